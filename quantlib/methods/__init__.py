"""Every quantization method, one module each, registered by `@register` (see `base.py`).

A method module holds its config class, its quantizer and its tensor format and math. Adding a
method is adding a module here and a line to `_METHODS`; nothing outside this package names one.
"""

from __future__ import annotations

import importlib

from quantlib.methods.base import (QUANTIZER_MAPPING, CalibratedQuantizer, LayerWeight, MatrixRef, QuantizedModel,
                                   Quantizer, ShapeError, get_quantizer, preflight, quantizer_class, register)

#: Method modules, imported in this order (the order of the registry, the builder and the CLI).
_METHODS = ("bitsandbytes", "rtn", "gguf", "hqq", "torchao", "quanto", "gptq", "awq", "aqlm")

for _name in _METHODS:
    importlib.import_module(f"quantlib.methods.{_name}")

__all__ = ["QUANTIZER_MAPPING", "CalibratedQuantizer", "LayerWeight", "MatrixRef", "QuantizedModel", "Quantizer",
           "ShapeError", "get_quantizer", "preflight", "quantizer_class", "register"]
