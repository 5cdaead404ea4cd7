"""Copyable Python that reproduces a config: transformers where it has the method, quantlib always."""

from __future__ import annotations

import json
from quantlib.configs import QuantConfig
from quantlib.methods.base import _py

#: Hub id of the default model (the app itself uses the embedded GGUF copy of it).
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def transformers_snippet(config: QuantConfig, model_id: str = DEFAULT_HUB_ID) -> str | None:
    """Python building the same config in transformers and loading a model with it (the method's own
    snippet); None if transformers has no config class for this method."""
    from quantlib.registry import quantizer_class

    return quantizer_class(config).snippet(config, model_id)


def quantlib_snippet(config: QuantConfig, source: str = "default") -> str:
    """Python that applies the config with quantlib (works for every registered method)."""
    lines = [
        "from quantlib.registry import parse_config, quantize_model",
        "",
        f"config = parse_config({_py(config.to_diff_dict())})",
        f"quantized = quantize_model(config, source={json.dumps(source)})  # simulated unless bitsandbytes",
        "print(quantized.backend.reason, quantized.memory.total_bytes / 2**20, \"MiB\")",
    ]
    return "\n".join(lines)
