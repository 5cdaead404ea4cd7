"""Every quantization method, one module each, registered by `@register` (see `base.py`).

A method module holds its config class, its quantizer and its tensor format and math. Modules here
are discovered, not listed: adding a method is adding a module (and a preset line); nothing outside
this package names one. Helper modules start with an underscore; `DISPLAY_ORDER` (a module-level
number, default 100) orders the registry, and so the builder's method list and the CLI.
"""

from __future__ import annotations

import importlib
import pkgutil

from quantlib import configs as _configs
from quantlib.methods.base import (QUANTIZER_MAPPING, CalibratedQuantizer, LayerWeight, MatrixRef, QuantizedModel,
                                   Quantizer, ShapeError, cpu_kernel_summaries, get_quantizer, preflight,
                                   quantizer_class, register)


def _discover() -> None:
    modules = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)
               if not m.name.startswith("_") and m.name != "base"]
    rank = {m.__name__: (getattr(m, "DISPLAY_ORDER", 100), m.__name__) for m in modules}
    for mapping in (QUANTIZER_MAPPING, _configs.CONFIG_MAPPING):
        ordered = sorted(mapping.items(), key=lambda kv: rank.get(kv[1].__module__, (100, kv[1].__module__)))
        mapping.clear()
        mapping.update(ordered)


_discover()

__all__ = ["QUANTIZER_MAPPING", "CalibratedQuantizer", "LayerWeight", "MatrixRef", "QuantizedModel", "Quantizer",
           "ShapeError", "cpu_kernel_summaries", "get_quantizer", "preflight", "quantizer_class", "register"]
