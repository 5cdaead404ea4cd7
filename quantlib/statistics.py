"""Every figure of a comparison, declared once: its column, header, unit, format, standard-error partner and how it
is computed from the per-token series.

The summary table, its CSV, the run store, the HTML report, the CLI and the pages all read `COLUMNS`; the
evaluation computes every `Statistic` from one `TokenSeries` per model. Adding a statistic is one entry in
`COLUMNS` plus its computation: nothing else names it.

A model's series are its per-token values against the baseline on the same tokens, in text order. The baseline's
own row is the same computation on the baseline against itself (KL 0, agreement 1, its own perplexity...), so it
needs no figures of its own. Standard errors are batch means over 64-token blocks (`quantlib.uncertainty`):
neighbouring tokens are correlated, so an i.i.d. standard error (or a plain McNemar test) would overstate how
sure a figure is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from quantlib.uncertainty import block_estimate, ppl_estimate


@dataclass(frozen=True)
class TokenSeries:
    """One model against the baseline, per scored token in text order."""

    kl: torch.Tensor  #: KL(baseline || model), nats (float32, clamped at 0)
    same_top1: torch.Tensor  #: both models' most likely next token is the same (bool)
    nll: torch.Tensor  #: the model's negative log-likelihood of the actual next token (float64)
    base_nll: torch.Tensor  #: the baseline's, on the same tokens (float64)
    right: torch.Tensor  #: the model's most likely next token is the actual one (bool)
    base_right: torch.Tensor  #: the baseline's is (bool)
    nll_mean: float  #: mean of `nll`, summed window by window in float64 (perplexity's own mean)
    base_nll_mean: float

    @classmethod
    def of_baseline(cls, base_nll: torch.Tensor, base_right: torch.Tensor, base_nll_mean: float) -> "TokenSeries":
        """The baseline against itself: its row of the table is computed like every other row."""
        n = base_nll.numel()
        return cls(kl=torch.zeros(n), same_top1=torch.ones(n, dtype=torch.bool), nll=base_nll, base_nll=base_nll,
                   right=base_right, base_right=base_right, nll_mean=base_nll_mean, base_nll_mean=base_nll_mean)

    @property
    def n_tokens(self) -> int:
        return int(self.nll.numel())


#: How a statistic is computed: the series -> {column: value, its SE column: SE, and any parts kept in the run's
#: details}.
Compute = Callable[[TokenSeries], dict[str, float]]


@dataclass(frozen=True)
class Column:
    """One column of the comparison's summary table.

    `key` names it in the table, the CSV and the run store; `header` and `unit` make the header the pages, the HTML
    report and the CLI show; `fmt` formats a value for reading (the CSV keeps full precision); `se_key` is the
    column of its standard error, shown as "value ± SE". `compute` is set for the statistics computed from the
    per-token series (the other columns come from the model, its memory and its layers)."""

    key: str
    header: str
    unit: str = ""
    fmt: str = "{}"
    se_key: Optional[str] = None
    compute: Optional[Compute] = None
    help: str = ""

    @property
    def title(self) -> str:
        """The header with its unit, as tables show it."""
        return f"{self.header} ({self.unit})" if self.unit else self.header

    def format(self, value: Any) -> str:
        try:
            return self.fmt.format(value) if value is not None and not _is_nan(value) else ""
        except (TypeError, ValueError):
            return str(value)

    def format_se(self, se: Any) -> str:
        """A standard error in the value's format, without a forced sign."""
        return self.fmt.replace("{:+", "{:").format(se)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


# ------------------------------------------------------------------ computations


def _perplexity(s: TokenSeries) -> dict[str, float]:
    return {"perplexity": math.exp(s.nll_mean), "perplexity_se": ppl_estimate(s.nll).se}


def _kl(s: TokenSeries) -> dict[str, float]:
    e = block_estimate(s.kl)
    return {"kl": float(s.kl.double().mean()), "kl_se": e.se}


def _top1(s: TokenSeries) -> dict[str, float]:
    same = s.same_top1.double()
    return {"top1_agreement": int(s.same_top1.sum()) / max(s.n_tokens, 1), "top1_se": block_estimate(same).se}


def _ln_ppl_ratio(s: TokenSeries) -> dict[str, float]:
    e = block_estimate(s.nll - s.base_nll)
    return {"ln_ppl_ratio": e.mean, "ln_ppl_ratio_se": e.se}


def _dp(s: TokenSeries) -> torch.Tensor:
    """Probability of the actual next token, model minus baseline."""
    return torch.exp(-s.nll) - torch.exp(-s.base_nll)


def _dp_mean(s: TokenSeries) -> dict[str, float]:
    e = block_estimate(_dp(s))
    return {"dp_mean": e.mean, "dp_se": e.se}


def _dp_rms(s: TokenSeries) -> dict[str, float]:
    return {"dp_rms": float(_dp(s).square().mean().sqrt())}


def _ln_ppl_corr(s: TokenSeries) -> dict[str, float]:
    """Pearson correlation of the per-token ln-probabilities of the actual next token, model against baseline:
    llama.cpp's `Cor(ln(PPL(Q)), ln(PPL(base)))`, from the same sums as its `perplexity --kl-divergence`."""
    x, y = s.base_nll, s.nll
    if x.numel() < 2:
        return {"ln_ppl_corr": float("nan")}
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx.square().sum()) * float(dy.square().sum()))
    corr = float((dx * dy).sum()) / denominator if denominator > 0 else float("nan")
    return {"ln_ppl_corr": min(1.0, max(-1.0, corr)) if math.isfinite(corr) else corr}


def _top1_flips(s: TokenSeries) -> dict[str, float]:
    """Net top-1 flips against the actual next token: the share of tokens the baseline predicts right and the model
    wrong, minus the share the model predicts right and the baseline wrong. Paired per token (+1, -1 or 0), so
    the standard error is the batch-means one of that difference, not McNemar's, which would take neighbouring
    tokens as independent."""
    lost = s.base_right & ~s.right
    gained = s.right & ~s.base_right
    e = block_estimate(lost.double() - gained.double())
    n = max(s.n_tokens, 1)
    return {"top1_flips": e.mean, "top1_flips_se": e.se, "top1_lost": int(lost.sum()) / n,
            "top1_gained": int(gained.sum()) / n}


# ------------------------------------------------------------------ the declarations

#: Every column of the summary table, in order. The ones with `compute` are the per-token statistics.
COLUMNS: tuple[Column, ...] = (
    Column("scheme", "scheme"),
    Column("backend", "backend"),
    Column("bits_per_param", "bits/param", fmt="{:.3f}",
           help="bits per parameter of the quantized linear weights (codes and their scales)"),
    Column("memory_mib", "memory", "MiB", "{:.1f}", help="the whole model's weights in memory"),
    Column("n_tokens", "tokens", fmt="{:,.0f}", help="tokens evaluated"),
    Column("perplexity", "perplexity", fmt="{:.3f}", se_key="perplexity_se", compute=_perplexity,
           help="exp(mean negative log-likelihood of the actual next token)"),
    Column("kl", "KL", "nats/token", "{:.5f}", se_key="kl_se", compute=_kl,
           help="KL(baseline ‖ quantized), the mean over tokens"),
    Column("top1_agreement", "top-1 agreement", fmt="{:.4f}", se_key="top1_se", compute=_top1,
           help="share of tokens where both models' most likely next token is the same"),
    Column("top1_flips", "top-1 flips (net)", "% of tokens", "{:+.2%}", se_key="top1_flips_se",
           compute=_top1_flips,
           help="tokens the baseline predicts right and the quantized model wrong, minus the reverse (paired)"),
    Column("ln_ppl_ratio", "ln(PPL/PPL base)", fmt="{:.5f}", se_key="ln_ppl_ratio_se", compute=_ln_ppl_ratio,
           help="mean per-token NLL difference on the same tokens (paired)"),
    Column("ln_ppl_corr", "Cor(ln PPL, base)", fmt="{:.2%}", compute=_ln_ppl_corr,
           help="correlation of per-token ln-probabilities with the baseline's, as llama.cpp prints it"),
    Column("dp_mean", "Δp mean", fmt="{:+.5f}", se_key="dp_se", compute=_dp_mean,
           help="probability of the actual next token, quantized minus baseline"),
    Column("dp_rms", "Δp RMS", fmt="{:.5f}", compute=_dp_rms),
    Column("mean_layer_rel_error", "mean layer rel. error", fmt="{:.4f}"),
    Column("worst_layer_rel_error", "worst layer rel. error", fmt="{:.4f}"),
    Column("worst_layer", "worst layer"),
    Column("seconds", "time", "s", "{:.1f}"),
    Column("calibration_seconds", "calibration", "s", "{:.1f}"),
)


def statistics() -> tuple[Column, ...]:
    """The columns computed from the per-token series (read from `COLUMNS` on every call: it is the one list)."""
    return tuple(c for c in COLUMNS if c.compute is not None)


def table_columns() -> list[str]:
    """The summary table's columns, standard errors after their figures (the CSV's header)."""
    return [k for c in COLUMNS for k in (c.key, c.se_key) if k]


def compute_statistics(series: TokenSeries) -> dict[str, float]:
    """Every declared statistic (and its standard error and parts) of one model's series."""
    out: dict[str, float] = {}
    for column in statistics():
        out.update(column.compute(series))
    return out


def statistic_row(figures: dict[str, float]) -> dict[str, float]:
    """The table's statistic columns (values and standard errors) from `compute_statistics`'s output."""
    return {k: figures.get(k, float("nan")) for c in statistics() for k in (c.key, c.se_key) if k}


def headers() -> dict[str, str]:
    """Column -> the header tables show, unit included."""
    return {c.key: c.title for c in COLUMNS}


def statistic_lines(figures: dict[str, float], leave_out: tuple[str, ...] = ()) -> list[str]:
    """Each declared statistic of one model as "header: value ± SE", for a caption or a line of text."""
    lines = []
    for column in statistics():
        if column.key in leave_out or column.key not in figures:
            continue
        text = column.format(figures[column.key])
        se = figures.get(column.se_key) if column.se_key else None
        if se is not None and se == se and se > 0:
            text += f" ± {column.format_se(se)}"
        lines.append(f"{column.header}: {text}")
    return lines
