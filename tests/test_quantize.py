"""Tensor quantizers: the torch reference must equal bitsandbytes bit for bit; storage is honest."""

import math

import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlib.codebooks import dynamic_map
from quantlib.metrics import code_histogram, error_metrics
from quantlib.methods.bitsandbytes import (
    BLOCKSIZES_4BIT,
    dequantize_4bit,
    int8_decomposed_matmul,
    int8_vectorwise_quant,
    outlier_columns,
    quantize_4bit,
    quantize_blockwise_8bit,
    quantize_int8_weight,
)
from quantlib.methods.bitsandbytes.rounding import _bucket_table
from quantlib.methods._gguf_tensor import GGUF_QUANTIZABLE_TYPES, quantize_gguf
from quantlib.methods.rtn import quantize_rtn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (63,), (64,), (130,), (7, 33), (5, 96), (3, 100), (2, 3, 50), (128, 256)]


def _rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2.5).to(dtype)


def _assert_same_state(ours, theirs):
    assert torch.equal(ours.packed, theirs.packed)
    if ours.dq is None:
        assert ours.absmax.dtype == torch.float32
        assert torch.equal(ours.absmax, theirs.absmax)
    else:
        assert torch.equal(ours.dq.codes, theirs.dq.codes)
        assert torch.equal(ours.dq.absmax, theirs.dq.absmax)
        assert torch.equal(ours.dq.offset, theirs.dq.offset)


# ------------------------------------------------------------------ 4-bit: torch == bitsandbytes


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_reference_identical_to_bnb(quant_type, dtype, shape, double_quant):
    x = _rand(shape, dtype)
    for blocksize in (64, 256) if len(shape) > 1 else (32, 64, 4096):
        ours = quantize_4bit(x, quant_type, blocksize, double_quant, backend="torch")
        packed, state = bnbf.quantize_4bit(x.reshape(-1), blocksize=blocksize,
                                           compress_statistics=double_quant, quant_type=quant_type)
        assert torch.equal(ours.packed, packed)
        if double_quant:
            assert torch.equal(ours.dq.codes, state.absmax)
            assert torch.equal(ours.dq.absmax, state.state2.absmax)
            assert torch.equal(ours.dq.offset, state.offset)
        else:
            assert torch.equal(ours.absmax, state.absmax)
        theirs = quantize_4bit(x, quant_type, blocksize, double_quant, backend="bitsandbytes")
        _assert_same_state(ours, theirs)
        deq = ours.dequantize()
        assert deq.shape == x.shape and deq.dtype == dtype
        assert torch.equal(deq, bnbf.dequantize_4bit(packed, state).reshape(shape))
        assert torch.equal(deq, dequantize_4bit(ours, backend="bitsandbytes"))
        assert torch.equal(theirs.dequantize(), deq)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_ties_zeros_and_nonfinite_identical_to_bnb(quant_type):
    """Values exactly on / one ulp around every midpoint, zero blocks, a zero tail, inf and NaN."""
    mid, _ = _bucket_table(quant_type)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    vals = torch.cat([mid, torch.nextafter(mid, up), torch.nextafter(mid, down), torch.rand(20000) * 2 - 1])
    rows = -(-vals.numel() // 63)
    body = torch.nn.functional.pad(vals, (0, rows * 63 - vals.numel())).view(rows, 63)
    x = torch.cat([torch.ones(rows, 1), body], 1).reshape(-1)  # absmax exactly 1 per block
    x = torch.cat([x, torch.zeros(64), torch.tensor([1.0, float("inf"), 2.0]), torch.zeros(64),
                   torch.tensor([float("nan")]), torch.zeros(63), torch.zeros(5)])
    for scale in (1.0, 3.7, 1e-30, 1e-36):
        ours = quantize_4bit(x * scale, quant_type)
        packed, state = bnbf.quantize_4bit(x * scale, quant_type=quant_type)
        assert torch.equal(ours.packed, packed)
        assert torch.equal(ours.absmax.nan_to_num(), state.absmax.nan_to_num())


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 700), blocksize=st.sampled_from(BLOCKSIZES_4BIT[:4]),
       quant_type=st.sampled_from(["nf4", "fp4"]), scale=st.floats(1e-6, 1e4), seed=st.integers(0, 99))
def test_4bit_property_identical_to_bnb(n, blocksize, quant_type, scale, seed):
    x = _rand((n,), torch.float32, seed) * scale
    ours = quantize_4bit(x, quant_type, blocksize, double_quant=True)
    theirs = quantize_4bit(x, quant_type, blocksize, double_quant=True, backend="bitsandbytes")
    _assert_same_state(ours, theirs)
    assert ours.codes_unpacked().shape == (n,)


def test_4bit_layout_and_codes():
    x = torch.tensor([-1.0, 1.0, 0.0])  # odd length: one pad nibble
    q = quantize_4bit(x, "nf4", 64)
    assert q.packed.shape == (2, 1) and q.packed.dtype == torch.uint8
    assert q.packed.view(-1).tolist() == [(0 << 4) | 15, (7 << 4) | 7]  # first element = high nibble
    assert q.codes_unpacked().tolist() == [0, 15, 7]
    counts, entropy = code_histogram(q.codes_unpacked(), q.n_codes)
    assert counts.sum() == 3 and entropy == pytest.approx(math.log2(3))


def test_4bit_bits_per_param_equals_bnb_allocation():
    x = _rand((1024, 1024), torch.float16)
    packed, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    bnb_bytes = (packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
                 + state.state2.absmax.numel() * state.state2.absmax.element_size()
                 + state.offset.numel() * state.offset.element_size())
    q = quantize_4bit(x, "nf4", 64, double_quant=True)
    assert q.total_bits == 8 * bnb_bytes
    expected = 4 + 8 / 64 + 32 / (64 * 256) + 32 / x.numel()
    assert q.bits_per_param == pytest.approx(expected, rel=1e-12)
    assert q.bits_per_param == pytest.approx(4.127, abs=0.001)
    assert set(q.storage_bits) == {"codes", "absmax", "dq_absmax", "dq_offset"}
    plain = quantize_4bit(x, "nf4", 64)
    assert plain.bits_per_param == 4.5
    plain_bytes = packed.numel() + 4 * (x.numel() // 64)
    assert plain.total_bits == 8 * plain_bytes


def test_4bit_rejects_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.randn(64), quant_type="int4")
    with pytest.raises(ValueError, match="float"):
        quantize_4bit(torch.ones(64, dtype=torch.int32))


def test_bnb_cpu_2d_dequant_workaround_is_correct():
    """Our bitsandbytes path quantizes the flattened tensor; results are right for any shape."""
    for shape in [(5, 96), (3, 100), (6, 48), (2, 2, 50)]:
        x = _rand(shape, torch.float32)
        q = quantize_4bit(x, "nf4", 64, backend="bitsandbytes")
        ref = quantize_4bit(x, "nf4", 64, backend="torch").dequantize()
        assert torch.equal(q.dequantize(), ref)
        assert error_metrics(x, q.dequantize())["rel_fro_error"] < 0.15


# ------------------------------------------------------------------ blockwise 8-bit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 255, 256, 1000, 70000])
def test_blockwise_8bit_identical_to_bnb(dtype, n):
    x = (torch.randn(n) * torch.rand(n) * 5).to(dtype)
    if n > 600:
        x[256:512] = 0  # an all-zero block
    q = quantize_blockwise_8bit(x, 256)
    codes, state = bnbf.quantize_blockwise(x, blocksize=256)
    assert torch.equal(q.codes, codes.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    deq = q.dequantize()
    assert deq.dtype == dtype and torch.equal(deq, bnbf.dequantize_blockwise(codes, state))
    assert q.bits_per_param == pytest.approx((8 * n + 32 * math.ceil(n / 256)) / n)


def test_blockwise_8bit_uses_bnb_lut_not_exact_nearest():
    """bnb's CPU kernel rounds through a 65536-cell grid; we match it, not exact nearest."""
    code = dynamic_map()
    x = torch.linspace(-1, 1, 256 * 4000).view(-1, 256)
    x[:, 0] = 1.0
    q = quantize_blockwise_8bit(x.reshape(-1), 256)
    codes, _ = bnbf.quantize_blockwise(x.reshape(-1), blocksize=256)
    assert torch.equal(q.codes, codes)
    exact = torch.bucketize(x.reshape(-1), (code[:-1] + code[1:]) / 2).to(torch.uint8)
    assert (exact != codes).any()  # documents the quirk; would flip if bnb switched to exact


# ------------------------------------------------------------------ LLM.int8()


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_vectorwise_identical_to_bnb(dtype):
    w = _rand((64, 200), dtype)
    codes, scales = int8_vectorwise_quant(w)
    theirs, their_scales, _ = bnbf.int8_vectorwise_quant(w.clone())
    assert torch.equal(codes, theirs) and torch.equal(scales, their_scales)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32


def test_int8_weight_storage_and_error():
    w = _rand((32, 256), torch.float32)
    q = quantize_int8_weight(w)
    assert q.bits_per_param == pytest.approx(8 + 32 / 256)
    err = (q.dequantize() - w).abs()
    assert torch.all(err <= (w.abs().amax(dim=1, keepdim=True) / 127) / 2 + 1e-6)
    assert q.codes_unpacked().min() >= 1 and q.codes_unpacked().max() <= 255


def test_outlier_columns():
    x = torch.zeros(4, 10)
    x[2, 3] = 6.0
    x[0, 7] = -9.0
    x[1, 1] = 5.99
    assert outlier_columns(x, 6.0).tolist() == [3, 7]


@pytest.mark.parametrize("threshold", [0.0, 1.5, 6.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_decomposed_matmul_is_bitsandbytes_linear8bitlt_bit_for_bit(tiny_llama_dir, threshold, dtype):
    """Every Linear8bitLt of a model transformers loaded with LLM.int8() computes exactly what our
    vectorized mirror computes from the original weights: same casts, outlier columns, accumulation."""
    from quantlib.registry import quantize_model
    from quantlib.models import load_model

    base = load_model(str(tiny_llama_dir))
    qm = quantize_model({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": threshold},
                        source=str(tiny_llama_dir), device="cpu")
    base_modules = dict(base.model.named_modules())
    torch.manual_seed(3)
    checked = 0
    for name, module in qm.model.named_modules():
        if type(module).__name__ != "Linear8bitLt":
            continue
        x = torch.randn(2, 7, module.in_features) * 2
        x[:, :, [3, 11]] = 9.0  # outlier features (columns) above every threshold used here
        x[0, 2, 20] = -7.5  # and a lone outlier element
        x = x.to(dtype)
        with torch.no_grad():
            theirs = module(x)
        ours = int8_decomposed_matmul(x, base_modules[name].weight.data, threshold=threshold)
        assert ours.dtype == theirs.dtype == dtype
        assert torch.equal(ours, theirs), (name, (ours.float() - theirs.float()).abs().max())
        checked += 1
    assert checked == 14


def test_int8_decomposed_matmul_close_and_beats_int8_with_outliers():
    torch.manual_seed(0)
    x = torch.randn(16, 512)
    w = torch.randn(256, 512) * 0.05
    exact = x @ w.T
    plain = int8_decomposed_matmul(x, w, threshold=float("inf"))
    assert error_metrics(exact, plain)["rel_fro_error"] < 0.02
    x[:, [5, 77, 300]] = 60.0 * torch.sign(torch.randn(16, 3))  # LLM.int8()-style outlier features
    exact = x @ w.T
    mixed = int8_decomposed_matmul(x, w, threshold=6.0)
    plain = int8_decomposed_matmul(x, w, threshold=float("inf"))
    e_mixed = error_metrics(exact, mixed)["rel_fro_error"]
    e_plain = error_metrics(exact, plain)["rel_fro_error"]
    assert e_mixed < 0.02 and e_mixed < e_plain / 3
    assert int8_decomposed_matmul(x.half(), w.half()).dtype == torch.float16


# ------------------------------------------------------------------ RTN


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_bound_and_storage(bits, granularity, symmetric):
    w = _rand((24, 256), torch.float32) + (0.0 if symmetric else 0.7)
    q = quantize_rtn(w, bits, granularity, group_size=64, symmetric=symmetric)
    deq = q.dequantize()
    assert deq.shape == w.shape and deq.dtype == w.dtype
    units = {"tensor": 1, "channel": 24, "group": 24 * 4}[granularity]
    assert q.scale.dtype == torch.float16 and q.scale.numel() == units
    err = (deq - w).reshape(units, -1).abs().amax(dim=1)
    assert torch.all(err <= q.scale.float() / 2 * (1 + 1e-5) + 1e-7)
    codes = q.codes_unpacked()
    assert codes.min() >= 0 and codes.max() < 2**bits
    zero_bits = 0 if symmetric else bits * units
    assert q.total_bits == bits * w.numel() + 16 * units + zero_bits


def test_rtn_levels_and_exact_zero():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 0.25]])
    q = quantize_rtn(w, 4, "tensor")
    assert q.codes.min() >= -7 and q.codes.max() == 7
    assert q.dequantize()[0, 2] == 0.0
    qa = quantize_rtn(w + 2.0, 4, "tensor", symmetric=False)
    assert qa.codes.max() <= 15 and qa.zero is not None


def test_rtn_group_size_must_divide():
    with pytest.raises(ValueError, match=r"group_size 96 does not divide the last dimension 256"):
        quantize_rtn(torch.randn(4, 256), 4, "group", group_size=96)
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(torch.randn(4, 256), 9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rtn_dtypes_and_1d(dtype):
    w = _rand((300,), dtype)
    q = quantize_rtn(w, 8, "channel")
    assert q.dequantize().dtype == dtype
    assert error_metrics(w, q.dequantize())["sqnr_db"] > 35


# ------------------------------------------------------------------ GGUF


def test_gguf_quantizable_types_probe():
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"} <= set(GGUF_QUANTIZABLE_TYPES)
    assert "Q4_K" not in GGUF_QUANTIZABLE_TYPES  # needs llama.cpp's C code


@pytest.mark.parametrize("qtype", GGUF_QUANTIZABLE_TYPES)
def test_gguf_round_trip_and_storage(qtype):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    w = _rand((8, 512), torch.float32)
    q = quantize_gguf(w, qtype)
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    assert q.bits_per_param == pytest.approx(nbytes * 8 / block)
    deq = q.dequantize()
    assert deq.shape == w.shape and deq.dtype == w.dtype
    blocks = w.reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    span = blocks.amax(dim=1, keepdim=True) - blocks.amin(dim=1, keepdim=True)
    # ggml's documented grids: _0 types put the signed extreme at -2**(b-1) (so the other side
    # can be one step short), _1 types spread min..max over 2**b - 1 steps, Q8_0 absmax/127.
    bound = {"Q8_0": amax / 127 / 2, "Q4_0": amax / 8, "Q5_0": amax / 16,
             "Q4_1": span / 15 / 2, "Q5_1": span / 31 / 2}.get(qtype)
    if bound is not None:
        err = (deq - w).reshape(-1, 32).abs()
        assert torch.all(err <= bound * 1.01 + 1e-3 * amax)
    if qtype in ("Q8_0", "Q4_0", "Q4_1", "MXFP4"):
        codes = q.codes_unpacked()
        assert codes.shape == (w.numel(),) and codes.max() < q.n_codes


def test_gguf_q8_0_codes_match_dequantized_values():
    w = _rand((2, 64), torch.float32)
    q = quantize_gguf(w, "Q8_0")
    d = torch.from_numpy(q.data.reshape(-1, 34)[:, :2].copy().view(np.float16).astype(np.float32))
    codes = q.codes_unpacked().view(-1, 32).float() - 128
    assert torch.allclose(codes * d, q.dequantize().view(-1, 32))


def test_gguf_errors():
    with pytest.raises(ValueError, match="multiple of its block size 32"):
        quantize_gguf(torch.randn(4, 100), "Q4_0")
    with pytest.raises(ValueError, match="cannot be quantized"):
        quantize_gguf(torch.randn(4, 256), "Q1_0")  # a GGML type neither the gguf package nor quantlib quantizes
    with pytest.raises(ValueError, match="IQ2_XXS needs an importance matrix"):
        quantize_gguf(torch.randn(4, 256), "IQ2_XXS")  # as ggml asserts one
    with pytest.raises(ValueError, match="multiple of its block size 256"):
        quantize_gguf(torch.randn(4, 576), "Q4_K")
    assert quantize_gguf(torch.randn(64).bfloat16(), "Q8_0").dequantize().dtype == torch.bfloat16


#: Bits per weight of each GGML type as llama.cpp documents them (block bytes x 8 / block size).
GGUF_PUBLISHED_BPW = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q5_1": 6.0, "Q5_0": 5.5, "Q4_1": 5.0,
                      "Q4_0": 4.5, "MXFP4": 4.25, "TQ2_0": 2.0625, "TQ1_0": 1.6875}


@pytest.mark.parametrize("qtype", GGUF_QUANTIZABLE_TYPES)
def test_gguf_storage_is_the_published_bits_per_weight(qtype):
    w = _rand((4, 256), torch.float32)
    q = quantize_gguf(w, qtype)
    assert q.bits_per_param == GGUF_PUBLISHED_BPW[qtype]
    assert q.total_bits == 8 * q.data.nbytes == GGUF_PUBLISHED_BPW[qtype] * w.numel()


@pytest.mark.parametrize("qtype, rel_bound", [("F32", 0.0), ("F16", 2**-11), ("BF16", 2**-8)])
def test_gguf_float_types_round_each_value_once(qtype, rel_bound):
    w = _rand((4, 256), torch.float32)
    deq = quantize_gguf(w, qtype).dequantize()
    assert torch.all((deq - w).abs() <= rel_bound * w.abs())


@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0"])
def test_gguf_ternary_types_hold_three_levels_per_block(qtype):
    w = _rand((2, 512), torch.float32)
    deq = quantize_gguf(w, qtype).dequantize().reshape(-1, 256)
    for block in deq:
        assert len(torch.unique(block.abs())) <= 2  # {0, d}: values are -d, 0 or +d


def test_gguf_q4_0_values_rebuilt_from_its_bytes():
    """llama.cpp's block_q4_0: fp16 scale d, then 16 bytes; element j is (low nibble j - 8) * d and
    element j + 16 is (high nibble j - 8) * d. Decoded here from the raw bytes, independently."""
    w = _rand((3, 64), torch.float32)
    q = quantize_gguf(w, "Q4_0")
    blocks = q.data.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    qs = blocks[:, 2:].astype(np.int32)
    values = np.concatenate([(qs & 0xF) - 8, (qs >> 4) - 8], axis=1) * d
    assert np.array_equal(values.reshape(3, 64), q.dequantize().numpy())
    assert error_metrics(w, q.dequantize())["rel_fro_error"] < 0.13
