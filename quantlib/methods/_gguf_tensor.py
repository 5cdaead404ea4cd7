"""GGML block-quantized tensors: the block types quantlib quantizes, the raw-block tensor format (the bytes a .gguf
file stores) and `quantize_gguf`, which quantizes with the `gguf` package's numpy reference quantizers (legacy
types) or quantlib's bit-exact ports of llama.cpp's (K-quants, IQ4, the importance-weighted legacy types)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Union

import numpy as np
import torch

from quantlib.formats import QuantizedTensor, check_float
from quantlib.methods.base.ahead import in_worker
from quantlib.methods._ggml_ftypes import NEEDS_IMATRIX


#: Block types quantlib quantizes: the `gguf` package's numpy quantizers (legacy types) and quantlib's ports of
#: llama.cpp's K-quant, IQ4 and lattice (IQ3, IQ2, IQ1) quantizers, widest first.
GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_XS", "IQ4_NL", "Q3_K", "IQ3_S",
              "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "MXFP4", "BF16", "F16")

#: Block types llama-quantize writes only with an importance matrix (`tensor_requires_imatrix`, ported in
#: `_ggml_ftypes`; ggml's own quantizer asserts one for IQ2_XXS, IQ2_XS and IQ1_S).
REQUIRES_IMATRIX = NEEDS_IMATRIX


#: Elements per slice of rows that the numpy block code works on at a time (see `by_rows`).
SLICE_ELEMENTS = 1 << 18


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)), thread_name_prefix="quantlib-gguf")


def _fresh_pool_after_fork() -> None:
    """A forked child inherits the pool but not its threads: it would wait on them forever. It makes its own."""
    _pool.cache_clear()


os.register_at_fork(after_in_child=_fresh_pool_after_fork)


def by_rows(f: Callable[[np.ndarray], np.ndarray], array: np.ndarray) -> np.ndarray:
    """`f` (rows of values or of blocks -> one output row each) over slices of about 256K elements of `array`'s rows,
    two at a time, the outputs stacked in order. Every GGML quantizer and dequantizer works row by row (blocks, and an
    importance matrix per column), so the bytes are those of one call on the whole array; but numpy's temporaries
    of a slice stay in the CPU's caches, where those of a whole 576 x 1536 matrix went to memory on every operation
    of the K-quants' scale searches, and numpy releases the GIL, so two slices run at once (one after the
    other on a worker thread that quantizes one of several layers at once, `base.ahead`). The gguf package's
    legacy quantizers gain too when called on blocks directly (`quantize_gguf`); its dequantizers only for large
    tensors (`dequantize_blocks`), as measured."""
    rows = max(1, SLICE_ELEMENTS // max(1, array.shape[-1]))
    if array.ndim != 2 or array.shape[0] <= rows:
        return f(array)
    parts = [array[i:i + rows] for i in range(0, array.shape[0], rows)]
    if in_worker():  # layers already run a core each (`Quantizer.quantize_ahead`): the slices run here, in order
        return np.concatenate([f(part) for part in parts], axis=0)
    return np.concatenate(list(_pool().map(f, parts)), axis=0)


def _ported_quantizers() -> dict[str, Any]:
    """Block type -> quantlib's port of llama.cpp's quantizer, `f(x, imatrix=None) -> bytes (rows, row_bytes)`."""
    from quantlib.methods._ggml_iq1 import quantize_iq1
    from quantlib.methods._ggml_iq4 import quantize_iq4_nl, quantize_iq4_xs
    from quantlib.methods._ggml_iqgrid import SPECS, quantize_iq
    from quantlib.methods._ggml_q3q6 import quantize_q3_K, quantize_q6_K
    from quantlib.methods._ggml_qk import quantize_q2_K, quantize_q4_K, quantize_q5_K

    lattice = {name: (lambda x, imatrix=None, _name=name: quantize_iq(_name, x, imatrix)) for name in SPECS}
    lattice.update({name: (lambda x, imatrix=None, _name=name: quantize_iq1(_name, x, imatrix))
                    for name in ("IQ1_S", "IQ1_M")})
    return {"Q2_K": quantize_q2_K, "Q3_K": quantize_q3_K, "Q4_K": quantize_q4_K, "Q5_K": quantize_q5_K,
            "Q6_K": quantize_q6_K, "IQ4_NL": quantize_iq4_nl, "IQ4_XS": quantize_iq4_xs, **lattice}


def _weighted_legacy_quantizers() -> dict[str, Any]:
    """Q4_0/Q4_1/Q5_0/Q5_1 with an importance matrix: llama.cpp's weighted quantizers (another algorithm than the
    reference ones the gguf package implements), ported bit-exact in `_ggml_legacy`."""
    from quantlib.methods._ggml_legacy import (quantize_q4_0_weighted, quantize_q4_1_weighted,
                                               quantize_q5_0_weighted, quantize_q5_1_weighted)

    return {"Q4_0": quantize_q4_0_weighted, "Q4_1": quantize_q4_1_weighted, "Q5_0": quantize_q5_0_weighted,
            "Q5_1": quantize_q5_1_weighted}


#: Types that take an importance matrix here: every type but MXFP4, whose llama.cpp quantizer has no weighted
#: path (Q8_0's, F16's and BF16's ignore it, as llama.cpp's do).
IMATRIX_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS",
                 "IQ2_XXS", "IQ1_M", "IQ1_S", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16")



#: Bits of the integer code per weight in each GGUF type (the rest of a block is scales/mins).
GGUF_CODE_BITS = {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_0": 4, "Q4_1": 4, "MXFP4": 4, "BF16": 16, "F16": 16,
                  "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "IQ4_NL": 4, "IQ4_XS": 4,
                  "F32": 32, "TQ2_0": 2,
                  # the lattice types: grid index + sign bits per group (IQ3_S: 9 bits per 4 weights + a sign each;
                  # IQ3_XXS: 8 bits per 4 + 7 sign bits per 8; IQ2_S: 10 bits per 8 + 8 signs; IQ2_XS: 9 + 7;
                  # IQ2_XXS: 8 + 7)
                  "IQ3_S": 9 / 4 + 1, "IQ3_XXS": 2 + 7 / 8, "IQ2_S": 18 / 8, "IQ2_XS": 16 / 8, "IQ2_XXS": 15 / 8,
                  # IQ1: an 11-bit grid index per 8 weights (the shift bits count with the scales)
                  "IQ1_S": 11 / 8, "IQ1_M": 11 / 8,
                  # TQ1_0 packs 5 trits per byte in 48 bytes and 4 per byte in 4 more: 52 bytes per 256 weights.
                  "TQ1_0": 52 * 8 / 256}


def gguf_block_geometry(quant_type: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGUF type, from the gguf package's own table."""
    import gguf

    return tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant_type]])  # type: ignore[return-value]



@dataclass
class GGUFTensor(QuantizedTensor):
    """A GGML block-quantized tensor: the raw bytes exactly as a .gguf file stores them."""

    data: np.ndarray
    qtype: "object"  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    dtype: torch.dtype
    #: where the weight came from, and where `dequantize` gives it back: the blocks are numpy on the host (GGUF's
    #: math runs in numpy, llama.cpp's own), so a weight on a GPU crosses the bus once each way
    device: str = "cpu"

    @property
    def storage_bits(self) -> dict[str, int]:
        return {"blocks": 8 * int(self.data.nbytes)}

    def storage_by_component(self) -> dict[str, float]:
        """The packed bytes split into codes (code bits x weights: Q5's fifth bits included) and the
        per-block scales/mins that make up the rest of each block."""
        total = float(self.data.nbytes)
        codes = self.numel * GGUF_CODE_BITS[self.qtype.name] / 8
        return {"codes": codes, "scales": total - codes}

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
        values = dequantize_blocks(self.data, self.qtype)
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(self.shape).to(self.device, self.dtype)


def _block_class(qtype: Any) -> Any:
    """The gguf package's quantizer class of a block type (gguf.quants.Q5_0 ...), None for F32/F16."""
    from gguf import quants

    cls = getattr(quants, qtype.name, None)
    return cls if isinstance(cls, type) and hasattr(cls, "dequantize_blocks") else None


def dequantize_blocks(data: np.ndarray, qtype: Any) -> np.ndarray:
    """The gguf package's dequantizer on every block in one call (its `dequantize` runs it on small groups of rows,
    which is the same arithmetic block by block, at twice the time here)."""
    from gguf import GGML_QUANT_SIZES, quants

    cls = _block_class(qtype)
    if cls is None:
        return quants.dequantize(data, qtype)
    cls.init_grid()  # the lattice types' grids: gguf builds them in `dequantize`, not in `dequantize_blocks`
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows = np.ascontiguousarray(data).reshape(-1, type_size)
    if len(rows) * block_size < 2 * SLICE_ELEMENTS:  # small: one call; larger: slices of rows, two at a time
        return cls.dequantize_blocks(rows)
    return by_rows(cls.dequantize_blocks, rows)


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


def quantize_gguf(w: torch.Tensor, qtype: Union[str, "object"] = "Q8_0",
                  imatrix: np.ndarray | None = None) -> GGUFTensor:
    """Quantize with a GGML block type: the ``gguf`` package's numpy implementation for the legacy types, quantlib's
    port of llama.cpp's quantizer for the K-quants and IQ4 types (with `imatrix`, the importance-weighted path,
    as `ggml_quantize_chunk` takes it).

    Blocks run along the last dim (as llama.cpp stores rows), so it must be a multiple of the
    type's block size. Storage is the real byte count: block bytes * 8 / block elements per
    parameter (e.g. Q8_0: 34 * 8 / 32 = 8.5; Q4_0: 4.5).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    check_float(w, "quantize_gguf")
    name = qtype if isinstance(qtype, str) else qtype.name
    ported = _ported_quantizers()
    if name not in GGUF_QUANTIZABLE_TYPES and name not in ported:
        raise ValueError(f"GGUF type {name!r} cannot be quantized here; choose one of "
                         f"{(*GGUF_QUANTIZABLE_TYPES, *ported)}")
    if imatrix is not None and name not in IMATRIX_TYPES:
        raise ValueError(f"GGUF {name} takes no importance matrix here (llama.cpp's {name} quantizer has no "
                         f"weighted path); types that take one: {', '.join(IMATRIX_TYPES)}")
    gtype = GGMLQuantizationType[name]
    block_elems, _ = GGML_QUANT_SIZES[gtype]
    last = w.shape[-1] if w.dim() else 1
    if last % block_elems:
        raise ValueError(
            f"GGUF {name} needs the last dimension to be a multiple of its block size {block_elems}; "
            f"got last dimension {last} (shape {tuple(w.shape)})"
        )
    array = w.detach().reshape(-1, last).cpu().float().numpy()  # numpy does the math: the one trip to the host
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).reshape(last)
    if name in ported:
        data = by_rows(lambda rows: ported[name](rows, weights), array)
    elif weights is not None and name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        data = by_rows(lambda rows: _weighted_legacy_quantizers()[name](rows, weights), array)
    elif (cls := _block_class(gtype)) is not None:  # the gguf package's block quantizer, on slices of rows
        data = by_rows(lambda rows: cls.quantize_blocks(rows.reshape(-1, block_elems)).reshape(rows.shape[0], -1),
                       array)
    else:
        data = quants.quantize(array, gtype)
    return GGUFTensor(data=data, qtype=gtype, shape=tuple(w.shape), dtype=w.dtype, device=str(w.device))
