"""Configs: strict validation that reports everything, and exact interchange with transformers."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import BitsAndBytesConfig

from quantlib import CONFIG_MAPPING, ConfigError, config_schemas, parse_config
from quantlib.methods.bitsandbytes import (BNB_COMPUTE_DTYPES, BNB_QUANT_TYPES, BNB_STORAGE_DTYPES,
                                           BitsAndBytesQuantConfig)
from quantlib.methods.gguf import GGUFQuantConfig
from quantlib.methods.rtn import RTNQuantConfig

logging.getLogger("transformers").setLevel(logging.ERROR)

module_names = st.lists(st.sampled_from(["lm_head", "mlp.down_proj", "self_attn.o_proj", "embed_tokens"]),
                        unique=True, max_size=3)


@st.composite
def valid_bnb_dicts(draw: st.DrawFn) -> dict:
    """Random valid bitsandbytes configs, with keys present or absent at random."""
    four = draw(st.booleans())
    d: dict = {"quant_method": "bitsandbytes", "load_in_4bit": four, "load_in_8bit": not four}
    optional = {
        "llm_int8_threshold": st.floats(min_value=0, max_value=100, allow_nan=False) | st.integers(0, 50),
        "llm_int8_skip_modules": st.none() | module_names,
        "llm_int8_enable_fp32_cpu_offload": st.booleans(),
        "llm_int8_has_fp16_weight": st.booleans(),
        "bnb_4bit_quant_type": st.sampled_from(BNB_QUANT_TYPES),
        "bnb_4bit_use_double_quant": st.booleans(),
        "bnb_4bit_compute_dtype": st.sampled_from(BNB_COMPUTE_DTYPES),
        "bnb_4bit_quant_storage": st.sampled_from(BNB_STORAGE_DTYPES),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            d[key] = draw(strategy)
    return d


@settings(max_examples=300, deadline=None)
@given(valid_bnb_dicts())
def test_valid_bnb_configs_round_trip_through_transformers(d: dict) -> None:
    config = parse_config(d)
    exported = json.loads(config.to_json())
    hf = BitsAndBytesConfig.from_dict(exported)
    # Same dict both ways: ours equals transformers', and transformers' re-imports to ours.
    assert json.loads(json.dumps(hf.to_dict())) == exported
    assert parse_config(json.loads(json.dumps(hf.to_dict()))) == config
    assert config.to_transformers().to_dict() == hf.to_dict()
    # The diff form parses back to the same config.
    assert parse_config(config.to_diff_dict()) == config
    assert parse_config(config.to_json(diff=True)) == config


@settings(max_examples=100, deadline=None)
@given(valid_bnb_dicts())
def test_saved_model_config_block_imports_unchanged(d: dict) -> None:
    """A model saved by transformers carries `to_dict()` in config.json; it must import as is."""
    hf_dict = json.loads(json.dumps(BitsAndBytesConfig.from_dict(parse_config(d).to_dict()).to_dict()))
    model_config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "quantization_config": hf_dict}
    assert parse_config(model_config).to_dict() == hf_dict
    assert parse_config(json.dumps(model_config)).to_dict() == hf_dict


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
field_names = st.sampled_from(
    [n for cls in CONFIG_MAPPING.values() for n in cls.field_names()]
    + ["quant_method", "_load_in_4bit", "_load_in_8bit", "quantization_config", "bogus"]
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, st.dictionaries(field_names, json_values, max_size=6),
                 st.fixed_dictionaries({"quant_method": st.sampled_from(list(CONFIG_MAPPING) + ["x", 3])},
                                       optional={n: json_values for n in
                                                 ["load_in_4bit", "load_in_8bit", "bits", "granularity",
                                                  "group_size", "quant_type", "llm_int8_threshold",
                                                  "bnb_4bit_quant_type", "bnb_4bit_compute_dtype",
                                                  "llm_int8_skip_modules", "_load_in_4bit", "symmetric"]})))
def test_any_json_value_gives_a_config_or_a_config_error(value: object) -> None:
    for candidate in (value, json.dumps(value)):
        try:
            config = parse_config(candidate)
        except ConfigError as exc:
            assert exc.errors, "a ConfigError must list at least one problem"
            assert all(e.field for e in exc.errors)
            continue
        # Whatever was accepted must survive export and re-import unchanged.
        assert parse_config(config.to_json()) == config


@pytest.mark.parametrize("text", ["", "{", "[1,2]", "null", "42", '"str"', "{\"quant_method\": {}}", b"\xff\xfe"])
def test_malformed_input_is_a_config_error(text: str | bytes) -> None:
    with pytest.raises(ConfigError):
        parse_config(text)


def test_every_problem_is_reported_at_once_with_field_value_and_allowed() -> None:
    bad = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": True,
        "bnb_4bit_quant_type": "nf5",
        "bnb_4bit_compute_dtype": "float8",
        "llm_int8_threshold": "six",
        "llm_int8_skip_modules": "lm_head",
        "bnb_4bit_use_double_quant": 1,
        "bnb_4bit_quant_typo": "nf4",
    }
    with pytest.raises(ConfigError) as info:
        parse_config(bad)
    errors = {e.field: e for e in info.value.errors}
    assert set(errors) == {"load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "llm_int8_threshold",
                           "llm_int8_skip_modules", "bnb_4bit_use_double_quant", "bnb_4bit_quant_typo"}
    assert errors["bnb_4bit_quant_type"].value == "nf5"
    assert '"nf4"' in errors["bnb_4bit_quant_type"].allowed and '"fp4"' in errors["bnb_4bit_quant_type"].allowed
    assert "did you mean bnb_4bit_quant_type" in errors["bnb_4bit_quant_typo"].allowed
    message = str(info.value)
    assert "7 problem(s)" in message and "nf5" in message and "float8" in message


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"load_in_4bit": False, "load_in_8bit": False}, "load_in_4bit"),
        ({"llm_int8_threshold": -0.5}, "llm_int8_threshold"),
        ({"llm_int8_threshold": float("nan")}, "llm_int8_threshold"),
        ({"llm_int8_threshold": True}, "llm_int8_threshold"),
        ({"llm_int8_skip_modules": ["lm_head", 3]}, "llm_int8_skip_modules"),
        ({"load_in_4bit": "true"}, "load_in_4bit"),
        ({"bnb_4bit_quant_storage": "int4"}, "bnb_4bit_quant_storage"),
        ({"_load_in_4bit": False}, "_load_in_4bit"),
    ],
)
def test_bnb_rules(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"quant_method": "bitsandbytes", "load_in_4bit": True, **changes})
    assert field in info.value.fields()


def test_transformers_spellings_are_normalised() -> None:
    import torch

    config = BitsAndBytesQuantConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                     bnb_4bit_quant_storage="torch.uint8", llm_int8_threshold=6)
    assert config.bnb_4bit_compute_dtype == "bfloat16"
    assert config.to_dict()["llm_int8_threshold"] == 6.0 and isinstance(config.to_dict()["llm_int8_threshold"], float)
    # An old block with only the private keys and no quant_method still imports.
    old = parse_config({"_load_in_4bit": True, "_load_in_8bit": False, "load_in_4bit": True})
    assert old.load_in_4bit


def test_unknown_method_lists_registered_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"quant_method": "fp9"})
    (error,) = info.value.errors
    assert error.field == "quant_method"
    for method in CONFIG_MAPPING:
        assert method in error.allowed


def test_rtn_and_gguf_validation() -> None:
    assert RTNQuantConfig(bits=4, granularity="group", group_size=64).label == "RTN int4 g64"
    with pytest.raises(ConfigError) as info:
        parse_config({"quant_method": "rtn", "bits": 1, "granularity": "row", "group_size": 0, "symmetric": "yes"})
    assert set(info.value.fields()) == {"bits", "granularity", "group_size", "symmetric"}
    with pytest.raises(ConfigError) as info:
        parse_config({"quant_method": "rtn", "bits": 4.0})
    assert info.value.fields() == ["bits"]
    assert GGUFQuantConfig(quant_type="Q4_1").label == "GGUF Q4_1"
    assert GGUFQuantConfig(quant_type="Q4_K_M").label == "GGUF Q4_K_M"  # a llama-quantize file type
    with pytest.raises(ConfigError) as info:
        parse_config({"quant_method": "gguf", "quant_type": "TQ1_0"})  # a llama.cpp type quantlib does not offer
    assert info.value.fields() == ["quant_type"]


def test_configs_are_immutable_values() -> None:
    a = parse_config({"quant_method": "rtn", "bits": 4})
    assert a == RTNQuantConfig(bits=4) and a != RTNQuantConfig(bits=8)
    assert hash(a) == hash(RTNQuantConfig(bits=4))
    with pytest.raises(AttributeError):
        a.bits = 8  # type: ignore[misc]
    assert a.replace(bits=8) == RTNQuantConfig(bits=8)
    with pytest.raises(ConfigError):
        a.replace(bits=9)
    assert RTNQuantConfig.from_dict({"bits": 4}) == a
    with pytest.raises(ConfigError):
        RTNQuantConfig.from_dict({"quant_method": "gguf"})


def test_warnings_flag_settings_that_have_no_effect() -> None:
    config = BitsAndBytesQuantConfig(load_in_8bit=True, bnb_4bit_quant_type="nf4")
    assert any("bnb_4bit_quant_type" in w for w in config.warnings())
    assert BitsAndBytesQuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").warnings() == []


def test_schema_describes_every_field_and_agrees_with_validation() -> None:
    schemas = config_schemas()
    assert set(schemas) == set(CONFIG_MAPPING)
    for method, schema in schemas.items():
        cls = CONFIG_MAPPING[method]
        # Closed: either the form's keys (and the mirrors transformers writes), or the saved form.
        assert schema.get("additionalProperties") is False or all(
            branch["additionalProperties"] is False for branch in schema["anyOf"])
        assert set(schema["properties"]) == {"quant_method", *cls.field_names()}
        defaults = {k: p["default"] for k, p in schema["properties"].items() if "default" in p}
        for name, prop in schema["properties"].items():
            for value in prop.get("enum", []):
                if value is None:
                    continue
                # Every value the schema offers must be accepted by the validator, alone.
                base = {"quant_method": method, **({"load_in_4bit": True} if method == "bitsandbytes" else {})}
                parse_config({**base, name: value})
        assert defaults
    bnb = schemas["bitsandbytes"]["properties"]
    assert bnb["bnb_4bit_quant_type"]["enum"] == ["nf4", "fp4"]
    assert bnb["bnb_4bit_quant_type"]["x-visible-when"] == {"field": "load_in_4bit", "equals": True}
    assert bnb["llm_int8_threshold"]["minimum"] == 0.0
