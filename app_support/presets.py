"""Named quantization configs shared by the Config Builder, Memory Planner and Compare pages.

Each preset is a plain config dict (only non-default keys plus `quant_method`), validated by
`quantlib.configs.parse_config` when used, so a typo here fails loudly in the tests.
"""

from __future__ import annotations

from typing import Any

from quantlib.configs import QuantConfig, parse_config

PRESETS: dict[str, dict[str, Any]] = {
    "NF4+DQ": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
               "bnb_4bit_use_double_quant": True},
    "NF4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "FP4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "INT8 (threshold 6.0)": {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 6.0},
    "RTN int4 g64": {"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 64},
    "RTN int8 per-channel": {"quant_method": "rtn", "bits": 8, "granularity": "channel"},
    "GGUF Q4_0": {"quant_method": "gguf", "quant_type": "Q4_0"},
    "GGUF Q8_0": {"quant_method": "gguf", "quant_type": "Q8_0"},
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_config(name: str) -> QuantConfig:
    """The validated config of a preset (KeyError for an unknown name)."""
    return parse_config(dict(PRESETS[name]))


def preset_configs() -> dict[str, QuantConfig]:
    """Every preset, validated, in display order."""
    return {name: preset_config(name) for name in PRESETS}
