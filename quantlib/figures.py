"""Plotly figures, built by pure functions from quantlib results so tests can inspect them.

The app and the HTML report draw the same figures; nothing here imports Streamlit.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from quantlib.distributions import BlockHistogram
from quantlib.footprint import COMPONENT_LABELS, COMPONENTS, MemoryBreakdown

LEVEL_COLORS = {"NF4": "#d62728", "FP4": "#2ca02c"}
COMPONENT_COLORS = {"codes": "#1f77b4", "scales": "#ff7f0e", "dq_constants": "#9467bd",
                    "code_tables": "#8c564b", "unquantized": "#7f7f7f"}


def histogram_figure(hist: BlockHistogram, title: str = "", show_levels: Sequence[str] = ("NF4", "FP4")) -> go.Figure:
    """Density of w/absmax(block) with the 16 NF4 and FP4 levels as rug lines above the axis."""
    fig = go.Figure()
    fig.add_trace(go.Bar(x=hist.centers, y=hist.density, name=f"w / absmax (block {hist.blocksize})",
                         marker_color="#9ecae1", marker_line_width=0, width=hist.edges[1] - hist.edges[0]))
    top = max(hist.density) if hist.density else 1.0
    for i, name in enumerate(show_levels):
        levels = hist.levels[name]
        y0, y1 = top * (1.02 + 0.08 * i), top * (1.08 + 0.08 * i)
        xs, ys = [], []
        for v in levels:
            xs += [v, v, None]
            ys += [y0, y1, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{name} levels ({len(levels)})",
                                 line={"color": LEVEL_COLORS.get(name, "black"), "width": 2}))
    fig.update_layout(title=title or "Block-normalized weights and 4-bit code levels", xaxis_title="w / block absmax",
                      yaxis_title="density", bargap=0, legend={"orientation": "h", "y": -0.2})
    return fig


def code_usage_figure(counts: Sequence[int], levels: Sequence[float], entropy_bits: float, scheme: str) -> go.Figure:
    """How often each of the 16 codes is used; the entropy is the bits the codes really carry."""
    total = sum(counts) or 1
    labels = [f"{i}: {v:+.3f}" for i, v in enumerate(levels)]
    fig = go.Figure(go.Bar(x=labels, y=[c / total for c in counts], marker_color="#1f77b4"))
    fig.update_layout(title=f"{scheme} code usage — entropy {entropy_bits:.3f} of {len(levels).bit_length() - 1} bits",
                      xaxis_title="code (index: level)", yaxis_title="share of weights")
    return fig


#: One colour per scheme, set on every trace: a figure exported to HTML outside Streamlit keeps them (a trace left
#: to the template's colour way was drawn black in the report).
SCHEME_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_BLOCK = re.compile(r"\.(\d+)\.")


def layer_ticks(names: Sequence[str], most: int = 16) -> dict[str, Any]:
    """x-axis ticks for layers in model order: the decoder block's number at its first layer (every k-th block,
    at most `most` ticks), so a spike can be matched to its block; the hover text names the layer in full."""
    firsts: dict[str, str] = {}
    for name in names:
        match = _BLOCK.search(name)
        firsts.setdefault(match.group(1) if match else name.rsplit(".", 1)[-1], name)
    step = max(1, -(-len(firsts) // most))
    shown = list(firsts.items())[::step]
    return {"tickmode": "array", "tickvals": [name for _, name in shown], "ticktext": [block for block, _ in shown],
            "tickangle": 0}


def layer_error_figure(errors: pd.DataFrame, metric: str = "rel_fro_error", scheme_col: str = "scheme") -> go.Figure:
    """One line per scheme over the linear layers in model order; ticks at decoder blocks, full names on hover."""
    fig = go.Figure()
    groups = errors.groupby(scheme_col, sort=False) if scheme_col in errors else [("", errors)]
    for i, (scheme, frame) in enumerate(groups):
        color = SCHEME_COLORS[i % len(SCHEME_COLORS)]
        fig.add_trace(go.Scatter(x=list(frame["layer"]), y=list(frame[metric]), mode="lines+markers",
                                 name=str(scheme), marker={"size": 4, "color": color}, line={"color": color},
                                 hovertemplate="%{x}: %{y:.4g}<extra>" + str(scheme) + "</extra>"))
    order = merged_layer_order([list(frame["layer"]) for _, frame in groups])
    fig.update_layout(title=f"Per-layer weight error ({metric})", xaxis_title="decoder block (hover: the layer)",
                      yaxis_title=metric, xaxis={**layer_ticks(order), "categoryorder": "array",
                                                 "categoryarray": order},
                      hovermode="closest")
    return fig


def merged_layer_order(sequences: Sequence[Sequence[str]]) -> list[str]:
    """One x-axis order for schemes that quantize different layers (a GGUF file type quantizes the embedding, most
    methods do not): each layer right after the one before it in the first scheme that has it, so every line runs
    left to right in its own model order."""
    order: list[str] = []
    for sequence in sequences:
        previous = None
        for name in sequence:
            if name not in order:
                order.insert(order.index(previous) + 1 if previous is not None else 0, name)
            previous = name
    return order


def tradeoff_figure(table: pd.DataFrame, x: str = "memory_mib") -> go.Figure:
    """Memory against the perplexity increase over the baseline, one marker per scheme.

    The y value is the paired quantity, PPL_q / PPL_base - 1 = exp(mean ln ratio) - 1 on the same tokens, with
    bars of +-2 standard errors of that paired mean (asymmetric once exponentiated). Each perplexity's own standard
    error is mostly the text's difficulty, shared by every row: bars drawn from it overlap where the paired
    difference is many standard errors from zero. Absolute perplexities are in the hover text."""
    fig = go.Figure()
    rows = table.reset_index(drop=True)
    ratio = rows["ln_ppl_ratio"].astype(float) if "ln_ppl_ratio" in rows else pd.Series([float("nan")] * len(rows))
    ratio_se = rows["ln_ppl_ratio_se"].astype(float) if "ln_ppl_ratio_se" in rows else pd.Series([0.0] * len(rows))
    pct = 100 * (np.exp(ratio) - 1)
    hi_pct = 100 * (np.exp(ratio + 2 * ratio_se.fillna(0.0)) - 1)
    lo_pct = 100 * (np.exp(ratio - 2 * ratio_se.fillna(0.0)) - 1)
    # Labels above and below in turn, by memory, so neighbours' names do not sit on each other.
    order = {i: k for k, i in enumerate(rows.sort_values(x).index)}
    for i, row in rows.iterrows():
        has_bar = pd.notna(ratio_se[i]) and ratio_se[i] > 0
        bars = {"type": "data", "symmetric": False, "array": [hi_pct[i] - pct[i]],
                "arrayminus": [pct[i] - lo_pct[i]], "visible": True} if has_bar else None
        ppl = row.get("perplexity", float("nan"))
        ppl_se = row.get("perplexity_se", float("nan"))
        hover = (f"{row['scheme']}<br>{row[x]:,.1f} MiB<br>perplexity {ppl:.4g} ± {ppl_se:.2g} (its own SE, mostly "
                 f"the text's)<br>vs baseline: {pct[i]:+.2f}% (paired ±2 SE: {lo_pct[i]:+.2f}% to {hi_pct[i]:+.2f}%)")
        color = SCHEME_COLORS[i % len(SCHEME_COLORS)]
        if bars is not None:
            bars["color"] = color
        fig.add_trace(go.Scatter(x=[row[x]], y=[pct[i]], mode="markers+text", text=[row["scheme"]],
                                 textposition="top center" if order[i] % 2 == 0 else "bottom center",
                                 name=str(row["scheme"]), marker={"size": 12, "color": color}, error_y=bars,
                                 hovertext=[hover], hoverinfo="text"))
    fig.update_layout(title="Memory vs perplexity increase (lower-left is better)",
                      xaxis_title="memory (MiB)",
                      yaxis_title="perplexity vs baseline, % (paired on the same tokens, ±2 SE)", showlegend=False)
    if len(rows):
        # Pad the axes so the labels of the outermost markers are not clipped.
        lo, hi = float(rows[x].min()), float(rows[x].max())
        pad = max((hi - lo) * 0.15, abs(hi) * 0.05, 1e-9)
        fig.update_xaxes(range=[lo - pad, hi + pad])
        finite = [v for v in (*lo_pct, *hi_pct, *pct) if np.isfinite(v)]
        if finite:
            ylo, yhi = min(finite), max(finite)
            ypad = max((yhi - ylo) * 0.15, abs(yhi) * 0.02, 1e-9)
            fig.update_yaxes(range=[ylo - 2 * ypad, yhi + 2 * ypad])
    return fig


#: Colours of the memory beside the weights (KV cache, activations of one forward).
RUNTIME_COLORS = ("#2ca02c", "#bcbd22")


def unquantized_label(breakdowns: dict[str, MemoryBreakdown], most: int = 3) -> str:
    """The legend name of the unquantized part: what it holds in these plans, largest first (fused MoE experts
    named where a method leaves them), or the generic label for breakdowns without a plan's detail."""
    from quantlib.memory import UNQUANTIZED_MODEL, short_reason

    totals: dict[str, float] = {}
    for plan in breakdowns.values():
        for part in getattr(plan, "unquantized_detail", None) or []:
            if part["why"] != UNQUANTIZED_MODEL:
                key = short_reason(part["why"])
                totals[key] = totals.get(key, 0.0) + part["bytes"]
    if not totals:
        return COMPONENT_LABELS["unquantized"]
    top = sorted(totals, key=lambda k: -totals[k])
    return "unquantized: " + ", ".join(top[:most]) + (", …" if len(top) > most else "")


def memory_unit(largest_bytes: float) -> tuple[str, float]:
    """("MiB", 2**20) for footprints up to 4 GiB, ("GiB", 2**30) past them: a 150,000 MiB axis is unreadable."""
    return ("GiB", 2.0 ** 30) if largest_bytes > 4 * 2**30 else ("MiB", 2.0 ** 20)


def memory_figure(breakdowns: dict[str, MemoryBreakdown], runtime: dict[str, float] | None = None) -> go.Figure:
    """Stacked bars of bytes by component, one bar per scheme; `runtime` (label -> bytes, the
    same for every scheme: KV cache, activations) stacks on top of the weights. In MiB, or in GiB past 4 GiB
    (`fig.layout.meta["unit_bytes"]` says which, for lines drawn on it)."""
    names = list(breakdowns)
    largest = max((b.total_bytes for b in breakdowns.values()), default=0.0) + sum((runtime or {}).values())
    unit, scale = memory_unit(largest)
    fig = go.Figure()
    for comp in COMPONENTS:
        label = unquantized_label(breakdowns) if comp == "unquantized" else COMPONENT_LABELS[comp]
        fig.add_trace(go.Bar(x=names, y=[breakdowns[n].bytes_by_component.get(comp, 0) / scale for n in names],
                             name=label, marker_color=COMPONENT_COLORS[comp]))
    for (label, nbytes), color in zip((runtime or {}).items(), RUNTIME_COLORS):
        fig.add_trace(go.Bar(x=names, y=[nbytes / scale] * len(names), name=label, marker_color=color))
    # the legend beside the bars, in stacking order: below them it covered the schemes' names, which tilt when the
    # chart is narrow
    fig.update_layout(barmode="stack", title="Memory by component", yaxis_title=unit, meta={"unit_bytes": scale},
                      legend={"orientation": "v", "x": 1.02, "y": 1, "font": {"size": 10}},
                      xaxis={"automargin": True})
    return fig


def add_available_line(fig: go.Figure, available_bytes: float, text: str) -> None:
    """A dashed line at the memory available, labelled above the plot area's right end on a white ground, so no
    bar hides the label."""
    fig.add_hline(y=available_bytes / fig.layout.meta["unit_bytes"], line_dash="dash", line_color="#d62728",
                  annotation_text=text, annotation_position="top right",
                  annotation={"bgcolor": "rgba(255,255,255,0.85)", "font": {"color": "#d62728"}})


def kl_figure(table: pd.DataFrame) -> go.Figure:
    """KL divergence to the baseline per scheme (nats per token)."""
    bars = None
    if "kl_se" in table and table["kl_se"].notna().any():
        bars = {"type": "data", "array": [2 * v if pd.notna(v) else 0.0 for v in table["kl_se"]], "visible": True}
    fig = go.Figure(go.Bar(x=list(table["scheme"]), y=list(table["kl"]), marker_color="#d62728", error_y=bars))
    fig.update_layout(title="KL(baseline ‖ quantized), nats/token (bars ±2 SE)", yaxis_title="KL")
    return fig


def outlier_figure(table: pd.DataFrame, threshold: float) -> go.Figure:
    """Per layer, the share of input dimensions LLM.int8() would run in 16 bits at `threshold`."""
    fig = go.Figure(go.Bar(x=list(table["layer"]), y=list(table["fp16_fraction"]), marker_color="#ff7f0e",
                           hovertemplate="%{x}: %{y:.2%}<extra></extra>"))
    fig.update_layout(title=f"Outlier dimensions at threshold {threshold:g} (share run in fp16)",
                      xaxis=layer_ticks(list(table["layer"])), yaxis_title="share of input dims",
                      xaxis_title="decoder block (hover: the layer)")
    return fig


def mix_frontier_figure(table: pd.DataFrame, mix_label: str, verdict: dict | None = None) -> go.Figure:
    """Memory against mean KL: the uniform settings joined in memory order, the recommended mix as a star
    (bars ±2 SE), so it shows whether the mix lies on a better frontier."""
    fig = go.Figure()
    uniform = table[table["scheme"] != mix_label].sort_values("memory_mib")
    mix = table[table["scheme"] == mix_label]

    def bars(rows: pd.DataFrame) -> dict | None:
        if "kl_se" not in rows or not rows["kl_se"].notna().any():
            return None
        return {"type": "data", "array": [2 * v if pd.notna(v) else 0.0 for v in rows["kl_se"]], "visible": True}

    fig.add_trace(go.Scatter(x=list(uniform["memory_mib"]), y=list(uniform["kl"]), mode="markers+text",
                             text=list(uniform["scheme"]), textposition="top right", name="uniform settings",
                             marker={"size": 10, "color": "#1f77b4"}, error_y=bars(uniform)))
    # the uniform frontier: each point with less KL than every uniform setting of its size or smaller
    best, frontier = float("inf"), []
    for _, row in uniform.sort_values(["memory_mib", "kl"]).iterrows():
        if row["kl"] < best:
            best = row["kl"]
            frontier.append(row)
    if len(frontier) > 1:
        fig.add_trace(go.Scatter(x=[r["memory_mib"] for r in frontier], y=[r["kl"] for r in frontier], mode="lines",
                                 name="uniform frontier", line={"dash": "dot", "color": "#1f77b4"}))
    fig.add_trace(go.Scatter(x=list(mix["memory_mib"]), y=list(mix["kl"]), mode="markers+text",
                             text=list(mix["scheme"]), textposition="bottom left", name="recommended mix",
                             marker={"size": 16, "symbol": "star", "color": "#d62728"}, error_y=bars(mix)))
    if verdict and verdict.get("line_kl") is not None:
        fig.add_trace(go.Scatter(x=[verdict["mix_mib"]], y=[verdict["line_kl"]], mode="markers",
                                 name="line between the uniform neighbours",
                                 marker={"size": 9, "symbol": "x", "color": "#7f7f7f"}))
    fig.update_layout(title="Memory vs mean KL: recommended mix against uniform settings (bars ±2 SE)",
                      xaxis_title="memory (MiB)", yaxis_title="mean KL (nats/token, log scale)",
                      legend={"orientation": "h", "y": -0.2})
    fig.update_yaxes(type="log")
    # Room for the labels: they sit beside the points (right of the uniform ones, left of the mix), so the axes
    # reach a fifth of the span past the outermost points instead of ending on them.
    xs = [float(v) for v in table["memory_mib"] if pd.notna(v)]
    if xs:
        lo, hi = min(xs), max(xs)
        pad = 0.2 * (hi - lo) if hi > lo else max(abs(hi) * 0.1, 1.0)
        fig.update_xaxes(range=[lo - pad, hi + pad])
    ys = [math.log10(float(v)) for v in table["kl"] if pd.notna(v) and float(v) > 0]
    if ys:
        lo, hi = min(ys), max(ys)
        pad = 0.2 * (hi - lo) if hi > lo else 0.5
        fig.update_yaxes(range=[lo - pad, hi + pad])  # log axis: the range is in decades
    return fig


def mix_depth_figure(layers: pd.DataFrame) -> go.Figure:
    """The chosen setting of every layer by depth (block) and role: one colour per setting (a choice among a few,
    not a scale: a layer kept unquantized is not "16 bits"), named in the legend bar and the cell's hover."""
    roles = list(dict.fromkeys(layers["layer"].str.split(".").str[-1]))
    blocks = sorted(layers["block"].unique())
    settings = list(dict.fromkeys(layers.sort_values(["bits", "setting"])["setting"]))
    index = {name: i for i, name in enumerate(settings)}
    z = [[None] * len(blocks) for _ in roles]
    text = [[""] * len(blocks) for _ in roles]
    col = {b: i for i, b in enumerate(blocks)}
    for row in layers.itertuples(index=False):
        r = roles.index(row.layer.split(".")[-1])
        z[r][col[row.block]] = index[row.setting]
        text[r][col[row.block]] = row.setting
    n = max(1, len(settings))
    scale = []
    for i in range(n):
        color = SCHEME_COLORS[i % len(SCHEME_COLORS)]
        scale += [[i / n, color], [(i + 1) / n, color]]
    fig = go.Figure(go.Heatmap(z=z, x=[str(b) for b in blocks], y=roles, text=text, zmin=-0.5, zmax=n - 0.5,
                               hovertemplate="block %{x} %{y}: %{text}<extra></extra>", colorscale=scale,
                               colorbar={"title": "setting", "tickvals": list(range(n)), "ticktext": settings}))
    fig.update_layout(title="Chosen setting per layer (by block and projection)", xaxis_title="block",
                      yaxis_title="projection")
    return fig
