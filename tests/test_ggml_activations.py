"""llama.cpp's activation quantization in its CPU matmul, as the GGUF method simulates it (`_ggml_activations`).

The references are the C functions themselves, written out plainly per block here: `quantize_row_q8_0` (x86 AVX
path: d = amax/127 in fp16, q = round-half-even(x * 127/amax)) and `quantize_row_q8_K_ref` (iscale = -127/max,
q = min(127, nearest_int(iscale*x)), d = 1/iscale in float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantlib.methods._ggml_activations import VEC_DOT_TYPE, quantize_activations


def _q8_0_by_block(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for s in range(0, len(x), 32):
        block = x[s:s + 32]
        amax = np.float32(np.abs(block).max())
        d = np.float32(amax / np.float32(127))
        inv = np.float32(127) / amax if amax != 0 else np.float32(0)
        q = np.round(block * inv)  # numpy rounds half to even
        out[s:s + 32] = q * np.float32(np.float16(d))
    return out


def _q8_K_by_block(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for s in range(0, len(x), 256):
        block = x[s:s + 256]
        amax, peak = np.float32(0), np.float32(0)
        for v in block:  # the C loop: strict >, the first of equal magnitudes
            if abs(v) > amax:
                amax, peak = abs(v), v
        if amax == 0:
            out[s:s + 256] = 0
            continue
        iscale = np.float32(-127) / peak
        q = np.minimum(127, np.round(iscale * block))
        out[s:s + 256] = q * (np.float32(1) / iscale)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_q8_0_and_q8_k_are_the_c_code_block_by_block(seed: int) -> None:
    g = np.random.default_rng(seed)
    x = (g.standard_t(3, 1024) * 0.3).astype(np.float32)
    x[:32] = 0.0  # a zero block
    x[300] = 9.0  # an outlier that sets its block's scale
    x[513], x[600] = -2.5, 2.5  # equal magnitudes: the first sets Q8_K's sign
    ours = quantize_activations(torch.from_numpy(x).reshape(2, 512), "Q8_0").reshape(-1).numpy()
    assert np.array_equal(ours, _q8_0_by_block(x))
    ours = quantize_activations(torch.from_numpy(x).reshape(2, 512), "Q8_K").reshape(-1).numpy()
    assert np.array_equal(ours, _q8_K_by_block(x))


def test_every_ported_weight_type_has_its_vec_dot_type() -> None:
    from quantlib.methods._gguf_tensor import GGUF_TYPES

    assert set(GGUF_TYPES) <= set(VEC_DOT_TYPE)
    assert VEC_DOT_TYPE["Q4_K"] == "Q8_K" and VEC_DOT_TYPE["Q4_1"] == "Q8_1" and VEC_DOT_TYPE["IQ4_NL"] == "Q8_0"


def test_the_floor_llama_cpp_adds_shows_in_a_comparison(tiny_llama_dir) -> None:
    """Q8_0 weights lose almost nothing; llama.cpp's Q8_0 activations add a floor of their own. The default config
    computes as llama.cpp does (its KL above the weights-only one, the same weight bytes); `activations: false`
    shows the weights' share alone."""
    from quantlib.compare import CompareSettings, run_comparison
    from quantlib.models import load_model

    base = load_model(str(tiny_llama_dir))
    settings = CompareSettings(source=str(tiny_llama_dir), max_tokens=256, window=64, device="cpu")
    result = run_comparison([{"quant_method": "gguf", "quant_type": "Q8_0"},
                             {"quant_method": "gguf", "quant_type": "Q8_0", "activations": False}],
                            settings, base=base, save=False)
    table = result.table.set_index("scheme")
    both, weights = table.loc["GGUF Q8_0", "kl"], table.loc["GGUF Q8_0, weights only", "kl"]
    assert both > 1.5 * weights > 0  # 1.8x on this tiny random model; on the default model see RESULTS.md
    assert table.loc["GGUF Q8_0", "memory_mib"] == table.loc["GGUF Q8_0, weights only", "memory_mib"]
    paths = result.details["GGUF Q8_0"]["kernel_path"]
    assert any("vec_dot_type" in p for p in paths)


def test_a_q4_1_layer_computes_llama_cpp_s_dot_product_with_its_fp16_block_sums() -> None:
    """vec_dot_q4_1_q8_1: sum over blocks of d_w * d_a * sum(q_w * q_a) + m_w * s_a, where s_a = fp16(d * sum(q_a))
    with d = amax / 127 unrounded (ggml-cpu's x86 quantize_row_q8_1). Written out per block in float64 here."""
    from quantlib.methods._ggml_activations import add_activation_quantization
    from quantlib.methods._gguf_tensor import quantize_gguf

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 64, generator=g) * 0.1 + 0.05
    packed = quantize_gguf(weight, "Q4_1")
    layer = torch.nn.Linear(64, 8, bias=False)
    layer.weight.data = packed.dequantize()
    x = torch.randn(3, 64, generator=g)
    handles = add_activation_quantization(torch.nn.Sequential(layer), {"0": packed})
    with torch.no_grad():
        ours = layer(x).double()
    for h in handles:
        h.remove()

    raw = packed.data.reshape(8, 2, 20)
    d_w = raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    m_w = raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    q_w = np.concatenate([raw[:, :, 4:] & 0x0F, raw[:, :, 4:] >> 4], axis=-1).astype(np.float64)  # (8, 2, 32)
    expected = np.zeros((3, 8))
    for t in range(3):
        for b in range(2):
            block = x[t, 32 * b:32 * (b + 1)].numpy()
            amax = np.float32(np.abs(block).max())
            d = np.float32(amax / np.float32(127))
            q_a = np.round(block * (np.float32(127) / amax)).astype(np.float64)
            s = float(np.float16(np.float32(d * np.float32(q_a.sum()))))
            expected[t] += d_w[:, b] * float(np.float16(d)) * (q_w[:, b] @ q_a) + m_w[:, b] * s
    assert np.allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-6)
    plain = (x @ packed.dequantize().T).double().numpy()
    assert np.abs(plain - expected).max() > 10 * np.abs(ours.numpy() - expected).max()  # the activations matter


def test_an_output_head_tied_to_the_quantized_embedding_gets_its_activations_quantized(tiny_tokenizer) -> None:
    """With tied embeddings llama.cpp's output matmul runs on the quantized token_embd, with its type's activation
    quantization; the head is not a packed layer of its own here, so the hook must find it by its weight."""
    from transformers import LlamaForCausalLM

    from quantlib.methods._ggml_activations import add_activation_quantization
    from quantlib.methods._gguf_tensor import quantize_gguf
    from tests.conftest import tiny_llama_config

    model = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer), tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    packed = quantize_gguf(model.model.embed_tokens.weight.detach(), "Q8_0")
    handles = add_activation_quantization(model, {"model.embed_tokens": packed})
    assert len(handles) == 1 and model.lm_head._forward_pre_hooks  # the head, not the lookup
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_0", "Q4_K"])
def test_layer_output_is_what_the_hooked_model_computes(qtype: str) -> None:
    """The recommender's per-layer figure (`layer_output`) and the quantized model (hooks) compute the same thing."""
    from quantlib.methods._ggml_activations import add_activation_quantization
    from quantlib.methods._gguf_tensor import quantize_gguf
    from quantlib.registry import get_quantizer, parse_config

    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 256, generator=g) * 0.1
    packed = quantize_gguf(weight, qtype)
    layer = torch.nn.Linear(256, 8, bias=False)
    layer.weight.data = packed.dequantize()
    x = torch.randn(5, 256, generator=g)
    add_activation_quantization(torch.nn.Sequential(layer), {"0": packed})
    with torch.no_grad():
        hooked = layer(x)
    quantizer = get_quantizer(parse_config({"quant_method": "gguf", "quant_type": qtype}), device="cpu")
    assert torch.equal(quantizer.layer_output(x, packed), hooked)
    weights_only = get_quantizer(parse_config({"quant_method": "gguf", "quant_type": qtype, "activations": False}),
                                 device="cpu")
    assert not torch.equal(weights_only.layer_output(x, packed), hooked)
