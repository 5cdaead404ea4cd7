"""optimum-quanto weight quantization (int2 / int4 / int8 / float8) as transformers' `QuantoConfig` uses it:
the config, the quantizer and the tensor format.

Each linear weight goes through quanto's own `QLinear.from_module(..., weights=qintN)` and `freeze()`,
the path `from_pretrained(quantization_config=QuantoConfig(...))` takes, and what its weight tensor
stores is counted tensor by tensor: int2/int4 codes packed into bytes (`_data`), a scale and a float
shift per group in the model dtype (`_scale`, `_shift`); int8 / float8 codes with one scale per row.
quanto picks the group size itself (128, else 96 or 64 where the input width needs it, else one
group per row); the planner follows the same rule.

The model computes with the dequantized weights (simulated): for int2/int4 they are rebuilt with the
unpacking of quanto's `quanto::unpack` default kernel (written out, so that no C++ extension has to be
compiled); in fp32 and fp16 quanto's forward multiplies by exactly these weights.
Activation quantization is refused: transformers rejects it at load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.errors import BackendUnavailableError
from quantlib.formats import QuantizedTensor, check_float
from quantlib.methods.base import register
from quantlib.methods.base.families import LinearReplacingQuantizer
from quantlib.runtime import BackendReport
from quantlib.shapes import DTYPE_BYTES

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 50

WEIGHTS = ("float8", "int8", "int4", "int2")
ACTIVATIONS = ("int8", "float8")
BITS = {"float8": 8, "int8": 8, "int4": 4, "int2": 2}


class QuantoQuantConfig(QuantConfig):
    """optimum-quanto weights (int2/int4 grouped with a float shift, int8/float8 per row); keys as QuantoConfig."""

    quant_method = "quanto"
    description = ("optimum-quanto weight quantization: int2/int4 per group with a float shift, int8/float8 per "
                   "row, as transformers' QuantoConfig loads it.")
    FIELDS = (
        FieldSpec("weights", str, "int8", "Weight type.", choices=WEIGHTS, title="Weights"),
        FieldSpec("activations", str, None, "Activation type (transformers refuses activation quantization at "
                  "load; kept for export).", choices=ACTIVATIONS, nullable=True, title="Activations"),
        FieldSpec("modules_to_not_convert", list, None, "Module names left unquantized (null: transformers' "
                  "defaults, the output head and tied weights; a list replaces them).", nullable=True,
                  title="Skip modules", patterns=True),
    )

    def to_transformers(self) -> Any:
        from transformers import QuantoConfig

        return QuantoConfig.from_dict(self.to_dict())

    @property
    def label(self) -> str:
        return f"quanto {self.weights}" + (f" a{self.activations}" if self.activations else "")


def group_size_for(in_features: int, bits: int) -> int | None:
    """quanto's `QModuleMixin` rule for int2/int4: 128, lowered by 32 while it does not divide the input
    width (down to 32); None (one group per row) for narrow inputs or where none divides, and for 8 bits."""
    if bits not in (2, 4):
        return None
    group = 128
    if in_features <= group:
        return None
    while in_features % group and group > 32:
        group -= 32
    return group if in_features % group == 0 else None


# --------------------------------------------------------------------------------------------
# The tensor format
# --------------------------------------------------------------------------------------------


@dataclass
class QuantoTensor(QuantizedTensor):
    """What a frozen quanto weight stores: codes (packed for int2/int4), scale (and shift) per group or row."""

    data: torch.Tensor  # packed bytes (int2/int4) or int8 / float8 codes
    scale: torch.Tensor
    shift: torch.Tensor | None
    bits: int
    rows: int  # rows of the grouped code matrix before packing
    group_size: int | None
    qtype: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    COMPONENT_OF: ClassVar[dict[str, str]] = {"codes": "codes", "scale": "scales", "shift": "scales"}

    @property
    def storage_bits(self) -> dict[str, int]:
        def nbits(t: torch.Tensor) -> int:
            return 8 * t.numel() * t.element_size()

        bits = {"codes": nbits(self.data), "scale": nbits(self.scale)}
        if self.shift is not None:
            bits["shift"] = nbits(self.shift)
        return bits

    @property
    def n_codes(self) -> int:
        return 0 if self.qtype == "float8" else 2 ** self.bits

    def _codes(self) -> torch.Tensor:
        return unpack_codes(self.data, self.bits)[: self.rows] if self.bits in (2, 4) else self.data

    def codes_unpacked(self) -> torch.Tensor:
        codes = self._codes().reshape(-1)
        return codes.long() if self.bits in (2, 4) else codes.view(torch.int8).long() + 128

    def dequantize(self) -> torch.Tensor:
        """quanto's `dequantize()`: scale x codes - shift per group (int2/int4), codes x scale per row
        (int8/float8), in the scale's dtype (the model's), ungrouped to the weight's shape."""
        from optimum.quanto.tensor.grouped import ungroup

        codes = self._codes()
        if self.bits in (2, 4):
            values = self.scale * codes.to(self.scale.dtype) - self.shift
            return ungroup(values, axis=0, orig_shape=torch.Size(self.shape)).to(self.dtype) \
                if self.group_size is not None else values.reshape(self.shape).to(self.dtype)
        return (codes.to(self.scale.dtype) * self.scale).reshape(self.shape).to(self.dtype)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's `PackedTensor` layout, unpacked as its `quanto::unpack` default kernel does: value i of a
    byte is row block i of the code matrix, at bit offset bits x i. (Written out so that no C++
    extension is compiled; tests check it against quanto's own dequantize.)"""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(per_byte)]).to(torch.uint8)


def quantize_quanto(w: torch.Tensor, weights: str = "int8") -> QuantoTensor:
    """Quantize one (out, in) weight with quanto's `QLinear.from_module(...)` + `freeze()`."""
    from optimum.quanto import qfloat8, qint2, qint4, qint8
    from optimum.quanto.nn import QLinear

    check_float(w, "quantize_quanto")
    qtype = {"int2": qint2, "int4": qint4, "int8": qint8, "float8": qfloat8}[weights]
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
    linear.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
    qlinear = QLinear.from_module(linear, weights=qtype)
    qlinear.freeze()
    q = qlinear.weight
    bits = BITS[weights]
    if bits in (2, 4):
        return QuantoTensor(q._data._data, q._scale, q._shift, bits, int(q._data.shape[0]), qlinear.weight_group_size,
                            weights, tuple(w.shape), w.dtype)
    return QuantoTensor(q._data, q._scale, None, bits, w.shape[0], None, weights, tuple(w.shape), w.dtype)


# --------------------------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------------------------


@register("quanto")
class QuantoQuantizer(LinearReplacingQuantizer):
    """optimum-quanto on CPU (its own QLinear and freeze), simulated with the weights it dequantizes."""

    config_class = QuantoQuantConfig
    requires = (("optimum.quanto", "optimum-quanto"),)
    library = "optimum-quanto"
    transformers_path = "transformers' quanto path replaces"
    experts_policy = ("transformers' quanto path replaces nn.Linear modules (per-expert lists and linear routers "
                      "included); fused 3-D expert tensors stay in 16/32 bits")

    def validate_environment(self, device: str) -> BackendReport:
        if self.config.activations is not None:
            raise BackendUnavailableError(
                self.config.label, "transformers refuses quanto activation quantization at load (\"We don't "
                "support quantizing the activations with transformers library\")",
                "Set activations to null to quantize weights only; quanto's own API quantizes activations.")
        return super().validate_environment(device)

    def quantize_tensor(self, weight: torch.Tensor) -> QuantoTensor:
        return quantize_quanto(weight, self.config.weights)

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        return float(BITS[config.weights]) if config.weights != "float8" else 4.0  # e4m3: 3 mantissa bits + sign

    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "QuantoConfig"

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int,
                      dtype: str = "float32") -> dict[str, float]:
        """int2/int4: the (groups, group) code matrix packed 8/bits rows per byte row, scale and shift per
        group in the model dtype; int8/float8: one byte per weight and a scale per row."""
        bits = BITS[config.weights]
        scalar = DTYPE_BYTES[dtype]
        if bits in (2, 4):
            group = group_size_for(in_features, bits)
            rows, cols = (out_features * in_features // group, group) if group else (out_features, in_features)
            codes = math.ceil(rows / (8 // bits)) * cols
            return {"codes": float(codes), "scales": 2.0 * rows * scalar, "dq_constants": 0.0, "code_tables": 0.0}
        return {"codes": float(out_features * in_features), "scales": float(out_features * scalar),
                "dq_constants": 0.0, "code_tables": 0.0}
