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
from typing import Any

import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.errors import FieldError, QuantlibError
from quantlib.methods._ct_formats import (FUSED_SUFFIXES, GROUP_SCHEMES, SCHEMES, CTTensor, global_scale_of,
                                          planned_bytes, quantize_ct, quantize_input, static_input, weight_group)
from quantlib.methods._ct_config import flatten, module_schemes_rule, saved_form
from quantlib.methods.base import Quantizer, register
from quantlib.methods.base.records import MixChoice, MixSpace
from quantlib.methods.base.rules import natural_key
from quantlib.methods.base.rules import group_size_problem
from quantlib.shapes import DTYPE_BYTES, ModelShapes, WeightShape

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 45

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
                  validator=module_schemes_rule, allowed="an object of module name -> scheme name",
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
        object.__setattr__(self, "_values", self._validate(flatten(dict(values))))

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
        saved = json.loads(saved_form(self.scheme, self.group_size, json.dumps(self.ignore),
                                       json.dumps(self.module_schemes, sort_keys=True)))
        for name in self.EVALUATION_FIELDS:
            spec = next(f for f in self.FIELDS if f.name == name)
            if self._values[name] != spec.default:
                saved[name] = self._values[name]
        return saved

    def weights_only(self) -> QuantConfig | None:
        schemes = {self.scheme, *(self.module_schemes or {}).values()}
        return self.replace(activations=False) if self.activations and any(map(_has_inputs, schemes)) else None

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

    snippet_heading = ("Made with llm-compressor (transformers and vLLM load compressed-tensors checkpoints; transformers "
                       "does not write them):")

    @classmethod
    def snippet(cls, config: QuantConfig, model_id: str) -> str | None:
        """llm-compressor's `oneshot` with this config's groups and ignore list, then `vllm serve`."""
        from quantlib.methods.base import _py

        saved = config.to_dict()
        static = any(static_input(s) is not None for s in {config.scheme, *(config.module_schemes or {}).values()})
        return "\n".join([
            "from llmcompressor import oneshot",
            "from llmcompressor.modifiers.quantization import QuantizationModifier",
            "from transformers import AutoModelForCausalLM",
            "",
            f"model_id = {json.dumps(model_id)}",
            "model = AutoModelForCausalLM.from_pretrained(model_id, dtype=\"auto\")",
            f"recipe = QuantizationModifier(config_groups={_py(saved['config_groups'])}, ignore={_py(saved['ignore'])})",
            "oneshot(model=model, recipe=recipe" + (", dataset=..., num_calibration_samples=512)  # static input "
                                                    "scales need calibration text" if static else ")"),
            "model.save_pretrained(\"quantized\", save_compressed=True)  # then: vllm serve quantized",
        ])

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
        from quantlib.methods._ct_formats import scheme_of

        scheme = config.scheme_for(name)
        group = weight_group(scheme, config.group_for(scheme))
        if group is not None and shape[-1] % group:
            if scheme in GROUP_SCHEMES:
                return group_size_problem(name, shape[-1], group)
            return f"{name}: input width {shape[-1]} is not a multiple of {scheme}'s block of {group}"
        inputs = scheme_of(scheme).input_activations
        if config.activations and inputs is not None and inputs.group_size and shape[-1] % inputs.group_size:
            return (f"{name}: {scheme} quantizes its inputs in groups of {inputs.group_size}, which input width "
                    f"{shape[-1]} is not a multiple of (compressed-tensors and vLLM's kernels need whole groups); "
                    "set activations to false for the weights' share alone")
        return None

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

    def quantize_layer_calibrated(self, name: str, weight: torch.Tensor, inputs: torch.Tensor) -> CTTensor:
        """As `quantize_layer`; a static input parameter not yet measured is measured on `inputs` (the static
        min-max observer on the layer's calibration inputs)."""
        scheme = self.config.scheme_for(name)
        if self.config.activations and static_input(scheme) is not None and name not in (self.input_params or {}):
            from quantlib.methods._ct_formats import input_params_from_range

            param = input_params_from_range(scheme, inputs.amin().float(), inputs.amax().float(), dtype=weight.dtype)
            self.input_params = {**(self.input_params or {}), name: param}
        return self.quantize_layer(name, weight)

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
                "static ones measured on calibration text (vLLM's CUDA kernels compute them themselves: the same formula for "
                "FP8 and NVFP4, their own E8M0 rounding for MX)"]

    #: The schemes a per-layer mix chooses from (vLLM serves any of them in one checkpoint), with their code bits.
    MIX_SCHEMES = (("NVFP4", 4.0), ("MXFP4", 4.0), ("FP8_DYNAMIC", 8.0), ("MXFP8", 8.0), ("W8A16", 8.0))

    @classmethod
    def mix_spaces(cls, shapes: ModelShapes) -> list[MixSpace]:
        """compressed-tensors targets modules by name: every layer chooses its scheme, or stays in 16 bits (ignore).
        The exported config names the commonest scheme for "Linear", one more config group per other scheme with its
        modules as exact targets, and the layers kept in `ignore`."""
        choices = [MixChoice(s, s, CompressedTensorsQuantConfig(scheme=s), bits) for s, bits in cls.MIX_SCHEMES]

        def build(assignment: dict[str, str]) -> QuantConfig:
            quantized = {m: s for m, s in assignment.items() if s != "keep"}
            kept = sorted((m for m, s in assignment.items() if s == "keep"), key=natural_key)
            counts = {s: list(quantized.values()).count(s) for s in dict.fromkeys(quantized.values())}
            base = max(counts, key=counts.get) if counts else cls.MIX_SCHEMES[0][0]
            others = {m: s for m, s in sorted(quantized.items(), key=lambda kv: natural_key(kv[0])) if s != base}
            return CompressedTensorsQuantConfig(scheme=base, module_schemes=others or None, ignore=["lm_head", *kept])

        return [MixSpace("compressed-tensors, a scheme per layer",
                         (*choices, MixChoice("keep", "kept in 16 bits", None, 16.0)), "module", lambda module: module,
                         build, choices[0].config, "one compressed-tensors quantization_config (vLLM loads it): a "
                         "config group per scheme, its layers as exact targets; kept layers in ignore")]

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
    from quantlib.methods._ct_formats import add_input_hooks

    for name, packed in packed_layers.items():
        if static_input(packed.scheme_name) is not None and packed.input_param is None:
            raise QuantlibError(f"{name}: {packed.scheme_name}'s {static_input(packed.scheme_name)} was not measured")
    with_inputs = {name: packed for name, packed in packed_layers.items() if _has_inputs(packed.scheme_name)}
    return add_input_hooks(model, with_inputs,
                           lambda x, packed: quantize_input(x, packed.scheme_name, packed.input_param))
