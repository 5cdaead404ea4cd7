"""Quantization Explorer engine: validated configs, exact quantization math, measurements.

Never imports Streamlit: the app's pages are thin layers over this package.
"""

from quantlib.configs import (
    CONFIG_MAPPING,
    BitsAndBytesQuantConfig,
    GGUFQuantConfig,
    QuantConfig,
    RTNQuantConfig,
    config_schemas,
    parse_config,
    registered_methods,
)
from quantlib.errors import BackendUnavailableError, Cancelled, ConfigError, FieldError, QuantlibError

__all__ = [
    "CONFIG_MAPPING",
    "BackendUnavailableError",
    "BitsAndBytesQuantConfig",
    "Cancelled",
    "ConfigError",
    "FieldError",
    "GGUFQuantConfig",
    "QuantConfig",
    "QuantlibError",
    "RTNQuantConfig",
    "config_schemas",
    "parse_config",
    "registered_methods",
]
