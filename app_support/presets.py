"""The presets of `quantlib.presets`, keyed by their display label for the app's selectboxes.

One list serves the app and the command line (`--preset nf4-dq`); here each preset is shown by
its config's label (e.g. "NF4+DQ", "GGUF Q8_0").
"""

from __future__ import annotations

from typing import Any

from quantlib.configs import QuantConfig
from quantlib.registry import parse_config
from quantlib.presets import PRESET_TITLES
from quantlib.presets import PRESETS as _BY_KEY

#: display label -> config dict, in quantlib's preset order.
PRESETS: dict[str, dict[str, Any]] = {parse_config(cfg).label: dict(cfg) for cfg in _BY_KEY.values()}
#: display label -> the preset's description, where it says more than the label.
DESCRIPTIONS: dict[str, str] = {parse_config(cfg).label: PRESET_TITLES[key] for key, cfg in _BY_KEY.items()
                                if key in PRESET_TITLES and PRESET_TITLES[key] != parse_config(cfg).label}
#: How the Config Builder's current config is named wherever a page offers it.
BUILDER_PREFIX = "Config Builder: "


def option_text(name: str) -> str:
    """A picker's text for an option: the label the tables use, then what the preset is."""
    return f"{name} · {DESCRIPTIONS[name]}" if name in DESCRIPTIONS else name


def preset_config(name: str) -> QuantConfig:
    """The validated config of a preset (KeyError for an unknown name)."""
    return parse_config(dict(PRESETS[name]))


def preset_configs() -> dict[str, QuantConfig]:
    """Every preset, validated, in display order."""
    return {name: preset_config(name) for name in PRESETS}
