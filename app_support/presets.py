"""The presets of `quantlib.presets`, keyed by their display label for the app's selectboxes.

One list serves the app and the command line (`--preset nf4-dq`); here each preset is shown by
its config's label (e.g. "NF4+DQ", "GGUF Q8_0").
"""

from __future__ import annotations

from typing import Any

from quantlib.configs import QuantConfig, parse_config
from quantlib.presets import PRESETS as _BY_KEY

#: display label -> config dict, in quantlib's preset order.
PRESETS: dict[str, dict[str, Any]] = {parse_config(cfg).label: dict(cfg) for cfg in _BY_KEY.values()}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_config(name: str) -> QuantConfig:
    """The validated config of a preset (KeyError for an unknown name)."""
    return parse_config(dict(PRESETS[name]))


def preset_configs() -> dict[str, QuantConfig]:
    """Every preset, validated, in display order."""
    return {name: preset_config(name) for name in PRESETS}
