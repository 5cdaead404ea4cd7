"""Shareable results: CSV, JSON and a self-contained HTML report of a comparison run.

The HTML report embeds plotly.js once and the same figures the app draws, so it opens offline in
any browser and can be mailed as one file. Every file is written atomically.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from quantlib import figures
from quantlib.footprint import MemoryBreakdown
from quantlib.runs import Run, atomic_write_text
from quantlib.statistics import COLUMNS, headers

_BLOCK_NUMBER = re.compile(r"\.(\d+)\.")


def run_figures(run: Run) -> dict[str, go.Figure]:
    """The comparison figures of a run, from its stored tables alone (no recomputation)."""
    summary = run.tables.get("summary", pd.DataFrame())
    out: dict[str, go.Figure] = {}
    if not summary.empty:
        out["Memory vs perplexity"] = figures.tradeoff_figure(summary)
        quantized = summary.iloc[1:] if len(summary) > 1 else summary
        out["KL divergence to the baseline"] = figures.kl_figure(quantized)
    layers = run.tables.get("layers", pd.DataFrame())
    if not layers.empty:
        out["Per-layer weight error"] = figures.layer_error_figure(layers)
    memory = run.extra.get("memory", {})
    if memory:
        out["Memory by component"] = figures.memory_figure({k: _breakdown(v) for k, v in memory.items()})
    return out


def _breakdown(data: dict) -> MemoryBreakdown:
    return MemoryBreakdown(dict(data["bytes_by_component"]), int(data["quantized_params"]),
                           int(data["total_params"]), str(data.get("source", "")))


def ranking_text(run: Run) -> str | None:
    """Whether the run's ranking by mean KL is settled, in one sentence (None for runs saved before it
    was computed, or with a single scheme)."""
    ranking = run.tables.get("ranking")
    if ranking is None or ranking.empty:
        return None
    z = run.extra.get("settled_z", 2.0)
    order = " < ".join([str(ranking["better"].iloc[0]), *map(str, ranking["worse"])])
    if bool(run.extra.get("ranking_settled")):
        return (f"Ranking by mean KL is settled: {order}; every adjacent pair is at least {z:g} standard errors "
                "apart on its paired per-token difference.")
    close = ranking[~ranking["separated"].astype(bool)]
    if close.empty:
        need = run.extra.get("min_settle_tokens", 0)
        return (f"Ranking by mean KL is not settled ({order}): every adjacent pair is at least {z:g} standard "
                f"errors apart, but on only {run.settings.get('n_tokens', 0):,} tokens; a settled ranking needs at "
                f"least {need:,} tokens, so that its standard errors can be trusted.")
    pairs = "; ".join(f"{r.better} vs {r.worse}: {r.z:.1f} SE" for r in close.itertuples())
    return (f"Ranking by mean KL is not settled ({order}): {pairs} apart, under {z:g}. Evaluate more tokens "
            "to separate them.")


def running_text(run: Run) -> str:
    """One line of a comparison's running figures (tokens so far, KL and perplexity ± SE per scheme,
    whether the ranking is settled): what the CLI prints to stderr after every window."""
    summary = run.tables.get("summary", pd.DataFrame())
    settings = run.settings
    parts = [f"{settings.get('n_tokens', 0):,}/{settings.get('tokens_planned', 0):,} tokens"]
    for row in summary.iloc[1:].itertuples():
        parts.append(f"{row.scheme}: KL {row.kl:.5f} ± {row.kl_se:.5f}, ppl {row.perplexity:.3f} ± "
                     f"{row.perplexity_se:.3f}")
    ranking = run.tables.get("ranking")
    if ranking is not None and not ranking.empty:
        parts.append("ranking settled" if run.extra.get("ranking_settled") else
                     "not settled (closest pair " + "{:.1f} SE)".format(float(ranking["z"].min())))
    return " | ".join(parts)


def partial_text(run: Run) -> str | None:
    """Why a run stopped before the end of its text, with its token count (None for a complete run)."""
    extra, settings = run.extra, run.settings
    if not extra.get("partial"):
        return None
    n, planned = settings.get("n_tokens", 0), settings.get("tokens_planned", 0)
    why = {"settled": "stopped when the ranking settled", "cancelled": "stopped by the user"}.get(
        extra.get("stop_reason", ""), "stopped early")
    missing = extra.get("schemes_missing") or []
    return (f"Partial run: {n:,} of {planned:,} tokens evaluated ({why}); every figure and standard error is "
            "from these tokens." + (f" Not evaluated: {', '.join(missing)}." if missing else ""))


def crosscheck_text(run: Run) -> list[str]:
    """One sentence per scheme evaluated through an exact simulation of its library's kernels."""
    out = []
    for label, detail in run.extra.get("details", {}).items():
        check = detail.get("crosscheck")
        if not check:
            continue
        verdict = "identical log-probs" if check.get("identical") else (
            f"largest log-prob difference {check['max_abs_logprob_diff']:.2e}, top-1 agreement "
            f"{check['top1_agreement']:.2%}, KL {check['kl_mean']:.2e}")
        speed = ""
        if check.get("kernel_seconds", 0) > 0 and "simulation_seconds" in check:
            speed = (f" The simulation took {check['simulation_seconds'] / check['kernel_seconds']:.1f}x the kernels' "
                     "time there.")
        out.append(f"{label}: exact simulation of the library's kernels, cross-checked against them on the first "
                   f"{check['tokens']} tokens: {verdict}.{speed}")
    return out


def output_head_text(run: Run) -> list[str]:
    """One sentence per model (baseline included) whose log-probs came from its full logits, not from its output
    head run slice by slice on its final hidden states (see `quantlib.evaluation`), with the reason."""
    return [f"{label}: log-probs read from its full logits, window by window ({info.get('note', '')})."
            for label, info in (run.extra.get("output_head") or {}).items() if info.get("path") == "full"]


def kernel_path_text(run: Run) -> list[str]:
    """The CPU the run ran on (its kernel-picking features) and, per scheme, which kernels computed its layers."""
    from quantlib.runtime import cpu_features_text

    lines = [cpu_features_text(run.environment["cpu_features"])] if "cpu_features" in run.environment else []
    for label, detail in run.extra.get("details", {}).items():
        if detail.get("kernel_path"):
            lines.append(f"{label}: computed by {'; '.join(detail['kernel_path'])}.")
    return lines


def phase_text(run: Run) -> str:
    """Where the run's time went ("load 2.08 s, quantize 5.59 s, ..."), phases under 5 ms left out; "" for a run
    saved before phases were recorded."""
    phases = run.extra.get("phase_seconds") or {}
    names = {"load": "load", "quantize": "quantize", "crosscheck": "cross-check", "errors": "layer errors",
             "forwards": "forward passes", "output_head": "output head and KL", "bookkeeping": "the rest"}
    return ", ".join(f"{label} {phases[key]:.2f} s" for key, label in names.items() if phases.get(key, 0) >= 0.005)


def check_lines(run: Run) -> list[str]:
    """What a reader should know about how the run's numbers were made: the CPU and each scheme's kernels,
    cross-checks of exact simulations, models read from full logits, and the run's notes (shown by the CLI, the
    HTML report and the Compare page)."""
    from quantlib.tool_checks import tool_check_text

    return (kernel_path_text(run) + crosscheck_text(run) + output_head_text(run) + tool_check_text(run)
            + [str(n) for n in run.extra.get("notes", [])])


def short_layer_name(name: object) -> object:
    """A layer's name as a table shows it: its decoder block and what follows ("model.layers.3.mlp.down_proj" ->
    "3: mlp.down_proj"); names without a block number, and non-strings, as they are."""
    if not isinstance(name, str):
        return name
    match = _BLOCK_NUMBER.search(name)
    return f"{match.group(1)}: {name[match.end():]}" if match else name


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary table with numbers rounded for reading, each as its declaration in `quantlib.statistics` says,
    a standard error beside its value as "value ± SE" (the CSV keeps full precision and both columns). Columns
    keep their keys: `headers` names them for reading."""
    shown = summary.copy()
    if "worst_layer" in shown:  # the block and the layer's own name: the full path is in layers.csv
        shown["worst_layer"] = shown["worst_layer"].map(short_layer_name)
    for column in COLUMNS:
        if column.key not in shown or column.fmt == "{}":
            continue
        shown[column.key] = [column.format(v) if pd.notna(v) else "" for v in summary[column.key]]
        if column.se_key and column.se_key in summary:
            shown[column.key] = [text if not (pd.notna(s) and s > 0) else f"{text} ± {column.format_se(s)}"
                                 for text, s in zip(shown[column.key], summary[column.se_key])]
            shown = shown.drop(columns=[column.se_key])
    return shown


def readable_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """`format_summary` with the declared headers (units included): what the pages and the HTML report show."""
    return format_summary(summary).rename(columns=headers())


def render_html(run: Run) -> str:
    """A self-contained HTML page: settings, summary table, and interactive figures."""
    parts = []
    for i, (title, fig) in enumerate(run_figures(run).items()):
        body = fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%", default_height="460px")
        parts.append(f"<h2>{html.escape(title)}</h2>\n{body}")
    summary = run.tables.get("summary", pd.DataFrame())
    shown = readable_summary(summary)
    table = (f'<div class="wide">{shown.to_html(index=False, border=0, classes="summary")}</div>'
             if not summary.empty else "")
    model = run.model
    settings = run.settings
    env = run.environment
    meta = {
        "Run": run.run_id, "Created": run.created, "Model": model.get("source", ""),
        "Architecture": model.get("architecture", ""), "Parameters": f"{model.get('n_params', 0):,}",
        "Backend": settings.get("backend", ""), "Tokens evaluated": settings.get("n_tokens", ""),
        "Window / stride": f"{settings.get('window')} / {settings.get('stride') or settings.get('window')}",
        "Time by phase": phase_text(run) or "not recorded",
        "Versions": ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
    }
    notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in model.get("notes", []))
    meta_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items())
    ranking = ranking_text(run)
    ranking_html = f"<p><strong>{html.escape(ranking)}</strong></p>" if ranking else ""
    partial = partial_text(run)
    if partial:
        ranking_html = f"<p><strong>{html.escape(partial)}</strong></p>" + ranking_html
    checks = check_lines(run)
    if checks:
        ranking_html += "<ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in checks) + "</ul>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Quantization comparison {html.escape(run.run_id)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }} th, td {{ padding: .3rem .7rem; text-align: left; }}
table.summary tr:nth-child(even) {{ background: #f4f6f8; }} table.summary th {{ background: #e3e8ee; }}
table.summary {{ font-size: .85rem; }} table.summary td, table.summary th {{ padding: .25rem .4rem; }}
.wide {{ max-width: 100%; overflow-x: auto; }}
.meta th {{ color: #555; font-weight: 600; }}
</style></head><body>
<h1>Quantization comparison</h1>
<table class="meta">{meta_rows}</table>
<ul>{notes}</ul>
<h2>Summary</h2>
{table}
{ranking_html}
<p>Perplexity and KL are measured on the same tokens; KL is KL(baseline ‖ quantized) in nats per token.
± is one standard error (batch means over 64-token blocks). Rows marked "(simulated)" replaced weights by their
quantize→dequantize result; memory for those is the packed size.</p>
{''.join(parts)}
</body></html>
"""


def write_outputs(run: Run, out_dir: str | Path) -> dict[str, Path]:
    """Write run.json, summary.csv, layers.csv and report.html into `out_dir`, each atomically."""
    out = Path(out_dir)
    paths = {"json": out / "run.json", "csv": out / "summary.csv", "layers": out / "layers.csv",
             "html": out / "report.html"}
    atomic_write_text(paths["json"], json.dumps(run.to_dict(), indent=1, default=str))
    atomic_write_text(paths["csv"], run.tables.get("summary", pd.DataFrame()).to_csv(index=False))
    atomic_write_text(paths["layers"], run.tables.get("layers", pd.DataFrame()).to_csv(index=False))
    atomic_write_text(paths["html"], render_html(run))
    return paths
