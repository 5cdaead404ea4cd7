"""transformers' fine-grained FP8 (FineGrainedFP8Config): the weights as transformers' own Fp8Quantize writes them,
checked against torch's float8 cast; the activations per token and group; the config and its shape refusals."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from quantlib.methods.base.records import ShapeError  # noqa: E402
from quantlib.registry import get_quantizer, parse_config, preflight  # noqa: E402


def _weight(rows: int = 128, cols: int = 192) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    w[:32, :32] = 0.0  # an all-zero block: transformers keeps its scale at 1
    w[40, 50] = 1e4
    return w


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_weights_are_the_float8_cast_of_each_block(scale_fmt: str) -> None:
    config = parse_config({"quant_method": "fp8", "weight_block_size": [32, 64], "scale_fmt": scale_fmt})
    w = _weight()
    packed = get_quantizer(config, device="cpu").quantize_tensor(w)
    inv = packed.weight_scale_inv.float()
    assert inv.shape == (4, 3)
    blocks = w.reshape(4, 32, 3, 64)
    amax = blocks.abs().amax((1, 3))
    if scale_fmt == "float":
        assert packed.weight_scale_inv.dtype == torch.float32
        expected_inv = torch.where(amax > 0, 1.0 / (448.0 / amax), torch.ones_like(amax))
        assert torch.equal(inv, expected_inv)
    else:  # a power of two at or above amax / 448, one byte
        assert packed.weight_scale_inv.element_size() == 1
        assert torch.equal(torch.log2(inv), torch.log2(inv).round())
        assert bool((inv[amax > 0] >= amax[amax > 0] / 448).all())
    full = (1.0 / inv).repeat_interleave(32, 0).repeat_interleave(64, 1)
    expected = (w * full).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(packed.weight.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(packed.dequantize(), expected.float() * inv.repeat_interleave(32, 0).repeat_interleave(64, 1))


def test_activations_are_quantized_per_token_and_group() -> None:
    config = parse_config({"quant_method": "fp8", "weight_block_size": [32, 64]})
    quantizer = get_quantizer(config, device="cpu")
    w = _weight()
    packed = quantizer.quantize_tensor(w)
    x = torch.randn(7, 192) * torch.logspace(-3, 3, 7).unsqueeze(1)
    groups = x.reshape(7, 3, 64)
    scale = groups.abs().amax(-1, keepdim=True) / 448.0
    xq = ((groups / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).reshape(7, 192)
    assert torch.equal(quantizer.layer_output(x, packed), xq @ packed.dequantize().t())
    weights_only = get_quantizer(config.replace(activations=False), device="cpu")
    assert not torch.equal(weights_only.layer_output(x, packed), quantizer.layer_output(x, packed))
    assert "activations" not in config.to_dict() and config.replace(activations=False).to_dict()["activations"] is False


def test_layers_that_are_no_whole_number_of_blocks_are_refused_with_the_reason(tiny_llama_dir) -> None:
    model_config = json.loads((tiny_llama_dir / "config.json").read_text())
    problems = preflight({"quant_method": "fp8"}, model_config)
    assert problems and "128 x 128 blocks" in problems[0] and "weight_block_size" in problems[0]
    quantizer = get_quantizer(parse_config({"quant_method": "fp8"}), device="cpu")
    with pytest.raises(ShapeError):
        quantizer.check_model_shapes(torch.nn.Sequential(torch.nn.Linear(576, 576)))


def test_static_activations_and_fp8_embeddings_are_refused_with_the_reason() -> None:
    from quantlib.memory import plan_memory

    for extra, word in (({"activation_scheme": "static"}, "activation_scale"), ({"modules_to_convert": ["x"]},
                                                                                "modules_to_convert")):
        with pytest.raises(Exception, match=word):
            plan_memory({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                         "num_attention_heads": 4, "vocab_size": 100}, parse_config({"quant_method": "fp8", **extra}))


@pytest.mark.parametrize("method, settings", [("fp8", {"weight_block_size": [32, 32]}), ("fp8", {}),
                                              ("fp8", {"weight_block_size": [32, 64], "scale_fmt": "ue8m0"}),
                                              ("fbgemm_fp8", {})])
def test_the_planner_counts_what_transformers_own_fp8_layers_hold(method: str, settings: dict) -> None:
    """transformers' FP8Linear / FbgemmFp8Linear, built on the meta device for a 192 x 576 layer: their parameters and
    buffers are what the planner counts for that layer."""
    from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear
    from transformers.integrations.finegrained_fp8 import FP8Linear

    from quantlib.registry import quantizer_class

    config = parse_config({"quant_method": method, **settings})
    with torch.device("meta"):
        if method == "fbgemm_fp8":
            layer = FbgemmFp8Linear(576, 192, False)
        else:
            hf = config.to_transformers()
            layer = FP8Linear(576, 192, block_size=hf.weight_block_size, scale_fmt=hf.scale_fmt)
    held = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    planned = quantizer_class(config).storage_bytes(config, 192, 576)
    assert sum(planned.values()) == held


def test_fbgemm_fp8_is_planned_and_refused_on_a_cpu_with_the_reason() -> None:
    from quantlib.errors import BackendUnavailableError

    config = parse_config({"quant_method": "fbgemm_fp8", "activation_scale_ub": 600.0})
    assert parse_config(config.to_transformers().to_dict()) == config
    with pytest.raises(BackendUnavailableError, match="fbgemm|GPU"):
        get_quantizer(config, device="cpu")


def test_transformers_nvfp4_is_planned_as_its_layers_hold_it_and_refused_on_a_cpu() -> None:
    """transformers' NVFP4Linear built on the meta device, its swizzled-scale shape given by the hub kernel's rule
    (vLLM's computeSwizzledSFShape: 128-row tiles, four E4M3 scales per int32; the kernel is not installable here).
    Its scale buffers and global scale, plus the packed uint8 weight NVFP4Quantize writes over the bf16 placeholder
    (out x in/2), are what the planner counts; a layer with a bias, or a width that is not a multiple of 16, stays
    as it is, as transformers' replace_with_nvfp4_linear leaves it."""
    from types import SimpleNamespace
    from unittest import mock

    from transformers.integrations import nvfp4 as hf_nvfp4

    from quantlib.errors import BackendUnavailableError
    from quantlib.registry import quantizer_class
    from quantlib.shapes import model_shapes

    config = parse_config({"quant_method": "nvfp4"})
    assert parse_config(config.to_transformers().to_dict()) == config
    kernel = SimpleNamespace(swizzled_sf_shape=lambda m, n: (-(-m // 128) * 128, -(-(n // 16) // 4) * 4 // 4))
    for out_features, in_features in ((192, 576), (1536, 576), (576, 1536), (64, 48)):
        with mock.patch.object(hf_nvfp4, "load_nvfp4_kernel", return_value=kernel), torch.device("meta"):
            layer = hf_nvfp4.NVFP4Linear(in_features, out_features)
        held = sum(b.numel() * b.element_size() for name, b in layer.named_buffers() if name != "weight")
        planned = quantizer_class(config).storage_bytes(config, out_features, in_features)
        assert sum(planned.values()) == held + out_features * in_features // 2
    shapes = model_shapes({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 200, "num_hidden_layers": 1,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100})
    decisions = quantizer_class(config).classify(config, shapes)
    assert "has a bias" in decisions["model.layers.0.self_attn.q_proj.weight"]  # Qwen2's q/k/v carry biases
    assert "multiple of 16" in decisions["model.layers.0.mlp.down_proj.weight"]  # 200 inputs
    assert decisions["model.layers.0.self_attn.o_proj.weight"] is None
    with pytest.raises(BackendUnavailableError, match="Blackwell|kernels"):
        get_quantizer(config, device="cpu")
