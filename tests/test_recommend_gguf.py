"""The recommender's GGUF family with an importance matrix (issue 27, deliverable 5): the K and IQ types llama.cpp
users mix, the i-quants llama-quantize writes only with an importance matrix among them, measured with one, and the
export naming the imatrix file; the verification leaves out, with the reason, uniform types that cannot quantize
the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantlib import recommend as rc
from quantlib.memory import plan_memory
from quantlib.methods._ggml_ftypes import NEEDS_IMATRIX
from quantlib.methods._gguf_tensor import quantize_gguf
from quantlib.registry import get_quantizer, parse_config
from quantlib.shapes import describe_model
from tests.conftest import build_tiny_tokenizer, tiny_llama_config


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A one-block Llama whose rows fit the 256-element super-blocks (K-quants and i-quants)."""
    from transformers import LlamaForCausalLM

    from quantlib.models import load_model

    folder = tmp_path_factory.mktemp("wide")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLIB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_imatrix_space_offers_every_type_and_exports_what_llama_quantize_takes(wide) -> None:
    shapes = describe_model(wide.model)
    plain, weighted = rc.family_class("gguf").mix_spaces(shapes)
    assert not any(c.config is not None and c.config.imatrix for c in plain.choices)
    offered = {c.config.quant_type for c in weighted.choices if c.config is not None}
    assert set(NEEDS_IMATRIX) <= offered and {"Q4_K", "Q6_K", "IQ4_XS", "IQ3_S", "Q4_0"} <= offered
    assert not set(NEEDS_IMATRIX) & {c.config.quant_type for c in plain.choices if c.config is not None}
    layers = [w.module for w in shapes.weights if w.is_matmul and "lm_head" not in w.module]
    config = weighted.build({m: key for m, key in zip(layers, ["IQ2_XXS+imatrix", "IQ1_S+imatrix", "keep",
                                                                  "Q4_K+imatrix", "IQ2_XXS+imatrix"])})
    assert config.imatrix and get_quantizer(config).config == config  # a config llama-quantize takes: valid here
    command = rc.family_class("gguf").tool_commands(config, wide.model.config.to_dict(), shapes)["llama-quantize"]
    assert "--imatrix imatrix.gguf" in command and "quantlib imatrix" in command and "=iq1_s'" in command


def test_a_layer_is_measured_with_the_importance_matrix_of_its_calibration_inputs(wide) -> None:
    """`quantize_layer_calibrated` with `imatrix`: the mean of x_j^2 over the inputs it is given, as llama-imatrix
    computes it; those bytes differ from the unweighted ones (so the space measures what it says)."""
    q = get_quantizer({"quant_method": "gguf", "quant_type": "IQ2_XXS", "imatrix": True}, device="cpu")
    name = "model.layers.0.mlp.down_proj"
    weight = dict(wide.model.named_modules())[name].weight.detach()
    x = torch.randn(300, weight.shape[1], generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 512)
    packed = q.quantize_layer_calibrated(name, weight, x)
    expected = (x.double().square().sum(0).float().numpy() / np.float32(300))
    assert np.array_equal(packed.data, quantize_gguf(weight, "IQ2_XXS", imatrix=expected).data)
    flat = quantize_gguf(weight, "IQ2_XXS", imatrix=np.ones(512, dtype=np.float32)).data
    assert not np.array_equal(packed.data, flat)
    plain = get_quantizer({"quant_method": "gguf", "quant_type": "Q4_K"}, device="cpu")
    assert np.array_equal(plain.quantize_layer_calibrated(name, weight, x).data, quantize_gguf(weight, "Q4_K").data)


def test_below_what_the_plain_types_reach_the_mix_takes_i_quants_with_the_importance_matrix(wide, cache_dir) -> None:
    sens = rc.measure_sensitivity(wide, "gguf", calib_tokens=64, check_layers=0)
    measured = set(sens.rows["choice"])
    assert {f"{t}+imatrix" for t in NEEDS_IMATRIX} <= measured and "Q4_K" in measured
    shapes = describe_model(wide.model)
    cfg = wide.model.config.to_dict()
    plain, weighted = rc.family_class("gguf").mix_spaces(shapes)
    plain_lo, _ = rc.reachable_range(sens, [plain])
    lo, _ = rc.reachable_range(sens, [plain, weighted])
    assert lo < plain_lo
    rec = rc.recommend(sens, cfg, budget_gib=(lo + plain_lo) / 2 / rc.GIB, shapes=shapes)
    assert rec.space == weighted.name and rec.config.imatrix
    assert set(rec.layers["choice"]) & {f"{t}+imatrix" for t in NEEDS_IMATRIX}
    assert plan_memory(cfg, rec.config, "float32", shapes=shapes).total_bytes == pytest.approx(rec.total_bytes)
    assert parse_config(rec.export()).to_dict() == rec.export()
    assert "--imatrix imatrix.gguf" in rec.commands["llama-quantize"]


def test_uniform_types_that_cannot_quantize_the_model_are_left_out_with_the_reason(tiny_llama_dir) -> None:
    """The tiny Llama's rows are 64 wide: no 256-element super-block fits, so uniform K and i-quant settings are
    named with the reason instead of failing the verification; Q4_0 and IQ4_NL (32-element blocks) stay."""
    from quantlib.models import load_model

    model_config = load_model(str(tiny_llama_dir)).model.config.to_dict()
    left_out = rc.uniform_problems("gguf", model_config)
    assert "GGUF Q4_K" in left_out and "GGUF IQ2_XXS imatrix" in left_out
    assert "GGUF Q4_0" not in left_out and "GGUF IQ4_NL imatrix" not in left_out
    assert "input width 64 is not a multiple of the Q4_K block (256)" in left_out["GGUF Q4_K"]
    lines = rc.verdict_lines({"mix": "m", "mix_kl": 0.1, "mix_kl_se": 0.01, "mix_mib": 1.0, "smaller": [],
                              "beats_smaller": None, "below_line": None, "left_out": left_out})
    assert any(line.startswith("not compared: uniform GGUF Q4_K, which cannot quantize this model") for line in lines)
    assert rc.uniform_problems("bitsandbytes", model_config) == {}


def test_the_verification_compares_the_uniform_settings_that_fit_and_names_the_others(tiny_llama_dir, cache_dir,
                                                                                       tmp_path) -> None:
    """A GGUF mix on 64-wide rows: before, the verification quantized uniform Q2_K and failed on its first layer;
    now it evaluates the mix and the uniform settings whose blocks fit, and the verdict names the rest."""
    from quantlib.compare import CompareSettings
    from quantlib.models import load_model

    tiny = load_model(str(tiny_llama_dir))
    shapes = describe_model(tiny.model)
    sens = rc.measure_sensitivity(tiny, "gguf", calib_tokens=64, check_layers=0)
    lo, hi = rc.reachable_range(sens, rc.family_class("gguf").mix_spaces(shapes))
    rec = rc.recommend(sens, tiny.model.config.to_dict(), budget_gib=(lo + 0.3 * (hi - lo)) / rc.GIB, shapes=shapes)
    settings = CompareSettings(source=str(tiny_llama_dir), max_tokens=128, window=64)
    verification = rc.verify(rec, settings, base=tiny, save=False)
    left_out = verification.verdict["left_out"]
    compared = set(verification.table["scheme"])
    assert left_out == rc.uniform_problems("gguf", tiny.model.config.to_dict()) and "GGUF Q4_K" in left_out
    assert not compared & set(left_out) and {"GGUF Q4_0", "GGUF IQ4_NL imatrix"} <= compared
    assert verification.mix_label in compared
    assert any("not compared: uniform GGUF IQ1_S imatrix" in line for line in rc.verdict_lines(verification.verdict))
