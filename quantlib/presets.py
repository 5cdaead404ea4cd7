"""Named configs a practitioner reaches for first; shared by the app and the command line.

Each preset is a plain dict, validated by `parse_config` like any user input (a test checks all),
so a preset can be exported, edited in the Config Builder and re-imported without special cases.
"""

from __future__ import annotations

from quantlib.configs import QuantConfig, parse_config
from quantlib.errors import ConfigError, FieldError

PRESETS: dict[str, dict] = {
    "nf4-dq": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
               "bnb_4bit_use_double_quant": True},
    "nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 6.0},
    "rtn-int4-g64": {"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 64},
    "rtn-int4-g64-asym": {"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 64,
                          "symmetric": False},
    "rtn-int8": {"quant_method": "rtn", "bits": 8, "granularity": "channel"},
    "gguf-q4_0": {"quant_method": "gguf", "quant_type": "Q4_0"},
    "gguf-q4_1": {"quant_method": "gguf", "quant_type": "Q4_1"},
    "gguf-q8_0": {"quant_method": "gguf", "quant_type": "Q8_0"},
}

PRESET_TITLES: dict[str, str] = {
    "nf4-dq": "NF4 + double quant (QLoRA)",
    "nf4": "NF4",
    "fp4": "FP4",
    "int8": "LLM.int8() (threshold 6.0)",
    "rtn-int4-g64": "RTN int4, group 64, symmetric",
    "rtn-int4-g64-asym": "RTN int4, group 64, asymmetric",
    "rtn-int8": "RTN int8, per channel",
    "gguf-q4_0": "GGUF Q4_0",
    "gguf-q4_1": "GGUF Q4_1",
    "gguf-q8_0": "GGUF Q8_0",
}


def preset(name: str) -> QuantConfig:
    """The validated config of a preset; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise ConfigError([FieldError("preset", name, "is not a known preset", ", ".join(PRESETS))])
    return parse_config(PRESETS[name])
