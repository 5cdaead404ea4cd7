"""HQQ (Half-Quadratic Quantization, Badri & Shaji 2023) through the `hqq` package, as transformers'
`HqqConfig` uses it: the config, the quantizer and the tensor format.

HQQ needs no calibration data: for each group it fits a scale and a zero point by a half-quadratic
solver that minimises an lp (p = 0.7) error of the weights, then rounds. The quantizer builds the
same `hqq.core.quantize.HQQLinear` that transformers builds on load (compute dtype fp16, HQQ's
default, so scales and zeros are stored in fp16) and keeps what it stores: the packed codes `W_q`,
`scale`, `zero` and the layer's metadata tensors, all counted byte by byte. The model then runs
with the weights `HQQLinear.dequantize()` gives (simulated: exact fp16 values, fp32 matmuls).

Which layers: transformers' HQQ replaces every `nn.Linear` (routers included) whose *linear tag*
(the module name without `model`, `layers` and layer numbers, e.g. `self_attn.q_proj`) is not in
`skip_modules` (default `["lm_head"]`); with `dynamic_config`, only the tags it names, each with its
own settings. Conv1D modules and fused expert tensors are not `nn.Linear` and stay unquantized.

The saved form of the config is what `HqqConfig.to_dict()` writes (`quant_config`, the output of
hqq's `BaseQuantizeConfig`, or one per tag; `skip_modules`), so transformers loads the export
unchanged; the flat constructor keys (`nbits`, `group_size`, `axis`, `view_as_float`,
`dynamic_config`) are what the form edits, and both forms parse.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.errors import _MISSING, FieldError
from quantlib.formats import QuantizedTensor, check_float
from quantlib.methods.base import Quantizer, register
from quantlib.methods.base.records import MixChoice, MixSpace
from quantlib.shapes import ROLE_LABELS, ModelShapes, WeightShape

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 30

#: nbits transformers documents for HqqConfig (hqq itself also packs 5, 6 and 1.58 into bytes).
HQQ_BITS = (1, 2, 3, 4, 8)
#: hqq's packing of each width: (codes per container, container bytes), as `Quantizer.bit_to_packing`.
PACKING = {8: ("8bit_u8", 1, 1), 4: ("4bit_u8", 2, 1), 3: ("3bit_32", 10, 4), 2: ("2bit_u8", 4, 1),
           1: ("1bit_u8", 8, 1)}
#: Keys of one layer's settings in `dynamic_config` (hqq's BaseQuantizeConfig arguments we model).
LAYER_KEYS = ("nbits", "group_size", "axis", "view_as_float")
#: Bytes of the metadata tensors `HQQLinear.state_dict()` stores per layer beside W_q/scale/zero
#: (nbits, group_size, axis as int32; shape as 2 x int64; the packing, view dtype and compute dtype
#: names as bytes; eight one-byte flags), for compute dtype fp16. Tested against the state dict.
META_BYTES = 68
COMPUTE_DTYPE = torch.float16


def linear_tag(module: str) -> str:
    """transformers' `name_to_linear_tag`: the module name without model/layers and layer numbers."""
    return ".".join(n for n in module.split(".") if n not in ("model", "layers") and not n.isnumeric())


def _group_size_rule(value: Any) -> str | None:
    return None if value is None or value % 8 == 0 else "must be a multiple of 8 (hqq's BaseQuantizeConfig asserts it)"


def _layer_settings_problem(tag: str, entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"entry {tag!r} must be an object with {', '.join(LAYER_KEYS)}"
    unknown = sorted(set(entry) - set(LAYER_KEYS))
    if unknown:
        return f"entry {tag!r} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(LAYER_KEYS)}"
    nbits = entry.get("nbits", 4)
    if isinstance(nbits, bool) or nbits not in HQQ_BITS:
        return f"entry {tag!r}: nbits {nbits!r} is not one of {', '.join(map(str, HQQ_BITS))}"
    gs = entry.get("group_size", 64)
    if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or gs % 8):
        return f"entry {tag!r}: group_size {gs!r} must be a positive multiple of 8 or null"
    if entry.get("axis", 1) not in (0, 1) or isinstance(entry.get("axis", 1), bool):
        return f"entry {tag!r}: axis must be 0 or 1"
    if not isinstance(entry.get("view_as_float", False), bool):
        return f"entry {tag!r}: view_as_float must be true or false"
    return None


def _dynamic_rule(value: Any) -> str | None:
    if not value:
        return "must name at least one linear tag (or be null)"
    for tag, entry in value.items():
        problem = _layer_settings_problem(tag, entry)
        if problem:
            return problem
    return None


def base_quantize_config(nbits: int = 4, group_size: int | None = 64, axis: int = 1,
                         view_as_float: bool = False) -> dict[str, Any]:
    """hqq's `BaseQuantizeConfig` for these settings (its output, written out: JSON without hqq)."""
    return {"weight_quant_params": {"nbits": nbits, "channel_wise": True, "group_size": group_size, "optimize": True,
                                    "round_zero": nbits == 4, "axis": axis, "view_as_float": view_as_float},
            "scale_quant_params": None, "zero_quant_params": None, "offload_meta": False}


class HqqQuantConfig(QuantConfig):
    """HQQ: calibration-free affine quantization with per-group fp16 scale and zero found by a
    half-quadratic solver. Keys as transformers' HqqConfig (flat) and its saved form (nested)."""

    quant_method = "hqq"
    description = ("HQQ: calibration-free int1/2/3/4/8 with per-group fp16 scale and zero fitted by a "
                   "half-quadratic solver (the hqq package, as transformers' HqqConfig uses it).")
    ACCEPTED_EXTRA_KEYS = ("quant_config",)
    SAVED_FORM = {"quant_config": {"type": "object", "description": "hqq's BaseQuantizeConfig, or one per linear tag"},
                  "skip_modules": {"type": "array", "items": {"type": "string"}}}
    FIELDS = (
        FieldSpec("nbits", int, 4, "Bits per weight code.", choices=HQQ_BITS, title="Bits"),
        FieldSpec("group_size", int, 64, "Weights per scale/zero group (a multiple of 8; null: one group per "
                  "row for axis 1, per column for axis 0).", minimum=8, nullable=True, validator=_group_size_rule,
                  allowed="a positive multiple of 8", title="Group size"),
        FieldSpec("axis", int, 1, "Grouping axis: 1 groups consecutive weights of a row (the layout fast "
                  "kernels use), 0 groups along the flattened columns.", choices=(0, 1), title="Axis"),
        FieldSpec("view_as_float", bool, False, "Store the packed codes viewed as the compute dtype (for "
                  "distributed training); the bytes are the same.", title="View as float"),
        FieldSpec("dynamic_config", dict, None, "Per-layer settings: linear tag (e.g. self_attn.q_proj) -> "
                  "{nbits, group_size, axis, view_as_float}. Layers whose tag is not named stay unquantized.",
                  nullable=True, validator=_dynamic_rule,
                  allowed="an object of linear tag -> {nbits, group_size, axis, view_as_float}", title="Per-layer"),
        FieldSpec("skip_modules", list, ["lm_head"], "Linear tags left unquantized.", title="Skip modules"),
    )

    def __init__(self, **values: Any):
        object.__setattr__(self, "_values", self._validate(self._flatten(dict(values))))

    @classmethod
    def _flatten(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """The saved form (`quant_config`) as the flat keys; problems are reported by `_absorb`."""
        qc = raw.get("quant_config", _MISSING)
        if not isinstance(qc, dict):
            return raw
        if "weight_quant_params" in qc:
            settings = _settings_of(qc)
            if isinstance(settings, dict):
                raw.update({k: v for k, v in settings.items() if k not in raw})
        elif qc and all(isinstance(v, dict) for v in qc.values()):
            layers = {tag: _settings_of(entry) for tag, entry in qc.items()}
            if all(isinstance(s, dict) for s in layers.values()) and "dynamic_config" not in raw:
                raw["dynamic_config"] = layers
        return raw

    @classmethod
    def _absorb(cls, raw: dict[str, Any], values: dict[str, Any]) -> list[FieldError]:
        qc = raw.get("quant_config", _MISSING)
        if qc is _MISSING:
            return []
        if not isinstance(qc, dict) or not qc:
            return [FieldError("quant_config", qc, "must be hqq's BaseQuantizeConfig or one per linear tag",
                               '{"weight_quant_params": {...}, ...}')]
        entries = {"": qc} if "weight_quant_params" in qc else qc
        problems = []
        for tag, entry in entries.items():
            where = "quant_config" + (f".{tag}" if tag else "")
            settings = _settings_of(entry)
            if isinstance(settings, str):
                problems.append(FieldError(where, entry, settings, "hqq's BaseQuantizeConfig output"))
        return problems

    @classmethod
    def check(cls, values: dict[str, Any], failed: set[str]) -> list[FieldError]:
        skip = values.get("skip_modules")
        if "skip_modules" not in failed and not all(isinstance(s, str) and s for s in skip or []):
            return [FieldError("skip_modules", skip, "every entry must be a non-empty linear tag", '["lm_head"]')]
        return []

    def layer_settings(self, tag: str) -> dict[str, Any] | None:
        """(nbits, group_size, axis, view_as_float) of a linear tag, or None where it stays unquantized."""
        if tag in self.skip_modules:
            return None
        if self.dynamic_config:
            entry = self.dynamic_config.get(tag)
            return None if entry is None else {"nbits": 4, "group_size": 64, "axis": 1, "view_as_float": False,
                                               **entry}
        return {"nbits": self.nbits, "group_size": self.group_size, "axis": self.axis,
                "view_as_float": self.view_as_float}

    def quant_config(self) -> dict[str, Any]:
        if self.dynamic_config:
            return {tag: base_quantize_config(**{"nbits": 4, "group_size": 64, "axis": 1, "view_as_float": False,
                                                 **entry}) for tag, entry in self.dynamic_config.items()}
        return base_quantize_config(self.nbits, self.group_size, self.axis, self.view_as_float)

    def to_dict(self) -> dict[str, Any]:
        """`HqqConfig.to_dict()`: what a checkpoint's config.json holds and transformers loads."""
        return {"quant_method": self.quant_method, "quant_config": self.quant_config(),
                "skip_modules": list(self.skip_modules)}

    def to_transformers(self) -> Any:
        from transformers import HqqConfig

        return HqqConfig.from_dict(json.loads(json.dumps(self.to_dict())))

    @property
    def label(self) -> str:
        if self.dynamic_config:
            return f"HQQ per-layer ({len(self.dynamic_config)} tags)"
        group = "per-row" if self.group_size is None else f"g{self.group_size}"
        return f"HQQ int{self.nbits} {group}" + ("" if self.axis == 1 else " axis0")


def _settings_of(entry: Any) -> dict[str, Any] | str:
    """The modelled settings of one BaseQuantizeConfig dict, or why it cannot be modelled."""
    if not isinstance(entry, dict) or not isinstance(entry.get("weight_quant_params"), dict):
        return "must hold weight_quant_params"
    w = entry["weight_quant_params"]
    nbits = w.get("nbits")
    if nbits not in HQQ_BITS:
        return f"nbits {nbits!r} is not one of {', '.join(map(str, HQQ_BITS))}"
    expected = base_quantize_config(nbits, w.get("group_size"), w.get("axis", 1), w.get("view_as_float", False))
    if entry.get("scale_quant_params") is not None or entry.get("zero_quant_params") is not None:
        return "quantized scales/zeros are deprecated in hqq (HQQLinear ignores them); set them to null"
    if entry.get("offload_meta", False):
        return "offload_meta is deprecated in hqq and not supported for serialized models; set it to false"
    for key in ("channel_wise", "optimize", "round_zero"):
        if key in w and w[key] != expected["weight_quant_params"][key]:
            return (f"weight_quant_params.{key}={json.dumps(w[key])} differs from what BaseQuantizeConfig writes "
                    f"for {nbits} bits ({json.dumps(expected['weight_quant_params'][key])}); not modelled")
    unknown = sorted(set(w) - set(expected["weight_quant_params"]))
    if unknown:
        return f"weight_quant_params has unknown key(s) {', '.join(unknown)}"
    return {"nbits": nbits, "group_size": w.get("group_size"), "axis": w.get("axis", 1),
            "view_as_float": bool(w.get("view_as_float", False))}


# --------------------------------------------------------------------------------------------
# The tensor format
# --------------------------------------------------------------------------------------------


@dataclass
class HQQTensor(QuantizedTensor):
    """What `HQQLinear` stores for one weight: packed codes, fp16 scale and zero per group, metadata."""

    W_q: torch.Tensor
    meta: dict[str, Any]
    meta_bytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    COMPONENT_OF: ClassVar[dict[str, str]] = {"codes": "codes", "scale": "scales", "zero": "scales",
                                              "meta": "code_tables"}

    @property
    def nbits(self) -> int:
        return int(self.meta["nbits"])

    @property
    def storage_bits(self) -> dict[str, int]:
        def nbits_of(t: torch.Tensor) -> int:
            return 8 * t.numel() * t.element_size()

        return {"codes": nbits_of(self.W_q), "scale": nbits_of(self.meta["scale"]),
                "zero": nbits_of(self.meta["zero"]), "meta": 8 * self.meta_bytes}

    @property
    def n_codes(self) -> int:
        return 2 ** self.nbits

    def codes_unpacked(self) -> torch.Tensor:
        from hqq.core.quantize import Quantizer as HQQ

        view = self.W_q.view(self.meta["unpack_view_dtype"]) if self.meta["view_as_float"] else self.W_q
        codes = HQQ.unpack[self.meta["packing"]](view, dtype=torch.uint8)
        return codes.reshape(-1)[: self.numel].long()

    def dequantize(self) -> torch.Tensor:
        """`HQQLinear.dequantize()`: (codes - zero) x scale in fp16, in the original dtype."""
        from hqq.core.quantize import Quantizer as HQQ

        return HQQ.dequantize(self.W_q, self.meta).reshape(self.shape).to(self.dtype)


def quantize_hqq(w: torch.Tensor, nbits: int = 4, group_size: int | None = 64, axis: int = 1,
                 view_as_float: bool = False) -> HQQTensor:
    """Quantize one (out, in) weight with hqq's `HQQLinear`, exactly as transformers' HQQ does on load."""
    from hqq.core.quantize import HQQLinear

    check_float(w, "quantize_hqq")
    if w.dim() != 2:
        raise ValueError(f"quantize_hqq takes an (out, in) matrix, got shape {tuple(w.shape)}")
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(w.detach(), requires_grad=False)
    layer = HQQLinear(linear, base_quantize_config(nbits, group_size, axis, view_as_float),
                      compute_dtype=COMPUTE_DTYPE, device=str(w.device), del_orig=False)
    state = layer.state_dict()
    meta_bytes = sum(t.numel() * t.element_size() for k, t in state.items()
                     if k not in ("W_q", "scale", "zero", "bias") and isinstance(t, torch.Tensor))
    return HQQTensor(layer.W_q.data, layer.meta, meta_bytes, tuple(w.shape), w.dtype)


# --------------------------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------------------------


@register("hqq")
class HqqQuantizer(Quantizer):
    """HQQ through the hqq package on CPU (or CUDA), simulated with the weights HQQLinear dequantizes."""

    config_class = HqqQuantConfig
    requires = (("hqq", "hqq"),)
    library = "hqq"
    experts_policy = ("transformers' HQQ replaces every nn.Linear whose linear tag is not skipped (per-expert "
                      "nn.Linear lists and linear routers included); fused 3-D expert tensors stay in 16/32 bits")

    def quantize_layer(self, name: str, weight: torch.Tensor) -> HQQTensor:
        settings = self.config.layer_settings(linear_tag(name))
        if settings is None:
            raise ValueError(f"{name}: HQQ leaves this layer unquantized")
        return quantize_hqq(weight, **settings)

    def quantize_tensor(self, weight: torch.Tensor) -> HQQTensor:
        c = self.config
        return quantize_hqq(weight, c.nbits, c.group_size, c.axis, c.view_as_float)

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        return float(config.nbits if not config.dynamic_config else
                     min(e.get("nbits", 4) for e in config.dynamic_config.values()))

    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "HqqConfig"

    snippet_heading = ("transformers' HqqConfig (what a checkpoint's config.json holds) and hqq's own API to quantize: "
                       "transformers 5.23 cannot load HQQ through from_pretrained:")

    @classmethod
    def snippet(cls, config: QuantConfig, model_id: str) -> str | None:
        """transformers 5.23 refuses HqqConfig in from_pretrained ("HQQ is not available yet"), so the
        snippet builds the config transformers saves and quantizes with hqq's own model API."""
        from quantlib.methods.base import _py

        quant_config = config.quant_config()
        if config.dynamic_config is None:  # one setting for every linear tag: written once
            tags = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                    "mlp.up_proj", "mlp.down_proj")
            per_layer = [f"layer = {_py(quant_config)}", f"quant_config = {{tag: layer for tag in {json.dumps(list(tags))}}}"]
        else:
            per_layer = [f"quant_config = {_py(quant_config)}"]
        return "\n".join([
            "import torch",
            "from hqq.models.hf.base import AutoHQQHFModel",
            "from transformers import AutoModelForCausalLM, HqqConfig",
            "",
            "# What a checkpoint's config.json holds (HqqConfig.to_dict()):",
            f"quantization_config = HqqConfig.from_dict({_py(config.to_dict())})",
            f"model_id = {json.dumps(model_id)}",
            "# transformers 5.23 cannot load HQQ through from_pretrained (\"not available yet\"): quantize with hqq",
            "model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float16)",
            *per_layer,
            "AutoHQQHFModel.quantize_model(model, quant_config=quant_config, compute_dtype=torch.float16, "
            "device=\"cpu\")",
        ])

    #: (nbits, group_size) a per-layer mix chooses from: the widths transformers documents at groups of 64, and
    #: 4 bits at groups of 32 and 128 (the first is the uniform setting).
    MIX_SETTINGS: ClassVar[tuple[tuple[int, int], ...]] = ((4, 64), (8, 64), (3, 64), (2, 64), (4, 32), (4, 128))

    @classmethod
    def mix_spaces(cls, shapes: ModelShapes) -> list[MixSpace]:
        """HqqConfig's `dynamic_config` sets nbits/group_size per linear tag (transformers' `name_to_linear_tag`:
        the same setting for that projection in every block); a tag it does not name stays unquantized."""
        choices = [MixChoice(f"int{n}-g{g}", f"int{n} g{g}", HqqQuantConfig(nbits=n, group_size=g), float(n))
                   for n, g in cls.MIX_SETTINGS]
        settings = {c.key: {"nbits": n, "group_size": g} for c, (n, g) in zip(choices, cls.MIX_SETTINGS)}

        def build(assignment: dict[str, str]) -> QuantConfig:
            dynamic = {tag: dict(settings[key]) for tag, key in sorted(assignment.items()) if key != "keep"}
            if not dynamic:
                return HqqQuantConfig(skip_modules=["lm_head", *sorted(assignment)])
            return HqqQuantConfig(dynamic_config=dynamic, skip_modules=["lm_head"])

        return [MixSpace("HQQ, nbits and group size per linear tag",
                         (*choices, MixChoice("keep", "kept unquantized", None, 16.0)), "linear tag", linear_tag,
                         build, choices[0].config, "HqqConfig with dynamic_config (one entry per linear tag)",
                         "transformers' HQQ sets one setting per linear tag, shared by every block")]

    @classmethod
    def treatment(cls, config: QuantConfig, w: WeightShape, rules: list[tuple[str, str]]) -> str | None:
        if not w.is_matmul:
            return ROLE_LABELS[w.role]
        if w.kind != "linear":
            return f"{w.module_class} is not an nn.Linear, which transformers' HQQ replacement needs"
        tag = linear_tag(w.module)
        if tag in config.skip_modules:
            return f"skipped by skip_modules ({tag!r})"
        if config.dynamic_config and tag not in config.dynamic_config:
            return f"linear tag {tag!r} is not named in dynamic_config (HQQ leaves it unquantized)"
        return None

    @classmethod
    def layer_storage_bytes(cls, config: QuantConfig, w: WeightShape, dtype: str = "float32") -> dict[str, float]:
        settings = config.layer_settings(linear_tag(w.module))
        return _storage(w.out_features, w.in_features, **(settings or {}))

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        return _storage(out_features, in_features, config.nbits, config.group_size, config.axis)

    @classmethod
    def layer_shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        settings = config.layer_settings(linear_tag(name.split("[")[0]))
        return None if settings is None else _shape_problem(name, shape, settings["nbits"], settings["group_size"],
                                                            settings["axis"])

    @classmethod
    def shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        return cls.layer_shape_problem(config, name, shape)


def _geometry(out_features: int, in_features: int, group_size: int | None, axis: int) -> tuple[int, int]:
    """(rows, columns) of the matrix hqq quantizes: (numel / g, g) for axis 1, (g, numel / g) for axis 0."""
    n = out_features * in_features
    g = group_size if group_size is not None else (in_features if axis == 1 else out_features)
    return (n // g, g) if axis == 1 else (g, n // g)


def _shape_problem(name: str, shape: tuple[int, ...], nbits: int, group_size: int | None, axis: int) -> str | None:
    out_features, in_features = shape[0], shape[-1]
    n = out_features * in_features
    g = group_size if group_size is not None else (in_features if axis == 1 else out_features)
    if n % g:
        return f"{name}: {n} weights do not split into groups of {g} (hqq needs the count divisible by group_size)"
    rows, _ = _geometry(out_features, in_features, group_size, axis)
    _, per, _ = PACKING[nbits]
    if nbits != 3 and rows % per:
        return (f"{name}: {rows} rows of the grouped weight do not pack {per} per byte at {nbits} bits "
                f"(hqq packs along the rows)")
    return None


def _storage(out_features: int, in_features: int, nbits: int = 4, group_size: int | None = 64, axis: int = 1,
             view_as_float: bool = False) -> dict[str, float]:
    """Bytes of what HQQLinear stores: W_q packed along the grouped rows (3-bit: ten codes per int32
    word, rows padded to a multiple of ten), fp16 scale and zero per group, and the metadata tensors."""
    rows, cols = _geometry(out_features, in_features, group_size, axis)
    _, per, container = PACKING[nbits]
    codes = math.ceil(rows / per) * cols * container
    groups = out_features * in_features / (group_size if group_size is not None else
                                           (in_features if axis == 1 else out_features))
    return {"codes": float(codes), "scales": 2.0 * 2 * groups, "dq_constants": 0.0, "code_tables": float(META_BYTES)}
