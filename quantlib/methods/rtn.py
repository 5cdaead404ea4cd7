"""Round-to-nearest integers (RTN): the config, the quantizer and its tensor format, simulated in torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.formats import QuantizedTensor, block_absmax, check_float
from quantlib.methods.base import Quantizer, register
from quantlib.methods.base.rules import group_size_problem

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 10



class RTNQuantConfig(QuantConfig):
    """Round-to-nearest integer weights: the baseline every smarter method must beat.

    Symmetric (absmax) or asymmetric (min/max with a zero point) integer codes, with one scale per
    tensor, per output channel, or per group of `group_size` input features. Applied as simulated
    quantization (weights replaced by their quantize→dequantize result).
    """

    quant_method = "rtn"
    description = "Round-to-nearest integer baseline (absmax or min/max), per tensor, channel or group."
    FIELDS = (
        FieldSpec("bits", int, 8, "Bits per weight.", choices=(2, 3, 4, 5, 6, 7, 8), title="Bits"),
        FieldSpec("granularity", str, "channel", "One scale per whole tensor, per output channel, or per group.",
                  choices=("tensor", "channel", "group"), title="Granularity"),
        FieldSpec("group_size", int, 64, "Input features per scale group (must divide the layer width).",
                  minimum=1, maximum=65536, visible_when=("granularity", "group"), title="Group size"),
        FieldSpec("symmetric", bool, True, "Symmetric absmax codes (true) or asymmetric min/max with a zero point.",
                  title="Symmetric"),
        FieldSpec("modules_to_not_convert", list, None,
                  "Module names left unquantized (default: the output head, as transformers does).",
                  nullable=True, title="Skip modules", patterns=True),
    )

    @property
    def label(self) -> str:
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        return f"RTN int{self.bits} {gran}{'' if self.symmetric else ' asym'}"


@dataclass
class RTNTensor(QuantizedTensor):
    """Round-to-nearest integer quantization (the GPTQ/AWQ baseline without error feedback).

    ``codes`` are int8/uint8-valued integers (signed ``-(2**(b-1)-1)..2**(b-1)-1`` when
    symmetric, unsigned ``0..2**b-1`` with an integer ``zero`` point otherwise), laid out as
    ``(n_units, unit_size)`` where a unit is the tensor, a row or a group. ``scale`` is stored in
    fp16 (as in GPTQ/AWQ checkpoints), one per unit, and is used *as stored* (after fp16 rounding,
    rounded up so the extreme value is never clipped). Storage: ``b`` bits per code, 16 per scale,
    ``b`` per zero point (GPTQ and AWQ pack zero points at the code width).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    bits: int
    granularity: str
    group_size: Optional[int]
    shape: tuple[int, ...]
    dtype: torch.dtype
    COMPONENT_OF: ClassVar[dict[str, str]] = {"codes": "codes", "scale": "scales", "zero": "scales"}

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def storage_bits(self) -> dict[str, int]:
        bits = {"codes": self.bits * self.codes.numel(), "scale": 16 * self.scale.numel()}
        if self.zero is not None:
            bits["zero"] = self.bits * self.zero.numel()
        return bits

    @property
    def n_codes(self) -> int:
        return 2**self.bits

    def codes_unpacked(self) -> torch.Tensor:
        """Unsigned codes as stored; symmetric codes offset by ``2**(bits-1)``."""
        codes = self.codes.reshape(-1).long()
        return codes if not self.symmetric else codes + 2 ** (self.bits - 1)

    def dequantize(self) -> torch.Tensor:
        scale = self.scale.float().unsqueeze(-1)
        values = self.codes.float()
        if self.zero is not None:
            values -= self.zero.float().unsqueeze(-1)
        return (values * scale).reshape(self.shape).to(self.dtype)




def _rtn_units(w: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """fp32 view ``(n_units, unit_size)``: one row per quantization unit."""
    w32 = w.float()
    if granularity == "tensor":
        return w32.reshape(1, -1)
    if granularity == "channel":
        return w32.reshape(w.shape[0], -1) if w.dim() > 1 else w32.reshape(1, -1)
    if granularity == "group":
        last = w.shape[-1]
        if group_size <= 0 or last % group_size:
            raise ValueError(
                f"group_size {group_size} does not divide the last dimension {last} "
                f"(shape {tuple(w.shape)}); pick a divisor of {last}"
            )
        return w32.reshape(-1, group_size)
    raise ValueError(f"granularity must be 'tensor', 'channel' or 'group', got {granularity!r}")


def _fp16_scale(needed: torch.Tensor) -> torch.Tensor:
    """fp16 scale >= ``needed`` (rounded up one ulp if fp16 rounding went down); 0 -> 1."""
    scale = needed.clamp(max=65504.0).to(torch.float16)
    low = scale.float() < needed
    if low.any():
        scale[low] = torch.nextafter(scale[low], torch.tensor(float("inf"), dtype=torch.float16, device=scale.device))
    scale[scale == 0] = 1.0
    return scale


def quantize_rtn(
    w: torch.Tensor,
    bits: int = 8,
    granularity: Literal["tensor", "channel", "group"] = "channel",
    group_size: int = 128,
    symmetric: bool = True,
) -> RTNTensor:
    """Round-to-nearest uniform integer quantization with fp16 scales.

    Symmetric: scale = absmax / (2**(b-1) - 1), codes ``round(x / scale)`` in
    ``-(2**(b-1)-1)..2**(b-1)-1`` (the most negative integer is unused so 0 sits in the middle).
    Asymmetric: range ``[min(x, 0), max(x, 0)]`` over ``2**b - 1`` steps with an integer zero
    point (so 0 is exact), codes ``0..2**b-1``. Units: the whole tensor, each output channel
    (dim 0), or groups of ``group_size`` along the input (last) dim. Max error per unit is at
    most scale/2 (the fp16 scale is rounded up, never clipping the extremes).
    """
    check_float(w, "quantize_rtn")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    units = _rtn_units(w, granularity, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = _fp16_scale(block_absmax(units) / qmax)
        codes = torch.round(units / scale.float().unsqueeze(1)).clamp_(-qmax, qmax).to(torch.int8)
        zero = None
    else:
        qmax = 2**bits - 1
        lo, hi = torch.aminmax(units, dim=1)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = _fp16_scale((hi - lo) / qmax)
        zero = torch.round(-lo / scale.float()).clamp_(0, qmax)
        codes = torch.round(units / scale.float().unsqueeze(1)).add_(zero.unsqueeze(1)).clamp_(0, qmax)
        codes, zero = codes.to(torch.uint8), zero.to(torch.uint8)
    gs = group_size if granularity == "group" else None
    return RTNTensor(codes, scale, zero, bits, granularity, gs, tuple(w.shape), w.dtype)


@register("rtn")
class RTNQuantizer(Quantizer):
    """Round-to-nearest integers, simulated in torch."""

    config_class = RTNQuantConfig

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        c = self.config
        return quantize_rtn(weight, bits=c.bits, granularity=c.granularity, group_size=c.group_size,
                            symmetric=c.symmetric)

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        n = out_features * in_features
        groups = {"tensor": 1, "channel": out_features,
                  "group": out_features * max(1, in_features // config.group_size)}[config.granularity]
        # fp16 scale per group, as GPTQ/AWQ checkpoints store them; asymmetric adds a `bits`-bit zero point.
        scales = 2.0 * groups + (0.0 if config.symmetric else groups * config.bits / 8)
        return {"codes": n * config.bits / 8, "scales": scales, "dq_constants": 0.0, "code_tables": 0.0}

    @classmethod
    def mix_problem(cls) -> str:
        return ("rtn: quantlib's own simulation, and no library loads a checkpoint of per-layer RTN settings; for "
                "int2-8 bits and group sizes per layer choose hqq (HqqConfig dynamic_config) or gptq (gptqmodel's "
                "dynamic)")

    @classmethod
    def shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        c = config
        if c.granularity == "group":
            return group_size_problem(name, shape[-1], c.group_size)
        return None

