"""llama.cpp's Q3_K and Q6_K block quantizers in vectorised numpy, bit-identical to llama.cpp.

Ported from `ggml/src/ggml-quants.c` of llama.cpp commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f (vendored in
the llama-cpp-python 0.3.36 sdist):
- `quantize_q3_K`: without an importance matrix `quantize_row_q3_K_ref` (per 16 weights `make_q3_quants` with
  its coordinate-descent refinement, scales quantized to 6 bits against the largest); with one
  `quantize_row_q3_K_impl` (`make_qx_quants` weighted by imatrix * sqrt(sigma2 + x^2), then the 16 scales
  themselves quantized by `make_qx_quants` weighted by the sums of those weights).
- `quantize_q6_K`: `quantize_row_q6_K_ref` / `quantize_row_q6_K_impl` (`make_qx_quants` with nmax 32 per 16
  weights, weighted by x^2 or by the raw imatrix; scales quantized to int8 against the largest).
- the helpers `make_qx_quants` (rmse_type 1) and `make_q3_quants` (do_rmse), and ggml's `nearest_int`.

Exactness rule: ggml-base is built without -march and without -ffast-math (SSE2, no FMA), so every C float
operation is one IEEE float32 operation in source order. Here every step is the same np.float32 operation in
the same order: sums run element after element (`seq_sum` or an explicit loop over the <= 16 positions of a
block), `a*b*c` is `(a*b)*c`, `1/x` is a division, integer/float conversions, (int8_t) casts, MIN/MAX clamps,
strict `>` comparisons and the GROUP_MAX_EPS early-outs are kept. Search loops (make_qx_quants' 18 trial
scales, make_q3_quants' 5 passes) run over all blocks at once and keep each block's best with np.where, so no
Python loop ever runs over blocks or rows.

Output: np.uint8 (rows, cols // 256 * block_bytes), the ggml block structs' bytes in field order
(block_q3_K: hmask[32] qs[64] scales[12] d; block_q6_K: ql[128] qh[64] scales[16] d; d fp16 little-endian).
"""

from __future__ import annotations

import numpy as np

from quantlib.methods._ggml_common import F32
from quantlib.methods._ggml_common import QK_K
from quantlib.methods._ggml_common import blocks
from quantlib.methods._ggml_common import f32
from quantlib.methods._ggml_common import nearest_int
from quantlib.methods._ggml_common import seq_sum
from quantlib.methods._ggml_common import to_fp16
from quantlib.methods._ggml_qk_search import clipped_nearest

#: GROUP_MAX_EPS (1e-15f): groups whose largest |x| is below it are all zero.
GROUP_MAX_EPS = F32(1e-15)
Q3_K_BYTES = QK_K // 8 + QK_K // 4 + 12 + 2
Q6_K_BYTES = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2


def abs_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max, amax) over the last axis as C scans it: `if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }`
    from amax = max = 0 (the first of equal magnitudes wins)."""
    amax = np.zeros(x.shape[:-1], dtype=np.float32)
    mx = np.zeros(x.shape[:-1], dtype=np.float32)
    for i in range(x.shape[-1]):
        ax = np.abs(x[..., i])
        take = ax > amax
        amax = np.where(take, ax, amax)
        mx = np.where(take, x[..., i], mx)
    return mx, amax


def _clamped(v: np.ndarray, nmax: int) -> np.ndarray:
    """`MAX(-nmax, MIN(nmax-1, nearest_int(v)))`."""
    return np.clip(nearest_int(v), -nmax, nmax - 1)


def _clamped_f(v: np.ndarray, nmax: int) -> np.ndarray:
    """`_clamped` as float32: nearest_int is `rint` for |v| < 2^22 - 0.5 (the levels here, |v| <= nmax + 1); inf, NaN
    and larger values (a group whose max is 0 or denormal) take nearest_int's own bit trick."""
    lf = np.clip(np.rint(v), -nmax, nmax - 1)
    odd = ~(np.abs(v) < F32(4194303.5))  # from 4194303.5 on, the bit trick carries into the exponent
    if odd.any():
        lf[odd] = _clamped(v[odd], nmax)
    return lf


def _trial(x, w, wx, iscale, nmax):
    """One trial scale of make_qx_quants: the clamped levels (float32) and `sumlx += w*x[i]*l; suml2 += w*l*l`."""
    lf = _clamped_f(iscale[..., None] * x, nmax)
    return lf, seq_sum(wx * lf), seq_sum(w * lf * lf)


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `make_qx_quants(n, nmax, x, L, rmse_type=1, qw)` over the last axis of x (..., n), all groups at
    once. Weights are qw (broadcast to x) or x*x when qw is None. Returns (scale (...,), L (..., n) int32 in
    [0, 2*nmax-1], 0 for all-zero groups).

    The work runs element-major, (n, groups): each of C's sequential sums is then one reduction along the slow
    axis (`seq_sum`), with no copy per sum."""
    x = f32(x)
    shape, n = x.shape, x.shape[-1]
    xt = np.ascontiguousarray(x.reshape(-1, n).T)
    wt = xt * xt if qw is None else np.ascontiguousarray(np.broadcast_to(f32(qw), shape).reshape(-1, n).T)
    with np.errstate(all="ignore"):
        mx, amax = abs_max(xt.T)
        wx = wt * xt
        iscale = F32(-nmax) / mx
        L, sumlx, suml2 = _trial_t(xt, wt, wx, iscale, nmax, amax)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        best_iscale = iscale  # the levels of the best trial are recomputed once from its scale
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
            lev, slx, sl2 = _trial_t(xt, wt, wx, iscale, nmax, amax)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            best_iscale = np.where(better, iscale, best_iscale)
            s = slx / sl2
            scale = np.where(better, s, scale)
            best = np.where(better, s * slx, best)
        L = clipped_nearest(best_iscale[None, :] * xt, -nmax, nmax - 1, np.abs(best_iscale) * amax)
        L = L.astype(np.int32)
    zero = amax < GROUP_MAX_EPS
    scale = np.where(zero, F32(0), scale).astype(np.float32).reshape(shape[:-1])
    L = np.where(zero[None, :], 0, L + nmax).T.reshape(shape)
    return scale, L


def _trial_t(xt, wt, wx, iscale, nmax, amax):
    """`_trial` element-major: xt, wt, wx (n, groups), iscale and amax (groups,); the levels as float32
    (`clipped_nearest`: |iscale*x| <= |iscale|*amax per group)."""
    lf = clipped_nearest(iscale[None, :] * xt, -nmax, nmax - 1, np.abs(iscale) * amax)
    return lf, seq_sum(wx * lf, axis=0), seq_sum(wt * lf * lf, axis=0)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `make_q3_quants(n, nmax, x, L, do_rmse=true)` over the last axis of x (..., n): levels from
    -nmax/max, then up to 5 passes of per-element coordinate descent on the x^2-weighted error. A pass that
    changes nothing leaves the state as it was, so the C `break` is the same as running all 5 passes.
    Returns (scale, L in [0, 2*nmax-1], 0 for all-zero groups)."""
    x = f32(x)
    with np.errstate(all="ignore"):
        mx, amax = abs_max(x)
        iscale = F32(-nmax) / mx
        w = x * x
        wx = w * x
        L, sumlx, suml2 = _trial(x, w, wx, iscale, nmax)
        L = L.astype(np.int32)
        for _ in range(5):
            for i in range(x.shape[-1]):
                li = L[..., i]
                lf = li.astype(np.float32)
                slx0 = sumlx - wx[..., i] * lf
                sl2 = suml2 - w[..., i] * lf * lf
                new_l = _clamped(x[..., i] * sl2 / slx0, nmax)
                nf = new_l.astype(np.float32)
                slx = slx0 + wx[..., i] * nf
                sl2 = sl2 + w[..., i] * nf * nf
                take = (slx0 > 0) & (new_l != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[..., i] = np.where(take, new_l, li)
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    zero = amax < GROUP_MAX_EPS
    return np.where(zero, F32(0), scale).astype(np.float32), np.where(zero[..., None], 0, L + nmax)


def _requantize(sub: np.ndarray, L: np.ndarray, d: np.ndarray, nmax: int) -> np.ndarray:
    """The final pass of both quantizers: per 16 weights `d = fp16(y.d) * sc`; where d != 0 the levels become
    `MAX(-nmax, MIN(nmax-1, nearest_int(x/d))) + nmax`; where d == 0 (`continue`) they stay as they were."""
    with np.errstate(all="ignore"):
        q = _clamped(sub / d[..., None], nmax) + nmax
    return np.where((d != 0)[..., None], q, L)


def _fp16_bytes(d: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(to_fp16(d).astype("<f2")[..., None]).view(np.uint8)


def _check(x: np.ndarray, imatrix: np.ndarray | None):
    x = f32(x)
    if x.ndim != 2:
        raise ValueError(f"expected a (rows, cols) matrix, got shape {x.shape}")
    xb = blocks(x, QK_K)
    rows, nb, _ = xb.shape
    qw = None
    if imatrix is not None:
        imatrix = f32(imatrix)
        if imatrix.shape != (x.shape[1],):
            raise ValueError(f"imatrix has shape {imatrix.shape}, expected ({x.shape[1]},)")
        qw = imatrix.reshape(nb, QK_K // 16, 16)
    return xb.reshape(rows, nb, QK_K // 16, 16), qw


def quantize_q3_K(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp `quantize_q3_K` (ggml_quantize_chunk's GGML_TYPE_Q3_K): rows of float32 -> block_q3_K bytes,
    (rows, cols // 256 * 110) uint8. Without imatrix `quantize_row_q3_K_ref`, with it `quantize_row_q3_K_impl`."""
    sub, qw = _check(x, imatrix)
    rows, nb = sub.shape[:2]
    with np.errstate(all="ignore"):
        if qw is None:
            scales, L = make_q3_quants(sub, 4)
            max_scale, _ = abs_max(scales)
            nonzero = max_scale != 0                                 # if (max_scale)
            iscale = F32(-32.0) / max_scale
            ls = nearest_int(iscale[..., None] * scales).astype(np.int8).astype(np.int32)   # int8_t l = ...
            ls = np.where(nonzero[..., None], np.clip(ls, -32, 31) + 32, 0)
            d = np.where(nonzero, F32(1) / iscale, F32(0))
        else:
            flat = sub.reshape(rows, nb, QK_K)
            sumx2 = seq_sum(flat * flat)
            sigma2 = F32(2) * sumx2 / F32(QK_K)
            weight = qw * np.sqrt(sigma2[..., None, None] + sub * sub)
            sw = seq_sum(weight)
            scales, L = make_qx_quants(sub, 4, weight)
            d, ls = make_qx_quants(scales, 32, sw)
        d16 = to_fp16(d)                                              # inf where d overflows fp16, as in C
        dsub = d16.astype(np.float32)[..., None] * (ls - 32).astype(np.float32)
    L = _requantize(sub, L, dsub, 4).reshape(rows, nb, QK_K)

    # hmask: bit j // 32 of byte j % 32 holds L[j] > 3; those levels lose the 4.
    high = L > 3
    L = np.where(high, L - 4, L)
    hmask = np.zeros((rows, nb, QK_K // 8), dtype=np.int32)
    for bit in range(8):
        hmask |= high[..., bit * 32:(bit + 1) * 32].astype(np.int32) << bit
    # qs[h*32 + l] = L[h*128 + l] | L[.. + 32] << 2 | L[.. + 64] << 4 | L[.. + 96] << 6
    L4 = L.reshape(rows, nb, 2, 4, 32)
    qs = L4[..., 0, :] | (L4[..., 1, :] << 2) | (L4[..., 2, :] << 4) | (L4[..., 3, :] << 6)
    # 6-bit scales: low nibbles of j < 8 in scales[j], of j >= 8 in the high nibble of scales[j-8];
    # the 2 high bits of j in scales[8 + j%4] at bit 2*(j/4).
    sc = np.zeros((rows, nb, 12), dtype=np.int32)
    sc[..., :8] = (ls[..., :8] & 0xF) | ((ls[..., 8:] & 0xF) << 4)
    hi = (ls >> 4).reshape(rows, nb, 4, 4)
    sc[..., 8:] = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
    out = np.concatenate([hmask.astype(np.uint8), qs.reshape(rows, nb, 64).astype(np.uint8),
                          sc.astype(np.uint8), _fp16_bytes(d16)], axis=-1)
    return out.reshape(rows, nb * Q3_K_BYTES)


def quantize_q6_K(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp `quantize_q6_K` (ggml_quantize_chunk's GGML_TYPE_Q6_K): rows of float32 -> block_q6_K bytes,
    (rows, cols // 256 * 210) uint8. Without imatrix `quantize_row_q6_K_ref`, with it `quantize_row_q6_K_impl`
    (which weights make_qx_quants by the raw importance matrix)."""
    sub, qw = _check(x, imatrix)
    rows, nb = sub.shape[:2]
    scales, L = make_qx_quants(sub, 32, qw)
    max_scale, max_abs = abs_max(scales)
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F32(-128.0) / max_scale
        d16 = to_fp16(np.where(zero, F32(0), F32(1) / iscale))
        sc = np.minimum(127, nearest_int(iscale[..., None] * scales)).astype(np.int8)   # int8_t scales[ib]
        sc = np.where(zero[..., None], np.int8(0), sc)
        dsub = d16.astype(np.float32)[..., None] * sc.astype(np.float32)
    L = _requantize(sub, L, dsub, 32).reshape(rows, nb, 2, 4, 32)

    lo = L & 0xF
    ql = np.concatenate([lo[..., 0, :] | (lo[..., 2, :] << 4), lo[..., 1, :] | (lo[..., 3, :] << 4)], axis=-1)
    hi = L >> 4
    qh = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
    out = np.concatenate([ql.reshape(rows, nb, 128).astype(np.uint8), qh.reshape(rows, nb, 64).astype(np.uint8),
                          sc.view(np.uint8), _fp16_bytes(d16)], axis=-1)
    out[zero] = 0                                                     # memset(&y[i], 0, sizeof(block_q6_K))
    return out.reshape(rows, nb * Q6_K_BYTES)
