"""Error and code-usage metrics of a quantized tensor.

Why these: MSE and max error are what the rounding does per weight; the relative Frobenius error
and SQNR make layers of different scale comparable; cosine says whether the direction of the
weight vector survived. They run on every layer of a model, so they use a few fused BLAS dot
products over fp32 data (no float64 copies of big tensors); each dot is accumulated in chunks
whose partial sums are added in float64, which keeps the relative error near fp32 epsilon even
for 16M-element tensors.
"""

from __future__ import annotations

import math

import torch

__all__ = ["code_histogram", "error_metrics"]

_CHUNK = 1 << 20


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sum of a*b for flat fp32 tensors: BLAS dot per 1M-element chunk, chunks summed in float64."""
    total = 0.0
    for start in range(0, a.numel(), _CHUNK):
        total += float(torch.dot(a[start : start + _CHUNK], b[start : start + _CHUNK]))
    return total


def _flat32(t: torch.Tensor) -> torch.Tensor:
    """Contiguous flat fp32 (no copy when it already is)."""
    return t.detach().reshape(-1).to(torch.float32).contiguous()


def error_metrics(ref: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Compare a tensor with its quantized approximation.

    Returns ``mse``, ``rel_fro_error`` = ||ref - approx||_F / ||ref||_F, ``sqnr_db`` =
    10 log10(sum ref^2 / sum (ref - approx)^2) (``inf`` when exact), ``max_abs_error`` and
    ``cosine`` of the flattened tensors. Conventions for degenerate inputs: a zero ``ref`` gives
    ``rel_fro_error`` inf (0 if exact) and ``sqnr_db`` -inf (inf if exact); ``cosine`` is 1.0 when
    both are zero and 0.0 when exactly one is.
    """
    if ref.shape != approx.shape:
        raise ValueError(f"shapes differ: ref {tuple(ref.shape)} vs approx {tuple(approx.shape)}")
    r, a = _flat32(ref), _flat32(approx)
    n = r.numel()
    if n == 0:
        raise ValueError("error_metrics needs non-empty tensors")
    diff = torch.sub(a, r)
    noise = _dot(diff, diff)
    lo, hi = torch.aminmax(diff)
    max_abs = max(float(hi), -float(lo))
    del diff
    signal = _dot(r, r)
    approx_power = _dot(a, a)
    return {
        "mse": noise / n,
        "rel_fro_error": _ratio(math.sqrt(noise), math.sqrt(signal)),
        "sqnr_db": _sqnr_db(signal, noise),
        "max_abs_error": max_abs,
        "cosine": _cosine(noise, signal, approx_power),
    }


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _cosine(noise: float, p: float, q: float) -> float:
    """cos = 1 - (||r - a||^2 - (||r|| - ||a||)^2) / (2 ||r|| ||a||).

    Why this form: for a good quantizer cos is 1 - 1e-5 or so; ``r.a / (|r||a|)`` in fp32 dots
    loses those digits to cancellation, while here the small quantity comes from the directly
    summed noise power.
    """
    if p == 0.0 and q == 0.0:
        return 1.0
    if p == 0.0 or q == 0.0:
        return 0.0
    norm_r, norm_a = math.sqrt(p), math.sqrt(q)
    one_minus = (noise - (norm_r - norm_a) ** 2) / (2.0 * norm_r * norm_a)
    return max(-1.0, min(1.0, 1.0 - one_minus))


def code_histogram(codes: torch.Tensor, n_codes: int) -> tuple[torch.Tensor, float]:
    """Counts of each code index ``0..n_codes-1`` and the entropy of their usage in bits.

    Why entropy: it is the number of bits per weight an ideal entropy coder would need for these
    codes, i.e. how many of the nominal bits the format actually uses on this tensor (NF4 on
    Gaussian weights is near 4; int8 on a heavy-tailed layer far below 8).
    """
    if n_codes <= 0:
        raise ValueError(f"n_codes must be positive, got {n_codes}")
    flat = codes.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_codes):
        raise ValueError(
            f"codes must lie in [0, {n_codes}); got range [{int(flat.min())}, {int(flat.max())}]"
        )
    counts = torch.bincount(flat, minlength=n_codes)
    total = int(counts.sum())
    if total == 0:
        return counts, 0.0
    p = counts[counts > 0].double() / total
    entropy = float(-(p * torch.log2(p)).sum())
    return counts, max(entropy, 0.0)
