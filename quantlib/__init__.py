"""Quantization Explorer engine: validated configs, exact quantization math, measurements.

Never imports Streamlit: the app's pages are thin layers over this package. The names below are
the stable entry points; the modules hold the rest (see the README's module list).
"""

import logging

# torch warns about torchao's enums (torchao is imported by transformers when present): noise on every
# model load; torchao's own logger is quieted in quantlib/methods/torchao.py. Real errors still come through.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from quantlib.configs import (  # noqa: E402
    CONFIG_MAPPING,
    QuantConfig,
    config_schemas,
    parse_config,
    registered_methods,
)
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


def __getattr__(name: str):
    """Heavier entry points load on first use, so `import quantlib` stays cheap for config work."""
    if name == "get_quantizer":
        from quantlib.methods import get_quantizer

        return get_quantizer
    raise AttributeError(f"module 'quantlib' has no attribute {name!r}")
