"""GPTQ (Frantar et al. 2022) through gptqmodel: the config transformers' GPTQConfig writes, the
quantizer that calibrates here, and the checkpoint's tensor layout (qweight, qzeros, scales, g_idx)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from quantlib.errors import _MISSING, FieldError
from quantlib.methods._gptqmodel import GptqmodelQuantizer, allow_fp32, as_out_in, pack_word_bits
from quantlib.methods._gptqmodel_config import (DYNAMIC_STORAGE_KEYS, GPTQ_BACKENDS, GPTQ_EXTRA_FIELDS, GPTQ_FORMATS,
                                                _gptq_family_fields, _GPTQFamilyConfig, dynamic_override)
from quantlib.methods._gptqmodel import groups as group_count
from quantlib.configs import QuantConfig
from quantlib.formats import QuantizedTensor
from quantlib.methods.base import _py, register
from quantlib.methods.base.families import TensorShapes
from quantlib.methods.base.records import MixChoice, MixSpace
from quantlib.shapes import ModelShapes, WeightShape

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 60


class GPTQQuantConfig(_GPTQFamilyConfig):
    """GPTQ (Frantar et al. 2022): Hessian-aware rounding, calibrated on text, run by gptqmodel.

    The keys are exactly those of `transformers.GPTQConfig.to_dict()` (including its legacy
    `checkpoint_format` mirror of `format`), with its normalisation: names lower-cased, a null
    backend becomes "auto", `act_group_aware` switched off under `desc_act`. Unlike transformers,
    `bits` has a default (4) so that a partial config can be filled in by the app. Keys written by
    AutoGPTQ, optimum and gptqmodel (`EXTRA_FIELDS`) are type-checked and kept, so a checkpoint's
    `quantization_config` block imports and exports unchanged; transformers itself drops them.
    """

    quant_method = "gptq"
    description = ("GPTQ: second-order (Hessian) rounding of int2/3/4/8 weights with per-group fp16 scales, "
                   "calibrated on text from the built-in corpus; needs gptqmodel to run.")
    FORMAT_MIRRORS = ("checkpoint_format",)
    FORMATS = GPTQ_FORMATS
    FIELDS = _gptq_family_fields(bits=(2, 3, 4, 8), bits_default=4, formats=GPTQ_FORMATS, format_default="gptq",
                                 backends=GPTQ_BACKENDS, backend_nullable=True, method="GPTQ")
    EXTRA_FIELDS = GPTQ_EXTRA_FIELDS

    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = super()._normalise(raw)
        if "backend" in raw and raw["backend"] is None:
            raw["backend"] = "auto"  # transformers' post_init does the same
        if raw.get("act_group_aware", _MISSING) is _MISSING and raw.get("desc_act") is True:
            raw["act_group_aware"] = False  # transformers' post_init turns it off under desc_act
        return raw

    @classmethod
    def check(cls, values: dict[str, Any], failed: set[str]) -> list[FieldError]:
        if {"desc_act", "act_group_aware"} & failed:
            return []
        if values["desc_act"] and values["act_group_aware"]:
            return [FieldError("act_group_aware", True, "cannot be true when desc_act is true",
                               "false (transformers' GPTQConfig turns it off under act-order)")]
        return []

    @classmethod
    def rules(cls) -> list[str]:
        return [*super().rules(), "act_group_aware must be false when desc_act is true."]

    TRANSFORMERS_CLASS = "GPTQConfig"
    TRANSFORMERS_MIRROR = "checkpoint_format"
    DYNAMIC_NOTE = ("dynamic per-module overrides: planned per layer (bits, group_size; \"-:\" keeps a module "
                    "unquantized) and honoured by gptqmodel's quantize and load (and vLLM); transformers' GPTQConfig "
                    "drops the key, so load such a checkpoint with GPTQModel.load")

    def layer_config(self, module: str) -> "GPTQQuantConfig | None":
        """The uniform config that quantizes `module` as this config does (its `dynamic` override of bits and
        group size applied), or None where a negative `dynamic` pattern leaves it unquantized."""
        dynamic = self._values.get("dynamic")
        if not dynamic:
            return self
        found = dynamic_override(dynamic, module)
        if found is False:
            return None
        changes = {k: found[k] for k in DYNAMIC_STORAGE_KEYS if found and k in found}
        cache = self.__dict__.setdefault("_layer_configs", {})
        key = tuple(sorted(changes.items()))
        if key not in cache:
            cache[key] = self.replace(dynamic=None, **changes)
        return cache[key]

    @property
    def label(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        text = f"GPTQ int{self.bits} {group}"
        if self.desc_act:
            text += " act-order"
        text += "" if self.sym else " asym"
        dynamic = self._values.get("dynamic")
        if dynamic:
            kept = sum(1 for k in dynamic if k.startswith("-:"))
            text += f" + dynamic ({len(dynamic) - kept} overridden, {kept} unquantized)"
        return text




@register("gptq")
class GPTQQuantizer(GptqmodelQuantizer):
    """GPTQ through gptqmodel (the backend transformers uses for GPTQConfig)."""

    config_class = GPTQQuantConfig
    method_name = "GPTQ"
    #: benchmarks/bench_calibrated.py: 857 s for 64k tokens on the 135M default model.
    CPU_CALIBRATION_COST = (30.0, 0.013)
    calibration = ("GPTQ calibrates on text (quantlib would feed its built-in corpus) and needs gptqmodel "
                   "for the Hessian-based rounding and int32 packing.")

    @classmethod
    def tensor_shapes(cls, config: QuantConfig, out_features: int, in_features: int) -> TensorShapes:
        """The buffers of gptqmodel's `BaseQuantLinear` (and AutoGPTQ's QuantLinear), GPTQ v1/v2 format.

        qweight: (in // W * bits, out) words of W bits (W = 32 for the default pack_dtype int32),
        the codes of `bits` bits packed along the input; qzeros: (groups, out // W * bits), one
        `bits`-bit zero point per group and output channel, stored even for sym=True; scales:
        (groups, out) fp16; g_idx: (in,) int32, the group of each input feature (written always,
        needed for desc_act). groups = ceil(in / group_size), or 1 for group_size -1. The bias
        (fp16, when the layer has one) is counted with the unquantized tensors.
        """
        word = pack_word_bits(config)
        bits = config.bits
        _, groups = group_count(config, in_features)
        return {
            "qweight": ((in_features // word * bits, out_features), word),
            "qzeros": ((groups, out_features // word * bits), word),
            "scales": ((groups, out_features), 16),
            "g_idx": ((in_features,), 32),
        }

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        """codes = qweight; scales = fp16 scales + packed qzeros + g_idx (per-group/feature metadata)."""
        t = cls.tensor_bytes(config, out_features, in_features)
        return {"codes": t["qweight"], "scales": t["scales"] + t["qzeros"] + t["g_idx"], "dq_constants": 0.0,
                "code_tables": 0.0}

    @classmethod
    def pack_problem(cls, config: QuantConfig, name: str, out_features: int, in_features: int) -> str | None:
        word = pack_word_bits(config)
        if in_features % word or out_features % word:
            return (f"{name}: shape {out_features}x{in_features} does not pack into {word}-bit words "
                    f"(GPTQ packs {config.bits}-bit codes along the input and zero points along the output; "
                    f"both widths must be multiples of {word})")
        return None

    @classmethod
    def skip_modules(cls, config: QuantConfig) -> list[str]:
        return list(getattr(config, "modules_to_not_convert", None) or [])



    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "GPTQConfig"

    def gptqmodel_config(self, QuantizeConfig: Any) -> Any:
        """gptqmodel's QuantizeConfig (offload to disk off: it is 3x slower on CPU)."""
        c = self.config
        return QuantizeConfig(bits=c.bits, group_size=c.group_size, desc_act=bool(c.desc_act), offload_to_disk=False,
                              sym=bool(c.sym), damp_percent=c.damp_percent, dynamic=c.dynamic or None)

    def gptqmodel_backends(self, BACKEND: Any) -> tuple[Any, Any, torch.dtype, torch.dtype]:
        """gptqmodel's pure-torch kernel, calibrated and run in fp32 like the baseline."""
        return BACKEND.GPTQ_TORCH, BACKEND.GPTQ_TORCH, torch.float32, torch.float32

    def prepare_library(self) -> None:
        from gptqmodel.nn_modules.qlinear import torch as gptq_torch

        allow_fp32([c for c in vars(gptq_torch).values() if isinstance(c, type)
                    and getattr(c, "SUPPORTS_DTYPES", None) and c.__module__ == gptq_torch.__name__])

    def dequantize_module(self, module: torch.nn.Module) -> torch.Tensor:
        return as_out_in(module, module.dequantize_weight().float())

    # ----- per-layer settings: gptqmodel's `dynamic` ---------------------------------------------
    @classmethod
    def layer_storage_bytes(cls, config: QuantConfig, w: WeightShape, dtype: str = "float32") -> dict[str, float]:
        layer = config.layer_config(w.module)
        return cls.storage_bytes(layer if layer is not None else config, w.out_features, w.in_features)

    @classmethod
    def layer_shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        layer = config.layer_config(name.split("[")[0])
        return None if layer is None else cls.shape_problem(layer, name, shape)

    @classmethod
    def unquantized_reason(cls, config: QuantConfig, w: WeightShape) -> str | None:
        if config.layer_config(w.module) is None:
            pattern = next(p for p in config.dynamic if p.startswith("-:") and dynamic_override({p: {}}, w.module) is False)
            return f"excluded by dynamic ({pattern!r})"
        return super().unquantized_reason(config, w)

    @classmethod
    def snippet(cls, config: QuantConfig, model_id: str) -> str | None:
        """transformers' GPTQConfig drops `dynamic`: a config with per-module overrides is quantized and loaded
        with GPTQModel itself (vLLM reads the same `dynamic` from the checkpoint)."""
        if not config.dynamic:
            return super().snippet(config, model_id)
        keys = ("bits", "group_size", "sym", "desc_act", "damp_percent", "dynamic")
        values = ", ".join(f"{k}={_py(config.to_dict()[k])}" for k in keys)
        return "\n".join([
            "from gptqmodel import GPTQModel, QuantizeConfig",
            "",
            f"quant_config = QuantizeConfig({values})",
            f"model = GPTQModel.load({json.dumps(model_id)}, quant_config)",
            "model.quantize(calibration_texts)  # a list of strings, e.g. 128 x 512 tokens",
            "model.save(\"out\")",
            "model = GPTQModel.load(\"out\")  # honours dynamic; transformers' GPTQConfig drops it",
        ])

    @classmethod
    def mix_problem(cls) -> str:
        return ("gptq: a per-module mix uses one group size for its settings, 128, 64 or 32, which must divide every "
                "quantized layer's input width")

    #: (bits, group size) of the per-layer mix; group size 0 stands for the largest that fits the model (<= 128)
    #: and -1 for half of it.
    MIX_SETTINGS: ClassVar[tuple[tuple[int, int], ...]] = ((4, 0), (8, 0), (3, 0), (2, 0), (4, -1))

    @classmethod
    def mix_spaces(cls, shapes: ModelShapes) -> list[MixSpace]:
        """gptqmodel's `dynamic` sets bits and group size per module (an anchored full-name pattern each) and
        leaves modules unquantized with "-:" patterns; the top-level bits/group_size are the most common
        setting, so the dict names only the exceptions. GPTQ rounds with each layer's inputs, so a setting's
        error is measured by gptqmodel's own GPTQ on the layer's captured calibration inputs
        (`quantize_layer_calibrated`)."""
        widths = {w.in_features for w in shapes.weights if w.is_matmul}
        group = next((g for g in (128, 64, 32) if all(n % g == 0 for n in widths)), None)
        if group is None:
            return []
        settings = []
        for bits, g in cls.MIX_SETTINGS:
            g = group if g == 0 else group // 2
            if g >= 16 and (bits, g) not in settings:
                settings.append((bits, g))
        choices = [MixChoice(f"int{b}-g{g}", f"int{b} g{g}", GPTQQuantConfig(bits=b, group_size=g), float(b))
                   for b, g in settings]
        by_key = dict(zip((c.key for c in choices), settings))

        def build(assignment: dict[str, str]) -> QuantConfig:
            quantized = [k for k in assignment.values() if k != "keep"]
            base_key = max(by_key, key=lambda k: (quantized.count(k), k == choices[0].key))
            bits, group_size = by_key[base_key]
            dynamic: dict[str, dict[str, Any]] = {}
            for module, key in assignment.items():
                anchored = "^" + re.escape(module) + "$"
                if key == "keep":
                    dynamic["-:" + anchored] = {}
                elif key != base_key:
                    b, g = by_key[key]
                    dynamic["+:" + anchored] = {"bits": b, "group_size": g}
            return GPTQQuantConfig(bits=bits, group_size=group_size, dynamic=dynamic or None)

        return [MixSpace("GPTQ, bits and group size per module", (*choices, MixChoice("keep", "kept unquantized", None,
                                                                                        16.0)),
                         "module", lambda module: module, build, choices[0].config,
                         "GPTQConfig keys plus gptqmodel's dynamic (one anchored pattern per module that differs from "
                         "the top-level setting; \"-:\" for the kept ones): GPTQModel.load and vLLM honour it, "
                         "transformers' GPTQConfig drops it",
                         "sensitivity is GPTQ of each layer on the unquantized model's inputs; the real calibration "
                         "quantizes blocks in sequence, each on the already-quantized model's activations, so errors "
                         "compound: the predicted KL is optimistic (whole mixes of the default model measured about "
                         "4x it, benchmarks/RESULTS.md) while its ranking of layers holds; verify to read the KL",
                         transformers_keeps=False)]

    def quantize_layer_calibrated(self, name: str, weight: torch.Tensor, inputs: torch.Tensor) -> QuantizedTensor:
        """gptqmodel's own GPTQ (`gptqmodel.quantization.gptq.GPTQ`, configured as its GPTQProcessor does) on
        one layer, with the Hessian from `inputs` (rows x in): what a calibration of this layer alone gives."""
        from gptqmodel.quantization.config import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ

        config = self.config.layer_config(name)
        if config is None:
            raise ValueError(f"{name}: this config leaves the layer unquantized")
        layer = torch.nn.utils.skip_init(torch.nn.Linear, weight.shape[1], weight.shape[0], bias=False)
        layer.weight.data = weight.detach().float().clone()
        quantizer = self if config is self.config else GPTQQuantizer(config, device="cpu")
        task = GPTQ(layer, quantizer.gptqmodel_config(QuantizeConfig))
        task.quantizer.configure(perchannel=True)
        task.add_batch(inputs.detach().float().unsqueeze(0), None)
        q, scale, zero, g_idx, *_ = task.quantize()
        return GPTQLayerTensor(q.to(weight.dtype), scale.float(), zero.float(), g_idx.long(), config.bits,
                               _layer_bits(config, weight.shape), tuple(weight.shape), weight.dtype)


def _layer_bits(config: QuantConfig, shape: tuple[int, ...]) -> dict[str, int]:
    """Stored bits of each buffer of one layer (the checkpoint's qweight, qzeros, scales, g_idx)."""
    shapes = GPTQQuantizer.tensor_shapes(config, shape[0], shape[-1])
    out = {}
    for name, (dims, width) in shapes.items():
        n = 1
        for d in dims:
            n *= int(d)
        out[name] = n * width
    return out


@dataclass
class GPTQLayerTensor(QuantizedTensor):
    """One layer as gptqmodel's GPTQ quantizes it: the dequantized weight it returns (scale x (code - zero),
    per group), the per-group scale and zero (out x groups) and the group of each input column."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    stored: dict[str, int]
    shape: tuple[int, ...]
    dtype: torch.dtype
    COMPONENT_OF: ClassVar[dict[str, str]] = {"qweight": "codes", "qzeros": "scales", "scales": "scales",
                                              "g_idx": "scales"}

    @property
    def storage_bits(self) -> dict[str, int]:
        return dict(self.stored)

    @property
    def n_codes(self) -> int:
        return 2 ** self.bits

    def codes_unpacked(self) -> torch.Tensor:
        codes = torch.round(self.weight.float() / self.scale[:, self.g_idx] + self.zero[:, self.g_idx])
        return codes.clamp(0, self.n_codes - 1).long().reshape(-1)

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(self.dtype)

