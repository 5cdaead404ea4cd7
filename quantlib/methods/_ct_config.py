"""compressed-tensors' `quantization_config` as quantlib's form reads and writes it: each saved config group matched
to one of compressed-tensors' preset schemes (what a file says, less how it was calibrated), the keys quantlib does
not model refused by name, and the saved form written by compressed-tensors' own `QuantizationConfig`."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from quantlib.errors import _MISSING, ConfigError, FieldError
from quantlib.methods._ct_formats import GROUP_SCHEMES, SCHEMES

METHOD = "compressed-tensors"

#: Keys of the saved `quantization_config` besides `config_groups`, and the value each must have to be modelled.
_NEUTRAL_KEYS = {"kv_cache_scheme": (None,), "global_compression_ratio": None, "moe_sparsity_config": (None,),
                 "sparsity_config": (None, {}), "transform_config": (None, {}), "version": None,
                 "quantization_status": ("compressed", "frozen"), "format": None}


def module_schemes_rule(value: Any) -> str | None:
    if not value:
        return "must name at least one module (or be null)"
    for module, scheme in value.items():
        if not isinstance(module, str) or not module:
            return "every key must be a module name, e.g. model.layers.3.mlp.down_proj"
        if scheme not in SCHEMES:
            return f"{module!r}: {scheme!r} is not one of {', '.join(SCHEMES)}"
    return None


@lru_cache(maxsize=64)
def saved_form(scheme: str, group_size: int | None, ignore: str, module_schemes: str) -> str:
    """compressed-tensors' `QuantizationConfig(...).model_dump(mode="json")` with `quant_method`, as JSON text."""
    from compressed_tensors.quantization import QuantizationConfig

    from quantlib.methods._ct_formats import scheme_of

    per_module = json.loads(module_schemes) or {}
    groups: dict[str, Any] = {}
    formats = []
    for i, name in enumerate([scheme, *sorted(set(per_module.values()) - {scheme})]):
        group = scheme_of(name, group_size if name in GROUP_SCHEMES else None).model_copy(deep=True)
        targets = sorted(m for m, s in per_module.items() if s == name)
        group.targets = ["Linear"] if name == scheme else targets
        if name == scheme and targets:
            group.targets = ["Linear", *targets]
        groups[f"group_{i}"] = group
        formats.append(group.format)
    fmt = formats[0] if len(set(formats)) == 1 else "mixed-precision"
    config = QuantizationConfig(config_groups=groups, ignore=json.loads(ignore), format=fmt,
                                quantization_status="compressed")
    return json.dumps({"quant_method": "compressed-tensors", **config.model_dump(mode="json")})


def flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved `quantization_config` (with `config_groups`) as the form's fields; the form's own keys pass through.
    Neither (a checkpoint's block that names no scheme) is refused rather than read as the default scheme."""
    if "config_groups" not in raw:
        if "scheme" not in raw:
            raise ConfigError([FieldError("config_groups", _MISSING, "is missing: a compressed-tensors "
                                          "quantization_config names its schemes in config_groups",
                                          "config_groups (a checkpoint's form), or scheme (quantlib's form)")],
                              method=METHOD)
        return raw
    errors: list[FieldError] = []
    out = {k: v for k, v in raw.items() if k not in _NEUTRAL_KEYS and k != "config_groups"}
    for key, allowed in _NEUTRAL_KEYS.items():
        if key in raw and allowed is not None and raw[key] not in allowed:
            errors.append(FieldError(key, raw[key], "is not modelled by quantlib",
                                     " or ".join(json.dumps(a) for a in allowed)))
    parsed = _groups(raw["config_groups"], errors)
    if parsed is not None:
        out.update(parsed)
    if errors:
        raise ConfigError(errors, method=METHOD)
    return out


def _groups(groups: Any, errors: list[FieldError]) -> dict[str, Any] | None:
    """scheme / group_size / module_schemes of saved config groups, each matched to a modelled preset."""
    from compressed_tensors.quantization import QuantizationScheme

    from quantlib.methods._ct_formats import scheme_of

    if not isinstance(groups, dict) or not groups:
        errors.append(FieldError("config_groups", groups, "must be a non-empty object", "group name -> scheme"))
        return None
    default: tuple[str, int | None] | None = None
    per_module: dict[str, str] = {}
    group_sizes: set[int] = set()
    for key, group in groups.items():
        where = f"config_groups.{key}"
        try:
            parsed = QuantizationScheme.model_validate(group)
        except Exception as exc:  # noqa: BLE001 - pydantic's message names the bad key
            errors.append(FieldError(where, group, f"compressed-tensors refuses it ({str(exc).splitlines()[0]})",
                                     "a QuantizationScheme"))
            continue
        name = None
        for candidate in SCHEMES:
            size = parsed.weights.group_size if candidate in GROUP_SCHEMES and parsed.weights else None
            preset = scheme_of(candidate, size if size != scheme_of(candidate).weights.group_size else None)
            if (_saved(parsed.weights) == _saved(preset.weights)
                    and _saved(parsed.input_activations) == _saved(preset.input_activations)
                    and parsed.output_activations is None):
                name = candidate
                if candidate in GROUP_SCHEMES and size != scheme_of(candidate).weights.group_size:
                    group_sizes.add(size)
                break
        if name is None:
            errors.append(FieldError(where, group, "is not one of compressed-tensors' presets that quantlib models",
                                     ", ".join(SCHEMES)))
            continue
        names = [t for t in parsed.targets if t != "Linear"]
        bad = [t for t in names if t.startswith("re:") or "." not in t]
        if bad:
            errors.append(FieldError(f"{where}.targets", parsed.targets, "names a regex or a class other than Linear",
                                     "\"Linear\" or exact module names"))
            continue
        if "Linear" in parsed.targets:
            if default is not None:
                errors.append(FieldError(f"{where}.targets", parsed.targets, "targets Linear, as another group does",
                                         "one group for \"Linear\""))
            default = (name, None)
        per_module.update(dict.fromkeys(names, name))
    if len(group_sizes) > 1:
        errors.append(FieldError("config_groups", groups, "uses several group sizes", "one group size"))
    if errors:
        return None
    if default is None:
        errors.append(FieldError("config_groups", groups, "has no group targeting \"Linear\"",
                                 "one group whose targets include \"Linear\""))
        return None
    out: dict[str, Any] = {"scheme": default[0]}
    per_module = {m: s for m, s in per_module.items() if s != default[0]}
    if per_module:
        out["module_schemes"] = per_module
    if group_sizes:
        out["group_size"] = group_sizes.pop()
    return out


def _saved(args: Any) -> Any:
    """Quantization args as a checkpoint writes them, less how they were calibrated (the observer): what decides the
    stored numbers' format. (zp_dtype, for one, is not written.)"""
    if args is None:
        return None
    return {k: v for k, v in args.model_dump(mode="json").items() if k not in ("observer", "observer_kwargs")}
