"""What every port of llama.cpp's block quantizers (`ggml/src/ggml-quants.c`) shares: float32 arithmetic done
the way the C code does it, vectorised over blocks.

ggml-base, which holds those quantizers, is built without -march (SSE2, no FMA, no -ffast-math): every float
operation is one IEEE float32 operation, in source order. numpy float32 elementwise operations are the same
operations, so a port is bit-identical when it keeps the C code's order. Two things need care:
- sums: C adds element by element, left to right; numpy's `sum` is pairwise. `seq_sum` adds in C's order.
- rounding to an integer: `nearest_int` is ggml's `nearest_int` (the 1.5 * 2^23 trick, round half to even, for
  |x| < 2^22).

Arrays are (..., n) float32 with the block's elements on the last axis; every function works on all blocks at
once, so a whole matrix is a few numpy calls per element position, never a Python loop per block.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
#: QK_K: weights per K-quant super-block.
QK_K = 256


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def seq_sum(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sum along `axis` in float32, one element after the other from the first (C's `for (...) sum += v[i]`).

    numpy sums pairwise only along the fastest axis in memory; along the slowest axis of a C-contiguous array its
    reduction adds the slices in index order, one float32 addition each, so the axis is moved first (a copy where
    it is not first already). `+ 0` turns the one result that can differ, a -0.0 total, into C's +0.0 (C starts from
    +0.0). tests/test_ggml_common.py holds this to an explicit loop."""
    values = f32(values)
    first = np.ascontiguousarray(np.moveaxis(values, axis, 0)) if values.ndim > 1 else values
    if first.ndim == 1 or first[0].size == 1:  # one sum per result: numpy would sum each pairwise, so loop
        flat = first.reshape(first.shape[0], -1)
        total = np.zeros(flat.shape[1], dtype=np.float32)
        for i in range(flat.shape[0]):
            total = total + flat[i]
        return total.reshape(first.shape[1:]) if first.ndim > 1 else total[0]
    return np.add.reduce(first, axis=0) + F32(0)


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int(float fval)`: `fval + 12582912.f`, read back as an integer (round half to even).
    Valid, as in C, for |x| <= 4194303."""
    val = f32(x) + F32(12582912.0)
    return (val.view(np.int32) & 0x007FFFFF) - 0x00400000


def to_fp16(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: round to nearest even (numpy's cast is the same IEEE conversion)."""
    return f32(x).astype(np.float16)


def fp16_to_f32(h: np.ndarray) -> np.ndarray:
    return np.asarray(h, dtype=np.float16).astype(np.float32)


def blocks(x: np.ndarray, size: int) -> np.ndarray:
    """(rows, cols) -> (rows, cols // size, size): the blocks of each row, in order."""
    x = f32(x)
    rows, cols = x.shape
    if cols % size:
        raise ValueError(f"row length {cols} is not a multiple of the block size {size}")
    return x.reshape(rows, cols // size, size)
