"""Copyable Python that reproduces a config: transformers for bitsandbytes, quantlib otherwise."""

from __future__ import annotations

import json
from typing import Any

from quantlib.configs import QuantConfig

#: Hub id of the default model (the app itself uses the embedded GGUF copy of it).
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: bitsandbytes keys whose values are torch dtypes in transformers' idiom.
DTYPE_KEYS = ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")


def _py(value: Any) -> str:
    """A JSON value as Python source (True/False/None, floats with a point)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    return repr(value)


def bnb_kwargs(config: QuantConfig) -> list[tuple[str, str]]:
    """(kwarg, python source) for each non-default BitsAndBytesConfig argument, in field order."""
    diff = config.to_diff_dict()
    out = []
    for name in config.field_names():
        if name not in diff:
            continue
        value = diff[name]
        out.append((name, f"torch.{value}" if name in DTYPE_KEYS and isinstance(value, str) else _py(value)))
    return out


def transformers_snippet(config: QuantConfig, model_id: str = DEFAULT_HUB_ID) -> str | None:
    """Python building the same `BitsAndBytesConfig` and loading a model with it; None if
    transformers has no config class for this method."""
    if config.quant_method != "bitsandbytes":
        return None
    kwargs = bnb_kwargs(config)
    needs_torch = any(src.startswith("torch.") for _, src in kwargs)
    lines = []
    if needs_torch:
        lines.append("import torch")
    lines.append("from transformers import (")
    lines.append("    AutoModelForCausalLM,")
    lines.append("    BitsAndBytesConfig,")
    lines.append(")")
    lines.append("")
    lines.append("quantization_config = BitsAndBytesConfig(")
    lines += [f"    {name}={src}," for name, src in kwargs]
    lines.append(")")
    lines.append(f"model_id = {json.dumps(model_id)}")
    lines.append("model = AutoModelForCausalLM.from_pretrained(")
    lines.append("    model_id,")
    lines.append("    quantization_config=quantization_config,")
    lines.append('    device_map="auto",')
    lines.append(")")
    return "\n".join(lines)


def quantlib_snippet(config: QuantConfig, source: str = "default") -> str:
    """Python that applies the config with quantlib (works for every registered method)."""
    lines = [
        "from quantlib.apply import quantize_model",
        "from quantlib.configs import parse_config",
        "",
        f"config = parse_config({_py(config.to_diff_dict())})",
        f"quantized = quantize_model(config, source={json.dumps(source)})  # simulated unless bitsandbytes",
        "print(quantized.backend.reason, quantized.memory.total_bytes / 2**20, \"MiB\")",
    ]
    return "\n".join(lines)
