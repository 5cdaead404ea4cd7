"""llama.cpp's lattice block quantizers IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S, ported to vectorised numpy.

Each of these types stores, per group of 8 (IQ2, the E8 lattice) or 4 (IQ3, the D4 lattice) weights, the index of
a point of a fixed grid of magnitudes, plus sign bits, plus a 4-bit scale per 16- or 32-weight sub-block and an
fp16 scale per 256-weight super-block. The quantizer searches scales; for each trial it rounds every group to the
nearest lattice point and, when that point is not on the grid, takes the grid point nearest it by a weighted
distance among a precomputed list of neighbours.

Ports, from `ggml/src/ggml-quants.c` of llama.cpp commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f (vendored in the
llama-cpp-python 0.3.36 sdist):
- `iq2xs_init_impl` / `iq3xs_init_impl`: the grid, the map from a lattice point to its grid index and the neighbour
  lists (`tables`). The grids themselves are read from the `gguf` package's dequantizers (the same tables);
- `iq2_find_best_neighbour` / `iq3_find_best_neighbour` (`nearest_on_grid`);
- `quantize_row_iq2_xxs_impl`, `quantize_row_iq2_xs_impl`, `quantize_row_iq2_s_impl`,
  `quantize_row_iq3_xxs_impl` and `quantize_row_iq3_s_impl`: one search (`_search`) with the differences between
  them as data (`_Spec`), and one packer per block layout.

Exactness: every C float operation is one numpy float32 operation in source order (ggml-base is built without
-march and without -ffast-math), sums run element after element (`seq_sum`), and the neighbour search keeps the C
loop's first strict minimum (`argmin`). The quirks are kept too: IQ3_S writes the grid bytes and signs of its
non-zero sub-blocks one after the other, so a sub-block of zeros shifts those that follow it. Not followed: inputs
that are not finite (NaN, or magnitudes near 1e15 without an importance matrix, where every neighbour's distance
overflows and ggml aborts); llama-quantize would not write such a tensor either. Checked byte for
byte against `ggml_quantize_chunk` in tests/test_ggml_golden.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from quantlib.methods._ggml_common import F32, QK_K, f32, nearest_int, seq_sum

@dataclass(frozen=True)
class _Spec:
    name: str
    group: int            # weights per grid point: 8 (IQ2) or 4 (IQ3)
    bits: int             # bits per coordinate in a lattice point's index (2 or 3)
    kmap_size: int        # lattice points the map covers
    nwant: int            # neighbour lists hold the points at the nwant smallest distances
    block: int            # weights per 4-bit scale
    kmax: int             # kMaxQ: coordinates are 2*l+1, l < kmax
    steps: tuple[int, int, float]  # the scale search: is = first..last, id = (2*kmax-1 + is*step)/max
    parity: bool          # signs stored in 7 bits: an odd count of negatives flips the least important weight
    eps: float | None     # a sub-block whose largest magnitude is below it is zero (None: exactly zero)
    sigma: int            # sigma2 = sigma*sum(x^2)/256
    unweighted: str | None  # weights without an importance matrix: "x2", "sigma_x2", None (one is required)
    first: str            # the first scale: "qp" (make_qp_quants) or "max" (max/(2*kmax-1))
    requant: str          # after the search: "all" groups, "offgrid" ones, or "all_if_offgrid"
    fudge: float | None   # factor on the stored fp16 super-block scale


SPECS = {
    "IQ2_XXS": _Spec("IQ2_XXS", 8, 2, 43692, 2, 32, 3, (-6, 6, 0.1), True, 1e-15, 1, None, "qp", "all", None),
    "IQ2_XS": _Spec("IQ2_XS", 8, 2, 43692, 2, 16, 3, (-9, 9, 0.1), True, 1e-15, 1, None, "max", "offgrid", None),
    "IQ2_S": _Spec("IQ2_S", 8, 2, 43692, 1, 16, 3, (-9, 9, 0.1), False, 1e-8, 2, "sigma_x2", "max", "offgrid",
                   0.9875),
    "IQ3_XXS": _Spec("IQ3_XXS", 4, 3, 4096, 2, 32, 8, (-15, 15, 0.2), True, 1e-8, 2, "x2", "max", "offgrid",
                     1.0125),
    "IQ3_S": _Spec("IQ3_S", 4, 3, 4096, 3, 32, 8, (-9, 9, 0.2), False, None, 2, "x2", "max", "all_if_offgrid",
                   1.033),
}
#: The grids and their neighbour tables: (weights per point, bits per coordinate in the map's index, lattice points
#: the map covers, nwant), as iq2xs_init_impl / iq3xs_init_impl build them. IQ1_S and IQ1_M share one grid.
GRIDS = {"IQ2_XXS": (8, 2, 43692, 2), "IQ2_XS": (8, 2, 43692, 2), "IQ2_S": (8, 2, 43692, 1),
         "IQ3_XXS": (4, 3, 4096, 2), "IQ3_S": (4, 3, 4096, 3), "IQ1_S": (8, 2, 43692, 3)}
#: Bytes per 256-weight block.
BLOCK_BYTES = {"IQ2_XXS": 66, "IQ2_XS": 74, "IQ2_S": 82, "IQ3_XXS": 98, "IQ3_S": 110}


@dataclass(frozen=True)
class _Tables:
    levels: np.ndarray  # (grid, group) int: l of each coordinate (the point is 2*l+1)
    points: np.ndarray  # (grid, group) float32: 2*l+1
    kmap: np.ndarray    # (kmap_size,) int64: grid index of a lattice point, -1 off the grid
    start: np.ndarray   # (kmap_size,) int64: where a point's neighbour list starts in `flat`
    count: np.ndarray   # (kmap_size,) int64: its length (0 on the grid)
    flat: np.ndarray    # every list in turn: grid indices by (distance, index)
    codes: np.ndarray   # (group, len(flat)) int64: i * n_levels + the level of coordinate i of each listed point
    n_levels: int       # levels a coordinate takes on the grid
    level_points: np.ndarray  # (n_levels,) float32: 2*l+1

    def neighbours(self, u: int) -> np.ndarray:
        return self.flat[self.start[u]:self.start[u] + self.count[u]]


def _grid_levels(name: str) -> np.ndarray:
    """The grid of `name` as levels l, read from the gguf package's dequantizer (its `grid_hex` packs each point's
    coordinates in 2-bit fields for IQ2 and 4-bit fields for IQ3, in llama.cpp's order)."""
    import gguf.quants

    cls = getattr(gguf.quants, name)
    n_points, group = cls.grid_shape
    packed = np.frombuffer(bytes.fromhex(cls.grid_hex.decode()), dtype="<u2").astype(np.int64)
    width = 2 if group == 8 else 4
    levels = (packed[:, None] >> (width * np.arange(group))) & ((1 << width) - 1)
    if levels.shape != (n_points, group):
        raise ValueError(f"gguf's {name} grid has shape {levels.shape}, expected {(n_points, group)}")
    return levels


@lru_cache(maxsize=None)
def tables(name: str) -> _Tables:
    """`iq2xs_init_impl` / `iq3xs_init_impl`: the map from every lattice point (coordinates l < 2**bits, packed
    `bits` to a coordinate) to its grid index, and for each point off the grid its neighbours: the grid points at
    its `nwant` smallest squared distances, ordered by (distance, index) as the C qsort orders them."""
    group, bits, kmap_size, nwant = GRIDS[name]
    levels = _grid_levels(name)
    points = (2 * levels + 1).astype(np.int32)
    shifts = bits * np.arange(group)
    kmap = np.full(kmap_size, -1, dtype=np.int64)
    kmap[(levels << shifts).sum(axis=1)] = np.arange(len(levels))
    off = np.flatnonzero(kmap < 0)
    lists: list[np.ndarray] = []
    n_grid = len(points)
    for start in range(0, len(off), 1024):
        u = off[start:start + 1024]
        pos = 2 * ((u[:, None] >> shifts) & ((1 << bits) - 1)) + 1
        d2 = ((points[None, :, :] - pos[:, None, :]) ** 2).sum(axis=2)
        order = np.argsort(d2 * n_grid + np.arange(n_grid), axis=1)
        d2_sorted = np.take_along_axis(d2, order, axis=1)
        rank = np.concatenate([np.zeros((len(u), 1), np.int64),
                               np.cumsum(d2_sorted[:, 1:] > d2_sorted[:, :-1], axis=1)], axis=1)
        keep = rank < nwant  # a prefix of each sorted row
        lists.append((keep.sum(axis=1), order[keep]))
    count = np.zeros(kmap_size, dtype=np.int64)
    count[off] = np.concatenate([c for c, _ in lists])
    start = np.cumsum(count) - count
    flat = np.concatenate([f for _, f in lists])
    n_levels = int(levels.max()) + 1
    codes = np.ascontiguousarray((np.arange(group) * n_levels + levels[flat]).T)
    return _Tables(levels, points.astype(np.float32), kmap, start, count, flat, codes, n_levels,
                   (2 * np.arange(n_levels) + 1).astype(np.float32))


def nearest_on_grid(t: _Tables, u: np.ndarray, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray,
                    values: np.ndarray | None = None):
    """`iq*_find_best_neighbour` for K groups off the grid: the neighbour of lattice point u (K,) with the smallest
    d2 = sum over i of waux[i]*(scale*q[i] - xval[i])^2, the first in the list on a tie (C's strict `<`). q[i] is
    the value of coordinate i's level: 2*l+1, or `values` (K, levels) per group (IQ1's shifted levels).

    Each term depends on one coordinate's level only, so the terms of every level are computed once per group
    (the same float operations C does per neighbour), and a neighbour's d2 is its terms added in C's order
    (0 + the first term is that term, bit for bit). All lists are laid end to end (about a dozen entries on
    average, hundreds at most), so the work is their total length. Returns (grid index (K,), levels (K, group))."""
    K, group = xval.shape
    nlev = t.n_levels
    q = t.level_points[None, :] if values is None else values
    diff = scale[:, None, None] * q[:, None, :] - xval[:, :, None]
    terms = (waux[:, :, None] * diff * diff).reshape(-1)           # (K * group * nlev,)
    count = t.count[u]
    ends = np.cumsum(count)
    seg = ends - count
    base = np.repeat(np.arange(K) * (group * nlev), count)
    pos = np.repeat(t.start[u] - seg, count) + np.arange(ends[-1])
    codes = t.codes[:, pos]                                        # (group, entries): i*nlev + level
    d2 = terms[base + codes[0]]
    for i in range(1, group):
        d2 = d2 + terms[base + codes[i]]
    lowest = np.minimum.reduceat(d2, seg)
    position = np.where(d2 == np.repeat(lowest, count), np.arange(len(pos)), len(pos))
    out = t.flat[pos[np.minimum.reduceat(position, seg)]]
    return out, t.levels[out]


def _to_grid(spec: _Spec, t: _Tables, L: np.ndarray, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray):
    """Each group of L (M, block) onto the grid: (L, grid index (M, groups), on the grid already (M, groups))."""
    M = L.shape[0]
    Lg = L.reshape(M, -1, spec.group).copy()
    u = (Lg << (spec.bits * np.arange(spec.group))).sum(axis=2)
    gi = t.kmap[u]
    off = gi < 0
    if off.any():
        rows, groups = np.nonzero(off)
        xg = xval.reshape(M, -1, spec.group)
        wg = waux.reshape(M, -1, spec.group)
        gi[rows, groups], Lg[rows, groups] = nearest_on_grid(t, u[rows, groups], xg[rows, groups],
                                                              wg[rows, groups], scale[rows])
    return Lg.reshape(M, -1), gi, ~off


def _round(spec: _Spec, xval: np.ndarray, id_: np.ndarray) -> np.ndarray:
    """`MAX(0, MIN(kMaxQ-1, nearest_int(0.5f*(id*xval-1))))`."""
    return np.clip(nearest_int(F32(0.5) * (id_[:, None] * xval - F32(1))), 0, spec.kmax - 1).astype(np.int64)


def _sums(weight, xval, L):
    q = (2 * L + 1).astype(np.float32)
    return seq_sum(weight * xval * q), seq_sum(weight * q * q)


def _signs(spec: _Spec, xb: np.ndarray, weight: np.ndarray):
    """Magnitudes and sign bytes per 8 weights; with `parity`, an odd count of negatives flips the weight of least
    weight*x^2 back (its magnitude turns negative) and only 7 bits are kept."""
    M = xb.shape[0]
    x8 = xb.reshape(M, -1, 8)
    neg = x8 < 0
    xval = np.where(neg, -x8, x8)
    bits = neg.astype(np.int64)
    if spec.parity:
        odd = bits.sum(axis=2) % 2 == 1
        imin = np.argmin(weight.reshape(M, -1, 8) * x8 * x8, axis=2)
        flip = odd[..., None] & (np.arange(8) == imin[..., None])
        xval = np.where(flip, -xval, xval)
        bits = bits ^ flip
    signs = (bits << np.arange(8)).sum(axis=2)
    return xval.reshape(M, -1).astype(np.float32), signs & (127 if spec.parity else 255)


def block_weights(x: np.ndarray, qw: np.ndarray | None, block: int, sigma: int = 2,
                  unweighted: str | None = "x2") -> tuple[np.ndarray, np.ndarray]:
    """Every i-quant's weights: with an importance matrix `qw[i] * sqrtf(sigma2 + x[i]*x[i])`, sigma2 =
    sigma*sum(x^2)/256 over the super-block; without one `x[i]*x[i]` ("x2") or `0.25f*sigma2 + x[i]*x[i]`
    ("sigma_x2"). x, qw (N, 256) -> (the blocks (N * 256/block, block), their weights)."""
    N = x.shape[0]
    nsub = QK_K // block
    sigma2 = F32(sigma) * seq_sum(x * x) / F32(QK_K) if sigma != 1 else seq_sum(x * x) / F32(QK_K)
    xb = x.reshape(N * nsub, block)
    s2 = np.repeat(sigma2, nsub)[:, None]
    if qw is not None:
        weight = qw.reshape(N * nsub, block) * np.sqrt(s2 + xb * xb)
    elif unweighted == "x2":
        weight = xb * xb
    else:
        weight = F32(0.25) * s2 + xb * xb
    return xb, f32(weight)


def super_blocks(name: str, x: np.ndarray, imatrix: np.ndarray | None,
                 needs_imatrix: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The checks and layout every i-quant shares: rows of float32 -> (super-blocks (N, 256), the importance
    matrix per super-block (N, 256) or None, rows). ValueError, with the reason, for a row length that is no
    multiple of 256, a missing importance matrix where llama.cpp asserts one, or one of the wrong length."""
    x = f32(x)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise ValueError(f"{name} quantizes rows whose length is a multiple of {QK_K}; got shape {x.shape}")
    if imatrix is None and needs_imatrix:
        raise ValueError(f"{name} needs an importance matrix: llama.cpp refuses to make it without one")
    rows, cols = x.shape
    qw = None
    if imatrix is not None:
        qw = f32(imatrix).reshape(-1)
        if qw.shape[0] != cols:
            raise ValueError(f"importance matrix has {qw.shape[0]} values for rows of {cols}")
        qw = np.tile(qw.reshape(-1, QK_K), (rows, 1))
    return x.reshape(-1, QK_K), qw, rows


def _search(spec: _Spec, x: np.ndarray, qw: np.ndarray | None):
    """The sub-block search of every `quantize_row_iq*_impl`, on all sub-blocks at once. x (N, 256).
    Returns (scales (N, sub-blocks), grid indices (N, sub-blocks, groups), signs (N, sub-blocks, 8-groups),
    active (N, sub-blocks))."""
    from quantlib.methods._ggml_qk_search import make_qp_quants

    t = tables(spec.name)
    N = x.shape[0]
    nsub = QK_K // spec.block
    xb, weight = block_weights(x, qw, spec.block, spec.sigma, spec.unweighted)
    waux = np.sqrt(weight)
    xval, signs = _signs(spec, xb, weight)
    mx = xval.max(axis=1)
    M = xb.shape[0]
    active = (mx != 0) if spec.eps is None else ~(mx < F32(spec.eps))
    L = np.zeros((M, spec.block), dtype=np.int64)
    if spec.first == "qp":
        scale, Lqp = make_qp_quants(xval.T, weight.T, spec.kmax + 1)
        denom = scale * F32(spec.kmax)
        active &= denom > 0
        L = Lqp.T.astype(np.int64)
    else:
        scale = mx / F32(2 * spec.kmax - 1)
        denom = mx
    denom = np.where(active, denom, F32(1))
    scale = f32(np.where(active, scale, F32(0)))
    best = np.zeros(M, dtype=np.float32)
    on = np.full((M, spec.block // spec.group), spec.requant != "all_if_offgrid")
    first, last, step = spec.steps
    for is_ in range(first, last + 1):
        id_ = (F32(2 * spec.kmax - 1) + F32(is_) * F32(step)) / denom
        Laux, _, on_aux = _to_grid(spec, t, _round(spec, xval, id_), xval, waux, F32(1) / id_)
        sumqx, sumq2 = _sums(weight, xval, Laux)
        better = active & (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = np.where(better, sumqx / np.where(better, sumq2, F32(1)), scale)
        best = np.where(better, scale * sumqx, best)
        L = np.where(better[:, None], Laux, L)
        on = np.where(better[:, None], on_aux, on)
    redo = active & (scale > 0)
    if spec.requant != "all":
        redo &= (~on).any(axis=1)
    rows = np.flatnonzero(redo)
    L2 = L.copy()
    if len(rows):
        L2[rows], _, _ = _to_grid(spec, t, _round(spec, xval[rows], F32(1) / scale[rows]), xval[rows], waux[rows],
                                  scale[rows])
    if spec.requant == "offgrid":
        keep = np.repeat(on, spec.group, axis=1) | ~redo[:, None]
    else:
        keep = np.broadcast_to(~redo[:, None], L.shape)
    L = np.where(keep, L, L2)
    sumqx, sumq2 = _sums(weight, xval, L)
    scale = np.where(redo & (sumq2 > 0), sumqx / np.where(sumq2 > 0, sumq2, F32(1)), scale)
    negative = scale < 0  # "should never happen" in llama.cpp too; it flips the signs
    scale = np.where(negative, -scale, scale)
    signs = np.where(negative[:, None], ~signs & (127 if spec.parity else 255), signs)
    L = np.where(active[:, None], L, 0)
    u = (L.reshape(M, -1, spec.group) << (spec.bits * np.arange(spec.group))).sum(axis=2)
    gi = t.kmap[u]
    if (gi < 0).any():
        raise AssertionError(f"{spec.name}: a point off the grid after the search (llama.cpp aborts here)")
    scale = np.where(active, scale, F32(0)).astype(np.float32)
    return (scale.reshape(N, nsub), gi.reshape(N, nsub, -1), signs.reshape(N, nsub, -1), active.reshape(N, nsub))


def _super_scales(spec: _Spec, scales: np.ndarray):
    """fp16 d per super-block and the 4-bit scale codes: d = max/31 (times the type's fudge factor), codes
    `MAX(0, MIN(15, nearest_int(0.5f*(id*scale-1))))`. A super-block whose scales are all 0 keeps d = 0, codes 0."""
    max_scale = scales.max(axis=1)
    zero = max_scale == 0
    d = max_scale / F32(31)
    stored = d * F32(spec.fudge) if spec.fudge is not None else d
    id_ = F32(1) / np.where(zero, F32(1), d)
    codes = np.clip(nearest_int(F32(0.5) * (id_[:, None] * scales - F32(1))), 0, 15)
    codes = np.where(zero[:, None], 0, codes).astype(np.uint32)
    dh = np.where(zero, F32(0), stored).astype(np.float16)
    return dh, codes, zero


def _pack(spec: _Spec, scales, gi, signs, active) -> np.ndarray:
    N = scales.shape[0]
    dh, codes, zero = _super_scales(spec, scales)
    gi = np.where(active[..., None], gi, 0).astype(np.uint32)
    signs = np.where(active[..., None], signs, 0).astype(np.uint32)
    out = np.zeros((N, BLOCK_BYTES[spec.name]), dtype=np.uint8)
    out[:, :2] = dh.view(np.uint8).reshape(N, 2)
    name = spec.name
    if name == "IQ2_XXS":  # 8 x (u32 of 4 grid bytes, u32 of 4 x 7 sign bits | scale << 28)
        q = np.zeros((N, 8, 2), dtype=np.uint32)
        q[..., 0] = (gi << (8 * np.arange(4, dtype=np.uint32))).sum(axis=2, dtype=np.uint32)
        q[..., 1] = (signs << (7 * np.arange(4, dtype=np.uint32))).sum(axis=2, dtype=np.uint32) | (codes << 28)
        q = np.where(zero[:, None, None], 0, q).astype("<u4")
        out[:, 2:] = q.view(np.uint8).reshape(N, -1)
    elif name == "IQ2_XS":  # 32 x u16 (grid index | 7 sign bits << 9), 8 bytes of two 4-bit scales
        q = (gi | (signs << 9)).astype("<u2").reshape(N, 32)
        q = np.where(zero[:, None], 0, q).astype("<u2")
        out[:, 2:66] = q.view(np.uint8).reshape(N, -1)
        out[:, 66:74] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    elif name == "IQ2_S":  # qs: 32 low grid bytes then 32 sign bytes; qh: 2 high bits per group; scales
        g = gi.reshape(N, 32)
        out[:, 2:34] = g & 255
        out[:, 34:66] = signs.reshape(N, 32)
        out[:, 66:74] = ((g >> 8) << (2 * (np.arange(32) % 4))).reshape(N, 8, 4).sum(axis=2)
        out[:, 74:82] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    elif name == "IQ3_XXS":  # 64 grid bytes, then 8 x u32 (4 x 7 sign bits | scale << 28)
        sas = (signs << (7 * np.arange(4, dtype=np.uint32))).sum(axis=2, dtype=np.uint32) | (codes << 28)
        out[:, 2:66] = np.where(zero[:, None], 0, gi.reshape(N, 64))
        out[:, 66:98] = np.where(zero[:, None], 0, sas).astype("<u4").view(np.uint8).reshape(N, -1)
    else:  # IQ3_S: qs[64], qh[8], signs[32], scales[4]; qs and signs of the non-zero sub-blocks packed in turn
        slot = np.cumsum(active, axis=1) - 1
        rows, subs = np.nonzero(active)
        qs = np.zeros((N, 8, 8), dtype=np.uint32)
        sg = np.zeros((N, 8, 4), dtype=np.uint32)
        qs[rows, slot[rows, subs]] = gi[rows, subs] & 255
        sg[rows, slot[rows, subs]] = signs[rows, subs]
        out[:, 2:66] = qs.reshape(N, 64)
        out[:, 66:74] = ((gi >> 8) << np.arange(8, dtype=np.uint32)).sum(axis=2)
        out[:, 74:106] = sg.reshape(N, 32)
        out[:, 106:110] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return out


def requires_imatrix(name: str) -> bool:
    return SPECS[name].unweighted is None


def quantize_iq(name: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """`quantize_<name>(x, nrow, n_per_row, imatrix)`: rows of float32 -> (rows, row bytes) uint8, llama.cpp's
    bytes. IQ2_XXS and IQ2_XS need an importance matrix (llama.cpp asserts it); the others take one or not."""
    spec = SPECS[name]
    blocks, qw, rows = super_blocks(name, x, imatrix, spec.unweighted is None)
    return _pack(spec, *_search(spec, blocks, qw)).reshape(rows, -1)


def quantize_iq2_xxs(x, imatrix=None):
    return quantize_iq("IQ2_XXS", x, imatrix)


def quantize_iq2_xs(x, imatrix=None):
    return quantize_iq("IQ2_XS", x, imatrix)


def quantize_iq2_s(x, imatrix=None):
    return quantize_iq("IQ2_S", x, imatrix)


def quantize_iq3_xxs(x, imatrix=None):
    return quantize_iq("IQ3_XXS", x, imatrix)


def quantize_iq3_s(x, imatrix=None):
    return quantize_iq("IQ3_S", x, imatrix)
