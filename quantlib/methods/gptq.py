"""GPTQ (Frantar et al. 2022) through gptqmodel: the config transformers' GPTQConfig writes, the
quantizer that calibrates here, and the checkpoint's tensor layout (qweight, qzeros, scales, g_idx)."""

from __future__ import annotations

from typing import Any

import torch

from quantlib.errors import _MISSING, FieldError
from quantlib.methods._gptqmodel import (GPTQ_BACKENDS, GPTQ_EXTRA_FIELDS, GPTQ_FORMATS, GptqmodelQuantizer,
                                         _gptq_family_fields, _GPTQFamilyConfig, allow_fp32, as_out_in,
                                         pack_word_bits)
from quantlib.methods._gptqmodel import groups as group_count
from quantlib.configs import QuantConfig
from quantlib.methods.base import TensorShapes, register

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

    @property
    def label(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        text = f"GPTQ int{self.bits} {group}"
        if self.desc_act:
            text += " act-order"
        return text + ("" if self.sym else " asym")




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
                              sym=bool(c.sym), damp_percent=c.damp_percent)

    def gptqmodel_backends(self, BACKEND: Any) -> tuple[Any, Any, torch.dtype, torch.dtype]:
        """gptqmodel's pure-torch kernel, calibrated and run in fp32 like the baseline."""
        return BACKEND.GPTQ_TORCH, BACKEND.GPTQ_TORCH, torch.float32, torch.float32

    def prepare_library(self) -> None:
        from gptqmodel.nn_modules.qlinear import torch as gptq_torch

        allow_fp32([c for c in vars(gptq_torch).values() if isinstance(c, type)
                    and getattr(c, "SUPPORTS_DTYPES", None) and c.__module__ == gptq_torch.__name__])

    def dequantize_module(self, module: torch.nn.Module) -> torch.Tensor:
        return as_out_in(module, module.dequantize_weight().float())
