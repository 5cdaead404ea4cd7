"""compressed-tensors' schemes (FP8, NVFP4, MXFP4, MXFP8, int): bit identity against references nobody here wrote
(torchao's prototype.mx_formats, torch's float8_e4m3fn cast, compressed-tensors' own forward pass), the config as
transformers and compressed-tensors read it, and the planner against what compressed-tensors' compressor stores."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("compressed_tensors")
warnings.filterwarnings("ignore", message=".*register_constant.*")

from quantlib.errors import ConfigError  # noqa: E402
from quantlib.methods._ct_formats import quantize_ct, quantize_input, scheme_of  # noqa: E402
from quantlib.registry import get_quantizer, parse_config  # noqa: E402


def _weights(dtype: torch.dtype, rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Seeded rows of several scales, then the edge rows: zeros, float32 subnormals, a block past E4M3's largest
    value, an outlier beside small values, and a block whose largest magnitude is exactly 1.75 x 2^k."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    w[0] = 0.0
    w[1, :32] = 1e-40  # subnormal in float32 (flushed to zero where bf16 cannot hold it)
    w[2, :32] = torch.linspace(-3e4, 3e4, 32)
    w[3, 5] = 500.0
    w[4, :32] = torch.linspace(-0.2, 0.2, 32)
    w[4, 7] = 1.75 * 2.0 ** -3
    return w.to(dtype)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_is_torchao_to_mx_with_even_rounding(dtype: torch.dtype) -> None:
    from torchao.prototype.mx_formats.mx_tensor import ScaleCalculationMode, to_mx

    w = _weights(dtype)
    packed = quantize_ct(w, "MXFP4A16")
    scale, data = to_mx(w.contiguous(), torch.float4_e2m1fn_x2, 32, scaling_mode=ScaleCalculationMode.EVEN)
    assert torch.equal(packed.stored["weight_scale"], scale.view(torch.uint8))
    assert torch.equal(packed.stored["weight_packed"], data.view(torch.uint8))
    # and not torchao's default (OCP's floor), which a careless port would have matched instead
    floor, _ = to_mx(w.contiguous(), torch.float4_e2m1fn_x2, 32, scaling_mode=ScaleCalculationMode.FLOOR)
    assert not torch.equal(packed.stored["weight_scale"], floor.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp8_is_torchao_rceil_except_at_a_block_max_of_exactly_1_75(dtype: torch.dtype) -> None:
    """compressed-tensors rounds MXFP8's block max up to the next power of two from a mantissa of 1.75 on (it uses
    E2M1's mantissa width for every MX type); torchao's RCEIL rounds up only past it. They differ exactly there."""
    from torchao.prototype.mx_formats.mx_tensor import ScaleCalculationMode, to_mx

    w = _weights(dtype)
    packed = quantize_ct(w, "MXFP8A16")
    scale, data = to_mx(w.contiguous(), torch.float8_e4m3fn, 32, scaling_mode=ScaleCalculationMode.RCEIL)
    ours, theirs = packed.stored["weight_scale"].int(), scale.view(torch.uint8).int()
    amax = w.float().unflatten(-1, (-1, 32)).abs().amax(-1)
    mantissa, _ = torch.frexp(amax)
    at_tie = (mantissa == 0.875) & (amax > 0)
    assert at_tie.any()  # the edge row holds one
    assert torch.equal(ours[~at_tie], theirs[~at_tie])
    assert torch.equal(ours[at_tie], theirs[at_tie] + 1)
    # the codes: the same wherever the scales agree, except in a block whose largest magnitude is a float32
    # subnormal: there torchao divides by the smallest normal float32 (2^-126) instead of the E8M0 scale 2^-127
    codes = packed.stored["weight"].view(torch.uint8).unflatten(-1, (-1, 32))
    reference = data.view(torch.uint8).unflatten(-1, (-1, 32))
    subnormal = (amax > 0) & (amax < torch.finfo(torch.float32).tiny)
    same = ~at_tie & ~subnormal
    assert torch.equal(codes[same], reference[same])
    if dtype == torch.float32:
        assert subnormal.any() and not torch.equal(codes[subnormal], reference[subnormal])


def test_nvfp4_is_torchao_nvfp4_quantize_where_no_block_scale_underflows() -> None:
    """Same global scale (448 x 6 / amax), same E4M3 block scales, same E2M1 codes. Where a block's scale rounds to
    zero in E4M3 the two libraries part: compressed-tensors stores E4M3's 0.125 instead, torchao its smallest
    subnormal; both decode such a block to (nearly) zero."""
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

    w = _weights(torch.float32)
    w[2] = w[5]  # no block past the global range here: its 3e4 would underflow every other block
    packed = quantize_ct(w, "NVFP4A16")
    per_tensor = per_tensor_amax_to_scale(w.abs().amax())
    assert torch.allclose(packed.stored["weight_global_scale"], 1 / per_tensor, rtol=1e-7)
    scale, data = nvfp4_quantize(w.contiguous(), 16, per_tensor)
    ours = packed.stored["weight_scale"].view(torch.uint8)
    tiny = (w.abs().unflatten(-1, (-1, 16)).amax(-1) / 6 * packed.stored["weight_global_scale"]) < 2.0 ** -10
    assert torch.equal(ours[~tiny], scale.view(torch.uint8)[~tiny])
    rows = ~tiny.any(-1)
    assert rows.sum() >= w.shape[0] - 3
    assert torch.equal(packed.stored["weight_packed"][rows], data.view(torch.uint8)[rows])
    assert packed.dequantize()[0].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "FP8_BLOCK", "FP8"])
def test_fp8_codes_are_torchs_float8_cast(dtype: torch.dtype, scheme: str) -> None:
    w = _weights(dtype, rows=200, cols=300)  # not a multiple of 128: FP8_BLOCK pads its last blocks with zeros
    packed = quantize_ct(w, scheme)
    scale = packed.stored["weight_scale"]
    if scheme == "FP8_BLOCK":
        assert scale.shape == (2, 3)
        scale = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    expected = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(packed.stored["weight"].view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(packed.dequantize(), (expected.to(scale.dtype) * scale).to(dtype))


@pytest.mark.parametrize("scheme,bits", [("W4A16", 4), ("W8A16", 8), ("W8A8", 8)])
def test_integer_codes_round_half_to_even_within_the_range(scheme: str, bits: int) -> None:
    w = _weights(torch.float32)
    packed = quantize_ct(w, scheme, group_size=64 if scheme != "W8A8" else None)
    scale = packed.stored["weight_scale"]
    units = w.unflatten(-1, (-1, 64)) if scheme != "W8A8" else w.unsqueeze(1)
    q = torch.round(units / scale.unsqueeze(-1)).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert torch.equal(packed.codes_unpacked(), (q.reshape(-1) + 2 ** (bits - 1)).long())
    assert torch.equal(packed.dequantize(), (q * scale.unsqueeze(-1)).reshape(w.shape))


@pytest.mark.parametrize("scheme", ["NVFP4", "MXFP4", "MXFP8", "FP8_DYNAMIC", "FP8_BLOCK", "FP8", "W8A8"])
def test_layer_output_is_compressed_tensors_own_forward(scheme: str) -> None:
    """The quantized layer computes what compressed-tensors' own quantized forward computes: its
    `apply_quantization_config` on a model, the layer's parameters set to ours, `forward_quantize` on the input."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 96, bias=False)
    x = torch.randn(2, 5, 256) * 3
    packed = quantize_ct(linear.weight.data, scheme,
                         input_param=None if scheme not in ("NVFP4", "FP8") else torch.tensor([0.37]))
    model = torch.nn.Sequential(linear)
    config = QuantizationConfig(config_groups={"group_0": scheme_of(scheme).model_copy(deep=True)},
                                quantization_status="frozen")
    apply_quantization_config(model, config)
    module = model[0]
    with torch.no_grad():
        module.weight.data = packed.dequantize()
        for key in ("weight_scale", "weight_global_scale"):
            if key in packed.stored:
                getattr(module, key).data = packed.stored[key].to(getattr(module, key).dtype).reshape(
                    getattr(module, key).shape)
        if scheme == "NVFP4":
            module.input_global_scale.data = packed.input_param.reshape(module.input_global_scale.shape)
        if scheme == "FP8":
            module.input_scale.data = packed.input_param.reshape(module.input_scale.shape)
            module.input_zero_point.data.zero_()
        module.quantization_status = QuantizationStatus.COMPRESSED  # the weight is already what the file holds
        theirs = module(x)
    quantizer = get_quantizer(parse_config({"quant_method": "compressed-tensors", "scheme": scheme}), device="cpu")
    ours = quantizer.layer_output(x, packed)
    assert torch.equal(ours, theirs)
    # and the input really is quantized (the weights-only figure differs)
    assert not torch.equal(quantize_input(x, scheme, packed.input_param), x)


# ---------------------------------------------------------------------------- the config


def _llm_compressor_fp8_dynamic() -> dict:
    """The quantization_config of a llm-compressor FP8-dynamic checkpoint (as RedHatAI's *-FP8-dynamic carry)."""
    return {"config_groups": {"group_0": {
        "input_activations": {"actorder": None, "block_structure": None, "dynamic": True, "group_size": None,
                              "num_bits": 8, "observer": None, "observer_kwargs": {}, "strategy": "token",
                              "symmetric": True, "type": "float"},
        "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": "channel", "symmetric": True,
                    "type": "float"}}},
        "format": "float-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": "0.10.3.dev47"}


def test_a_llm_compressor_checkpoint_config_parses_and_is_planned() -> None:
    from quantlib.memory import stored_quantization

    saved = _llm_compressor_fp8_dynamic()
    config, why = stored_quantization({"model_type": "llama", "quantization_config": saved})
    assert why is None
    assert config.scheme == "FP8_DYNAMIC" and config.ignore == ["lm_head"]


def test_unmodelled_groups_and_keys_are_refused_by_name() -> None:
    saved = _llm_compressor_fp8_dynamic()
    saved["config_groups"]["group_0"]["weights"]["num_bits"] = 6
    with pytest.raises(ConfigError, match="config_groups.group_0"):
        parse_config(saved)
    saved = _llm_compressor_fp8_dynamic()
    saved["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor"}
    with pytest.raises(ConfigError, match="kv_cache_scheme"):
        parse_config(saved)
    with pytest.raises(ConfigError, match="group_size"):
        parse_config({"quant_method": "compressed-tensors", "scheme": "NVFP4", "group_size": 32})


def test_a_per_layer_mix_is_one_config_that_transformers_and_compressed_tensors_load() -> None:
    from compressed_tensors.quantization import QuantizationConfig

    mix = {"model.layers.0.mlp.down_proj": "FP8_DYNAMIC", "model.layers.1.self_attn.q_proj": "W8A16"}
    config = parse_config({"quant_method": "compressed-tensors", "scheme": "NVFP4", "module_schemes": mix,
                           "ignore": ["lm_head", "re:.*embed.*"]})
    saved = config.to_dict()
    assert saved["format"] == "mixed-precision"
    assert {tuple(g["targets"]) for g in saved["config_groups"].values()} == {
        ("Linear",), ("model.layers.0.mlp.down_proj",), ("model.layers.1.self_attn.q_proj",)}
    loaded = QuantizationConfig.model_validate({k: v for k, v in saved.items() if k != "quant_method"})
    assert len(loaded.config_groups) == 3
    assert parse_config(config.to_transformers().to_dict()) == config
    assert parse_config(json.dumps(saved)) == config


def test_the_planner_follows_the_per_layer_schemes(tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    from quantlib.layers import simulate_quantization
    from quantlib.memory import plan_memory

    mix = {"model.layers.0.mlp.down_proj": "FP8_BLOCK", "model.layers.1.self_attn.q_proj": "MXFP8"}
    config = parse_config({"quant_method": "compressed-tensors", "scheme": "NVFP4", "module_schemes": mix})
    model_config = json.loads((tiny_llama_dir / "config.json").read_text())
    planned = plan_memory(model_config, config, "float32")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    quantizer = get_quantizer(config, device="cpu")
    measured = simulate_quantization(base, quantizer)
    for component, nbytes in measured.bytes_by_component.items():
        assert planned.bytes_by_component[component] == nbytes, component


def test_nvfp4_fused_matrices_share_the_smallest_global_scale(tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    quantizer = get_quantizer(parse_config({"quant_method": "compressed-tensors", "scheme": "NVFP4A16"}), device="cpu")
    quantizer.quantizable_layers(base)
    scales = quantizer.global_scales
    attn = [scales[f"model.layers.0.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")]
    own = [quantize_ct(getattr(base.model.layers[0].self_attn, p).weight.data, "NVFP4A16")
           .stored["weight_global_scale"] for p in ("q_proj", "k_proj", "v_proj")]
    assert all(torch.equal(a, torch.min(torch.cat(own)).reshape(1)) for a in attn)
    assert len({float(v) for v in own}) > 1  # the random matrices really differ
    o_proj = quantize_ct(base.model.layers[0].self_attn.o_proj.weight.data, "NVFP4A16").stored["weight_global_scale"]
    assert torch.equal(scales["model.layers.0.self_attn.o_proj"], o_proj)  # not fused


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "W8A8", "MXFP4", "NVFP4"])
def test_a_row_of_tokens_is_quantized_per_token_as_in_the_model(scheme: str) -> None:
    """The recommender hands layers (tokens, features): each token keeps its own dynamic scale, as in the model's
    (batch, seq, features) forward (compressed-tensors alone would read a 2-D input as one tensor)."""
    torch.manual_seed(2)
    x = torch.randn(6, 64) * torch.logspace(-2, 2, 6).unsqueeze(1)
    param = torch.tensor([0.5]) if scheme == "NVFP4" else None
    flat = quantize_input(x, scheme, param)
    assert torch.equal(flat, quantize_input(x.unsqueeze(0), scheme, param).squeeze(0))
    assert torch.equal(flat[0], quantize_input(x[:1].unsqueeze(0), scheme, param)[0, 0])


@pytest.mark.parametrize("scheme", sorted(__import__("quantlib.methods._ct_formats", fromlist=["SCHEMES"]).SCHEMES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planned_bytes_are_what_the_compressor_stores_for_every_scheme(scheme: str, dtype: str, tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    from quantlib.layers import simulate_quantization
    from quantlib.memory import plan_memory

    config = parse_config({"quant_method": "compressed-tensors", "scheme": scheme,
                           **({"group_size": 32} if scheme in ("W4A16", "W8A16") else {}),
                           # its 128-wide input groups do not fit the tiny model (refused); the bytes are the weights'
                           **({"activations": False} if scheme == "FP8_BLOCK" else {})})
    model_config = json.loads((tiny_llama_dir / "config.json").read_text())
    planned = plan_memory(model_config, config, dtype)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=getattr(torch, dtype))
    measured = simulate_quantization(base, get_quantizer(config, device="cpu"))
    for component, nbytes in measured.bytes_by_component.items():
        assert planned.bytes_by_component[component] == nbytes, (component, planned.bytes_by_component, nbytes)
