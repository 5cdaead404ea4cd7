"""Tensor-level quantization math: pure-torch references plus the bitsandbytes and gguf paths.

Why a torch reference next to bitsandbytes: the app shows *what* a format does to a weight (codes,
scales, error, honest storage) and must work where a library kernel is missing or buggy. The
reference reproduces bitsandbytes bit for bit (same packed codes, same absmax, same
double-quantization state; the tests check it), so either backend can be shown and compared.

Storage convention (``QuantizedTensor.storage_bits``): every per-tensor, per-block, per-group or
per-row component a checkpoint must hold *for this tensor* is counted at the width it is stored
in, padding included (e.g. a packed 4-bit tensor of odd length holds a whole last byte). Constant
code tables shared by every tensor of a format (the 16 NF4/FP4 levels, the 256-entry dynamic map)
are *not* counted: they are part of the format, not of the tensor. (bitsandbytes' serialised
state does repeat the 1 KiB dynamic map per tensor as ``nested_quant_map``; we treat that as a
serialisation overhead, not as information.) The fp32 double-quantization offset is counted
(32 bits per tensor: negligible, but real).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional, Union

import numpy as np
import torch

from quantlib.codebooks import FP4_LEVELS, NF4_LEVELS, dynamic_map

__all__ = [
    "BLOCKSIZES_4BIT",
    "BLOCKSIZES_8BIT",
    "GGUF_QUANTIZABLE_TYPES",
    "Blockwise4bitTensor",
    "Blockwise8bitTensor",
    "DoubleQuantState",
    "GGUFTensor",
    "QuantizedTensor",
    "RTNTensor",
    "RowwiseInt8Tensor",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "int8_decomposed_matmul",
    "int8_vectorwise_quant",
    "outlier_columns",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "quantize_gguf",
    "quantize_int8_weight",
    "quantize_rtn",
]

QuantType4bit = Literal["nf4", "fp4"]
Backend = Literal["torch", "bitsandbytes"]

# bitsandbytes 0.50 accepts these for quantize_4bit/dequantize_4bit (32 was added in 0.46).
BLOCKSIZES_4BIT: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Blockwise 8-bit: the sizes bitsandbytes documents for quantize_blockwise.
BLOCKSIZES_8BIT: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
# Double quantization always re-quantizes the absmax vector in blocks of 256 (bitsandbytes).
DQ_BLOCKSIZE = 256
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# bitsandbytes guards 1/absmax with this floor (a zero block would divide by zero).
_ABSMAX_FLOOR = 1e-38
_LUT_SIZE = 65536


# --------------------------------------------------------------------------------------------
# The container family
# --------------------------------------------------------------------------------------------


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


@dataclass
class DoubleQuantState:
    """bitsandbytes' double quantization of a 4-bit tensor's per-block absmax.

    ``absmax - offset`` (offset = mean absmax, fp32) is quantized blockwise to 8 bits with the
    dynamic map in blocks of 256: ``codes`` (uint8, one per 4-bit block) and ``absmax`` (fp32, one
    per 256 4-bit blocks). Why subtract the mean: absmaxes are all positive and similar, so
    centring them uses the signed dynamic map's resolution around zero.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor
    blocksize: int = DQ_BLOCKSIZE

    def dequantize(self) -> torch.Tensor:
        """The fp32 per-block absmax the 4-bit dequantization uses (bitsandbytes' order of ops)."""
        absmax = _dequantize_blockwise_flat(self.codes, self.absmax, dynamic_map(), self.blocksize)
        absmax += self.offset
        return absmax


@dataclass
class Blockwise4bitTensor(QuantizedTensor):
    """NF4/FP4 blockwise 4-bit tensor in bitsandbytes' layout.

    ``packed``: uint8, shape ``((n + 1) // 2, 1)``, two codes per byte, the *first* element in
    the high nibble. ``absmax``: fp32 per block of ``blocksize`` consecutive elements of the
    flattened tensor (the last block may be partial), or ``None`` when double-quantized
    (then ``dq`` holds it). ``backend`` records who produced it and is the default way back.
    """

    packed: torch.Tensor
    absmax: Optional[torch.Tensor]
    dq: Optional[DoubleQuantState]
    quant_type: QuantType4bit
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    backend: Backend = "torch"

    @property
    def storage_bits(self) -> dict[str, int]:
        bits = {"codes": 8 * self.packed.numel()}
        if self.dq is None:
            bits["absmax"] = 32 * self.absmax.numel()
        else:
            bits["absmax"] = 8 * self.dq.codes.numel()
            bits["dq_absmax"] = 32 * self.dq.absmax.numel()
            bits["dq_offset"] = 32 * self.dq.offset.numel()
        return bits

    @property
    def n_codes(self) -> int:
        return 16

    @property
    def levels(self) -> torch.Tensor:
        """The 16-entry code table of this tensor's format."""
        return _levels(self.quant_type)

    def block_absmax(self) -> torch.Tensor:
        """The fp32 per-block absmax actually used to dequantize (after undoing double quant)."""
        return self.absmax if self.dq is None else self.dq.dequantize()

    def codes_unpacked(self) -> torch.Tensor:
        return _unpack_nibbles(self.packed.reshape(-1), self.numel).long()

    def dequantize(self) -> torch.Tensor:
        return dequantize_4bit(self)


@dataclass
class Blockwise8bitTensor(QuantizedTensor):
    """Blockwise 8-bit tensor with the dynamic map (bitsandbytes ``quantize_blockwise``)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def storage_bits(self) -> dict[str, int]:
        return {"codes": 8 * self.codes.numel(), "absmax": 32 * self.absmax.numel()}

    @property
    def n_codes(self) -> int:
        return 256

    def codes_unpacked(self) -> torch.Tensor:
        return self.codes.reshape(-1).long()

    def dequantize(self) -> torch.Tensor:
        return dequantize_blockwise_8bit(self)


@dataclass
class RowwiseInt8Tensor(QuantizedTensor):
    """LLM.int8() weight format: int8 codes with one fp32 absmax per row (bitsandbytes ``SCB``).

    Rows are all leading dimensions flattened; a row's scale is ``absmax / 127``.
    """

    codes: torch.Tensor
    row_absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def storage_bits(self) -> dict[str, int]:
        return {"codes": 8 * self.codes.numel(), "row_absmax": 32 * self.row_absmax.numel()}

    @property
    def n_codes(self) -> int:
        return 256

    def codes_unpacked(self) -> torch.Tensor:
        """Offset binary: int8 code ``q`` becomes index ``q + 128``."""
        return self.codes.reshape(-1).long() + 128

    def dequantize(self) -> torch.Tensor:
        scale = (self.row_absmax / 127.0).unsqueeze(-1)
        return (self.codes.float() * scale).reshape(self.shape).to(self.dtype)


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


@dataclass
class GGUFTensor(QuantizedTensor):
    """A GGML block-quantized tensor: the raw bytes exactly as a .gguf file stores them."""

    data: np.ndarray
    qtype: "object"  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def storage_bits(self) -> dict[str, int]:
        return {"blocks": 8 * int(self.data.nbytes)}

    @property
    def n_codes(self) -> int:
        return _GGUF_CODE_LAYOUT[self.qtype.name][0] if self.qtype.name in _GGUF_CODE_LAYOUT else 0

    def codes_unpacked(self) -> torch.Tensor:
        """Per-element quant indices for the simple block types (Q8_0, Q4_0, Q4_1, MXFP4).

        Q8_0 codes are offset by 128 (int8). The order within a block is element order.
        """
        name = self.qtype.name
        if name not in _GGUF_CODE_LAYOUT:
            raise NotImplementedError(f"codes_unpacked is not implemented for GGUF type {name}")
        _, header_bytes, kind = _GGUF_CODE_LAYOUT[name]
        from gguf import GGML_QUANT_SIZES

        _, block_bytes = GGML_QUANT_SIZES[self.qtype]
        blocks = self.data.reshape(-1, block_bytes)[:, header_bytes:]
        if kind == "int8":
            return torch.from_numpy(blocks.view(np.int8).astype(np.int64) + 128).reshape(-1)
        low = blocks & 0x0F
        high = blocks >> 4
        # ggml nibble layout: low nibbles are elements 0..15, high nibbles 16..31 of the block.
        return torch.from_numpy(np.concatenate([low, high], axis=1).astype(np.int64)).reshape(-1)

    def dequantize(self) -> torch.Tensor:
        from gguf import quants

        values = quants.dequantize(self.data, self.qtype)
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(self.shape).to(self.dtype)


# name -> (n_codes, header bytes per block before the codes, code kind)
_GGUF_CODE_LAYOUT: dict[str, tuple[int, int, str]] = {
    "Q8_0": (256, 2, "int8"),
    "Q4_0": (16, 2, "nibble"),
    "Q4_1": (16, 4, "nibble"),
    "MXFP4": (16, 1, "nibble"),
}


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _check_float(w: torch.Tensor, what: str) -> None:
    """Reject non-float inputs early: every method here quantizes real-valued weights."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what} supports float32/float16/bfloat16 inputs, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{what} got an empty tensor (shape {tuple(w.shape)})")


def _levels(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return NF4_LEVELS
    if quant_type == "fp4":
        return FP4_LEVELS
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


@lru_cache(maxsize=None)
def _bucket_table(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between value-sorted levels and the sorted-position -> code-index map.

    Nearest-level rounding is then one ``bucketize`` (binary search over 15 midpoints) instead of
    an argmin over 16 distances. A value exactly on a midpoint goes to the *lower* level
    (``bucketize`` with ``right=False``), as in bitsandbytes. The sort is stable so FP4's +0
    (code 0) sorts before its -0 (code 8): values in (0, 0.0026] then get code 8, a quirk
    bitsandbytes has too (harmless: both mean 0).
    """
    levels = _levels(quant_type)
    order = torch.sort(levels, stable=True).indices
    sorted_levels = levels[order]
    midpoints = (sorted_levels[:-1] + sorted_levels[1:]) / 2
    return midpoints, order.to(torch.uint8)


@lru_cache(maxsize=None)
def _pair_table(quant_type: str) -> torch.Tensor:
    """(256, 2) fp32: the two levels a packed byte stands for (high nibble first).

    Dequantizing with one gather per *byte* halves the number of gathers.
    """
    levels = _levels(quant_type)
    byte = torch.arange(256)
    return torch.stack([levels[byte >> 4], levels[byte & 0x0F]], dim=1).contiguous()


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 bytes -> uint8 codes, high nibble first, trimmed to ``n`` (drops the pad nibble)."""
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return codes[:n]


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (even length) -> bytes ``(first << 4) | second``, shape (n/2, 1) like bnb."""
    pairs = codes.view(-1, 2)
    packed = pairs[:, 0] << 4
    packed |= pairs[:, 1]
    return packed.unsqueeze(1)


def _block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """Per-row max |x| of a 2-D fp32 view, without materialising ``abs`` of the whole tensor.

    ``max(max, -min)`` equals ``abs().max()`` exactly; ``+ 0.0`` turns a -0.0 into 0.0.
    """
    lo, hi = torch.aminmax(blocks, dim=1)
    return torch.maximum(hi, lo.neg_()).add_(0.0)


def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each block to [-1, 1] exactly as bitsandbytes' reference quantizer does.

    Full blocks: ``x * (1 / max(absmax, 1e-38))`` (a reciprocal, then a multiply); the partial
    last block: ``x / max(absmax, 1e-38)`` (a true division), and its stored absmax is the
    *floored* one (1e-38 for an all-zero tail) while full blocks store the raw absmax. Matching
    these details is what makes the codes bit-identical. No clamp to [-1, 1] is needed: a value
    that rounds past +-1 lands in the outermost bucket anyway.
    """
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    pieces, absmaxes = [], []
    if full:
        blocks = flat[:full].view(-1, blocksize)
        absmax = _block_absmax(blocks)
        inv = torch.reciprocal(absmax.clamp(min=_ABSMAX_FLOOR))
        pieces.append(torch.mul(blocks, inv.unsqueeze(1)).view(-1))
        absmaxes.append(absmax)
    if rem:
        tail = flat[full:]
        tail_absmax = tail.abs().max().clamp(min=_ABSMAX_FLOOR)
        pieces.append(tail / tail_absmax)
        absmaxes.append(tail_absmax.reshape(1))
    scaled = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    absmax = absmaxes[0] if len(absmaxes) == 1 else torch.cat(absmaxes)
    return scaled, absmax


def _flat_float(w: torch.Tensor) -> torch.Tensor:
    """Flattened fp32 view/copy of ``w`` (a view when it already is contiguous fp32)."""
    return w.reshape(-1).float()


# --------------------------------------------------------------------------------------------
# Blockwise 8-bit with the dynamic map (used for double quantization)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _nearest_code_lut(code_key: tuple[float, ...]) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer: a 65536-entry lookup table over [-1, 1].

    The CPU kernel does not search the code for the nearest value; it maps the scaled value to
    one of 65536 evenly spaced grid points and returns the code nearest to *that grid point*
    (first code whose upper midpoint is >= it). This differs from exact nearest rounding for
    values close to a midpoint, so we reproduce the table to get identical codes.
    """
    code = torch.tensor(code_key, dtype=torch.float32)
    midpoints = (code[:-1] + code[1:]) * 0.5
    grid = torch.arange(_LUT_SIZE, dtype=torch.float32)
    grid = (2.0 * grid) / float(_LUT_SIZE - 1) - 1.0
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


def _lut_index(scaled: torch.Tensor) -> torch.Tensor:
    """The kernel's grid index: ``uint16((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)`` in fp32."""
    idx = scaled.clamp(-1.0, 1.0).add_(1.0).mul_(0.5).mul_(float(_LUT_SIZE - 1)).add_(0.5)
    return idx.to(torch.int64)


def _quantize_blockwise_flat(
    flat: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit codes and fp32 absmax of a flat fp32 tensor, as bitsandbytes' CPU kernel.

    Per block: absmax = max |x| (stored as is, including 0), codes of an all-zero block are 0,
    otherwise ``lut[grid_index(x * (1 / absmax))]``.
    """
    n = flat.numel()
    pad = (-n) % blocksize
    padded = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    blocks = padded.view(-1, blocksize)
    absmax = _block_absmax(blocks)
    inv = torch.where(absmax > 0, torch.reciprocal(absmax), torch.zeros_like(absmax))
    scaled = blocks * inv.unsqueeze(1)
    codes = _nearest_code_lut(tuple(code.tolist()))[_lut_index(scaled)]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax


def _dequantize_blockwise_flat(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """fp32 ``code[codes] * absmax[block]`` over a flat code vector (last block may be partial)."""
    n = codes.numel()
    values = code[codes.reshape(-1).long()]
    pad = (-n) % blocksize
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values = values.view(-1, blocksize).mul_(absmax.unsqueeze(1))
    return values.reshape(-1)[:n]


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256) -> Blockwise8bitTensor:
    """Blockwise 8-bit quantization with the signed dynamic map, identical to bitsandbytes' CPU.

    Why: it is how bitsandbytes stores 8-bit optimizer states and double-quantized absmax, and a
    useful 8-bit weight format to compare (8 + 32/blocksize bits/param).
    """
    _check_float(x, "quantize_blockwise_8bit")
    _check_blocksize(blocksize, BLOCKSIZES_8BIT)
    codes, absmax = _quantize_blockwise_flat(_flat_float(x), dynamic_map(), blocksize)
    return Blockwise8bitTensor(codes, absmax, blocksize, tuple(x.shape), x.dtype)


def dequantize_blockwise_8bit(q: Blockwise8bitTensor) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit` (fp32 math, then the original dtype)."""
    values = _dequantize_blockwise_flat(q.codes, q.absmax, dynamic_map(), q.blocksize)
    return values.reshape(q.shape).to(q.dtype)


def _check_blocksize(blocksize: int, allowed: tuple[int, ...]) -> None:
    if blocksize not in allowed:
        raise ValueError(f"blocksize must be one of {allowed}, got {blocksize}")


# --------------------------------------------------------------------------------------------
# NF4 / FP4
# --------------------------------------------------------------------------------------------


def _double_quantize(absmax: torch.Tensor) -> DoubleQuantState:
    """bitsandbytes' double quant: centre on the mean absmax, then 8-bit blockwise in 256s."""
    offset = absmax.mean()
    codes, dq_absmax = _quantize_blockwise_flat(absmax - offset, dynamic_map(), DQ_BLOCKSIZE)
    return DoubleQuantState(codes=codes, absmax=dq_absmax, offset=offset)


_CELLS = 1 << 16  # grid cells over [-1, 1] for the fast nearest-level lookup
_AMBIGUOUS = 255
_MAGIC = float(2**23)  # adding 2**23 to a float in [0, 2**17) leaves round(x) in its low bits
_CELL_MASK = 0x3FFFF  # 18 low bits; cells past _CELLS (only from inf/NaN) resolve exactly


@lru_cache(maxsize=None)
def _cell_table(quant_type: str) -> torch.Tensor:
    """uint8 code for each grid cell of [-1, 1], or 255 where a cell is near a midpoint.

    (Indices past the grid, reachable only from inf/NaN inputs, are 255 as well.)

    Why: ``bucketize`` (a binary search per element) dominated the reference quantizer. Instead
    we compute each value's grid cell with one fused multiply-add (folded into the per-block
    scale), read the code from this table, and resolve only values in the few cells within one
    cell of a midpoint exactly (about 0.05% of values). A cell is marked unambiguous only if the
    whole interval one cell wider on both sides holds no midpoint, so the rounding of the cell
    computation can never change a code: results equal ``bucketize`` bit for bit.
    """
    midpoints, order = _bucket_table(quant_type)
    cell = torch.arange(_CELLS + 1, dtype=torch.float64)
    lo = (cell - 1.5) * 2.0 / _CELLS - 1.0
    hi = (cell + 1.5) * 2.0 / _CELLS - 1.0
    mids = midpoints.double()
    first = torch.bucketize(lo, mids)
    last = torch.bucketize(hi, mids)
    table = torch.full((_CELL_MASK + 1,), _AMBIGUOUS, dtype=torch.uint8)
    table[: _CELLS + 1] = order[first.clamp(max=len(order) - 1)]
    table[: _CELLS + 1][first != last] = _AMBIGUOUS
    return table


def _nearest_codes_fast(
    blocks: torch.Tensor, inv: torch.Tensor, quant_type: str
) -> torch.Tensor:
    """Codes of ``blocks * inv`` (per row), equal to bucketize on the exactly scaled values."""
    midpoints, order = _bucket_table(quant_type)
    half = _CELLS / 2
    grid_scale = inv * half
    grid = torch.mul(blocks, grid_scale.unsqueeze(1)).add_(_MAGIC + half)
    cells = grid.view(torch.int32).bitwise_and_(_CELL_MASK).view(-1)
    codes = _cell_table(quant_type).index_select(0, cells)
    del grid, cells
    fix = torch.nonzero(codes == _AMBIGUOUS).view(-1)
    if fix.numel():
        rows = torch.div(fix, blocks.shape[1], rounding_mode="floor")
        exact = blocks.reshape(-1)[fix] * inv[rows]
        codes[fix] = order[torch.bucketize(exact, midpoints).long()]
    # Blocks the grid cannot handle, redone exactly as bnb does: NaN or inf inside (NaN or 0
    # inverse) and zero or tiny absmax (below ~3e-34 the grid scale overflows to inf).
    bad = torch.nonzero(~torch.isfinite(grid_scale) | (grid_scale == 0)).view(-1)
    if bad.numel():
        exact = blocks[bad] * inv[bad].unsqueeze(1)
        codes.view(blocks.shape)[bad] = order[torch.bucketize(exact, midpoints).long()]
    return codes


def _quantize_4bit_torch(w: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes and fp32 absmax, bit-identical to ``bitsandbytes.functional.quantize_4bit``.

    Full blocks use the table lookup of :func:`_nearest_codes_fast`; the (at most one) partial
    block goes through :func:`_scaled_blocks` and ``bucketize`` exactly like bitsandbytes.
    """
    midpoints, order = _bucket_table(quant_type)
    flat = _flat_float(w)
    n = flat.numel()
    full = n - n % blocksize
    parts, absmaxes = [], []
    if full:
        blocks = flat[:full].view(-1, blocksize)
        absmax = _block_absmax(blocks)
        inv = torch.reciprocal(absmax.clamp(min=_ABSMAX_FLOOR))
        parts.append(_nearest_codes_fast(blocks, inv, quant_type))
        absmaxes.append(absmax)
    if full < n:
        scaled, tail_absmax = _scaled_blocks(flat[full:], blocksize)
        parts.append(order[torch.bucketize(scaled, midpoints).long()])
        absmaxes.append(tail_absmax)
    if n % 2:
        parts.append(order[torch.bucketize(torch.zeros(1), midpoints).long()])  # pad nibble = code of 0.0
    codes = parts[0] if len(parts) == 1 else torch.cat(parts)
    absmax = absmaxes[0] if len(absmaxes) == 1 else torch.cat(absmaxes)
    return _pack_nibbles(codes), absmax


def _quantize_4bit_bnb(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    """bitsandbytes' quantize_4bit on the FLATTENED tensor.

    Why flattened: blocks are defined over the flat tensor anyway, but bitsandbytes' CPU
    dequantize kernel on AVX-512 machines indexes absmax per row when given a 2-D shape whose
    last dim is not a multiple of the blocksize, giving wrong values. With a 1-D shape the flat
    (correct) indexing is always used; we reshape after dequantizing.
    """
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        w.reshape(-1).contiguous(),
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    if not double_quant:
        return packed, state.absmax, None
    dq = DoubleQuantState(codes=state.absmax, absmax=state.state2.absmax, offset=state.offset)
    return packed, None, dq


def quantize_4bit(
    w: torch.Tensor,
    quant_type: QuantType4bit = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    backend: Backend = "torch",
) -> Blockwise4bitTensor:
    """NF4/FP4 blockwise 4-bit quantization (QLoRA / bitsandbytes ``Linear4bit`` weights).

    Blocks are ``blocksize`` consecutive elements of the flattened tensor (any shape; the last
    block may be partial). Each element becomes the index of the level nearest to
    ``x / absmax(block)``. ``backend="torch"`` is the pure-torch reference, bit-identical to
    ``backend="bitsandbytes"`` in packed codes, absmax and double-quant state.

    Storage at blocksize 64: 4 + 32/64 = 4.5 bits/param; with double quant
    4 + 8/64 + 32/(64*256) (+ 32 bits per tensor for the offset) ~= 4.127.
    """
    _check_float(w, "quantize_4bit")
    _levels(quant_type)
    _check_blocksize(blocksize, BLOCKSIZES_4BIT)
    if backend == "torch":
        packed, absmax = _quantize_4bit_torch(w, quant_type, blocksize)
        dq = _double_quantize(absmax) if double_quant else None
        absmax = None if double_quant else absmax
    elif backend == "bitsandbytes":
        packed, absmax, dq = _quantize_4bit_bnb(w, quant_type, blocksize, double_quant)
    else:
        raise ValueError(f"backend must be 'torch' or 'bitsandbytes', got {backend!r}")
    return Blockwise4bitTensor(packed, absmax, dq, quant_type, blocksize, tuple(w.shape), w.dtype, backend)


def dequantize_4bit(q: Blockwise4bitTensor, backend: Optional[Backend] = None) -> torch.Tensor:
    """Values of a :class:`Blockwise4bitTensor` in its original shape and dtype.

    ``backend`` defaults to the one that quantized it; either works on either's output. Math is
    fp32 (level * absmax) and then cast, like bitsandbytes' kernels.
    """
    backend = backend or q.backend
    if backend == "bitsandbytes":
        return _dequantize_4bit_bnb(q)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'bitsandbytes', got {backend!r}")
    n = q.numel
    absmax = q.block_absmax()
    values = _pair_table(q.quant_type)[q.packed.reshape(-1).long()].view(-1)
    pad = (-values.numel()) % q.blocksize
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values = values.view(-1, q.blocksize)[: absmax.numel()].mul_(absmax.unsqueeze(1))
    return values.view(-1)[:n].reshape(q.shape).to(q.dtype)


def _dequantize_4bit_bnb(q: Blockwise4bitTensor) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit with a rebuilt QuantState over the flat shape."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState

    state2 = None
    absmax, offset = q.absmax, None
    if q.dq is not None:
        absmax, offset = q.dq.codes, q.dq.offset
        state2 = QuantState(absmax=q.dq.absmax, code=dynamic_map(), blocksize=q.dq.blocksize, dtype=torch.float32)
    state = QuantState(
        absmax=absmax,
        shape=torch.Size([q.numel]),
        code=_levels(q.quant_type).clone(),
        blocksize=q.blocksize,
        quant_type=q.quant_type,
        dtype=q.dtype,
        offset=offset,
        state2=state2,
    )
    return bnbf.dequantize_4bit(q.packed, state).reshape(q.shape)


# --------------------------------------------------------------------------------------------
# LLM.int8()
# --------------------------------------------------------------------------------------------


def int8_vectorwise_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 (LLM.int8()): ``round(w * (127 / absmax_row))`` and fp32 absmax.

    Same arithmetic as ``bitsandbytes.functional.int8_vectorwise_quant`` (fp32 math, round half
    to even), so codes and scales are identical. Rows are all leading dims flattened. An all-zero
    row gets codes 0 (bitsandbytes would compute 0 * inf = NaN there).
    """
    _check_float(w, "int8_vectorwise_quant")
    rows = w.reshape(-1, w.shape[-1]) if w.dim() > 0 else w.reshape(1, 1)
    absmax = _block_absmax(rows.float())
    factor = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    codes = torch.round(rows.float() * factor.unsqueeze(1)).to(torch.int8)
    return codes.reshape(w.shape), absmax


def quantize_int8_weight(w: torch.Tensor) -> RowwiseInt8Tensor:
    """LLM.int8() weight storage: int8 codes + fp32 row absmax = 8 + 32/in_features bits/param."""
    codes, absmax = int8_vectorwise_quant(w)
    return RowwiseInt8Tensor(codes.reshape(-1, w.shape[-1] if w.dim() else 1), absmax, tuple(w.shape), w.dtype)


def outlier_columns(x: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """Feature dims (last-dim indices) where any |activation| >= ``threshold`` (LLM.int8())."""
    flat = x.reshape(-1, x.shape[-1])
    lo, hi = torch.aminmax(flat.float(), dim=0)
    return torch.nonzero(torch.maximum(hi, lo.neg()) >= threshold).reshape(-1)


def int8_decomposed_matmul(x: torch.Tensor, w: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8() mixed-precision ``x @ w.T``: int8 for ordinary features, float for outliers.

    ``x``: (..., in), ``w``: (out, in). Feature columns with an |activation| >= threshold are
    multiplied in fp32 with the original weights (the paper keeps them in fp16); the rest are
    quantized row-wise (x per token, w per output channel) to int8, multiplied with exact integer
    accumulation and rescaled by ``sx * sw / 127**2``. The integer GEMM runs as a float64 GEMM:
    every partial sum is an integer below 2**53, so it is exact, i.e. equal to an int32
    accumulator, and uses BLAS. ``threshold=inf`` gives plain row-wise int8.
    """
    _check_float(x, "int8_decomposed_matmul")
    _check_float(w, "int8_decomposed_matmul")
    if x.shape[-1] != w.shape[-1] or w.dim() != 2:
        raise ValueError(f"need x (..., {w.shape[-1] if w.dim() == 2 else 'in'}) and w (out, in); "
                         f"got x {tuple(x.shape)} and w {tuple(w.shape)}")
    x2 = x.reshape(-1, x.shape[-1]).float()
    w2 = w.float()
    outliers = outlier_columns(x2, threshold)
    keep = torch.ones(x2.shape[-1], dtype=torch.bool)
    keep[outliers] = False
    out = _int8_matmul(x2[:, keep], w2[:, keep])
    if outliers.numel():
        out += x2[:, outliers] @ w2[:, outliers].T
    return out.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)


def _int8_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Row-wise int8 x, row-wise int8 w, exact integer accumulation, fp32 rescale."""
    if x.shape[-1] == 0:
        return torch.zeros(x.shape[0], w.shape[0])
    xq, sx = int8_vectorwise_quant(x)
    wq, sw = int8_vectorwise_quant(w)
    acc = (xq.double() @ wq.double().T).to(torch.int32)
    return acc.float() * (sx.unsqueeze(1) * sw.unsqueeze(0) / (127.0 * 127.0))


# --------------------------------------------------------------------------------------------
# Round-to-nearest integer baseline
# --------------------------------------------------------------------------------------------


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
        scale[low] = torch.nextafter(scale[low], torch.tensor(float("inf"), dtype=torch.float16))
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
    _check_float(w, "quantize_rtn")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    units = _rtn_units(w, granularity, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = _fp16_scale(_block_absmax(units) / qmax)
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


# --------------------------------------------------------------------------------------------
# GGUF block types
# --------------------------------------------------------------------------------------------


def _probe_gguf_types() -> tuple[str, ...]:
    """Names of the GGML types the installed ``gguf`` package can quantize in numpy.

    Found by trying each on a small tensor: the package raises NotImplementedError for the rest
    (the k-quants and i-quants need llama.cpp's C code).
    """
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
    except ImportError:
        return ()
    sample = np.linspace(-1.0, 1.0, 2 * 256, dtype=np.float32).reshape(2, 256)
    names = []
    for qtype in GGMLQuantizationType:
        if qtype not in GGML_QUANT_SIZES:
            continue
        try:
            quants.dequantize(quants.quantize(sample, qtype), qtype)
        except (NotImplementedError, ValueError, TypeError, AssertionError):
            continue
        names.append(qtype.name)
    return tuple(names)


GGUF_QUANTIZABLE_TYPES: tuple[str, ...] = _probe_gguf_types()
"""GGML type names ``quantize_gguf`` accepts (with gguf 0.19: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, BF16, TQ1_0, TQ2_0, MXFP4)."""


def quantize_gguf(w: torch.Tensor, qtype: Union[str, "object"] = "Q8_0") -> GGUFTensor:
    """Quantize with the ``gguf`` package's numpy implementation of a GGML block type.

    Blocks run along the last dim (as llama.cpp stores rows), so it must be a multiple of the
    type's block size. Storage is the real byte count: block bytes * 8 / block elements per
    parameter (e.g. Q8_0: 34 * 8 / 32 = 8.5; Q4_0: 4.5).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    _check_float(w, "quantize_gguf")
    name = qtype if isinstance(qtype, str) else qtype.name
    if name not in GGUF_QUANTIZABLE_TYPES:
        raise ValueError(f"GGUF type {name!r} cannot be quantized here; choose one of {GGUF_QUANTIZABLE_TYPES}")
    gtype = GGMLQuantizationType[name]
    block_elems, _ = GGML_QUANT_SIZES[gtype]
    last = w.shape[-1] if w.dim() else 1
    if last % block_elems:
        raise ValueError(
            f"GGUF {name} needs the last dimension to be a multiple of its block size {block_elems}; "
            f"got last dimension {last} (shape {tuple(w.shape)})"
        )
    array = w.detach().float().reshape(-1, last).numpy()
    data = quants.quantize(array, gtype)
    return GGUFTensor(data=data, qtype=gtype, shape=tuple(w.shape), dtype=w.dtype)
