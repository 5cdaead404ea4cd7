"""One test over the method registry: every registered method checked the same way.

For each preset (and every registered method must have one): its JSON Schema accepts what it
exports, it round-trips through transformers' own config class, it pre-flights a tiny model, its
planned bytes equal what the method really stores (bitsandbytes' loaded tensors, the simulated
packed tensors, or the calibrated checkpoint's safetensors), and its per-layer weight error stays
under a bound set by its code bits. A method whose library is missing must be refused with the
install command, never skipped silently. New methods get these tests by adding a preset.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM

from quantlib import parse_config
from quantlib.layers import layer_errors, simulate_quantization
from quantlib.registry import quantize_model
from quantlib.registry import preflight
from quantlib.registry import CONFIG_MAPPING
from quantlib.errors import BackendUnavailableError, ConfigError
from quantlib.shapes import describe_model
from quantlib.memory import plan_memory
from quantlib.footprint import measure_footprint
from quantlib.presets import PRESETS, preset
from quantlib.registry import get_quantizer, QUANTIZER_MAPPING
from quantlib.shapes import model_shapes

#: Relative Frobenius error bound of a layer's weights (Gaussian-initialised tiny model) by code bits:
#: about twice what round-to-nearest reaches at that width (4-bit NF4 0.09, FP4 0.12, 8-bit 0.006).
ERROR_BOUNDS = {2: 0.6, 3: 0.3, 4: 0.17, 5: 0.08, 8: 0.015, 16: 1e-3}


def _bound(bits: float) -> float:
    return ERROR_BOUNDS[max(b for b in ERROR_BOUNDS if b <= bits)]


def _missing(name: str) -> list[str]:
    cls = QUANTIZER_MAPPING[preset(name).quantizer_key]
    return [pip for module, pip in cls.requires if importlib.util.find_spec(module) is None]


def test_every_registered_method_has_a_preset_and_a_quantizer() -> None:
    methods = {PRESETS[name]["quant_method"] for name in PRESETS}
    assert set(CONFIG_MAPPING) <= methods, set(CONFIG_MAPPING) - methods
    for name in PRESETS:
        assert preset(name).quantizer_key in QUANTIZER_MAPPING, name


@pytest.mark.parametrize("name", list(PRESETS))
def test_schema_accepts_the_export_and_rejects_junk(name: str) -> None:
    config = preset(name)
    schema = type(config).json_schema()
    jsonschema.validate(config.to_dict(), schema)  # what we export is what our schema describes
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config.to_dict(), "not_a_field": 1}, schema)
    with pytest.raises(ConfigError, match="not_a_field"):
        parse_config({**PRESETS[name], "not_a_field": 1})


@pytest.mark.parametrize("name", list(PRESETS))
def test_round_trip_through_transformers_class(name: str) -> None:
    config = preset(name)
    hf = config.to_transformers()
    if hf is None:  # a quantlib-only method (RTN, GGUF block types): its JSON must round-trip instead
        assert parse_config(json.dumps(config.to_dict())).to_dict() == config.to_dict()
        return
    assert type(hf).__module__.startswith("transformers.")
    assert hf.to_dict()["quant_method"] == config.to_dict()["quant_method"]
    assert parse_config(hf.to_dict()).to_dict() == config.to_dict()
    assert type(hf).from_dict(config.to_dict()).to_dict() == hf.to_dict()


@pytest.mark.parametrize("name", list(PRESETS))
def test_preflight_fits_the_tiny_model(name: str, tiny_llama_dir: Path) -> None:
    model_config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert preflight(PRESETS[name], model_config) == []


# ---------------------------------------------------------------------------- what each method stores

_QUANTIZED: dict[str, object] = {}


def _quantized(name: str, tiny_llama_dir: Path):
    """The real quantization of the tiny model under a preset (calibrated ones once per session)."""
    if name not in _QUANTIZED:
        from quantlib.methods._gptqmodel import CalibrationSettings

        _QUANTIZED[name] = quantize_model(preset(name), source=str(tiny_llama_dir), device="cpu",
                                          calibration=CalibrationSettings(n_samples=4, seq_len=64, batch_size=4))
    return _QUANTIZED[name]


def _safetensors_bytes(folder: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key != "__metadata__":
                out[key] = (info["dtype"], info["data_offsets"][1] - info["data_offsets"][0])
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_planned_bytes_equal_what_the_method_stores(name: str, tiny_llama_dir: Path) -> None:
    config = preset(name)
    model_config = json.loads((tiny_llama_dir / "config.json").read_text())
    planned = plan_memory(model_config, config, "float32")
    if _missing(name):
        with pytest.raises(BackendUnavailableError, match="pip install"):
            get_quantizer(config, device="cpu")
        assert planned.quantized_params > 0  # the planner still plans it
        return
    quantizer = get_quantizer(config, device="cpu")
    if getattr(quantizer, "calibrated", False):
        # The checkpoint gptqmodel wrote, tensor by tensor (the loaded CPU model upcasts scales to fp32).
        stored = _safetensors_bytes(_quantized(name, tiny_llama_dir).checkpoint_dir)
        codes = sum(n for k, (_, n) in stored.items() if k.endswith(".qweight"))
        scales = sum(n for k, (_, n) in stored.items() if k.rsplit(".", 1)[-1] in ("scales", "qzeros", "g_idx"))
        assert planned.bytes_by_component["codes"] == codes
        assert planned.bytes_by_component["scales"] == scales
        rest = {k: v for k, v in stored.items() if k.rsplit(".", 1)[-1] not in ("qweight", "scales", "qzeros",
                                                                                   "g_idx")}
        dtypes = {d for d, _ in rest.values()}
        assert len(dtypes) == 1, dtypes
        dtype = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[dtypes.pop()]
        shapes = model_shapes(model_config)
        as_stored = plan_memory(model_config, config, dtype, shapes=shapes)
        assert as_stored.bytes_by_component["unquantized"] - shapes.buffer_bytes() == sum(n for _, n in rest.values())
        return
    if quantizer.simulated:
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        measured = simulate_quantization(base, quantizer)
    else:
        real = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config.to_transformers(),
                                                    dtype=torch.float32, device_map="cpu")
        measured = measure_footprint(real)
    for component, nbytes in measured.bytes_by_component.items():
        assert planned.bytes_by_component[component] == nbytes, component
    assert planned.quantized_params == measured.quantized_params


@pytest.mark.parametrize("name", list(PRESETS))
def test_layer_error_is_below_the_bound_of_its_bits(name: str, tiny_llama_dir: Path) -> None:
    if _missing(name):
        pytest.skip(f"{name}: {', '.join(_missing(name))} not installed; its refusal is asserted above")
    config = preset(name)
    quantizer = get_quantizer(config, device="cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    quantized = _quantized(name, tiny_llama_dir) if getattr(quantizer, "calibrated", False) else None
    errors = layer_errors(base, quantizer, quantized=quantized)
    bits = type(quantizer).error_bits(config)
    # 7 linear layers x 2 decoder layers (llama-quantize's file types quantize the output and embedding too): what
    # the planner's rules name, no more, no less
    planned = type(quantizer).quantized_matrices(config, describe_model(base))
    assert len(errors) == len(planned) and len(errors) >= 14
    assert {"model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"} <= set(errors["layer"])
    worst = float(errors["rel_fro_error"].max())
    # AWQ stores W·diag(s) rounded and folds 1/s into the preceding module: its weight error against the
    # base weight includes that rescaling (measured 0.21 at 4 bits here), so it gets twice the bound.
    bound = _bound(bits) * (1 if type(quantizer).weight_error_is_rounding else 2)
    assert 0 < worst < bound, (name, bits, worst)
