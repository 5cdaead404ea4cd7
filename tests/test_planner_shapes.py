"""The planner against reality: every causal LM transformers builds, MoE and Conv1D models quantized for
real, KV cache against published figures, bad configs refused with a message."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2MoeConfig,
)

from quantlib import parse_config
from quantlib.layers import simulate_quantization
from quantlib.registry import preflight
from quantlib.memory import plan_memory, plan_table, stored_quantization
from quantlib.footprint import measure_footprint
from quantlib.presets import PRESETS, preset
from quantlib.registry import get_quantizer
from quantlib.shapes import ArchitectureError, forward_memory, model_shapes

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=320, max_position_embeddings=256)


def _tiny_configs():
    return {
        "llama-tied": LlamaConfig(**SMALL, tie_word_embeddings=True),
        "llama-untied": LlamaConfig(**SMALL, tie_word_embeddings=False),
        "mixtral": MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
        "qwen2-moe": Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                    shared_expert_intermediate_size=128),
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=128),
    }


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    folders = {}
    for name, cfg in _tiny_configs().items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, safe_serialization=True)
        folders[name] = folder
    return folders


def _config_dict(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


# ---------------------------------------------------------------------------- every architecture


def _causal_lm_mapping():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return list(MODEL_FOR_CAUSAL_LM_MAPPING.items())


def test_unquantized_plan_equals_meta_parameter_bytes_for_every_causal_lm() -> None:
    """Over the whole MODEL_FOR_CAUSAL_LM_MAPPING: planned fp32 total == the bytes of every parameter
    (tied once) and buffer of the model transformers builds on the meta device, built here on its own."""
    built = refused = 0
    mismatches, crashes = [], []
    for config_cls, model_cls in _causal_lm_mapping():
        try:
            config = config_cls()
        except Exception:  # noqa: BLE001 - transformers' own defaults fail its own validation
            continue
        try:
            with torch.device("meta"):
                model = model_cls._from_config(config)
            model.tie_weights()
        except Exception:  # noqa: BLE001 - transformers itself cannot build it from defaults here
            try:
                plan_memory(config.to_dict(), None, "float32")
            except ArchitectureError as exc:
                assert config_cls.model_type in str(exc) or "config" in str(exc), str(exc)
                refused += 1
            except Exception as exc:  # noqa: BLE001
                crashes.append(f"{config_cls.__name__}: {type(exc).__name__}: {exc}")
            continue
        expected = sum(p.numel() * p.element_size() for p in model.parameters())
        expected += sum(b.numel() * b.element_size() for b in model.buffers())
        n_params = sum(p.numel() for p in model.parameters())
        plan = plan_memory(config.to_dict(), None, "float32")
        built += 1
        if plan.total_bytes != expected or plan.total_params != n_params:
            mismatches.append(f"{config_cls.__name__}: planned {plan.total_bytes} vs {expected}")
    assert not mismatches, mismatches
    assert not crashes, crashes
    assert built >= 150, built  # transformers 5.23 builds 168 of its causal LMs from their defaults here


@pytest.mark.parametrize("config_cls, expected_params", [
    (MixtralConfig, 46_702_792_704),  # Mixtral 8x7B: 46.7B, experts included
    (GPT2Config, 124_439_808),  # GPT-2 small: 124M with the head tied to wte
])
def test_parameter_counts_of_published_models(config_cls, expected_params: int) -> None:
    assert model_shapes(config_cls().to_dict()).n_params == expected_params


def test_moe_experts_and_routers_are_found() -> None:
    shapes = model_shapes(_tiny_configs()["mixtral"].to_dict())
    experts = [w for w in shapes.weights if w.kind == "experts"]
    assert {w.name.rsplit(".", 1)[1] for w in experts} == {"gate_up_proj", "down_proj"}
    gate_up = shapes.weight("model.layers.0.mlp.experts.gate_up_proj")
    assert (gate_up.n_matrices, gate_up.out_features, gate_up.in_features) == (4, 256, 64)
    assert [w.role for w in shapes.weights if w.module == "model.layers.0.mlp.gate"] == ["router"]
    assert shapes.n_experts == 4


def test_gpt2_conv1d_is_read_as_out_by_in() -> None:
    shapes = model_shapes(_tiny_configs()["gpt2"].to_dict())
    c_fc = shapes.weight("transformer.h.0.mlp.c_fc.weight")
    assert c_fc.kind == "conv1d" and c_fc.shape == (64, 256)
    assert (c_fc.out_features, c_fc.in_features) == (256, 64)
    assert shapes.tied == (("lm_head.weight", "transformer.wte.weight"),)


# ---------------------------------------------------------------------------- planned == measured


BNB = ["nf4", "nf4-dq", "int8"]
SIMULATED = ["rtn-int4-g64-asym", "rtn-int8", "gguf-q4_0", "gguf-q8_0"]
BNB_SKIP = {**PRESETS["nf4-dq"], "llm_int8_skip_modules": ["down_proj", "c_proj"]}


def _assert_equal_breakdowns(planned, measured) -> None:
    for component, nbytes in measured.bytes_by_component.items():
        assert planned.bytes_by_component[component] == pytest.approx(nbytes, rel=0, abs=0.5), component
    assert planned.total_params == measured.total_params
    assert planned.quantized_params == measured.quantized_params


@pytest.mark.parametrize("model", list(_tiny_configs()))
@pytest.mark.parametrize("scheme", [*BNB, "nf4-skip"])
def test_planned_bytes_equal_bitsandbytes_from_pretrained(tiny_folders, model: str, scheme: str) -> None:
    """bitsandbytes through transformers' own from_pretrained: the footprint it really holds, to the byte."""
    config = parse_config(BNB_SKIP if scheme == "nf4-skip" else PRESETS[scheme])
    folder = tiny_folders[model]
    real = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config.to_transformers(),
                                                dtype=torch.float32, device_map="cpu")
    measured = measure_footprint(real)
    planned = plan_memory(_config_dict(folder), config, "float32")
    _assert_equal_breakdowns(planned, measured)


@pytest.mark.parametrize("model", list(_tiny_configs()))
@pytest.mark.parametrize("scheme", SIMULATED)
def test_planned_bytes_equal_simulated_packed_bytes(tiny_folders, model: str, scheme: str) -> None:
    folder = tiny_folders[model]
    real = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    measured = simulate_quantization(real, get_quantizer(preset(scheme), device="cpu"))
    planned = plan_memory(_config_dict(folder), preset(scheme), "float32")
    _assert_equal_breakdowns(planned, measured)


def test_bitsandbytes_leaves_fused_experts_in_full_precision(tiny_folders) -> None:
    """What transformers 5.23 really does: only nn.Linear/Conv1D become bnb layers; fused experts stay."""
    config = preset("nf4")
    real = AutoModelForCausalLM.from_pretrained(tiny_folders["mixtral"], quantization_config=config.to_transformers(),
                                                dtype=torch.float32, device_map="cpu")
    experts = real.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float32 and experts.gate_up_proj.dim() == 3
    plan = plan_memory(_config_dict(tiny_folders["mixtral"]), config, "float32")
    reasons = {row["why"]: row for row in plan.unquantized_detail}
    fused = next(r for why, r in reasons.items() if why.startswith("fused expert tensors"))
    assert fused["tensors"] == 4 and fused["params"] == 2 * (4 * 256 * 64 + 4 * 64 * 128)
    assert "fused 3-D expert tensors" in plan.experts_policy
    # RTN quantizes the same experts one matrix per expert.
    rtn = plan_memory(_config_dict(tiny_folders["mixtral"]), preset("rtn-int8"), "float32")
    assert rtn.quantized_params - plan.quantized_params == fused["params"]


def test_bitsandbytes_skip_list_replaces_the_default_head_skip(tiny_folders) -> None:
    """transformers applies its default skips (lm_head) only when llm_int8_skip_modules is None."""
    cfg = _config_dict(tiny_folders["llama-untied"])
    default = plan_memory(cfg, preset("nf4"), "float32")
    skip = plan_memory(cfg, parse_config({**PRESETS["nf4"], "llm_int8_skip_modules": ["down_proj"]}), "float32")
    head = 320 * 64
    down = 2 * 64 * 128
    assert skip.quantized_params == default.quantized_params + head - down
    assert any(r["why"].startswith("output head") for r in default.unquantized_detail)
    assert not any(r["why"].startswith("output head") for r in skip.unquantized_detail)


def test_preflight_reads_expert_and_conv1d_shapes() -> None:
    mixtral = MixtralConfig(**{**SMALL, "hidden_size": 96, "intermediate_size": 160}, num_local_experts=4)
    problems = preflight(PRESETS["rtn-int4-g64"], mixtral.to_dict())
    assert any("experts.down_proj" in p and "160" in p for p in problems), problems
    gpt2 = GPT2Config(n_embd=96, n_layer=1, n_head=4, vocab_size=320, n_positions=64).to_dict()
    problems = preflight(PRESETS["rtn-int4-g64"], gpt2)
    assert any("mlp.c_fc" in p and "96" in p for p in problems), problems


# ---------------------------------------------------------------------------- KV cache and activations


def test_kv_cache_of_llama3_8b_is_128_kib_per_token() -> None:
    llama3_8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256).to_dict()
    one = forward_memory(llama3_8b, context=1, dtype="float16")
    assert one.kv_bytes == 128 * 1024
    assert forward_memory(llama3_8b, context=64, batch=2, dtype="float16").kv_bytes == 2 * 64 * 128 * 1024


def test_kv_cache_of_a_sliding_window_model_stops_growing_at_its_window() -> None:
    cfg = MistralConfig(**{**SMALL, "num_hidden_layers": 2}, sliding_window=32).to_dict()
    per_token = 2 * 2 * 2 * 16 * 2  # layers x (K, V) x kv heads x head dim x fp16 bytes
    short = forward_memory(cfg, context=16, dtype="float16")
    long = forward_memory(cfg, context=200, dtype="float16")
    assert short.kv_bytes == 16 * per_token
    assert 31 * per_token <= long.kv_bytes <= 32 * per_token  # the window, not 200 tokens
    assert long.layers_sliding == 2


def test_kv_cache_of_deepseek_v3_is_its_compressed_latent() -> None:
    """DeepSeek-V2/V3's MLA caches kv_lora_rank + qk_rope_head_dim = 576 elements per token and layer."""
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                           n_group=1, topk_group=1,
                           vocab_size=1000).to_dict()
    kv = forward_memory(cfg, context=8, dtype="bfloat16")
    assert kv.kv_elements == 3 * 8 * 576


def test_activation_peak_scales_with_tokens_and_is_refused_where_untraceable() -> None:
    cfg = LlamaConfig(**SMALL).to_dict()
    small, big = forward_memory(cfg, 64), forward_memory(cfg, 256)
    # MLP intermediates of all tokens are alive at once: gate and up (B x L x intermediate, fp16).
    assert big.activation_peak_bytes >= 2 * 256 * 128 * 2
    assert big.activation_peak_bytes > 3 * small.activation_peak_bytes
    assert any("fused kernel" in a for a in big.assumptions)
    table = plan_table(cfg, [preset("nf4"), None], "float16", runtime=big, kv_dtype_bytes=1)
    assert table["KV cache"].iloc[0] == pytest.approx(big.kv_elements / 2**20)
    assert (table["total MiB"] > table["quantized codes"] + table["KV cache"]).all()


# ---------------------------------------------------------------------------- bad input, stored quantization


@pytest.mark.parametrize("cfg, message", [
    ({"hidden_size": 64}, "model_type"),
    ({"model_type": "not-a-model"}, "'not-a-model'"),
    ({"model_type": "my_remote", "auto_map": {"AutoModelForCausalLM": "modeling.MyModel"}}, "trust_remote_code"),
    ({"model_type": "resnet"}, "causal language model"),
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5}, "llama"),
    ({"model_type": "llama", "hidden_size": "wide"}, "hidden_size"),
    ({"model_type": "llama", "num_hidden_layers": -3}, "no linear layer"),
])
def test_bad_configs_are_refused_with_a_message(cfg: dict, message: str) -> None:
    with pytest.raises(ArchitectureError, match=message):
        plan_memory(cfg, None)


def test_stored_quantization_is_planned_as_stored() -> None:
    gptq = {**LlamaConfig(**SMALL).to_dict(), "quantization_config": {"quant_method": "gptq", "bits": 4,
                                                                       "group_size": 32}}
    config, why = stored_quantization(gptq)
    assert why is None and config.quant_method == "gptq"
    plan = plan_memory(gptq, config, "float16")
    # q/k/v/o + gate/up/down of 2 layers, 4-bit codes: half a byte per weight.
    assert plan.bytes_by_component["codes"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128) / 2
    odd = {**gptq, "quantization_config": {"quant_method": "compressed-tensors"}}
    config, why = stored_quantization(odd)
    assert config is None and "compressed-tensors" in why


def test_checkpoint_dtypes_come_from_safetensors_headers(tmp_path) -> None:
    from quantlib.models import checkpoint_dtypes

    AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)).to(torch.float16).save_pretrained(tmp_path)
    counts = checkpoint_dtypes(str(tmp_path))
    assert counts == {"F16": model_shapes(LlamaConfig(**SMALL).to_dict()).n_params}


def test_hub_config_offline_says_what_to_do(monkeypatch) -> None:
    from quantlib.models import ModelSourceError, read_model_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="config.json"):
        read_model_config("nobody-here/no-such-model-xyz")
