"""Quantization Explorer engine: validated configs, exact quantization math, measurements.

Never imports Streamlit: the app's pages are thin layers over this package. The names below are
the stable entry points; the modules hold the rest (see the README's module list).

`import quantlib` loads nothing but this file and `quantlib.errors` (no torch, no method): the entry points
below load on first use, from `quantlib.configs` (the config framework, which knows no method) and
`quantlib.registry` (the one module that knows every method's config and quantizer).
"""

import logging

# torch warns about torchao's enums (torchao is imported by transformers when present): noise on every
# model load; torchao's own logger is quieted in quantlib/methods/torchao.py. Real errors still come through.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from quantlib.errors import BackendUnavailableError, Cancelled, ConfigError, FieldError, QuantlibError  # noqa: E402

__all__ = [
    "CONFIG_MAPPING",
    "BackendUnavailableError",
    "Cancelled",
    "ConfigError",
    "FieldError",
    "QuantConfig",
    "QuantlibError",
    "config_schemas",
    "get_quantizer",
    "parse_config",
    "registered_methods",
]

#: Entry point -> the module that holds it (imported on first use).
_LAZY = {"QuantConfig": "quantlib.configs", "CONFIG_MAPPING": "quantlib.registry",
         "config_schemas": "quantlib.registry", "get_quantizer": "quantlib.registry",
         "parse_config": "quantlib.registry", "registered_methods": "quantlib.registry"}


def __getattr__(name: str):
    """The heavier entry points load on first use, so `import quantlib` stays cheap."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quantlib' has no attribute {name!r}")
