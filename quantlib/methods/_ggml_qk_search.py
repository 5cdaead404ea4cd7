"""The scale searches of llama.cpp's K-quants (`ggml/src/ggml-quants.c`), vectorised over blocks:
`make_qkx2_quants`, `make_qkx3_quants` (one function, `make_qkx`) and `make_qp_quants`, plus the 6-bit
scale packing of Q4_K/Q5_K (`get_scale_min_k4` and its inverse).

Ported from llama.cpp commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f (vendored in the llama-cpp-python 0.3.36
sdist). Exactness rule: every C float operation is one numpy float32 operation in the C source order (ggml-base
is built without -march: SSE2, no FMA, no fast-math); sums run element after element (`seq_sum`), never
pairwise; int/uint8 conversions, clamps and strict comparisons are those of the C code.

Layout: a block's elements are on the *first* axis, blocks on the second, so arrays are (n, N) and each
sequential step of a sum is one contiguous numpy operation over all N blocks.
"""

from __future__ import annotations

import numpy as np

from quantlib.methods._ggml_common import F32
from quantlib.methods._ggml_common import nearest_int
from quantlib.methods._ggml_common import seq_sum

#: GROUP_MAX_EPS (1e-15f): below it a group counts as all zero in make_qp_quants.
GROUP_MAX_EPS = F32(1e-15)


def as_u8(values: np.ndarray) -> np.ndarray:
    """C's conversion of an int to uint8_t: modulo 256."""
    return (np.asarray(values).astype(np.int64) & 0xFF).astype(np.uint8)


def clipped_nearest(v: np.ndarray, lo: int, hi: int, bound: np.ndarray | None = None) -> np.ndarray:
    """`MAX(lo, MIN(hi, nearest_int(v)))` as float32. nearest_int rounds half to even like `rint` for
    |v| < 2^22 - 0.5; outside that (inf, NaN, a scale from a denormal range) C's bit trick gives other integers, which are
    taken from `nearest_int` itself for those elements only. `bound`: a per-block bound on |v| from the caller;
    where every block's is below 2^21 (half the limit: room for its own rounding), the elementwise check is
    skipped."""
    lf = np.clip(np.rint(v), lo, hi)
    if bound is not None and bool(np.all(bound < F32(2097152))):
        return lf
    odd = ~(np.abs(v) < F32(4194303.5))  # from 4194303.5 on, the bit trick carries into the exponent
    if odd.any():
        lf[odd] = np.clip(nearest_int(v[odd]), lo, hi)
    return lf


def make_qkx(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
             use_mad: bool, qkx3: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`make_qkx2_quants` (qkx3=False) or `make_qkx3_quants` with weights (qkx3=True) on x, weights (n, N).

    Returns (scale (N,), the_min (N,), L (n, N) uint8). The two C functions differ only in the degenerate test
    (`max == min` against `max <= min`). Note that the search loop's `x[i] - min` and `max - min` use the best
    min found so far, which this keeps per block."""
    x = np.asarray(x, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    n = x.shape[0]
    nmax_f = F32(nmax)
    with np.errstate(all="ignore"):
        mn = x[0].copy()
        mx = x[0].copy()
        sum_w = w[0].copy()
        sum_x = sum_w * x[0]
        for i in range(1, n):
            mn = np.where(x[i] < mn, x[i], mn)
            mx = np.where(x[i] > mx, x[i], mx)
            sum_w = sum_w + w[i]
            sum_x = sum_x + w[i] * x[i]
        xmin = mn
        mn = np.where(mn > 0, F32(0), mn)
        degenerate = (mx <= mn) if qkx3 else (mx == mn)

        def error(scale, the_min, lf):
            diff = scale * lf
            diff += the_min
            diff -= x
            if use_mad:
                np.abs(diff, out=diff)
            else:
                diff *= diff
            diff *= w
            return seq_sum(diff, axis=0)

        iscale = nmax_f / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(nearest_int(iscale * (x - mn)), 0, nmax).astype(np.float32)
        best = error(scale, mn, L)
        if nstep >= 1:
            # the levels of the best step are recomputed once at the end from its (iscale, min), not kept per step
            best_iscale, best_from = np.full_like(mn, np.nan), mn.copy()
            for step in range(nstep + 1):
                iscale = (F32(rmin) + F32(rdelta) * F32(step) + nmax_f) / (mx - mn)
                # |x - mn| <= max(|max - mn|, |xmin - mn|): the levels' bound per block, without a pass over x
                bound = np.abs(iscale) * np.maximum(np.abs(mx - mn), np.abs(xmin - mn))
                v = x - mn
                v *= iscale
                lf = clipped_nearest(v, 0, nmax, bound)
                wl = w * lf
                sum_l = seq_sum(wl, axis=0)
                sum_l2 = seq_sum(wl * lf, axis=0)
                sum_xl = seq_sum(wl * x, axis=0)
                D = sum_w * sum_l2 - sum_l * sum_l
                this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
                this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
                pos = this_min > 0
                this_min = np.where(pos, F32(0), this_min)
                this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
                cur = error(this_scale, this_min, lf)
                better = (D > 0) & (cur < best)
                best_iscale = np.where(better, iscale, best_iscale)
                best_from = np.where(better, mn, best_from)
                best = np.where(better, cur, best)
                scale = np.where(better, this_scale, scale)
                mn = np.where(better, this_min, mn)
            chosen = ~np.isnan(best_iscale)
            if chosen.any():
                v = x - best_from
                v *= best_iscale
                bound = np.abs(best_iscale) * np.maximum(np.abs(mx - best_from), np.abs(xmin - best_from))
                L = np.where(chosen, clipped_nearest(v, 0, nmax, np.where(chosen, bound, F32(0))), L)
        scale = np.where(degenerate, F32(0), scale)
        L = np.where(degenerate, 0, L)
        return scale.astype(np.float32), (-mn).astype(np.float32), L.astype(np.int64).astype(np.uint8)


def make_qp_quants(x: np.ndarray, quant_weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """`make_qp_quants(n, nmax, x, L, quant_weights)` on x, quant_weights (n, N): (scale (N,), L (n, N) uint8).

    L is C's uint8_t array: an int stored there wraps modulo 256 and is read back as 0..255. The C refinement
    loop stops when a pass changes nothing; a pass that changes nothing leaves the state as it was, so running
    all 5 passes on every block gives the same result."""
    x = np.asarray(x, dtype=np.float32)
    qw = np.asarray(quant_weights, dtype=np.float32)
    n = x.shape[0]
    nmax_f = F32(nmax)
    with np.errstate(all="ignore"):
        mx = np.zeros(x.shape[1:], dtype=np.float32)
        for i in range(n):
            mx = np.where(mx > x[i], mx, x[i])              # MAX(max, x[i])
        zero = mx < GROUP_MAX_EPS
        iscale = nmax_f / mx
        L = as_u8(nearest_int(iscale * x))
        scale = F32(1) / iscale
        diff = x - scale * L.astype(np.float32)
        best = seq_sum(qw * diff * diff, axis=0)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_is = (F32(0.1) * F32(step) + nmax_f) / mx
            scale_is = F32(1) / iscale_is
            lf = np.minimum(nmax, nearest_int(iscale_is * x)).astype(np.float32)
            diff = x - scale_is * lf
            mse = seq_sum(qw * diff * diff, axis=0)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale)
        li = np.minimum(nmax, nearest_int(iscale * x))
        L = as_u8(li)
        lf = li.astype(np.float32)
        sumlx = seq_sum(qw * x * lf, axis=0)
        suml2 = seq_sum(qw * lf * lf, axis=0)
        L = L.astype(np.int64)
        for _ in range(5):
            for i in range(n):
                w = qw[i]
                cur = L[i].astype(np.float32)
                slx = sumlx - w * x[i] * cur
                sl2 = suml2 - w * cur * cur
                usable = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(nmax, nearest_int(x[i] * sl2 / slx)).astype(np.int64)
                new_f = new_l.astype(np.float32)
                slx = slx + w * x[i] * new_f
                sl2 = sl2 + w * new_f * new_f
                take = usable & (new_l != L[i]) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[i] = np.where(take, new_l & 0xFF, L[i])
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        result = np.where(suml2 > F32(0), sumlx / suml2, F32(0))
        result = np.where(zero, F32(0), result).astype(np.float32)
        L = np.where(zero, 0, L).astype(np.uint8)
        return result, L


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 scale bytes of Q4_K/Q5_K from the 8 uint8 scales and mins (..., 8), as the C packing loop writes
    them (including its `|=` on bytes written before, so values above 63 behave as in C)."""
    ls = np.asarray(ls).astype(np.int64)
    lm = np.asarray(lm).astype(np.int64)
    out = np.zeros(ls.shape[:-1] + (12,), dtype=np.int64)
    for j in range(8):
        if j < 4:
            out[..., j] = ls[..., j]
            out[..., j + 4] = lm[..., j]
        else:
            out[..., j + 4] = (ls[..., j] & 0xF) | ((lm[..., j] & 0xF) << 4)
            out[..., j - 4] |= (ls[..., j] >> 4) << 6
            out[..., j] |= (lm[..., j] >> 4) << 6
        out &= 0xFF
    return out.astype(np.uint8)


def get_scale_min_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`get_scale_min_k4` for j = 0..7 on the 12 scale bytes (..., 12): (sc, m), each (..., 8) int64."""
    q = np.asarray(q).astype(np.int64)
    sc = np.empty(q.shape[:-1] + (8,), dtype=np.int64)
    m = np.empty_like(sc)
    for j in range(8):
        if j < 4:
            sc[..., j] = q[..., j] & 63
            m[..., j] = q[..., j + 4] & 63
        else:
            sc[..., j] = (q[..., j + 4] & 0xF) | ((q[..., j - 4] >> 6) << 4)
            m[..., j] = (q[..., j + 4] >> 4) | ((q[..., j] >> 6) << 4)
    return sc, m


def requantize(x: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray, nmax: int) -> np.ndarray:
    """The final pass of every K-quant: where `d` (the sub-block's float scale) is not 0,
    L = MAX(0, MIN(nmax, nearest_int((x + dm)/d))); elsewhere L stays. x, L (n, N); d, dm (N,)."""
    with np.errstate(all="ignore"):
        new = np.clip(nearest_int((x + dm) / d), 0, nmax)
    return np.where(d != 0, new, L).astype(np.uint8)


def max_so_far(values: np.ndarray) -> np.ndarray:
    """`float m = 0; for (j...) if (v[j] > m) m = v[j];` over the last axis of values (..., k)."""
    m = np.zeros(values.shape[:-1], dtype=np.float32)
    for j in range(values.shape[-1]):
        m = np.where(values[..., j] > m, values[..., j], m)
    return m
