"""llama.cpp's importance-weighted quantizers for the legacy GGUF types Q4_0, Q4_1, Q5_0 and Q5_1, in vectorised
numpy, bit-identical to llama.cpp.

Ported from `ggml/src/ggml-quants.c` of llama.cpp commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f (vendored in
the llama-cpp-python 0.3.36 sdist): the path `quantize_q4_0`, `quantize_q4_1`, `quantize_q5_0` and
`quantize_q5_1` take when `quant_weights` is not NULL, i.e. `quantize_row_q4_0_impl`, `quantize_row_q4_1_impl`,
`quantize_row_q5_0_impl` and `quantize_row_q5_1_impl`, applied row by row:
- per row, `sum_x2 += x[j]*x[j]` over the whole row (n_per_row), then `sigma2 = sum_x2/n_per_row`;
- per block of 32, `weight[j] = qw[j] * sqrtf(sigma2 + xb[j]*xb[j])`;
- Q4_0 / Q5_0: `make_qx_quants(32, 8 | 16, xb, L, rmse_type=1, weight)`; block = fp16 d, (Q5_0: qh), qs;
- Q4_1 / Q5_1: `make_qkx3_quants(32, 15 | 31, xb, weight, L, &min, Laux, -0.9f, 0.05f, 36, false)`;
  block = fp16 d, fp16 -min, (Q5_1: qh), qs.
The searches are the already exact ports `_ggml_q3q6.make_qx_quants` (block elements on the last axis) and
`_ggml_qk_search.make_qkx` (block elements on the first axis), reused unchanged.

Exactness rule: ggml-base is built without -march and without -ffast-math (SSE2, no FMA), so every C float
operation is one IEEE float32 operation in source order; here each is the same np.float32 operation in the same
order. The row sum runs element after element (`seq_sum`), `qw * sqrtf(...)` is a float32 multiply of a
correctly rounded float32 sqrt, and `n_per_row` is converted to float before the division, as in C.

Output: np.uint8 (rows, cols // 32 * block_bytes), the ggml block structs' bytes in field order (block_q4_0:
d qs[16]; block_q4_1: d m qs[16]; block_q5_0: d qh[4] qs[16]; block_q5_1: d m qh[4] qs[16]; fp16 and the
uint32 qh little-endian).
"""

from __future__ import annotations

import numpy as np

from quantlib.methods._ggml_common import F32
from quantlib.methods._ggml_common import blocks
from quantlib.methods._ggml_common import f32
from quantlib.methods._ggml_common import seq_sum
from quantlib.methods._ggml_common import to_fp16
from quantlib.methods._ggml_q3q6 import make_qx_quants
from quantlib.methods._ggml_qk_search import make_qkx

#: QK4_0 = QK4_1 = QK5_0 = QK5_1: weights per block.
QK = 32
Q4_0_BYTES = 2 + QK // 2
Q4_1_BYTES = 4 + QK // 2
Q5_0_BYTES = 2 + 4 + QK // 2
Q5_1_BYTES = 4 + 4 + QK // 2


def _blocks_and_weights(x: np.ndarray, imatrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (rows, cols) -> (xb, weight), both (rows, nb, 32): the blocks and
    `weight[j] = qw[j] * sqrtf(sigma2 + xb[j]*xb[j])` with `sigma2 = sum_x2/n_per_row` over each whole row."""
    x = f32(x)
    if x.ndim != 2:
        raise ValueError(f"expected a (rows, cols) matrix, got shape {x.shape}")
    xb = blocks(x, QK)
    rows, cols = x.shape
    if imatrix is None:
        raise ValueError("these are the importance-weighted quantizers: imatrix is required")
    qw = f32(imatrix)
    if qw.shape != (cols,):
        raise ValueError(f"imatrix has shape {qw.shape}, expected ({cols},)")
    # for (j < n_per_row) sum_x2 += x[j]*x[j]; one step per column, all rows at once (columns made contiguous).
    with np.errstate(over="ignore", invalid="ignore"):      # inf / nan propagate as in C
        sum_x2 = seq_sum(np.ascontiguousarray((x * x).T), axis=0)
        sigma2 = sum_x2 / F32(cols)                              # float / (int64 -> float)
        weight = qw.reshape(cols // QK, QK) * np.sqrt(sigma2[:, None, None] + xb * xb)
    return xb, weight


def _fp16_bytes(d: np.ndarray) -> np.ndarray:
    """(...,) float32 -> (..., 2) uint8: GGML_FP32_TO_FP16 (inf past the fp16 range, as in C), little-endian."""
    with np.errstate(over="ignore"):
        h = to_fp16(d)
    return np.ascontiguousarray(h.astype("<f2")[..., None]).view(np.uint8)


def _nibbles(L: np.ndarray) -> np.ndarray:
    """qs[j] = (L[j] & 0x0F) | ((L[j+16] & 0x0F) << 4) for j < 16, on L (..., 32)."""
    L = L.astype(np.int64)
    return ((L[..., :16] & 0x0F) | ((L[..., 16:] & 0x0F) << 4)).astype(np.uint8)


def _high_bits(L: np.ndarray) -> np.ndarray:
    """qh: bit j of the little-endian uint32 is bit 4 of L[j] (L (..., 32)), as 4 bytes (..., 4)."""
    bit = (L.astype(np.int64) & 0x10) >> 4
    qh = np.zeros(L.shape[:-1], dtype=np.uint32)
    for j in range(QK):
        qh |= bit[..., j].astype(np.uint32) << np.uint32(j)
    return np.ascontiguousarray(qh.astype("<u4")[..., None]).view(np.uint8)


def _symmetric(x: np.ndarray, imatrix: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`float d = make_qx_quants(QK, nmax, xb, L, 1, weight)` for every block: (d (rows, nb), L (rows, nb, 32), nb)."""
    xb, weight = _blocks_and_weights(x, imatrix)
    d, L = make_qx_quants(xb, nmax, weight)
    return d, L, xb.shape[1]


def _affine(x: np.ndarray, imatrix: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """`make_qkx3_quants(QK, nmax, xb, weight, L, &min, Laux, -0.9f, 0.05f, 36, false)` for every block:
    (d, min (rows, nb), L (rows, nb, 32), nb), min being the function's `*the_min` output."""
    xb, weight = _blocks_and_weights(x, imatrix)
    rows, nb, _ = xb.shape
    # make_qkx wants the block elements first: (32, rows * nb).
    xt = np.ascontiguousarray(xb.reshape(rows * nb, QK).T)
    wt = np.ascontiguousarray(weight.reshape(rows * nb, QK).T)
    d, the_min, L = make_qkx(xt, wt, nmax, -0.9, 0.05, 36, use_mad=False, qkx3=True)
    return d.reshape(rows, nb), the_min.reshape(rows, nb), L.T.reshape(rows, nb, QK), nb


def quantize_q4_0_weighted(x: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """llama.cpp `quantize_q4_0` with quant_weights (`quantize_row_q4_0_impl`): rows of float32 -> block_q4_0
    bytes, (rows, cols // 32 * 18) uint8."""
    d, L, nb = _symmetric(x, imatrix, 8)
    out = np.concatenate([_fp16_bytes(d), _nibbles(L)], axis=-1)
    return out.reshape(d.shape[0], nb * Q4_0_BYTES)


def quantize_q4_1_weighted(x: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """llama.cpp `quantize_q4_1` with quant_weights (`quantize_row_q4_1_impl`): rows of float32 -> block_q4_1
    bytes, (rows, cols // 32 * 20) uint8."""
    d, the_min, L, nb = _affine(x, imatrix, 15)
    out = np.concatenate([_fp16_bytes(d), _fp16_bytes(-the_min), _nibbles(L)], axis=-1)
    return out.reshape(d.shape[0], nb * Q4_1_BYTES)


def quantize_q5_0_weighted(x: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """llama.cpp `quantize_q5_0` with quant_weights (`quantize_row_q5_0_impl`): rows of float32 -> block_q5_0
    bytes, (rows, cols // 32 * 22) uint8."""
    d, L, nb = _symmetric(x, imatrix, 16)
    out = np.concatenate([_fp16_bytes(d), _high_bits(L), _nibbles(L)], axis=-1)
    return out.reshape(d.shape[0], nb * Q5_0_BYTES)


def quantize_q5_1_weighted(x: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """llama.cpp `quantize_q5_1` with quant_weights (`quantize_row_q5_1_impl`): rows of float32 -> block_q5_1
    bytes, (rows, cols // 32 * 24) uint8."""
    d, the_min, L, nb = _affine(x, imatrix, 31)
    out = np.concatenate([_fp16_bytes(d), _fp16_bytes(-the_min), _high_bits(L), _nibbles(L)], axis=-1)
    return out.reshape(d.shape[0], nb * Q5_1_BYTES)
