"""llama.cpp's 4-bit non-linear block quantizers, IQ4_NL and IQ4_XS, ported to vectorised numpy.

Ports, from `ggml/src/ggml-quants.c` of llama.cpp commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f (the copy
vendored in the llama-cpp-python 0.3.36 sdist):
- `quantize_row_iq4_nl_impl`, the search both types share, with `best_index_int8` and `kvalues_iq4nl`
  (`ggml/src/ggml-common.h`);
- `quantize_iq4_nl` (32-weight blocks, ntry = 7): what `ggml_quantize_chunk` and llama-quantize call, with or
  without an importance matrix. `quantize_row_iq4_nl_ref` (ntry = -1: the first pass only, no scale search and
  no final re-quantization) is `quantize_iq4_nl(x, reference=True)`;
- `quantize_iq4_xs` (256-weight super-blocks of eight 32-weight blocks with 6-bit scales, ntry = 7), of which
  `quantize_row_iq4_xs_ref` is the call without an importance matrix.

Exactness: the output is byte for byte what llama.cpp writes. ggml-base is compiled without -march and without
-ffast-math (SSE2 float32, no FMA contraction), so every C float operation is one IEEE float32 operation in
source order; this port does each of them in np.float32, in the same order, with sequential sums (`seq_sum`),
and vectorises over blocks only (Python loops run over the element index or the 15 search steps, never over
blocks or rows). Checked against `ggml_quantize_chunk` in tests/test_ggml_golden.py and tests/test_ggml_iq4.py.
"""

from __future__ import annotations

import numpy as np

from quantlib.methods._ggml_common import F32, QK_K, blocks, f32, nearest_int, seq_sum, to_fp16

#: QK4_NL: weights per IQ4_NL block (and per IQ4_XS sub-block).
QK4_NL = 32
#: kvalues_iq4nl: the 16 non-linear levels, ascending.
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                         dtype=np.int8)
_KV = KVALUES_IQ4NL.astype(np.float32)
#: GROUP_MAX_EPS: a block whose largest |x| is below it gets scale 0.
GROUP_MAX_EPS = F32(1e-15)
#: Bytes per block: IQ4_NL = fp16 d + 16 nibble bytes; IQ4_XS = fp16 d + u16 scales_h + 4 scales_l + 128 qs.
IQ4_NL_BYTES = 2 + QK4_NL // 2
IQ4_XS_BYTES = 2 + 2 + QK_K // 64 + QK_K // 2


def best_index_int8(x: np.ndarray) -> np.ndarray:
    """`best_index_int8(16, kvalues_iq4nl, x)` for every element of x.

    The C code returns 0 for x <= val[0], 15 for x >= val[15], else binary-searches mu with
    val[mu-1] <= x < val[mu] and returns `x - val[mu-1] < val[mu] - x ? mu-1 : mu` (a tie goes up).
    `searchsorted(side='right')` is that mu; clipping it to [1, 15] makes the same final comparison give 0 and
    15 at the ends (and 15 for NaN, as the C loop does)."""
    x = f32(x)
    mu = np.clip(np.searchsorted(_KV, x, side="right"), 1, 15)
    closer_below = (x - _KV[mu - 1]) < (_KV[mu] - x)
    return (mu - closer_below).astype(np.uint8)


def _sums(w: np.ndarray, q: np.ndarray, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`sumqx += w*q*xb[j]; sumq2 += w*q*q;` over the block's last axis, left to right."""
    wq = w * q
    return seq_sum(wq * xb), seq_sum(wq * q)


def _impl(x: np.ndarray, qw: np.ndarray | None, ntry: int):
    """`quantize_row_iq4_nl_impl(super_block_size, 32, ...)` for every super-block at once.

    x: (n, super_block_size) float32; qw: None or (n, super_block_size), the importance weights of each.
    Returns (scales, L, d, extra): scales (n, nb) float32 per 32-block; L (n, super_block_size) uint8 level
    indices; d (n,) float32, the value stored as fp16 (the super-block scale when nb > 1, else scales[:, 0]);
    extra: for nb > 1 the stored 6-bit block scales l + 32 (n, nb) uint8; for ntry <= 0 the (n,) mask of
    skipped blocks (whose L C does not write); else None."""
    n, sbs = x.shape
    nb = sbs // QK4_NL
    # sigma2 = sum x^2, in order, then *= 2.f/super_block_size.
    sigma2 = seq_sum(x * x) * F32(2.0 / sbs)
    xb = x.reshape(n, nb, QK4_NL)
    if qw is not None:
        weight = qw.reshape(n, nb, QK4_NL) * np.sqrt(sigma2[:, None, None] + xb * xb)
    else:
        weight = xb * xb

    # amax/max: the first element whose |x| is strictly larger than every earlier one (start 0; NaN never wins).
    ax = np.abs(xb)
    ax = np.where(np.isnan(ax), F32(0), ax)
    first = np.argmax(ax, axis=-1)[..., None]
    amax = np.take_along_axis(ax, first, axis=-1)[..., 0]
    mx = np.where(amax > 0, np.take_along_axis(xb, first, axis=-1)[..., 0], F32(0))
    skip = amax < GROUP_MAX_EPS

    v0 = F32(_KV[0])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = (-mx if ntry > 0 else mx) / v0
        idd = F32(1) / d
        L = best_index_int8(idd[..., None] * xb)
        sumqx, sumq2 = _sums(weight, _KV[L], xb)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            idd = F32(itry + int(KVALUES_IQ4NL[0])) / mx
            sumqx, sumq2 = _sums(weight, _KV[best_index_int8(idd[..., None] * xb)], xb)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            dn = sumqx / sumq2
            d = np.where(better, dn, d)
            best = np.where(better, dn * sumqx, best)
        scales = np.where(skip, F32(0), d).astype(np.float32)
        # C leaves a skipped block's L unwritten here; with nb > 1 or ntry > 0 it is recomputed below.

        if nb > 1:
            # max_scale: the first scale whose |d| is strictly above all earlier ones (start 0).
            a = np.abs(scales)
            a = np.where(np.isnan(a), F32(0), a)
            first = np.argmax(a, axis=-1)[:, None]
            max_scale = np.where(np.take_along_axis(a, first, axis=-1)[:, 0] > 0,
                                 np.take_along_axis(scales, first, axis=-1)[:, 0], F32(0))
            dsb = -max_scale / F32(32)  # -0.0 for an all-zero super-block: fp16 0x8000, as in C
            idd = np.where(dsb != 0, F32(1) / dsb, F32(0))
            ls = np.clip(nearest_int(idd[:, None] * scales), -32, 31)
            dl = dsb[:, None] * ls.astype(np.float32)
            idl = np.where(dl != 0, F32(1) / dl, F32(0))
            L = best_index_int8(idl[..., None] * xb)
            return scales, L.reshape(n, sbs), dsb, (ls + 32).astype(np.uint8)
        if ntry > 0:
            s = scales[:, 0]
            idd = np.where(s != 0, F32(1) / s, F32(0))
            L = best_index_int8(idd[:, None] * x)
            return scales, L.reshape(n, sbs), s, None
        # ntry <= 0 keeps the first pass's L; C leaves it unwritten for a skipped block (the caller's L buffer
        # still holds the previous block's levels): returned with the skipped mask, for the caller to fill.
        return scales, L.reshape(n, sbs), scales[:, 0], skip[:, 0]


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """`q4[16*i + j] = L[32*i + j] | (L[32*i + 16 + j] << 4)`: (n, m*32) uint8 -> (n, m*16)."""
    n, size = L.shape
    g = L.reshape(n, size // 32, 2, 16)
    return (g[:, :, 0, :] | (g[:, :, 1, :] << 4)).reshape(n, size // 2).astype(np.uint8)


def _fp16_bytes(d: np.ndarray) -> np.ndarray:
    return to_fp16(d).astype("<f2").view(np.uint8).reshape(d.shape[0], 2)


def _prepare(x, imatrix, size: int):
    x = f32(x)
    if x.ndim != 2:
        raise ValueError(f"expected a (rows, cols) matrix, got shape {x.shape}")
    rows, cols = x.shape
    xb = blocks(x, size).reshape(-1, size)
    qw = None
    if imatrix is not None:
        imatrix = f32(imatrix).reshape(-1)
        if imatrix.shape[0] != cols:
            raise ValueError(f"imatrix has {imatrix.shape[0]} values for {cols} columns")
        qw = np.broadcast_to(imatrix.reshape(1, cols // size, size), (rows, cols // size, size)).reshape(-1, size)
    return xb, qw, rows, cols


def quantize_iq4_nl(x: np.ndarray, imatrix: np.ndarray | None = None, *, reference: bool = False) -> np.ndarray:
    """`quantize_iq4_nl(src, dst, rows, cols, imatrix)`: (rows, cols) float32 -> (rows, cols/32 * 18) uint8,
    the block_iq4_nl bytes {fp16 d; uint8 qs[16]}. `reference=True` is `quantize_row_iq4_nl_ref` (no imatrix,
    ntry = -1)."""
    if reference and imatrix is not None:
        raise ValueError("quantize_row_iq4_nl_ref takes no importance matrix")
    xb, qw, rows, cols = _prepare(x, imatrix, QK4_NL)
    _, L, d, skip = _impl(xb, qw, -1 if reference else 7)
    if reference:
        # quantize_row_iq4_nl_ref reuses one L buffer along the row and a skipped block (max |x| < 1e-15) does
        # not write it: such a block repeats the levels of the row's last block that was not skipped. Before
        # any, C packs uninitialised stack memory; this port packs zeros there.
        nblock = cols // QK4_NL
        skip = skip.reshape(rows, nblock)
        idx = np.where(skip, -1, np.arange(nblock))
        src = np.maximum.accumulate(idx, axis=1)
        rowbase = (np.arange(rows) * nblock)[:, None]
        L = np.where((src >= 0).reshape(-1, 1), L[(np.maximum(src, 0) + rowbase).reshape(-1)], np.uint8(0))
    out = np.concatenate([_fp16_bytes(d), _pack_nibbles(L)], axis=1)
    return out.reshape(rows, (cols // QK4_NL) * IQ4_NL_BYTES)


def quantize_iq4_xs(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """`quantize_iq4_xs(src, dst, rows, cols, imatrix)`: (rows, cols) float32 -> (rows, cols/256 * 136) uint8,
    the block_iq4_xs bytes {fp16 d; uint16 scales_h; uint8 scales_l[4]; uint8 qs[128]} (little-endian)."""
    xb, qw, rows, cols = _prepare(x, imatrix, QK_K)
    _, L, d, ls = _impl(xb, qw, 7)
    n = xb.shape[0]
    # scales_l[ib/2]: low nibble of l+32 for even ib, high nibble for odd; scales_h: bits 2*ib.. hold (l+32) >> 4.
    low = ls & 0xF
    scales_l = (low[:, 0::2] | (low[:, 1::2] << 4)).astype(np.uint8)
    high = (ls >> 4).astype(np.uint16)
    scales_h = np.zeros(n, dtype=np.uint16)
    for ib in range(QK_K // QK4_NL):
        scales_h |= high[:, ib] << np.uint16(2 * ib)
    out = np.concatenate([_fp16_bytes(d), scales_h.astype("<u2").view(np.uint8).reshape(n, 2), scales_l,
                          _pack_nibbles(L)], axis=1)
    return out.reshape(rows, (cols // QK_K) * IQ4_XS_BYTES)
