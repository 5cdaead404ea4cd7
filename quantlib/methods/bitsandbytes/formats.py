"""bitsandbytes' tensor formats: NF4/FP4 blockwise 4-bit (with double quantization), blockwise 8-bit with
the dynamic map and LLM.int8()'s row-wise int8, and their pure-torch quantize/dequantize (the rounding they
share is in `rounding`) next to bitsandbytes' own functions.

Why a torch reference next to bitsandbytes: the app shows *what* a format does to a weight (codes,
scales, error, honest storage) and must work where a library kernel is missing or buggy. The
reference reproduces bitsandbytes' CPU backend bit for bit (same packed codes, same absmax, same
double-quantization state; the tests check it), so either backend can be shown and compared.

bitsandbytes' CUDA kernels round by other rules (csrc/kernels.cu; tests/test_cuda.py states each rule and
checks it on a GPU): NF4's decision tree has exactly our midpoints, so NF4 codes agree; FP4's thresholds are
decimal literals up to 14 ulp from the midpoints (a value between the two rounds the other way), and zero
takes the other sign bit;
double quantization's 8-bit codes come from a binary search and a mean summed in another order, so a block's
absmax code can be the neighbouring one. On the default model's weights (fp32) the CUDA kernels change 1 NF4
value in 106 million and 0.011% of FP4 values (0.03% from fp16, 0.07% from bf16 weights: their ratios hit the
thresholds exactly); with double quantization about 0.1% of absmax codes move one step and the offset differs
in its last bits, so most values move by a few ulp. The weights' squared error stays within 2e-6 (relative) of
the reference's. Numbers a model gives on CUDA come from the CUDA kernels themselves (benchmarks/RESULTS.md,
"On a GPU").

Constant code tables shared by every tensor of a format (the 16 NF4/FP4 levels, the 256-entry
dynamic map) are not counted as a tensor's storage. (bitsandbytes' serialised state does repeat the
1 KiB dynamic map per tensor as `nested_quant_map`; we treat that as a serialisation overhead, not
as information.) The fp32 double-quantization offset is counted (32 bits per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Literal, Optional

import torch

from quantlib.codebooks import dynamic_map
from quantlib.formats import QuantizedTensor, block_absmax, check_float, on_device
from quantlib.methods.bitsandbytes.rounding import (_dequantize_blockwise_flat, _flat_float, _levels, _pair_table,
                                                    _quantize_4bit_torch, _quantize_blockwise_flat, _unpack_nibbles)

QuantType4bit = Literal["nf4", "fp4"]
Backend = Literal["torch", "bitsandbytes"]


# bitsandbytes 0.50 accepts these for quantize_4bit/dequantize_4bit (32 was added in 0.46).
BLOCKSIZES_4BIT: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Blockwise 8-bit: the sizes bitsandbytes documents for quantize_blockwise.
BLOCKSIZES_8BIT: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
# Double quantization always re-quantizes the absmax vector in blocks of 256 (bitsandbytes).
DQ_BLOCKSIZE = 256


# --------------------------------------------------------------------------------------------
# Tensor formats
# --------------------------------------------------------------------------------------------

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
        absmax = _dequantize_blockwise_flat(self.codes, self.absmax, _dynamic_table(), self.blocksize)
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
    COMPONENT_OF: ClassVar[dict[str, str]] = {"codes": "codes", "absmax": "scales", "dq_absmax": "dq_constants",
                                              "dq_offset": "dq_constants"}

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
    COMPONENT_OF: ClassVar[dict[str, str]] = {"codes": "codes", "absmax": "scales"}

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
    COMPONENT_OF: ClassVar[dict[str, str]] = {"codes": "codes", "row_absmax": "scales"}

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


# --------------------------------------------------------------------------------------------
# Blockwise 8-bit with the dynamic map (used for double quantization)
# --------------------------------------------------------------------------------------------


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256) -> Blockwise8bitTensor:
    """Blockwise 8-bit quantization with the signed dynamic map, identical to bitsandbytes' CPU.

    Why: it is how bitsandbytes stores 8-bit optimizer states and double-quantized absmax, and a
    useful 8-bit weight format to compare (8 + 32/blocksize bits/param).
    """
    check_float(x, "quantize_blockwise_8bit")
    _check_blocksize(blocksize, BLOCKSIZES_8BIT)
    codes, absmax = _quantize_blockwise_flat(_flat_float(x), _dynamic_table(), blocksize)
    return Blockwise8bitTensor(codes, absmax, blocksize, tuple(x.shape), x.dtype)


def dequantize_blockwise_8bit(q: Blockwise8bitTensor) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit` (fp32 math, then the original dtype)."""
    values = _dequantize_blockwise_flat(q.codes, q.absmax, _dynamic_table(), q.blocksize)
    return values.reshape(q.shape).to(q.dtype)


@lru_cache(maxsize=1)
def _dynamic_table() -> torch.Tensor:
    """The signed dynamic map, made once (read only: `on_device` keeps one copy of it per device)."""
    return dynamic_map()


def _check_blocksize(blocksize: int, allowed: tuple[int, ...]) -> None:
    if blocksize not in allowed:
        raise ValueError(f"blocksize must be one of {allowed}, got {blocksize}")


# --------------------------------------------------------------------------------------------
# NF4 / FP4
# --------------------------------------------------------------------------------------------


def _double_quantize(absmax: torch.Tensor) -> DoubleQuantState:
    """bitsandbytes' double quant: centre on the mean absmax, then 8-bit blockwise in 256s."""
    offset = absmax.mean()
    codes, dq_absmax = _quantize_blockwise_flat(absmax - offset, _dynamic_table(), DQ_BLOCKSIZE)
    return DoubleQuantState(codes=codes, absmax=dq_absmax, offset=offset)


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
    ``backend="bitsandbytes"`` on the CPU in packed codes, absmax and double-quant state (on CUDA the kernels
    round FP4 ties, zero's sign and double quant's codes by their own rules: see the module docstring).

    Storage at blocksize 64: 4 + 32/64 = 4.5 bits/param; with double quant
    4 + 8/64 + 32/(64*256) (+ 32 bits per tensor for the offset) ~= 4.127.
    """
    check_float(w, "quantize_4bit")
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
    # index_select with int32 indices: about 4x faster than indexing with int64 bytes, the same values
    values = on_device(_pair_table(q.quant_type), q.packed.device).index_select(0, q.packed.reshape(-1).int()).view(-1)
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
    check_float(w, "int8_vectorwise_quant")
    rows = w.reshape(-1, w.shape[-1]) if w.dim() > 0 else w.reshape(1, 1)
    absmax = block_absmax(rows.float())
    factor = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    codes = torch.round(rows.float() * factor.unsqueeze(1)).to(torch.int8)
    return codes.reshape(w.shape), absmax


def quantize_int8_weight(w: torch.Tensor) -> RowwiseInt8Tensor:
    """LLM.int8() weight storage: int8 codes + fp32 row absmax = 8 + 32/in_features bits/param."""
    codes, absmax = int8_vectorwise_quant(w)
    return RowwiseInt8Tensor(codes.reshape(-1, w.shape[-1] if w.dim() else 1), absmax, tuple(w.shape), w.dtype)
