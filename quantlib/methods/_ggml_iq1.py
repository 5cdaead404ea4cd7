"""llama.cpp's 1-bit lattice quantizers IQ1_S and IQ1_M, ported to vectorised numpy.

Each 8 weights are one point of a 2048-point grid whose coordinates take three levels, -1, 0 and +1, shifted by
+-IQ1S_DELTA (1/8) per 32 weights (IQ1_S) or per 8 weights (IQ1_M, two shifts per 16-weight block). The quantizer
solves the weighted least-squares problem exactly per block: it sorts the block's weights and tries every split
of them into the three levels (and every shift), then maps each group of 8 onto the grid (a neighbour by weighted
distance where the exact point is not on it).

Ports, from `ggml/src/ggml-quants.c` of llama.cpp commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f (vendored in the
llama-cpp-python 0.3.36 sdist): `quantize_row_iq1_s_impl` / `quantize_iq1_s` and `quantize_row_iq1_m_impl` /
`quantize_iq1_m`, with `iq1_find_best_neighbour2` (`_ggml_iqgrid.nearest_on_grid` with the shifted levels) and
the grid tables of `iq2xs_init_impl` for IQ1 (`_ggml_iqgrid.tables("IQ1_S")`).

Exactness: every C float operation is one numpy float32 operation in source order; the split searches keep C's
sequential running best (a loop over the splits, vectorised over blocks). The sort is C's `qsort` of (value,
index) pairs by value; glibc's qsort (up to 2.36, this machine's) is a merge sort, stable on ties, which
`argsort(kind="stable")` reproduces. Checked byte for byte against `ggml_quantize_chunk` in
tests/test_ggml_golden.py.
"""

from __future__ import annotations

import numpy as np

from quantlib.methods._ggml_common import F32, QK_K, nearest_int, seq_sum
from quantlib.methods._ggml_iqgrid import block_weights, nearest_on_grid, super_blocks, tables

DELTA = F32(0.125)
#: The levels of a coordinate with the shift up (x_p) and down (x_m).
X_P = np.array([F32(-1) + DELTA, DELTA, F32(1) + DELTA], dtype=np.float32)
X_M = np.array([F32(-1) - DELTA, -DELTA, F32(1) - DELTA], dtype=np.float32)
BLOCK_BYTES = {"IQ1_S": 50, "IQ1_M": 56}
_EPS = {"IQ1_S": F32(1e-12), "IQ1_M": F32(1e-7)}


def _sorted_prefix(xb: np.ndarray, weight: np.ndarray):
    """The block's weights sorted ascending (stable) and C's prefix sums over that order."""
    order = np.argsort(xb, axis=1, kind="stable")
    xs = np.take_along_axis(xb, order, axis=1)
    ws = np.take_along_axis(weight, order, axis=1)
    return order, xs, ws


def _levels(order: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
    """L[order[j]] = 0 for j < i1, 1 for i1 <= j < i2, 2 after."""
    j = np.arange(order.shape[1])
    ranked = np.where(j < i1[:, None], 0, np.where(j < i2[:, None], 1, 2))
    L = np.empty_like(ranked)
    np.put_along_axis(L, order, ranked, axis=1)
    return L


def _scan(candidates_qx: np.ndarray, candidates_q2: np.ndarray):
    """C's running best over candidates in order: `if (sumq2 > 0 && sumqx*sumqx > best*sumq2) { scale =
    sumqx/sumq2; best = scale*sumqx; pick }`. (M, C) each -> (picked candidate or -1, scale)."""
    M, C = candidates_qx.shape
    best = np.full(M, -np.finfo(np.float32).max, dtype=np.float32)
    scale = np.zeros(M, dtype=np.float32)
    pick = np.full(M, -1, dtype=np.int64)
    with np.errstate(all="ignore"):
        for c in range(C):
            qx, q2 = candidates_qx[:, c], candidates_q2[:, c]
            take = (q2 > 0) & (qx * qx > best * q2)
            if take.any():
                s = qx / q2
                scale = np.where(take, s, scale)
                best = np.where(take, s * qx, best)
                pick = np.where(take, c, pick)
    return pick, scale


def _to_grid(t, L: np.ndarray, xb: np.ndarray, weight: np.ndarray, scale: np.ndarray, values: np.ndarray):
    """Each group of 8 onto the grid: (grid index (M, groups), all on the grid (M,)). values: (M, groups, 3)."""
    M = L.shape[0]
    Lg = L.reshape(M, -1, 8)
    u = (Lg << (2 * np.arange(8))).sum(axis=2)
    gi = t.kmap[u]
    off = gi < 0
    if off.any():
        rows, groups = np.nonzero(off)
        gi[rows, groups], _ = nearest_on_grid(t, u[rows, groups], xb.reshape(M, -1, 8)[rows, groups],
                                              weight.reshape(M, -1, 8)[rows, groups], scale[rows],
                                              values[rows, groups])
    return gi, ~off.any(axis=1)


def _grid_terms(t, gi: np.ndarray, xb: np.ndarray, weight: np.ndarray, values: np.ndarray, factor=None):
    """The terms of `sumqx += w*q*xb; sumq2 += w*q*q` (M, block), q the grid point's shifted level values (times
    `factor` per block)."""
    M = gi.shape[0]
    q = np.take_along_axis(values, t.levels[gi], axis=2).reshape(M, -1)
    if factor is not None:
        q = q * factor[:, None]
    wq = weight * q
    return wq * xb, wq * q


def _refit(scale, on_grid, terms):
    """With a group off the grid: `if (sumqx > 0 && sumq2 > 0) scale = sumqx/sumq2` over the block."""
    sqx, sq2 = seq_sum(terms[0]), seq_sum(terms[1])
    ok = ~on_grid & (sqx > 0) & (sq2 > 0)
    return np.where(ok, sqx / np.where(ok, sq2, F32(1)), scale)


def _iq1_s(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    t = tables("IQ1_S")
    N = x.shape[0]
    xb, weight = block_weights(x, qw, 32)
    M = xb.shape[0]
    active = ~(np.abs(xb).max(axis=1) < _EPS["IQ1_S"])
    order, xs, ws = _sorted_prefix(xb, weight)
    sumx = np.zeros((M, 33), np.float32)
    sumw = np.zeros((M, 33), np.float32)
    for j in range(32):
        sumx[:, j + 1] = sumx[:, j] + ws[:, j] * xs[:, j]
        sumw[:, j + 1] = sumw[:, j] + ws[:, j]
    i1, i2 = np.triu_indices(33)                     # C's loops: i1 = 0..32, i2 = i1..32
    a_x, b_x, c_x = sumx[:, i1], sumx[:, i2] - sumx[:, i1], sumx[:, 32:33] - sumx[:, i2]
    a_w, b_w, c_w = sumw[:, i1], sumw[:, i2] - sumw[:, i1], sumw[:, 32:33] - sumw[:, i2]
    qx, q2 = [], []
    for xx in (X_P, X_M):                            # per split: first the shift up, then down
        qx.append(a_x * xx[0] + b_x * xx[1] + c_x * xx[2])
        q2.append(a_w * xx[0] * xx[0] + b_w * xx[1] * xx[1] + c_w * xx[2] * xx[2])
    pick, scale = _scan(np.stack(qx, axis=2).reshape(M, -1), np.stack(q2, axis=2).reshape(M, -1))
    active &= pick >= 0
    split = np.maximum(pick, 0) // 2
    shift = np.where(pick % 2 == 0, 1, -1)
    L = _levels(order, i1[split], i2[split])
    flip = scale < 0
    L = np.where(flip[:, None], 2 - L, L)
    scale = np.where(flip, -scale, scale)
    shift = np.where(flip, -shift, shift)
    values = np.where((shift == 1)[:, None, None], X_P, X_M) * np.ones((M, 4, 1), np.float32)
    gi, on_grid = _to_grid(t, L, xb, weight, scale, values)
    scale = _refit(scale, on_grid, _grid_terms(t, gi, xb, weight, values))
    scale = np.where(active, scale, F32(0)).astype(np.float32).reshape(N, 8)
    shift = np.where(active, shift, 1).reshape(N, 8)
    gi = np.where(active[:, None], gi, 0).reshape(N, 8, 4)
    max_scale = scale.max(axis=1)
    zero = max_scale == 0
    d = max_scale / F32(15)
    id_ = F32(1) / np.where(zero, F32(1), d)
    code = np.clip(nearest_int(F32(0.5) * (id_[:, None] * scale - F32(1))), 0, 7) | np.where(shift == -1, 8, 0)
    # a super-block whose scales are all 0 keeps d = 0 and no scale codes (C skips them), its grid bytes as written
    qh = ((gi >> 8) << (3 * np.arange(4))).sum(axis=2) | np.where(zero[:, None], 0, code << 12)
    out = np.zeros((N, 50), np.uint8)
    out[:, :2] = np.where(zero, F32(0), d * F32(1.125)).astype(np.float16).view(np.uint8).reshape(N, 2)
    out[:, 2:34] = (gi & 255).reshape(N, 32)
    out[:, 34:50] = qh.astype("<u2").view(np.uint8).reshape(N, 16)
    return out


def _iq1_m(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    t = tables("IQ1_S")
    N = x.shape[0]
    xb, weight = block_weights(x, qw, 16)
    M = xb.shape[0]
    active = ~(np.abs(xb).max(axis=1) < _EPS["IQ1_M"])
    order, xs, ws = _sorted_prefix(xb, weight)
    half = order >= 8
    px = np.zeros((2, M, 17), np.float32)
    pw = np.zeros((2, M, 17), np.float32)
    for j in range(16):
        wx, w = ws[:, j] * xs[:, j], ws[:, j]
        for h in (0, 1):
            mine = half[:, j] == bool(h)
            px[h, :, j + 1] = np.where(mine, px[h, :, j] + wx, px[h, :, j])
            pw[h, :, j + 1] = np.where(mine, pw[h, :, j] + w, pw[h, :, j])
    txs, tws = px[:, :, 16:17], pw[:, :, 16:17]
    p2, m2 = X_P[2], X_M[2]
    cp1, cp2 = X_P[0] * X_P[0] - X_P[1] * X_P[1], X_P[1] * X_P[1] - X_P[2] * X_P[2]
    cm1, cm2 = X_M[0] * X_M[0] - X_M[1] * X_M[1], X_M[1] * X_M[1] - X_M[2] * X_M[2]
    i1, i2 = np.triu_indices(17)
    sx = px[:, :, i1] + px[:, :, i2]
    qx_p, qx_m = txs * p2 - sx, txs * m2 - sx
    q2_p = tws * p2 * p2 + pw[:, :, i1] * cp1 + pw[:, :, i2] * cp2
    q2_m = tws * m2 * m2 + pw[:, :, i1] * cm1 + pw[:, :, i2] * cm2
    # k: 0 = (+, +), 1 = (+, -), 2 = (-, +), 3 = (-, -) for the two halves
    qx = np.stack([qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1]], axis=2)
    q2 = np.stack([q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1]], axis=2)
    pick, scale = _scan(qx.reshape(M, -1), q2.reshape(M, -1))
    active &= pick >= 0
    split, k = np.maximum(pick, 0) // 4, np.maximum(pick, 0) % 4
    L = _levels(order, i1[split], i2[split])
    flip = scale < 0
    L = np.where(flip[:, None], 2 - L, L)
    scale = np.where(flip, -scale, scale)
    k = np.where(flip, 3 - k, k)
    values = _m_values(k)
    gi, on_grid = _to_grid(t, L, xb, weight, scale, values)
    scale = _refit(scale, on_grid, _grid_terms(t, gi, xb, weight, values))
    scale = np.where(active, scale, F32(0)).astype(np.float32)
    k = np.where(active, k, 0)
    gi = np.where(active[:, None], gi, 0)
    max_scale = scale.reshape(N, 16).max(axis=1)
    zero = max_scale == 0
    d = max_scale / F32(15)
    id_ = np.repeat(F32(1) / np.where(zero, F32(1), d), 16)
    code = np.clip(nearest_int(F32(0.5) * (id_ * scale - F32(1))), 0, 7)
    # the super-block scale, fitted again in one running sum over its 256 weights (blocks of zeros included, as
    # grid point 0 with shift code 0)
    qx_t, q2_t = _grid_terms(t, gi, xb, weight, _m_values(k), factor=(2 * code + 1).astype(np.float32))
    sqx, sq2 = seq_sum(qx_t.reshape(N, QK_K)), seq_sum(q2_t.reshape(N, QK_K))
    d = np.where(sq2 > 0, sqx / np.where(sq2 > 0, sq2, F32(1)), d)
    s16 = (d * F32(1.1125)).astype(np.float16).view(np.uint16).astype(np.int64)
    masks = np.array([0x00, 0x80, 0x08, 0x88])
    # a super-block whose scales are all 0 keeps no scale codes, shift bits or fp16 scale (C skips them)
    qh = ((gi[:, 0] >> 8) | ((gi[:, 1] >> 8) << 4) | np.where(np.repeat(zero, 16), 0, masks[k])).reshape(N, 16)
    sc = (code.reshape(N, 4, 4) << (3 * np.arange(4))).sum(axis=2)
    sc = np.where(zero[:, None], 0, sc | (((s16[:, None] >> (4 * np.arange(4))) & 0xF) << 12))
    out = np.zeros((N, 56), np.uint8)
    out[:, :32] = (gi & 255).reshape(N, 32)
    out[:, 32:48] = qh
    out[:, 48:56] = sc.astype("<u2").view(np.uint8).reshape(N, 8)
    return out


def _m_values(k: np.ndarray) -> np.ndarray:
    """(M, 2, 3): the level values of each half's group: the first half shifted up for k < 2, the second for even
    k."""
    first = np.where((k < 2)[:, None], X_P, X_M)
    second = np.where((k % 2 == 0)[:, None], X_P, X_M)
    return np.stack([first, second], axis=1).astype(np.float32)


def quantize_iq1(name: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """`quantize_iq1_s` / `quantize_iq1_m` on rows of float32 -> (rows, row bytes) uint8, llama.cpp's bytes.
    IQ1_S needs an importance matrix (ggml asserts one); IQ1_M takes one or not."""
    blocks, qw, rows = super_blocks(name, x, imatrix, name == "IQ1_S")
    out = _iq1_s(blocks, qw) if name == "IQ1_S" else _iq1_m(blocks, qw)
    return out.reshape(rows, -1)
