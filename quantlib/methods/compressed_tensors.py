"""compressed-tensors, the checkpoint format vLLM serves (and transformers loads through `CompressedTensorsConfig`):
FP8 (per channel, per tensor, 128 x 128 blocks), NVFP4, MXFP4, MXFP8 and integer W4A16 / W8A16 / W8A8, each weight
quantized, stored and read back by compressed-tensors itself (`_ct_formats`), activations quantized as its forward
pass quantizes them.

The form names one of compressed-tensors' preset schemes for every Linear layer, the `ignore` list, and optionally a
scheme per module (`module_schemes`, one config group per scheme with the modules as exact targets: an exact name
outranks the "Linear" class target in compressed-tensors and vLLM). `to_dict()` writes the `quantization_config` a
llm-compressor checkpoint carries, made by compressed-tensors' own `QuantizationConfig`; a checkpoint's config.json
parses back when each of its groups is one of the modelled presets.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.errors import _MISSING, ConfigError, FieldError, QuantlibError
from quantlib.methods._ct_formats import (FUSED_SUFFIXES, GROUP_SCHEMES, SCHEMES, CTTensor, global_scale_of,
                                          planned_bytes, quantize_ct, quantize_input, static_input, weight_group)
from quantlib.methods.base import Quantizer, register
from quantlib.methods.base.rules import group_size_problem
from quantlib.shapes import DTYPE_BYTES, ModelShapes, WeightShape

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 45

#: Keys of the saved `quantization_config` besides `config_groups`, and the value each must have to be modelled.
_NEUTRAL_KEYS = {"kv_cache_scheme": (None,), "global_compression_ratio": None, "moe_sparsity_config": (None,),
                 "sparsity_config": (None, {}), "transform_config": (None, {}), "version": None,
                 "quantization_status": ("compressed", "frozen"), "format": None}


def _module_schemes_rule(value: Any) -> str | None:
    if not value:
        return "must name at least one module (or be null)"
    for module, scheme in value.items():
        if not isinstance(module, str) or not module:
            return "every key must be a module name, e.g. model.layers.3.mlp.down_proj"
        if scheme not in SCHEMES:
            return f"{module!r}: {scheme!r} is not one of {', '.join(SCHEMES)}"
    return None


class CompressedTensorsQuantConfig(QuantConfig):
    """A compressed-tensors `quantization_config`: one of its preset schemes per Linear layer, as vLLM loads it."""

    quant_method = "compressed-tensors"
    description = ("compressed-tensors (the format vLLM serves): FP8, NVFP4, MXFP4, MXFP8, int W4A16/W8A16/W8A8, "
                   "quantized and stored by compressed-tensors itself; activations as its forward pass quantizes them.")
    SAVED_FORM = {"config_groups": {"type": "object", "description": "compressed-tensors' config groups"},
                  "format": {"type": "string"}, "ignore": {"type": "array", "items": {"type": "string"}},
                  "quantization_status": {"type": "string"}, "kv_cache_scheme": {"type": "null"},
                  "global_compression_ratio": {"type": ["number", "null"]},
                  "moe_sparsity_config": {"type": "null"}, "sparsity_config": {"type": ["object", "null"]},
                  "transform_config": {"type": ["object", "null"]}, "version": {"type": "string"}}
    FIELDS = (
        FieldSpec("scheme", str, "FP8_DYNAMIC", "compressed-tensors' preset scheme for every Linear layer: "
                  + "; ".join(f"{k}: {v}" for k, v in SCHEMES.items()) + ".", choices=tuple(SCHEMES), title="Scheme"),
        FieldSpec("group_size", int, None, "Input features per scale of the integer group schemes (W4A16, W8A16; "
                  "null: the preset's 128). Fixed by the format for the others.", minimum=1, nullable=True,
                  title="Group size"),
        FieldSpec("ignore", list, ["lm_head"], "Modules left in 16 bits: exact names, or `re:` regular expressions, "
                  "as compressed-tensors matches them.", title="Ignore"),
        FieldSpec("module_schemes", dict, None, "A scheme per module (module name -> scheme): one config group per "
                  "scheme, its modules as exact targets; the others take the scheme above.", nullable=True,
                  validator=_module_schemes_rule, allowed="an object of module name -> scheme name",
                  title="Per-layer schemes"),
        FieldSpec("activations", bool, True, "Quantize each layer's input as the scheme says (FP8, NVFP4, MXFP4, MXFP8, "
                  "W8A8), as compressed-tensors' forward pass and vLLM's kernels do; off: the weights' share of the "
                  "loss alone. Not part of the exported config.", title="Activations as the scheme says"),
        FieldSpec("calibration_tokens", int, 2048, "Calibration tokens on which the static input scales are measured "
                  "(FP8's input_scale, NVFP4's input_global_scale; llm-compressor's static min-max observer).",
                  minimum=64, maximum=1_000_000, title="Calibration tokens"),
    )
    #: quantlib's own settings, written into `to_dict()` only where they differ from their defaults.
    EVALUATION_FIELDS = ("activations", "calibration_tokens")

    def __init__(self, **values: Any):
        object.__setattr__(self, "_values", self._validate(_flatten(dict(values))))

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The base schema, its saved form requiring only `config_groups` (a checkpoint may carry the other keys or
        not) and admitting quantlib's evaluation settings."""
        schema = super().json_schema()
        saved = schema["anyOf"][1]
        saved["required"] = ["quant_method", "config_groups"]
        saved["properties"].update({name: schema["properties"][name] for name in cls.EVALUATION_FIELDS})
        return schema

    @classmethod
    def check(cls, values: dict[str, Any], failed: set[str]) -> list[FieldError]:
        if {"scheme", "group_size"} & failed:
            return []
        if values["group_size"] is not None and values["scheme"] not in GROUP_SCHEMES:
            return [FieldError("group_size", values["group_size"], f"is fixed by the {values['scheme']} format",
                               f"null, or a scheme among {', '.join(GROUP_SCHEMES)}")]
        return []

    def scheme_for(self, module: str) -> str:
        """The scheme of layer `module`: its own, else the config's."""
        return (self.module_schemes or {}).get(module, self.scheme)

    def group_for(self, scheme: str) -> int | None:
        return self.group_size if scheme in GROUP_SCHEMES else None

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` of a compressed-tensors checkpoint, written by compressed-tensors'
        `QuantizationConfig` (plus quantlib's evaluation settings where they differ from their defaults)."""
        saved = json.loads(_saved_form(self.scheme, self.group_size, json.dumps(self.ignore),
                                       json.dumps(self.module_schemes, sort_keys=True)))
        for name in self.EVALUATION_FIELDS:
            spec = next(f for f in self.FIELDS if f.name == name)
            if self._values[name] != spec.default:
                saved[name] = self._values[name]
        return saved

    def to_transformers(self) -> Any:
        from transformers import CompressedTensorsConfig

        return CompressedTensorsConfig.from_dict(self.to_dict())

    def export_notes(self) -> list[str]:
        notes = ["Written by compressed-tensors' own QuantizationConfig: transformers' CompressedTensorsConfig and "
                 "vLLM read it as it is."]
        if any(self._values[n] != f.default for f in self.FIELDS for n in self.EVALUATION_FIELDS if f.name == n):
            notes.append("activations / calibration_tokens are quantlib's evaluation settings; compressed-tensors and "
                         "transformers ignore them.")
        return notes

    @property
    def label(self) -> str:
        label = f"CT {self.scheme}" + (f" g{self.group_size}" if self.group_size else "")
        if self.module_schemes:
            label += f" + {len(self.module_schemes)} per-layer"
        has_inputs = any(static_input(s) is not None or _has_inputs(s)
                         for s in {self.scheme, *(self.module_schemes or {}).values()})
        return label + ("" if self.activations or not has_inputs else ", weights only")


def _has_inputs(scheme: str) -> bool:
    from quantlib.methods._ct_formats import scheme_of

    return scheme_of(scheme).input_activations is not None


@lru_cache(maxsize=64)
def _saved_form(scheme: str, group_size: int | None, ignore: str, module_schemes: str) -> str:
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


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved `quantization_config` (with `config_groups`) as the form's fields; the form's own keys pass through.
    Neither (a checkpoint's block that names no scheme) is refused rather than read as the default scheme."""
    if "config_groups" not in raw:
        if "scheme" not in raw:
            raise ConfigError([FieldError("config_groups", _MISSING, "is missing: a compressed-tensors "
                                          "quantization_config names its schemes in config_groups",
                                          "config_groups (a checkpoint's form), or scheme (quantlib's form)")],
                              method=CompressedTensorsQuantConfig.quant_method)
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
        raise ConfigError(errors, method=CompressedTensorsQuantConfig.quant_method)
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


@register("compressed-tensors")
class CompressedTensorsQuantizer(Quantizer):
    """compressed-tensors' schemes, quantized and stored by compressed-tensors, simulated in the forward pass."""

    config_class = CompressedTensorsQuantConfig
    requires = (("compressed_tensors", "compressed-tensors"),)
    library = "compressed-tensors"

    #: Module name -> NVFP4 weight global scale shared by vLLM's fused matrices (set by `quantizable_layers`).
    global_scales: dict[str, torch.Tensor] | None = None
    #: Module name -> static input parameter (input_scale / input_global_scale), measured by `quantize_model`.
    input_params: dict[str, torch.Tensor] | None = None

    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "CompressedTensorsConfig"

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        from quantlib.methods._ct_formats import scheme_of

        return float(min(scheme_of(s).weights.num_bits for s in {config.scheme, *(config.module_schemes or {}).values()}))

    @classmethod
    def error_bits(cls, config: QuantConfig) -> float:
        """E4M3 elements (FP8, MXFP8) round like a 6-bit grid; E2M1 and the integers like their bits."""
        from quantlib.methods._ct_formats import scheme_of

        def bits(name: str) -> int:
            args = scheme_of(name).weights
            return 6 if (args.type == "float" and args.num_bits == 8) else args.num_bits

        return float(min(bits(s) for s in {config.scheme, *(config.module_schemes or {}).values()}))

    # ----- which layers ---------------------------------------------------------------------
    @classmethod
    def skip_rules(cls, config: QuantConfig, shapes: ModelShapes) -> list[tuple[str, str]]:
        return [(p, "kept in fp32 by the model (_keep_in_fp32_modules)") for p in shapes.keep_in_fp32_modules]

    @classmethod
    def unquantized_reason(cls, config: QuantConfig, w: WeightShape) -> str | None:
        from compressed_tensors.utils.match import match_name

        for pattern in config.ignore:
            if match_name(w.module, pattern):
                return f"in the config's ignore list ({pattern!r})"
        if w.kind != "linear":
            return f"{w.module_class} is not an nn.Linear, which the config's \"Linear\" target names"
        if w.role == "router":
            return "MoE routers / gates (llm-compressor's recipes ignore them; add them to ignore to say so)"
        return None

    @classmethod
    def config_problem(cls, config: QuantConfig) -> str | None:
        return None

    @classmethod
    def layer_shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        scheme = config.scheme_for(name)
        group = weight_group(scheme, config.group_for(scheme))
        if group is None or shape[-1] % group == 0:
            return None
        if scheme in GROUP_SCHEMES:
            return group_size_problem(name, shape[-1], group)
        return f"{name}: input width {shape[-1]} is not a multiple of {scheme}'s block of {group}"


    @classmethod
    def shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        return cls.layer_shape_problem(config, name, shape)

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int,
                      dtype: str = "float32") -> dict[str, float]:
        return planned_bytes(config.scheme, config.group_size, out_features, in_features, DTYPE_BYTES[dtype])

    @classmethod
    def layer_storage_bytes(cls, config: QuantConfig, w: WeightShape, dtype: str = "float32") -> dict[str, float]:
        scheme = config.scheme_for(w.module)
        return planned_bytes(scheme, config.group_for(scheme), w.out_features, w.in_features, DTYPE_BYTES[dtype])

    # ----- quantizing -----------------------------------------------------------------------
    def quantizable_layers(self, model: torch.nn.Module) -> list:
        refs = super().quantizable_layers(model)
        fp4 = {ref.name for ref in refs if _is_tensor_group(self.config.scheme_for(ref.name))}
        if fp4:
            own = {ref.name: global_scale_of(ref.get()) for ref in refs if ref.name in fp4}
            shared = dict(own)
            for suffixes in FUSED_SUFFIXES:
                parents = {n.rsplit(".", 1)[0] for n in own if n.rsplit(".", 1)[-1] in suffixes}
                for parent in parents:
                    members = [f"{parent}.{s}" for s in suffixes]
                    if all(m in own for m in members):  # vLLM fuses them: llm-compressor gives them one global scale
                        fused = torch.min(torch.cat([own[m] for m in members])).reshape(1)
                        shared.update(dict.fromkeys(members, fused))
            self.global_scales = shared
        return refs

    def quantize_tensor(self, weight: torch.Tensor) -> CTTensor:
        return quantize_ct(weight, self.config.scheme, self.config.group_for(self.config.scheme))

    def quantize_layer(self, name: str, weight: torch.Tensor) -> CTTensor:
        scheme = self.config.scheme_for(name)
        return quantize_ct(weight, scheme, self.config.group_for(scheme),
                           global_scale=(self.global_scales or {}).get(name),
                           input_param=(self.input_params or {}).get(name))

    def quantize_model(self, *, base: Any = None, source: str = "default", dtype: torch.dtype = torch.float32,
                       trust_remote_code: bool = False, allow_pickle: bool = False,
                       progress: Any = None, cancel: Any = None, calibration: Any = None) -> Any:
        """As every simulated method; where a scheme has static input scales and activations are simulated, they are
        measured first on the unquantized model (llm-compressor's static min-max observer on calibration text)."""
        if self.config.activations and self.input_params is None:
            from quantlib.methods._ct_formats import input_params_from_range, input_ranges
            from quantlib.models import load_model

            if base is None:
                base = load_model(source, dtype=dtype, device=self.backend.device,
                                  trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=progress)
            static = [ref.name for ref in self.quantizable_layers(base.model)
                      if static_input(self.config.scheme_for(ref.name)) is not None]
            if static:
                ranges = input_ranges(base.model, base.tokenizer, static, self.config.calibration_tokens,
                                      progress=progress, cancel=cancel)
                self.input_params = {name: input_params_from_range(self.config.scheme_for(name), *ranges[name],
                                                                   dtype=dtype)
                                     for name in static if name in ranges}
        quantized = super().quantize_model(base=base, source=source, dtype=dtype, trust_remote_code=trust_remote_code,
                                           allow_pickle=allow_pickle, progress=progress, cancel=cancel,
                                           calibration=calibration)
        if self.config.activations:
            add_input_quantization(quantized.model, quantized.packed_layers)
        return quantized

    def layer_output(self, x: torch.Tensor, packed: CTTensor) -> torch.Tensor:
        if self.config.activations:
            x = quantize_input(x, packed.scheme_name, packed.input_param)
        return x @ packed.dequantize().to(x.dtype).t()

    def kernel_paths(self, model: Any) -> list[str]:
        weights = ("quantlib's simulation: F.linear on the weights compressed-tensors decompresses, in the model's "
                   "dtype")
        if not self.config.activations:
            return [weights, "activations in the model's dtype (weights only)"]
        return [weights, "inputs quantized by compressed-tensors' forward_quantize: dynamic scales per token or group, "
                "static ones measured on calibration text (vLLM's CUDA kernels take the same scales)"]

    @classmethod
    def offload_problem(cls, config: QuantConfig, dtype: str) -> str | None:
        if config.activations and any(_has_inputs(s) for s in {config.scheme, *(config.module_schemes or {}).values()}):
            return ("its activations are quantized in the forward pass, which a checkpoint of dequantized weights does "
                    "not carry; set activations to false to evaluate the weights offloaded")
        return super().offload_problem(config, dtype)

    @classmethod
    def plan_notes(cls, config: QuantConfig, shapes: ModelShapes) -> list[str]:
        notes = []
        if _is_tensor_group(config.scheme):
            notes.append("NVFP4: one fp32 weight global scale per matrix, shared by q/k/v and by gate/up as vLLM "
                         "fuses them (llm-compressor sets the shared one to their minimum)")
        if static_input(config.scheme):
            notes.append(f"{config.scheme}: one {static_input(config.scheme)} per matrix, measured on calibration text")
        return notes


def _is_tensor_group(scheme: str) -> bool:
    from quantlib.methods._ct_formats import scheme_of

    return scheme_of(scheme).weights.strategy == "tensor_group"


def add_input_quantization(model: torch.nn.Module, packed_layers: dict[str, CTTensor]) -> list:
    """Hooks that quantize each quantized layer's input as its scheme says; returns their handles."""
    modules = dict(model.named_modules())
    handles = []
    for name, packed in packed_layers.items():
        module = modules.get(name)
        if module is None or not _has_inputs(packed.scheme_name):
            continue
        if static_input(packed.scheme_name) is not None and packed.input_param is None:
            raise QuantlibError(f"{name}: {packed.scheme_name}'s {static_input(packed.scheme_name)} was not measured")

        def pre_hook(_module: Any, args: tuple, packed: CTTensor = packed) -> tuple:
            return (quantize_input(args[0], packed.scheme_name, packed.input_param), *args[1:])

        handles.append(module.register_forward_pre_hook(pre_hook))
    return handles

