"""Standard errors that account for correlated neighbouring tokens (batch means), checked against
hand computation, against theory on simulated correlated series, and through the evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from quantlib.uncertainty import block_estimate, ppl_estimate


def test_block_estimate_by_hand_with_a_short_last_block() -> None:
    values = torch.tensor([1.0, 3.0, 2.0, 2.0, 10.0])  # blocks of 2: [1, 3], [2, 2], [10]
    e = block_estimate(values, block=2)
    means, sizes = torch.tensor([2.0, 2.0, 10.0], dtype=torch.float64), torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    mean = 18.0 / 5
    var = float(((sizes / 5) ** 2 * (means - mean) ** 2).sum()) * 3 / 2
    assert (e.mean, e.n_blocks) == (mean, 3)
    assert e.se == pytest.approx(math.sqrt(var), rel=1e-12)
    assert math.isnan(block_estimate(torch.ones(5), block=8).se)  # one block: unknown, not zero
    assert math.isnan(block_estimate(torch.zeros(0)).mean)


def _ar1(n: int, rho: float, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(n, generator=generator, dtype=torch.float64)
    x = torch.empty(n, dtype=torch.float64)
    x[0] = noise[0] / math.sqrt(1 - rho * rho)
    for i in range(1, n):
        x[i] = rho * x[i - 1] + noise[i]
    return x


def test_correlated_series_get_honest_intervals() -> None:
    """AR(1) with rho 0.8: the i.i.d. standard error is 3x too small; batch means is within ~15% of the
    long-run value, and its 95% intervals cover the true mean close to 95% of the time."""
    g = torch.Generator().manual_seed(0)
    n, rho, reps = 4096, 0.8, 200
    true_se = math.sqrt((1 + rho) / (1 - rho)) / math.sqrt(1 - rho * rho) / math.sqrt(n)
    covered, ses, naive = 0, [], []
    for _ in range(reps):
        x = _ar1(n, rho, g)
        e = block_estimate(x)
        lo, hi = e.interval()
        covered += lo <= 0.0 <= hi
        ses.append(e.se)
        naive.append(float(x.std() / math.sqrt(n)))
    assert sum(ses) / reps == pytest.approx(true_se, rel=0.15)
    assert sum(naive) / reps < true_se / 2.5
    assert 0.88 <= covered / reps <= 0.99


def test_perplexity_se_is_the_delta_method() -> None:
    nll = torch.linspace(1.0, 3.0, 640)
    e, p = block_estimate(nll), ppl_estimate(nll)
    assert p.mean == pytest.approx(math.exp(e.mean)) and p.se == pytest.approx(math.exp(e.mean) * e.se)


def test_paired_ranking_separates_real_gaps_and_never_identical_or_noisy_ones() -> None:
    from quantlib.uncertainty import paired_ranking

    g = torch.Generator().manual_seed(1)
    text = torch.rand(4096, generator=g, dtype=torch.float64) * 5  # shared per-token difficulty
    good = text * 0.01
    bad = text * 0.02  # twice the divergence on every token: far apart once paired
    noisy = good + 1e-4 * torch.randn(4096, generator=g, dtype=torch.float64)  # a hair off "good"
    rows, settled = paired_ranking({"bad": bad, "good": good})
    assert settled and rows[0]["better"] == "good" and rows[0]["worse"] == "bad" and rows[0]["z"] > 10
    rows, settled = paired_ranking({"good": good, "same": good.clone()})
    assert not settled and rows[0]["difference"] == 0 and not rows[0]["separated"]
    rows, settled = paired_ranking({"good": good, "noisy": noisy, "bad": bad})
    assert not settled and [r["separated"] for r in rows] == [False, True]
    with pytest.raises(ValueError, match="same tokens"):
        paired_ranking({"a": good, "b": good[:100]})
