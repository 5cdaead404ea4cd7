"""How sure a per-token average is, when neighbouring tokens are correlated.

Per-token figures of a language model (negative log-likelihood, KL to a baseline, top-1 agreement)
are not independent: tokens in the same passage move together, so the i.i.d. standard error
understates the uncertainty. We use batch means: the scored tokens, in text order, are cut into
contiguous blocks of `BLOCK_TOKENS`; the standard error of the mean is that of the block means
(weighted by block size, the last block may be shorter). Differences between two models are paired:
the per-token difference on the same tokens is averaged and blocked the same way, which removes the
text's own difficulty from the comparison (ln(PPL_q / PPL_base) is such a paired mean).

Perplexity's standard error follows from its log by the delta method (PPL x SE of the mean NLL), as
llama.cpp's perplexity tool reports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Tokens per block of the batch-means estimate. Correlation of per-token NLL and KL in running text
#: decays within tens of tokens; 64-token blocks leave 64 blocks in a 4,096-token evaluation.
BLOCK_TOKENS = 64


@dataclass(frozen=True)
class Estimate:
    """A mean, its standard error (batch means over `block`-token blocks) and how many blocks."""

    mean: float
    se: float
    n_blocks: int
    block: int

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        return self.mean - z * self.se, self.mean + z * self.se


def block_estimate(values: torch.Tensor, block: int = BLOCK_TOKENS) -> Estimate:
    """Mean of per-token `values` (in text order) and its batch-means standard error.

    With fewer than two blocks the standard error is unknown (nan), never a guess.
    """
    v = values.reshape(-1).double()
    n = v.numel()
    if n == 0:
        return Estimate(float("nan"), float("nan"), 0, block)
    mean = float(v.mean())
    sizes = torch.tensor([min(block, n - s) for s in range(0, n, block)], dtype=torch.float64)
    if sizes.numel() < 2:
        return Estimate(mean, float("nan"), int(sizes.numel()), block)
    sums = torch.stack([v[s:s + block].sum() for s in range(0, n, block)])
    means = sums / sizes
    w = sizes / sizes.sum()
    b = sizes.numel()
    var = float((w.square() * (means - mean).square()).sum()) * b / (b - 1)
    return Estimate(mean, math.sqrt(max(var, 0.0)), b, block)


def ppl_estimate(nll: torch.Tensor, block: int = BLOCK_TOKENS) -> Estimate:
    """Perplexity exp(mean NLL) with its delta-method standard error, PPL x SE(mean NLL)."""
    e = block_estimate(nll, block)
    ppl = math.exp(e.mean)
    return Estimate(ppl, ppl * e.se, e.n_blocks, block)



#: Standard errors of the paired difference that separate two schemes in a settled ranking.
SETTLED_Z = 2.0
#: No ranking is called settled on fewer tokens: 16 blocks, so each standard error rests on enough
#: block means to be trusted (below that the estimate of the SE itself is too noisy).
MIN_SETTLE_TOKENS = 16 * BLOCK_TOKENS


def paired_ranking(series: dict[str, torch.Tensor], block: int = BLOCK_TOKENS,
                   z: float = SETTLED_Z) -> tuple[list[dict[str, object]], bool]:
    """Rank schemes by the mean of their per-token values on the same tokens (lower first, e.g. KL)
    and test each adjacent pair on its paired per-token difference.

    Returns one row per adjacent pair (better, worse, mean difference, its standard error, how many
    standard errors apart, separated) and whether the whole ranking is settled: every adjacent pair
    at least `z` standard errors apart. Identical series are never separated; with an unknown
    standard error (fewer than two blocks) nothing is.
    """
    means = {name: float(v.double().mean()) for name, v in series.items()}
    order = sorted(series, key=lambda name: means[name])
    rows: list[dict[str, object]] = []
    for better, worse in zip(order, order[1:]):
        a, b = series[better].reshape(-1).double(), series[worse].reshape(-1).double()
        if a.numel() != b.numel():
            raise ValueError(f"{better} and {worse} were not evaluated on the same tokens "
                             f"({a.numel()} vs {b.numel()})")
        e = block_estimate(b - a, block)
        apart = e.mean / e.se if e.se > 0 and math.isfinite(e.se) else (math.inf if e.mean > 0 and e.se == 0 else 0.0)
        rows.append({"better": better, "worse": worse, "difference": e.mean, "se": e.se, "z": apart,
                     "separated": bool(e.mean > 0 and apart >= z)})
    return rows, all(r["separated"] for r in rows)
