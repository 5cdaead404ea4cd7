"""Every figure of a comparison is declared once (`quantlib.statistics`), and the table, CSV, run store, HTML
report, CLI and pages read that declaration.

The two statistics added through it (llama.cpp's correlation of ln PPL, and net top-1 flips against the actual next
token with a paired batch-means test) are checked against plain computations here and, on a real comparison,
against a hand-written evaluation in `tests/test_numbers_tied.py`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from quantlib import statistics as stats
from quantlib.compare import CompareSettings, run_comparison
from quantlib.models import load_model
from quantlib.reports import format_summary, readable_summary, render_html, write_outputs
from quantlib.runs import load_run

RTN = {"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": False}


def _series(n: int = 640, seed: int = 0, flip_blocks: bool = False) -> stats.TokenSeries:
    g = torch.Generator().manual_seed(seed)
    base_nll = torch.rand(n, generator=g, dtype=torch.float64) * 6
    nll = base_nll + torch.rand(n, generator=g, dtype=torch.float64) * 0.4 - 0.1
    base_right = torch.rand(n, generator=g) < 0.35
    right = base_right.clone()
    if flip_blocks:  # flips that come in runs, as neighbouring tokens' do: whole 32-token stretches lost
        for start in range(0, n, 128):
            right[start:start + 32] = False
    else:
        right[torch.randperm(n, generator=g)[: n // 10]] ^= True
    return stats.TokenSeries(kl=torch.rand(n, generator=g) * 0.05, same_top1=torch.rand(n, generator=g) < 0.9,
                             nll=nll, base_nll=base_nll, right=right, base_right=base_right,
                             nll_mean=float(nll.mean()), base_nll_mean=float(base_nll.mean()))


def test_every_column_is_declared_once_with_its_standard_error_partner() -> None:
    keys = [c.key for c in stats.COLUMNS]
    assert len(keys) == len(set(keys))
    columns = stats.table_columns()
    assert len(columns) == len(set(columns))
    computed = stats.compute_statistics(_series())
    for column in stats.statistics():
        assert column.key in computed, column.key
        if column.se_key:
            assert column.se_key in computed and column.se_key in columns
            assert columns.index(column.se_key) == columns.index(column.key) + 1  # beside its figure in the CSV
    assert {"ln_ppl_corr", "top1_flips", "top1_flips_se"} <= set(columns)


def test_the_correlation_is_llama_cpp_s_pearson_correlation_of_ln_p() -> None:
    s = _series()
    expected = np.corrcoef((-s.nll).numpy(), (-s.base_nll).numpy())[0, 1]
    assert stats.compute_statistics(s)["ln_ppl_corr"] == pytest.approx(expected, abs=1e-12)


def test_net_top1_flips_count_lost_minus_gained_with_a_paired_standard_error() -> None:
    s = _series()
    lost = int((s.base_right & ~s.right).sum())
    gained = int((s.right & ~s.base_right).sum())
    assert lost > 0 and gained > 0
    figures = stats.compute_statistics(s)
    assert figures["top1_flips"] == pytest.approx((lost - gained) / s.n_tokens, abs=1e-15)
    assert figures["top1_lost"] == lost / s.n_tokens and figures["top1_gained"] == gained / s.n_tokens
    d = (s.base_right & ~s.right).double() - (s.right & ~s.base_right).double()
    blocks = d.reshape(-1, 64).mean(1)  # 640 tokens: ten full blocks
    assert figures["top1_flips_se"] == pytest.approx(float(blocks.std(unbiased=True) / math.sqrt(len(blocks))),
                                                     rel=1e-12)


def test_flips_that_come_in_runs_get_a_wider_standard_error_than_mcnemar_s() -> None:
    """McNemar's test takes tokens as independent; a model that loses whole stretches of text is less sure than
    that, and the batch-means standard error says so."""
    s = _series(flip_blocks=True)
    figures = stats.compute_statistics(s)
    d = ((s.base_right & ~s.right).double() - (s.right & ~s.base_right).double()).numpy()
    iid_se = d.std(ddof=1) / math.sqrt(len(d))
    assert figures["top1_flips"] > 0
    assert figures["top1_flips_se"] > 1.5 * iid_se


def test_the_baseline_row_is_the_baseline_against_itself() -> None:
    s = _series()
    row = stats.statistic_row(stats.compute_statistics(stats.TokenSeries.of_baseline(s.base_nll, s.base_right,
                                                                                     s.base_nll_mean)))
    assert row["kl"] == 0.0 and row["kl_se"] == 0.0
    assert row["top1_agreement"] == 1.0 and row["top1_flips"] == 0.0 and row["ln_ppl_ratio"] == 0.0
    assert row["ln_ppl_corr"] == 1.0 and row["dp_mean"] == 0.0 and row["dp_rms"] == 0.0
    assert row["perplexity"] == math.exp(s.base_nll_mean) and row["perplexity_se"] > 0


def test_format_puts_the_standard_error_beside_its_value_without_a_forced_sign() -> None:
    table = pd.DataFrame([{**{k: 0.0 for k in stats.table_columns()}, "scheme": "x", "backend": "cpu",
                           "worst_layer": "model.layers.3.mlp.down_proj", "top1_flips": 0.0123,
                           "top1_flips_se": 0.0045, "ln_ppl_corr": 0.99512}])
    shown = format_summary(table)
    assert shown.loc[0, "top1_flips"] == "+1.23% ± 0.45%"
    assert shown.loc[0, "ln_ppl_corr"] == "99.51%"
    assert "top1_flips_se" not in shown
    headers = readable_summary(table).columns
    assert "top-1 flips (net) (% of tokens)" in headers and "KL (nats/token)" in headers


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def test_one_new_declaration_reaches_the_table_csv_run_store_report_and_text(tiny, tiny_llama_dir, tmp_path,
                                                                             monkeypatch) -> None:
    """The proof of "declared once": a statistic added to `COLUMNS` alone, with its computation, shows up in every
    output with no other change."""
    def tail_kl(s: stats.TokenSeries) -> dict[str, float]:
        return {"kl_p_above_0_01": float((s.kl > 0.01).double().mean())}

    extra = stats.Column("kl_p_above_0_01", "share of tokens with KL > 0.01", fmt="{:.1%}", compute=tail_kl)
    monkeypatch.setattr(stats, "COLUMNS", (*stats.COLUMNS, extra))
    settings = CompareSettings(source=str(tiny_llama_dir), max_tokens=256, window=64, device="cpu")
    result = run_comparison([RTN], settings, base=tiny, runs_folder=tmp_path / "runs")
    table = result.table.set_index("scheme")
    assert table["kl_p_above_0_01"].iloc[0] == 0.0  # the baseline against itself
    assert 0 <= table["kl_p_above_0_01"].iloc[1] <= 1
    paths = write_outputs(result.run, tmp_path / "out")
    assert "kl_p_above_0_01" in pd.read_csv(paths["csv"]).columns
    assert "kl_p_above_0_01" in load_run(result.path).tables["summary"].columns
    assert "share of tokens with KL &gt; 0.01" in render_html(result.run)
    detail = json.loads(paths["json"].read_text())["extra"]["details"]
    assert "kl_p_above_0_01" in next(iter(detail.values()))["kl"]["figures"]
    assert any(line.startswith("share of tokens with KL > 0.01: ")
               for line in stats.statistic_lines(result.details[next(iter(detail))]["kl"]["figures"]))


def test_the_layer_error_chart_runs_every_scheme_left_to_right_in_model_order():
    """A GGUF file type also quantizes the embedding, which other schemes leave alone: the axis puts it first, so no
    line doubles back across the chart (it did: the embedding was appended after the last block)."""
    import pandas as pd

    from quantlib.figures import layer_error_figure, merged_layer_order

    blocks = [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    errors = pd.DataFrame({"scheme": ["NF4"] * 3 + ["GGUF Q4_K_M"] * 4,
                           "layer": blocks + ["model.embed_tokens", *blocks],
                           "rel_fro_error": [0.1, 0.1, 0.1, 0.02, 0.05, 0.05, 0.05]})
    order = merged_layer_order([blocks, ["model.embed_tokens", *blocks]])
    assert order == ["model.embed_tokens", *blocks]
    assert merged_layer_order([["a", "c"], ["a", "b", "c"], ["d"]]) == ["d", "a", "b", "c"]
    axis = layer_error_figure(errors).layout.xaxis
    assert list(axis.categoryarray) == order and axis.categoryorder == "array"
