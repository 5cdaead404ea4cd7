"""llama.cpp's Q2_K, Q4_K and Q5_K block quantizers in vectorised numpy, bit-identical to llama.cpp.

Ports, from `ggml/src/ggml-quants.c` of llama.cpp commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f (the copy
vendored in the llama-cpp-python 0.3.36 sdist):
- `quantize_q2_K`: `quantize_row_q2_K_ref` without an importance matrix, `quantize_row_q2_K_impl` with one;
- `quantize_q4_K`: `quantize_row_q4_K_ref` / `quantize_row_q4_K_impl`;
- `quantize_q5_K`: `quantize_row_q5_K_ref` / `quantize_row_q5_K_impl`;
with their helpers `make_qkx2_quants`, `make_qkx3_quants`, `make_qp_quants` and `get_scale_min_k4`
(`_ggml_qk_search`). The output is the bytes of `block_q2_K` / `block_q4_K` / `block_q5_K`
(`ggml-common.h`), fields in struct order, fp16 little-endian.

Exactness rule: ggml-base is compiled without -march (SSE2 float32, no FMA contraction, no fast-math), so
every C float operation here is one numpy float32 operation in C's order; sums are sequential (`seq_sum`);
rounding is ggml's `nearest_int`; int and uint8_t conversions, clamps and strict comparisons are C's. Every
function works on all blocks of all rows at once (Python loops only over positions inside a block and over
search steps). The tests compare the bytes with llama.cpp's own (tests/data/llamacpp_golden.npz).
"""

from __future__ import annotations

import numpy as np

from quantlib.methods._ggml_common import F32
from quantlib.methods._ggml_common import QK_K
from quantlib.methods._ggml_common import blocks
from quantlib.methods._ggml_common import fp16_to_f32
from quantlib.methods._ggml_common import nearest_int
from quantlib.methods._ggml_common import seq_sum
from quantlib.methods._ggml_common import to_fp16
from quantlib.methods._ggml_qk_search import as_u8
from quantlib.methods._ggml_qk_search import get_scale_min_k4
from quantlib.methods._ggml_qk_search import make_qkx
from quantlib.methods._ggml_qk_search import make_qp_quants
from quantlib.methods._ggml_qk_search import max_so_far
from quantlib.methods._ggml_qk_search import pack_scale_min_k4
from quantlib.methods._ggml_qk_search import requantize

#: Bytes per 256-weight block.
BLOCK_BYTES = {"Q2_K": 84, "Q4_K": 144, "Q5_K": 176}


def _prepare(x: np.ndarray, imatrix) -> tuple[np.ndarray, np.ndarray | None]:
    """x (rows, cols) -> superblocks (rows, nb, 256); imatrix (cols,) -> (1, nb, 256) (one per column block)."""
    xb = blocks(np.asarray(x, dtype=np.float32), QK_K)
    if imatrix is None:
        return xb, None
    qw = np.asarray(imatrix, dtype=np.float32)
    if qw.shape != (xb.shape[1] * QK_K,):
        raise ValueError(f"imatrix has shape {qw.shape}, expected ({xb.shape[1] * QK_K},)")
    return xb, qw.reshape(1, xb.shape[1], QK_K)


def _sub(a: np.ndarray, size: int) -> np.ndarray:
    """(..., 256) -> (size, B * 256 // size): the sub-blocks, elements first (the layout of _ggml_qk_search)."""
    return np.ascontiguousarray(a.reshape(-1, size).T)


def _unsub(a: np.ndarray, nsub: int) -> np.ndarray:
    """Inverse of _sub: (size, B * nsub) -> (B, nsub, size)."""
    return a.T.reshape(-1, nsub, a.shape[0])


def _superblock_sigma2(xb: np.ndarray) -> np.ndarray:
    """`float sum_x2 = 0; for (l < QK_K) sum_x2 += x[l]*x[l];` per superblock: (rows, nb, 256) -> (rows, nb)."""
    return seq_sum(xb * xb, axis=-1)


def _imatrix_weights(xb: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """`weight[l] = qw[l] * sqrtf(sigma2 + x[l]*x[l])` for the whole superblock: (rows, nb, 256)."""
    with np.errstate(all="ignore"):
        return qw * np.sqrt(sigma2[..., None] + xb * xb)


def _fp16_bytes(h: np.ndarray) -> np.ndarray:
    """fp16 values (B,) -> their little-endian bytes (B, 2)."""
    return np.ascontiguousarray(h.astype("<f2")).view(np.uint8).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------------- Q2_K

def _q2_K_ref(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q2_K_ref on all superblocks: (scales (B, 16) uint8, d fp16 (B,), dmin fp16 (B,), L (B, 256))."""
    nsub = QK_K // 16
    xs = _sub(xb, 16)
    scales, mins, L = make_qkx(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
    scales = scales.reshape(-1, nsub)
    mins = mins.reshape(-1, nsub)
    max_scale = max_so_far(scales)
    max_min = max_so_far(mins)
    q4scale = F32(15)
    with np.errstate(all="ignore"):
        has_scale = max_scale > 0
        iscale = q4scale / max_scale
        sc = np.where(has_scale[:, None], nearest_int(iscale[:, None] * scales), 0)
        d = to_fp16(np.where(has_scale, max_scale / q4scale, F32(0)))
        has_min = max_min > 0
        imin = q4scale / max_min
        sc = np.where(has_min[:, None], sc | (nearest_int(imin[:, None] * mins) << 4), sc)
        dmin = to_fp16(np.where(has_min, max_min / q4scale, F32(0)))
    sc = as_u8(sc)
    return sc, d, dmin, _q2_K_requantize(xs, L, sc, d, dmin)


def _q2_K_impl(xb: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q2_K_impl (with quant_weights) on all superblocks; returns as _q2_K_ref."""
    nsub = QK_K // 16
    sigma2 = _superblock_sigma2(xb) / F32(QK_K)
    weights = _sub(_imatrix_weights(xb, qw, sigma2), 16)
    xs = _sub(xb, 16)
    sw = seq_sum(weights, axis=0).reshape(-1, nsub)
    scales, mins, L = make_qkx(xs, weights, 3, -0.9, 0.05, 36, use_mad=False, qkx3=True)
    dm, Ls = make_qp_quants(scales.reshape(-1, nsub).T, sw.T, 15)
    mm, Lm = make_qp_quants(mins.reshape(-1, nsub).T, sw.T, 15)
    d = to_fp16(dm)
    dmin = to_fp16(mm)
    sc = as_u8(Ls.T.astype(np.int64) | (Lm.T.astype(np.int64) << 4))
    return sc, d, dmin, _q2_K_requantize(xs, L, sc, d, dmin)


def _q2_K_requantize(xs, L, sc, d, dmin) -> np.ndarray:
    """The final loop of both Q2_K paths: L (16, B*16) -> (B, 256)."""
    scf = sc.astype(np.int64)
    dsub = (fp16_to_f32(d)[:, None] * (scf & 0xF).astype(np.float32)).reshape(-1)
    msub = (fp16_to_f32(dmin)[:, None] * (scf >> 4).astype(np.float32)).reshape(-1)
    return _unsub(requantize(xs, L, dsub, msub, 3), QK_K // 16).reshape(-1, QK_K)


def quantize_q2_K(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's `quantize_q2_K`: x float32 (rows, cols), cols a multiple of 256; imatrix None or (cols,).
    Returns the block_q2_K bytes (rows, cols // 256 * 84): scales[16], qs[64], d, dmin."""
    xb, qw = _prepare(x, imatrix)
    rows, nb = xb.shape[:2]
    sc, d, dmin, L = _q2_K_ref(xb) if qw is None else _q2_K_impl(xb, qw)
    Li = L.astype(np.uint8).reshape(-1, 2, 4, 32)           # [block, j/128, (0, 32, 64, 96)/32, l]
    qs = Li[:, :, 0] | (Li[:, :, 1] << 2) | (Li[:, :, 2] << 4) | (Li[:, :, 3] << 6)
    out = np.concatenate([sc, qs.reshape(-1, 64), _fp16_bytes(d), _fp16_bytes(dmin)], axis=1)
    return out.reshape(rows, nb * BLOCK_BYTES["Q2_K"])


# ---------------------------------------------------------------------------------------------- Q4_K, Q5_K

def _q45_K_ref(xb: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """quantize_row_q4_K_ref (nmax 15) / quantize_row_q5_K_ref (nmax 31) up to the final L:
    (scale bytes (B, 12), d fp16 (B,), dmin fp16 (B,), L (B, 256))."""
    nsub = QK_K // 32
    xs = _sub(xb, 32)
    with np.errstate(all="ignore"):
        av_x = np.sqrt(seq_sum(xs * xs, axis=0) / F32(32))
        weights = av_x + np.abs(xs)
    scales, mins, L = make_qkx(xs, weights, nmax, rmin, rdelta, nstep, use_mad=False)
    scales = scales.reshape(-1, nsub)
    mins = mins.reshape(-1, nsub)
    max_scale = max_so_far(scales)
    max_min = max_so_far(mins)
    with np.errstate(all="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(63, as_u8(nearest_int(inv_scale[:, None] * scales)))   # uint8_t ls = nearest_int(...)
        lm = np.minimum(63, as_u8(nearest_int(inv_min[:, None] * mins)))
        d = to_fp16(max_scale / F32(63))
        dmin = to_fp16(max_min / F32(63))
    q = pack_scale_min_k4(ls, lm)
    return q, d, dmin, _q45_K_requantize(xs, L, q, d, dmin, nmax)


def _q45_K_impl(xb: np.ndarray, qw: np.ndarray, nmax: int, clamp_ls: bool):
    """quantize_row_q4_K_impl / quantize_row_q5_K_impl with quant_weights; returns as _q45_K_ref. Only the Q5_K
    one clamps Ls, Lm with MIN(63, ...) before packing (clamp_ls)."""
    nsub = QK_K // 32
    sigma2 = F32(2) * _superblock_sigma2(xb) / F32(QK_K)
    weights = _sub(_imatrix_weights(xb, qw, sigma2), 32)
    xs = _sub(xb, 32)
    sw = seq_sum(weights, axis=0).reshape(-1, nsub)
    scales, mins, L = make_qkx(xs, weights, nmax, -0.9, 0.05, 36, use_mad=False, qkx3=True)
    d_block, Ls = make_qp_quants(scales.reshape(-1, nsub).T, sw.T, 63)
    m_block, Lm = make_qp_quants(mins.reshape(-1, nsub).T, sw.T, 63)
    Ls, Lm = Ls.T, Lm.T
    if clamp_ls:
        Ls, Lm = np.minimum(63, Ls), np.minimum(63, Lm)
    q = pack_scale_min_k4(Ls, Lm)
    d = to_fp16(d_block)
    dmin = to_fp16(m_block)
    return q, d, dmin, _q45_K_requantize(xs, L, q, d, dmin, nmax)


def _q45_K_requantize(xs, L, q, d, dmin, nmax: int) -> np.ndarray:
    """The final loop of Q4_K/Q5_K: get_scale_min_k4, then requantize where d != 0. -> L (B, 256)."""
    sc, m = get_scale_min_k4(q)
    dsub = (fp16_to_f32(d)[:, None] * sc.astype(np.float32)).reshape(-1)
    msub = (fp16_to_f32(dmin)[:, None] * m.astype(np.float32)).reshape(-1)
    return _unsub(requantize(xs, L, dsub, msub, nmax), QK_K // 32).reshape(-1, QK_K)


def quantize_q4_K(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's `quantize_q4_K`: x float32 (rows, cols), cols a multiple of 256; imatrix None or (cols,).
    Returns the block_q4_K bytes (rows, cols // 256 * 144): d, dmin, scales[12], qs[128]."""
    xb, qw = _prepare(x, imatrix)
    rows, nb = xb.shape[:2]
    if qw is None:
        q, d, dmin, L = _q45_K_ref(xb, 15, -1.0, 0.1, 20)
    else:
        q, d, dmin, L = _q45_K_impl(xb, qw, 15, clamp_ls=False)
    Li = L.reshape(-1, 4, 2, 32)                              # [block, j/64, low/high half, l]
    qs = (Li[:, :, 0] | (Li[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), q, qs], axis=1)
    return out.reshape(rows, nb * BLOCK_BYTES["Q4_K"])


def quantize_q5_K(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's `quantize_q5_K`: x float32 (rows, cols), cols a multiple of 256; imatrix None or (cols,).
    Returns the block_q5_K bytes (rows, cols // 256 * 176): d, dmin, scales[12], qh[32], qs[128]."""
    xb, qw = _prepare(x, imatrix)
    rows, nb = xb.shape[:2]
    if qw is None:
        q, d, dmin, L = _q45_K_ref(xb, 31, -0.5, 0.1, 15)
    else:
        q, d, dmin, L = _q45_K_impl(xb, qw, 31, clamp_ls=True)
    Li = L.reshape(-1, 4, 2, 32)                              # [block, n/64, (l1, l2), j]
    high = Li > 15
    low = np.where(high, Li - 16, Li).astype(np.uint8)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    qh = np.zeros((Li.shape[0], 32), dtype=np.uint8)
    for n in range(4):
        qh |= (high[:, n, 0].astype(np.uint8) << (2 * n)) | (high[:, n, 1].astype(np.uint8) << (2 * n + 1))
    out = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), q, qh, qs], axis=1)
    return out.reshape(rows, nb * BLOCK_BYTES["Q5_K"])
