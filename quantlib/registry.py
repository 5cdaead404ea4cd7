"""The one module that knows both sides: every method's config class and its quantizers.

Modelled on transformers' `quantizers/auto.py` (`AUTO_QUANTIZATION_CONFIG_MAPPING` and
`AUTO_QUANTIZER_MAPPING`). The config framework (`quantlib.configs`) knows no method; each method module
(`quantlib/methods/<name>.py` or a package of that name) holds its config class and marks its quantizers with
`@register("key")` (`quantlib.methods.base`), which writes nothing global. This module discovers the method
modules, so adding a method is adding a module (and a preset line): nothing here names one.

Data flows one way: configs -> quantizers (`methods.base` and the method modules) -> this registry -> the
pipeline, the planner and the app. Importing `quantlib` alone loads none of it (`quantlib.__init__`).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from typing import TYPE_CHECKING, Any

import torch

import quantlib.methods as _methods_package
from quantlib.callbacks import CancelFn, ProgressFn
from quantlib.configs import QuantConfig
from quantlib.errors import _MISSING, BackendUnavailableError, ConfigError, FieldError
from quantlib.methods.base import QuantizedModel, Quantizer

if TYPE_CHECKING:
    from quantlib.models import LoadedModel

__all__ = ["CONFIG_MAPPING", "QUANTIZER_MAPPING", "config_schemas", "cpu_kernel_summaries", "get_quantizer",
           "method_libraries", "parse_config", "preflight", "quantize_model", "quantizer_class",
           "registered_methods"]

#: quant_method -> config class, in display order.
CONFIG_MAPPING: dict[str, type[QuantConfig]] = {}
#: quantizer key (see `QuantConfig.quantizer_key`) -> quantizer class, in display order.
QUANTIZER_MAPPING: dict[str, type[Quantizer]] = {}


def _method_modules() -> list[Any]:
    """Every method module (helpers start with an underscore; `base` is the base class), ordered by its
    `DISPLAY_ORDER` (a module-level number, default 100) and then by name: the builder's method list and the CLI
    follow this order."""
    modules = [importlib.import_module(f"{_methods_package.__name__}.{m.name}")
               for m in pkgutil.iter_modules(_methods_package.__path__)
               if not m.name.startswith("_") and m.name != "base"]
    return sorted(modules, key=lambda m: (getattr(m, "DISPLAY_ORDER", 100), m.__name__))


def _marked_quantizers(module: Any) -> list[type[Quantizer]]:
    """The quantizer classes a method module (or package) marked with `@register`, in definition order."""
    found: dict[type, None] = {}
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Quantizer) and "registry_key" in vars(value) \
                and value.__module__.startswith(module.__name__):
            found.setdefault(value, None)
    return list(found)


def _discover() -> None:
    for module in _method_modules():
        for cls in _marked_quantizers(module):
            key = cls.registry_key
            if key in QUANTIZER_MAPPING and QUANTIZER_MAPPING[key] is not cls:
                raise ValueError(f"quantizer key {key!r} is registered twice ({QUANTIZER_MAPPING[key].__name__}, "
                                 f"{cls.__name__})")
            QUANTIZER_MAPPING[key] = cls
            method = cls.config_class.quant_method
            known = CONFIG_MAPPING.get(method)
            if known is not None and known is not cls.config_class:
                raise ValueError(f"quant_method {method!r} has two config classes ({known.__name__}, "
                                 f"{cls.config_class.__name__})")
            CONFIG_MAPPING[method] = cls.config_class


_discover()


# --------------------------------------------------------------------------- configs


def registered_methods() -> list[str]:
    return list(CONFIG_MAPPING)


def parse_config(obj: Any) -> QuantConfig:
    """Turn a dict or JSON text into a validated config; `ConfigError` is the only error raised.

    Also accepts a whole model `config.json` (its `quantization_config` block is used) and old
    bitsandbytes blocks that predate `quant_method` (inferred from `load_in_4bit`/`load_in_8bit`).
    """
    if isinstance(obj, QuantConfig):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        try:
            obj = obj.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError([FieldError("<file>", _MISSING, f"is not UTF-8 text ({exc.reason})",
                                          "a JSON object")]) from None
    if isinstance(obj, str):
        obj = _load_json(obj)
    if not isinstance(obj, dict):
        raise ConfigError([FieldError("<root>", obj, "must be a JSON object", "a JSON object with a quant_method")])
    if "quant_method" not in obj and isinstance(obj.get("quantization_config"), dict):
        obj = obj["quantization_config"]  # a model's config.json
    elif "quant_method" not in obj and "quantization_config" in obj:
        raise ConfigError([FieldError("quantization_config", obj["quantization_config"], "must be a JSON object",
                                      "a quantization config object")])
    method = obj.get("quant_method", _MISSING)
    if method is _MISSING:  # a block that predates quant_method: the one class that recognises it
        owners = [m for m, c in CONFIG_MAPPING.items() if c.recognises(obj)]
        method = owners[0] if len(owners) == 1 else _MISSING
    if method is _MISSING or not isinstance(method, str) or method not in CONFIG_MAPPING:
        message = "is missing" if method is _MISSING else "is not a registered method"
        raise ConfigError([FieldError("quant_method", method, message,
                                      "one of " + ", ".join(json.dumps(m) for m in CONFIG_MAPPING))])
    cls = CONFIG_MAPPING[method]
    return cls(**{str(k): v for k, v in obj.items()})


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([FieldError("<json>", _MISSING, f"is not valid JSON: {exc.msg} at line {exc.lineno} "
                                      f"column {exc.colno}", "a JSON object")]) from None
    except RecursionError:
        raise ConfigError([FieldError("<json>", _MISSING, "is nested too deeply", "a JSON object")]) from None


def config_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every registered config class, keyed by quant_method."""
    return {method: cls.json_schema() for method, cls in CONFIG_MAPPING.items()}


# --------------------------------------------------------------------------- quantizers


def quantizer_class(config: QuantConfig) -> type[Quantizer]:
    """The registered quantizer class of a parsed config (no environment check: for planning)."""
    cls = QUANTIZER_MAPPING.get(config.quantizer_key)
    if cls is None:  # a config class registered without a quantizer
        raise BackendUnavailableError(config.quant_method, "no quantizer is registered for it",
                                      "Register one with @quantlib.methods.base.register.")
    return cls


def get_quantizer(config: QuantConfig | dict | str, device: str = "auto") -> Quantizer:
    """Factory: validate the config, pick the quantizer, check libraries and hardware.

    Raises `ConfigError` for a bad config and `BackendUnavailableError` when the scheme cannot run
    here, both before any weights are touched. The returned quantizer's `.backend` says which
    backend was chosen and why.
    """
    config = parse_config(config)
    cls = quantizer_class(config)
    problem = cls.config_problem(config)
    if problem is not None:
        raise BackendUnavailableError(config.label, problem, "Change the config; quantlib refuses rather than guesses.")
    return cls(config, device=device)


def method_libraries() -> tuple[str, ...]:
    """The Python packages the registered methods run on (for version reports), in registry order."""
    seen: dict[str, None] = {}
    for cls in QUANTIZER_MAPPING.values():
        seen.setdefault(cls.library, None)
    return tuple(seen)


def cpu_kernel_summaries() -> list[str]:
    """For each method whose library picks its CPU kernels by CPU features: which it takes on this machine, in a few
    words (the app's backend line). Each method says it once, however many quantizers it registers."""
    seen: dict[str, None] = {}
    for cls in QUANTIZER_MAPPING.values():
        text = cls.cpu_kernel_summary()
        if text:
            seen.setdefault(text, None)
    return list(seen)


def preflight(config: QuantConfig | dict | str, model_config: dict[str, Any]) -> list[str]:
    """Problems a config will hit on a model, from `config.json` alone, before any weights are read
    (`Quantizer.shape_problems`); an empty list means the config fits the model."""
    config = parse_config(config)
    return quantizer_class(config).shape_problems(config, model_config)


def quantize_model(config: QuantConfig | dict | str, *, base: LoadedModel | None = None, source: str = "default",
                   device: str = "auto", dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   allow_pickle: bool = False, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None, calibration: Any = None) -> QuantizedModel:
    """Quantize a model with a config and measure its footprint: `get_quantizer(config).quantize_model`.

    `base` (an unquantized model already in memory) saves a reload where the method can start from
    it; `calibration` reaches methods that calibrate (their settings object, e.g. the gptqmodel
    family's `CalibrationSettings`).
    """
    quantizer = get_quantizer(config, device=device)
    return quantizer.quantize_model(base=base, source=source, dtype=dtype, trust_remote_code=trust_remote_code,
                                    allow_pickle=allow_pickle, progress=progress, cancel=cancel,
                                    calibration=calibration)
