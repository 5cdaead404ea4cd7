"""The CUDA path gives the numbers the CPU path promises. Skipped, with the reason, without a GPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from quantlib.methods.bitsandbytes import quantize_4bit
from quantlib.registry import get_quantizer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible to torch")]

NF4_DQ = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
          "bnb_4bit_use_double_quant": True}


def test_factory_picks_cuda_and_says_why() -> None:
    quantizer = get_quantizer(NF4_DQ, device="auto")
    assert quantizer.backend.device == "cuda" and "CUDA" in quantizer.backend.reason
    assert quantizer.backend.device_name == torch.cuda.get_device_name(0)


# --- bitsandbytes' CUDA kernels, rule by rule (csrc/kernels.cu), as test oracles ------------------------------
# The CPU backend rounds to the nearest level (ties down); the CUDA kernels use decision trees with decimal
# thresholds. NF4's thresholds are exactly our fp32 midpoints, so NF4 codes agree for every input. FP4's differ
# from the midpoints by up to 14 ulp (0.00260417f; 0.583333f is 6 ulp off), and the sign of zero is flipped: the CPU gives (0, 0.0026] the
# code of -0 and (-0.0026, 0] the code of +0, CUDA the other way round (both mean 0).
NF4_CUDA_THRESHOLDS = torch.tensor([  # dQuantizeNF4: code = number of thresholds x exceeds
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544, -0.23460740596055984,
    -0.13791173323988914, -0.045525018125772476, 0.03979014977812767, 0.1202552504837513, 0.2035212516784668,
    0.2920137718319893, 0.3893125355243683, 0.5016634166240692, 0.6427869200706482, 0.8614784181118011])
FP4_CUDA_THRESHOLDS = torch.tensor([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333])
FP4_CUDA_RANK_CODE = torch.tensor([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011])  # dQuantizeFP4


def _cuda_rule_codes(w: torch.Tensor, quant_type: str, blocksize: int) -> torch.Tensor:
    """Unpacked 4-bit codes as kQuantizeBlockwise computes them: x * (1 / absmax) in fp32, then the tree."""
    flat = w.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # the kernel loads 0 past the end
    scaled = (blocks * (1.0 / blocks.abs().amax(1, keepdim=True))).reshape(-1)[: flat.numel()]
    if quant_type == "nf4":
        return torch.bucketize(scaled, NF4_CUDA_THRESHOLDS)  # count of thresholds strictly below x
    sign = (scaled < 0).long() * 0b1000
    return FP4_CUDA_RANK_CODE[torch.bucketize(scaled.abs(), FP4_CUDA_THRESHOLDS)] + sign


def _cuda_rule_dynamic(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """dQuantize<0>: binary search over the 256-entry map, then the nearer neighbour by fp32 midpoint."""
    pivot = torch.full(x.shape, 127, dtype=torch.long)
    upper_pivot, lower_pivot = torch.full_like(pivot, 255), torch.zeros_like(pivot)
    upper, lower = torch.ones_like(x), -torch.ones_like(x)
    val = code[pivot]
    step = 64
    while step:
        up = x > val
        lower_pivot, lower = torch.where(up, pivot, lower_pivot), torch.where(up, val, lower)
        upper_pivot, upper = torch.where(up, upper_pivot, pivot), torch.where(up, upper, val)
        pivot = pivot + torch.where(up, step, -step)
        val = code[pivot]
        step >>= 1
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    below = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(x > val, above, below).to(torch.uint8)


def _cuda_rule_blockwise(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    from quantlib.codebooks import dynamic_map

    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    scaled = (blocks * (1.0 / absmax).unsqueeze(1)).reshape(-1)[: flat.numel()]
    return _cuda_rule_dynamic(scaled, dynamic_map().float()), absmax


def _nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = packed.reshape(-1).long()
    return torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:n]


SHAPES = [(576, 576), (1536, 576), (100, 33)]
dq_steps: dict = {}  # (absmax codes one step from the reference's, of all)
at_ties: dict = {}  # (values within 2 ulp of a threshold, of which the kernel put on the other side)


def levels_of(q) -> torch.Tensor:
    return q.levels.float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_kernels_follow_their_rules_and_give_the_reference_values(quant_type, shape, dtype) -> None:
    torch.manual_seed(0)
    w = torch.randn(*shape).to(dtype)
    ref = quantize_4bit(w, quant_type, 64, False, backend="torch")
    cuda = quantize_4bit(w.cuda(), quant_type, 64, False, backend="bitsandbytes")
    assert torch.equal(cuda.absmax.cpu(), ref.absmax)
    got, ours = _nibbles(cuda.packed.cpu(), w.numel()), _nibbles(ref.packed, w.numel())
    # The kernel's 1.0f / absmax need not be IEEE (fast math): a scaled value within 2 ulp of a threshold may
    # fall on either side of it. Everywhere else the codes are the kernel's rules exactly.
    thresholds = NF4_CUDA_THRESHOLDS if quant_type == "nf4" else FP4_CUDA_THRESHOLDS
    scaled = (w.reshape(-1).float() * (1.0 / ref.absmax).repeat_interleave(64)[: w.numel()])
    near = ((scaled.abs() if quant_type == "fp4" else scaled).unsqueeze(1) - thresholds).abs() \
        <= 2 * torch.finfo(torch.float32).eps * thresholds.abs()
    near = near.any(1)
    rule = _cuda_rule_codes(w, quant_type, 64)
    assert torch.equal(got[~near], rule[~near])
    at_ties[quant_type, shape, dtype] = (int(near.sum()), int((got[near] != rule[near]).sum()))
    if quant_type == "nf4":
        assert torch.equal(got, ours)  # the same thresholds: bit-identical codes
    else:  # codes differ only for zero's sign bit or within a few ulp of a threshold
        moved = (levels_of(ref)[got] != levels_of(ref)[ours]).nonzero().view(-1)
        scaled = (w.reshape(-1).float() / ref.absmax.repeat_interleave(64)[: w.numel()])[moved].abs()
        assert ((scaled.unsqueeze(1) - FP4_CUDA_THRESHOLDS).abs().amin(1) < 1e-6).all()
    same = torch.ones(w.numel(), dtype=torch.bool)
    same[(levels_of(ref)[got] != levels_of(ref)[ours]).nonzero().view(-1)] = False
    assert torch.equal(cuda.dequantize().cpu().reshape(-1)[same], ref.dequantize().reshape(-1)[same])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_double_quant_follows_its_rules(quant_type, shape) -> None:
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float16)
    raw = quantize_4bit(w, quant_type, 64, False, backend="torch").absmax  # equal to CUDA's (test above)
    cuda = quantize_4bit(w.cuda(), quant_type, 64, True, backend="bitsandbytes")
    offset = cuda.dq.offset.float().cpu()
    assert abs(float(offset) - float(raw.double().mean())) <= 1e-6 * float(raw.max())  # the mean, summed otherwise
    codes, absmax2 = _cuda_rule_blockwise(raw - offset, 256)
    assert torch.equal(cuda.dq.absmax.cpu(), absmax2)
    assert torch.equal(cuda.dq.codes.cpu(), codes)
    # Our dequantization of the kernel's state is the kernel's dequantization, bit for bit.
    state = dataclasses.replace(cuda, packed=cuda.packed.cpu(), backend="torch",
                                dq=dataclasses.replace(cuda.dq, codes=cuda.dq.codes.cpu(),
                                                       absmax=cuda.dq.absmax.cpu(), offset=cuda.dq.offset.cpu()))
    assert torch.equal(state.dequantize(), cuda.dequantize().cpu())
    # Against the CPU reference (nearest code, ties down, its own mean) each block's absmax code is the same or a
    # neighbour of the 8-bit map: the kernel's binary search and its mean move a value across a midpoint only.
    ref = quantize_4bit(w, quant_type, 64, True, backend="torch")
    steps = (cuda.dq.codes.cpu().long() - ref.dq.codes.long()).abs()
    assert steps.max() <= 1
    dq_steps[quant_type, shape] = (int((steps > 0).sum()), steps.numel())


@pytest.mark.slow
def test_cuda_perplexity_agrees_with_cpu_within_one_percent(default_model) -> None:
    from quantlib.corpus import builtin_text
    from quantlib.evaluation import perplexity, tokenize_for_eval
    from quantlib.models import load_model

    ids = tokenize_for_eval(default_model.tokenizer, builtin_text("eval"), 1024)
    cpu = perplexity(default_model.model, ids, window=512)
    gpu_model = load_model("default", device="cuda")
    cuda = perplexity(gpu_model.model, ids, window=512)
    assert cuda.backend.startswith("cuda")
    assert abs(cuda.ppl / cpu.ppl - 1) < 0.01


# --- every screen's engine on a CUDA model: the tiny Llama, compared with the same run on the CPU ----------------
SMOKE_CONFIGS = [NF4_DQ,
                 {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
                 {"quant_method": "bitsandbytes", "load_in_8bit": True},
                 {"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 64},
                 {"quant_method": "gguf", "quant_type": "Q4_0"}]


def _comparison(folder, device: str, config: dict):
    from quantlib.compare import CompareSettings, run_comparison

    settings = CompareSettings(source=str(folder), max_tokens=256, window=64, device=device, baseline_cache=False)
    return run_comparison([config], settings, save=False).table.set_index("scheme")


def _inspection(folder, device: str):
    from quantlib.inspection import inspect_scheme
    from quantlib.models import load_model

    base = load_model(str(folder), device=device)
    result, _ = inspect_scheme(base, NF4_DQ, source=str(folder), device=device, tokens=256, window=64,
                               outlier_tokens=128)
    return result


def _layer_detail(folder, device: str):
    from quantlib.layers import layer_detail
    from quantlib.models import load_model

    base = load_model(str(folder), device=device)
    return layer_detail(base.model, get_quantizer(NF4_DQ, device=device), "model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("config", SMOKE_CONFIGS, ids=lambda c: json.dumps(c, sort_keys=True))
def test_cuda_comparison_agrees_with_the_cpu(tiny_llama_dir, config) -> None:
    cuda, cpu = _comparison(tiny_llama_dir, "cuda", config), _comparison(tiny_llama_dir, "cpu", config)
    assert list(cuda.index) == list(cpu.index)
    assert all("cuda" in str(b) for b in cuda["backend"])
    for scheme in cuda.index:
        assert cuda.loc[scheme, "perplexity"] == pytest.approx(cpu.loc[scheme, "perplexity"], rel=0.01)
        assert cuda.loc[scheme, "kl"] == pytest.approx(cpu.loc[scheme, "kl"], rel=0.05, abs=1e-5)
    assert cuda["memory_mib"].tolist() == pytest.approx(cpu["memory_mib"].tolist(), rel=0.02)


def test_cuda_inspection_and_layer_detail_run_and_agree_with_the_cpu(tiny_llama_dir) -> None:
    cuda, cpu = _inspection(tiny_llama_dir, "cuda"), _inspection(tiny_llama_dir, "cpu")
    assert "cuda" in str(cuda.backend)
    assert cuda.baseline.ppl == pytest.approx(cpu.baseline.ppl, rel=0.01)
    assert list(cuda.layers["layer"]) == list(cpu.layers["layer"])
    detail_cuda, detail_cpu = _layer_detail(tiny_llama_dir, "cuda"), _layer_detail(tiny_llama_dir, "cpu")
    # the same weights through the same reference, now computed on each device (issue 29): the codes are equal
    # (fp32 products and comparisons round the same everywhere), the metrics' dot products sum in another order
    assert detail_cuda["code_counts"] == detail_cpu["code_counts"]
    for key, value in detail_cpu["metrics"].items():
        assert detail_cuda["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-12), key


# --- issue 29: every scheme's tensor work on the device, equal to the CPU's -------------------------------------
DEVICE_PRESETS = ["nf4-dq", "fp4", "int8", "rtn-int4-g64", "rtn-int8", "gguf-q4_0", "gguf-q4_k_m", "hqq-int4-g64",
                  "torchao-int8", "quanto-int4", "fp8-block32", "ct-fp8-dynamic", "ct-nvfp4", "ct-mxfp4"]


def _errors_on(folder, device: str, name: str):
    from quantlib.layers import layer_errors
    from quantlib.models import load_model
    from quantlib.presets import preset
    from quantlib.transfers import HostTransfers

    base = load_model(str(folder), device=device)
    quantizer = get_quantizer(preset(name), device=device)
    with HostTransfers() as audit:
        qm = quantizer.quantize_model(base=base, source=str(folder))
        errors = layer_errors(base.model, quantizer, quantized=qm)
    return errors.set_index("layer"), audit


@pytest.mark.parametrize("name", DEVICE_PRESETS)
def test_cuda_layer_errors_are_computed_on_the_device_and_equal_the_cpu(tiny_llama_dir, name) -> None:
    cuda, audit = _errors_on(tiny_llama_dir, "cuda", name)
    cpu, _ = _errors_on(tiny_llama_dir, "cpu", name)
    assert list(cuda.index) == list(cpu.index)
    reads = [t for t in audit.transfers if t.call in ("cpu", "tolist")]
    assert len(reads) == (len(cuda) if name.startswith("gguf") else 0), reads
    assert cuda["bits_per_param"].tolist() == cpu["bits_per_param"].tolist()
    assert cuda["rel_fro_error"].tolist() == pytest.approx(cpu["rel_fro_error"].tolist(), rel=1e-4)


def test_cuda_sensitivity_runs_on_the_device_and_agrees_with_the_cpu(tiny_llama_dir) -> None:
    from quantlib.models import load_model
    from quantlib.recommend import measure_sensitivity

    rows = {}
    for device in ("cuda", "cpu"):
        base = load_model(str(tiny_llama_dir), device=device)
        rows[device] = measure_sensitivity(base, "bitsandbytes", calib_tokens=64, check_layers=0,
                                           use_cache=False, proxy="relative").rows
    # the relative output error does not depend on the sampled tokens (the Fisher proxy does)
    assert rows["cuda"]["error"].tolist() == pytest.approx(rows["cpu"]["error"].tolist(), rel=1e-3, abs=1e-9)
