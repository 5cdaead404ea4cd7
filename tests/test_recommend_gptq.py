"""GPTQ per-layer mixes (issue 13): gptqmodel's `dynamic`, planned per layer, measured with gptqmodel's own GPTQ on
each layer's calibration inputs, and honoured by a real gptqmodel calibration exactly as planned."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from quantlib import recommend as rc
from quantlib.registry import parse_config
from quantlib.memory import plan_memory
from quantlib.registry import get_quantizer, quantizer_class
from quantlib.shapes import describe_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                                reason="gptqmodel is not installed (pip install --no-deps -r requirements-gptq.txt)")


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from quantlib.models import load_model

    return load_model(str(tiny_llama_dir))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLIB_CACHE", str(tmp_path / "cache"))


def test_dynamic_is_resolved_as_gptqmodel_resolves_it():
    """First matching pattern wins, matched at the start of the name, "-:" leaves the module unquantized."""
    from gptqmodel.quantization.config import QuantizeConfig

    dynamic = {r"-:^model\.layers\.1\.mlp\.down_proj$": {},
               r"+:.*\.mlp\.": {"bits": 8, "group_size": 32},
               r"model\.layers\.1": {"bits": 2},  # no prefix: positive; no "$": a prefix match (layers.1, .10, ...)
               r"+:^model\.layers\.0\.self_attn\.q_proj$": {"bits": 3}}
    config = parse_config({"quant_method": "gptq", "bits": 4, "group_size": 64, "dynamic": dynamic})
    theirs = get_quantizer(config, device="cpu").gptqmodel_config(QuantizeConfig)
    names = [f"model.layers.{i}.{m}" for i in (0, 1, 10, 11) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")]
    for name in names:
        ours = config.layer_config(name)
        if theirs.dynamic_get(name) is False:
            assert ours is None, name
            continue
        assert (ours.bits, ours.group_size) == (theirs.dynamic_get(name, "bits", theirs.bits),
                                                theirs.dynamic_get(name, "group_size", theirs.group_size)), name
    assert config.layer_config("model.layers.1.mlp.down_proj") is None
    assert config.layer_config("model.layers.10.self_attn.q_proj").bits == 2  # the prefix pattern reaches layer 10
    assert config.layer_config("model.layers.0.self_attn.q_proj").bits == 3  # only the last pattern matches it
    assert config.layer_config("model.layers.0.self_attn.k_proj").bits == 4  # none matches: the top-level setting
    assert config.layer_config("model.layers.1.mlp.up_proj").bits == 8  # the mlp pattern comes before layers.1


def test_bad_dynamic_is_refused_with_the_field_named():
    from quantlib.errors import ConfigError

    for dynamic, needle in (({"+:(": {}}, "not a regular expression"), ({"x": {"bits": 5}}, "bits 5"),
                            ({"x": {"group_size": 0}}, "group_size 0"), ({"x": 3}, "overrides must be an object")):
        with pytest.raises(ConfigError, match="dynamic") as info:
            parse_config({"quant_method": "gptq", "bits": 4, "dynamic": dynamic})
        assert needle in str(info.value)


def test_a_layer_is_quantized_by_gptq_with_its_inputs(tiny):
    """The measured setting is gptqmodel's GPTQ on the captured inputs: on those inputs its output error is below
    round-to-nearest's at the same bits and groups, and its stored size is the planner's."""
    torch.manual_seed(0)
    x = torch.randn(256, 16) @ torch.randn(16, 64) + 0.1 * torch.randn(256, 64)  # correlated channels, as activations
    weight = dict(tiny.model.named_parameters())["model.layers.0.mlp.up_proj.weight"].detach()
    gptq = get_quantizer({"quant_method": "gptq", "bits": 3, "group_size": 32}, device="cpu")
    rtn = get_quantizer({"quant_method": "rtn", "bits": 3, "granularity": "group", "group_size": 32, "symmetric": True},
                        device="cpu")
    packed = gptq.quantize_layer_calibrated("model.layers.0.mlp.up_proj", weight, x)
    y = x @ weight.t()
    err_gptq = float((gptq.layer_output(x, packed) - y).square().sum())
    err_rtn = float((rtn.layer_output(x, rtn.quantize_layer("up", weight)) - y).square().sum())
    assert err_gptq < 0.5 * err_rtn, (err_gptq, err_rtn)
    codes = packed.codes_unpacked()
    assert codes.min() >= 0 and codes.max() <= 7 and len(codes.unique()) > 4
    planned = quantizer_class(gptq.config).storage_bytes(gptq.config, *weight.shape)
    assert packed.total_bits == 8 * sum(planned.values())


@pytest.mark.slow
def test_a_gptq_mix_is_calibrated_by_gptqmodel_exactly_as_planned(tiny, tiny_llama_dir):
    """A mix with four settings and kept modules: gptqmodel's calibration gives each module the planned bits and
    group size (or leaves it a plain Linear), and the checkpoint it writes holds exactly the planned bytes."""
    from safetensors import safe_open

    from quantlib.registry import quantize_model

    shapes = describe_model(tiny.model)
    cls = rc.family_class("gptq")
    space = cls.mix_spaces(shapes)[0]
    sens = rc.measure_sensitivity(tiny, "gptq", calib_tokens=64, check_layers=0)
    layers = list(sens.rows["layer"].unique())
    keys = [c.key for c in space.choices]
    assignment = {layer: keys[i % len(keys)] for i, layer in enumerate(layers)}  # every setting and keep
    config = space.build(assignment)
    exported = json.loads(json.dumps(config.to_dict()))
    assert parse_config(exported).to_dict() == exported
    settings = {c.key: c.config for c in space.choices if c.config is not None}

    qm = quantize_model(config, source=str(tiny_llama_dir), device="cpu",
                        calibration=cls.calibration_settings(128))
    modules = dict(qm.model.named_modules())
    for layer, key in assignment.items():
        module = modules[layer]
        if key == "keep":
            assert isinstance(module, torch.nn.Linear) and not hasattr(module, "qweight"), layer
        else:
            assert (module.bits, module.group_size) == (settings[key].bits, settings[key].group_size), layer
    stored = 0
    for path in qm.checkpoint_dir and __import__("pathlib").Path(qm.checkpoint_dir).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                if name.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
                    t = f.get_tensor(name)
                    stored += t.numel() * t.element_size()
    planned = plan_memory(tiny.model.config.to_dict(), config, "float32", shapes=shapes)
    assert stored == planned.bytes_by_component["codes"] + planned.bytes_by_component["scales"]
    assert planned.total_bytes == pytest.approx(sum(
        sens.rows.set_index(["layer", "choice"]).loc[list(assignment.items()), "bytes"]) + sens.fixed_bytes, abs=0.5)


def test_recommend_page_with_the_gptq_family_measures_exports_and_verifies(tiny_llama_dir, tmp_path, monkeypatch):
    """The page on a tiny model with the GPTQ family: the export carries `dynamic`, the page says transformers'
    class drops it and gives GPTQModel code, and the verification calibrates every config for real."""
    from tests.apptest_support import page_on_folder

    monkeypatch.setenv("QUANTLIB_RUNS_DIR", str(tmp_path / "runs"))
    at = page_on_folder("5_Recommend.py", "recommend", tiny_llama_dir, timeout=300)
    at.selectbox(key="recommend.family").set_value("gptq").run()
    at.number_input(key="recommend.calib").set_value(64).run()
    at.button(key="recommend.run").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    slider = at.slider(key="recommend.budget_gib")
    slider.set_value(slider.min + 0.4 * (slider.max - slider.min)).run()
    exported = json.loads(at.code[0].value)
    assert parse_config(exported).to_dict() == exported and exported["dynamic"]
    assert any("drops part of this mix" in i.value for i in at.info)
    assert "GPTQModel.load" in at.code[1].value and "dynamic=" in at.code[1].value
    at.number_input(key="recommend.verify.tokens").set_value(256).run()
    at.number_input(key="recommend.verify.calib_tokens").set_value(256).run()
    at.button(key="recommend.verify.run").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    text = " ".join(m.value for m in at.markdown)
    assert "measured:" in text and "KL" in text
    runs = list((tmp_path / "runs").glob("*.run.json"))
    assert len(runs) == 1
    run = json.loads(runs[0].read_text())
    assert "dynamic" in json.dumps(run)  # the mix was calibrated with its dynamic config


def test_a_model_no_group_size_fits_is_refused_with_the_reason(tiny_tokenizer, tmp_path):
    """Input widths of 48: no group of 128, 64 or 32 divides them, so there is no GPTQ mix, and the refusal says
    why instead of failing later."""
    from transformers import LlamaForCausalLM

    from quantlib.models import load_model
    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer), hidden_size=48, intermediate_size=96,
                                       num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    base = load_model(str(tmp_path))
    assert rc.family_class("gptq").mix_spaces(describe_model(base.model)) == []
    with pytest.raises(rc.RecommendError, match="no per-layer mix fits this model.*128, 64 or 32"):
        rc.measure_sensitivity(base, "gptq", calib_tokens=32, check_layers=0)
