"""What every quantized tensor format shares: the container, its storage accounting, input checks.


Why a torch reference next to bitsandbytes: the app shows *what* a format does to a weight (codes,
scales, error, honest storage) and must work where a library kernel is missing or buggy. The
reference reproduces bitsandbytes' CPU backend bit for bit (same packed codes, same absmax, same
double-quantization state; the tests check it), so either backend can be shown and compared. (Its CUDA
kernels differ at FP4 ties and in double quant's codes: quantlib/methods/bitsandbytes/formats.py says where.)

Storage convention (``QuantizedTensor.storage_bits``): every per-tensor, per-block, per-group or
per-row component a checkpoint must hold *for this tensor* is counted at the width it is stored
in, padding included (e.g. a packed 4-bit tensor of odd length holds a whole last byte). Constant
code tables shared by every tensor of a format (the 16 NF4/FP4 levels, the 256-entry dynamic map)
are *not* counted: they are part of the format, not of the tensor. (bitsandbytes' serialised
state does repeat the 1 KiB dynamic map per tensor as ``nested_quant_map``; we treat that as a
serialisation overhead, not as information.) The fp32 double-quantization offset is counted
(32 bits per tensor: negligible, but real).

Every stored component of a format maps to one memory component of the planner (`COMPONENT_OF`):
`codes`, `scales` (per-block/group/row scales and zero points), `dq_constants` (second-level
quantization state) or `code_tables` (per-tensor lookup tables). A component a format stores but
does not map is an error, never silently counted as something else.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Memory components of the planner's breakdown, in display order.
MEMORY_COMPONENTS = ("codes", "scales", "dq_constants", "code_tables")


class QuantizedTensor(ABC):
    """A quantized tensor: stored components, what they cost, and the way back.

    Subclasses are dataclasses holding the stored components; ``shape``/``dtype`` are those of the
    original tensor so :meth:`dequantize` can give back a drop-in replacement.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    @abstractmethod
    def storage_bits(self) -> dict[str, int]:
        """Bits each stored component occupies (see the module docstring for the convention)."""

    @property
    @abstractmethod
    def n_codes(self) -> int:
        """Size of the code alphabet, i.e. the range of :meth:`codes_unpacked`."""

    @abstractmethod
    def codes_unpacked(self) -> torch.Tensor:
        """Flat int64 code indices in ``[0, n_codes)``, one per element (for histograms)."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The approximation of the original tensor, in its original shape and dtype."""

    @property
    def numel(self) -> int:
        """Number of parameters of the original tensor."""
        return math.prod(self.shape)

    @property
    def total_bits(self) -> int:
        """Sum of :attr:`storage_bits`."""
        return sum(self.storage_bits.values())

    @property
    def bits_per_param(self) -> float:
        """Total stored bits divided by the number of parameters."""
        return self.total_bits / max(self.numel, 1)

    #: Stored component -> memory component (see the module docstring); formats extend it.
    COMPONENT_OF: ClassVar[dict[str, str]] = {"codes": "codes"}

    def storage_by_component(self) -> dict[str, float]:
        """Bytes of this tensor by memory component (codes / scales / dq_constants / code_tables)."""
        out: dict[str, float] = {}
        for key, nbits in self.storage_bits.items():
            if key not in self.COMPONENT_OF:
                raise KeyError(f"{type(self).__name__} stores {key!r} but does not say which memory component "
                               f"it is (add it to COMPONENT_OF: one of {', '.join(MEMORY_COMPONENTS)})")
            comp = self.COMPONENT_OF[key]
            out[comp] = out.get(comp, 0.0) + nbits / 8
        return out


def check_float(w: torch.Tensor, what: str) -> None:
    """Reject non-float inputs early: every method here quantizes real-valued weights."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} supports float32/float16/bfloat16 inputs, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{what} got an empty tensor (shape {tuple(w.shape)})")



def block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """Per-row max |x| of a 2-D fp32 view, without materialising ``abs`` of the whole tensor.

    ``max(max, -min)`` equals ``abs().max()`` exactly; ``+ 0.0`` turns a -0.0 into 0.0.
    """
    lo, hi = torch.aminmax(blocks, dim=1)
    return torch.maximum(hi, lo.neg_()).add_(0.0)



_TABLE_COPIES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def on_device(table: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A format's constant table (code levels, lookup tables) on `device`: itself where it already is, else one
    copy per device, made once and kept (the tables are a few KiB; the weights they index stay where the model
    lives, so tensor work runs on the model's device)."""
    device = torch.device(device)
    if table.device == device:
        return table
    if len(_TABLE_COPIES) > 256:  # tables live for the process; a caller passing fresh tensors must not grow this
        _TABLE_COPIES.clear()
    key = (id(table), str(device))
    kept = _TABLE_COPIES.get(key)
    if kept is None or kept[0] is not table:  # the original is kept alive with its copy, so its id is not reused
        kept = _TABLE_COPIES[key] = (table, table.to(device))
    return kept[1]
