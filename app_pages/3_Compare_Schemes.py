"""Compare Schemes: 2-6 configs against one unquantized baseline, on the same tokens, in one table.

`quantlib.compare.run_comparison` does the work and saves the run (under `quantlib.runs.runs_dir()`);
this page picks its inputs, shows the estimated time, a progress bar and a cancel button, then the
summary table and the figures of `quantlib.reports.run_figures` — the same ones an earlier run is
reopened with, and the same ones the HTML report embeds.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import streamlit as st

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from app_support.errors import guard, run_page, show_exception  # noqa: E402
from app_support.models_ui import (ModelChoice, backend_label, config_json, config_options, estimate_note,  # noqa: E402
                                   format_seconds, load_base, model_picker, n_params, preflight_problems, resolve)
from app_support.presets import option_text  # noqa: E402
from app_support.runner import Progress, run_buttons, was_cancelled  # noqa: E402
from app_support.state import BUILDER_LABEL, Namespace, builder_config  # noqa: E402

st.set_page_config(layout="wide")  # title and icon: app_support/home.py PAGES, read by the navigation

NS = Namespace("compare")
MIN_CONFIGS, MAX_CONFIGS = 2, 6
DEFAULT_SELECTION = ["NF4", "FP4"]
TEXT_BUILTIN = "Built-in evaluation text (Lee corpus)"
TEXT_UPLOAD = "Upload a text file"
TEXT_PASTE = "Paste text"

# ------------------------------------------------------------------------------------ inputs

def choose_configs() -> tuple[list[dict], list[str]]:
    """The selected configs (validated dicts) and the problems that keep the run button disabled."""
    from quantlib.registry import parse_config

    options = config_options(builder_config(), st.session_state.get(BUILDER_LABEL))
    NS.setdefault([n for n in DEFAULT_SELECTION if n in options], "configs")
    st.session_state[NS.key("configs")] = [n for n in st.session_state[NS.key("configs")] if n in options]
    selected = st.multiselect(f"Configs to compare ({MIN_CONFIGS}–{MAX_CONFIGS})", list(options),
                              key=NS.key("configs"), format_func=option_text,
                              help="Presets, plus the Config Builder's current config when you have built one.")
    if not builder_config():
        st.caption("Your own config from the Config Builder page appears here once you have built one.")
    twins = st.checkbox("Also each config's weights-only share", key=NS.key("weights_only_too"),
                        help="For configs that quantize the activations too (GGUF as llama.cpp computes, FP8, NVFP4, "
                             "MXFP4, W8A8): the same config with the activations left alone, evaluated beside it, so "
                             "the table shows what the weights lose and what the activations add.")
    problems: list[str] = []
    if len(selected) < MIN_CONFIGS:
        problems.append(f"Pick at least {MIN_CONFIGS} configs to compare (you have {len(selected)}).")
    elif len(selected) > MAX_CONFIGS:
        problems.append(f"Pick at most {MAX_CONFIGS} configs (you have {len(selected)}): each one adds a "
                        "quantization and a full evaluation pass.")
    configs = []
    for name in selected:
        try:
            configs.append(parse_config(options[name]).to_dict())
        except Exception as exc:  # noqa: BLE001
            show_exception(exc, f"use the config {name!r}")
            problems.append(f"{name} is not a valid config.")
    if twins and not problems:
        from quantlib.compare import with_weights_only

        configs = [c.to_dict() for c in with_weights_only(configs)]
        if len(configs) > MAX_CONFIGS:
            problems.append(f"With their weights-only twins these are {len(configs)} configs; at most {MAX_CONFIGS} "
                            "run at once: pick fewer.")
    labels = [parse_config(c).label for c in configs]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        problems.append(f"Two selected configs are the same scheme ({', '.join(dupes)}): drop one.")
    return configs, problems


def choose_text() -> tuple[str | None, str | None]:
    """(path of the text to evaluate on or None for the built-in one, its description); errors shown."""
    from quantlib.corpus import load_text

    kind = st.radio("Evaluation text", [TEXT_BUILTIN, TEXT_UPLOAD, TEXT_PASTE], key=NS.key("text_kind"),
                    horizontal=True)
    if kind == TEXT_BUILTIN:
        st.caption("Held-out half of the Lee corpus shipped with quantlib (news articles, English).")
        return None, "built-in"
    if kind == TEXT_UPLOAD:
        upload = st.file_uploader("UTF-8 text file", type=["txt", "md", "text"], key=NS.key("upload"))
        if upload is None:
            st.info("Upload a UTF-8 text file (a few thousand words is plenty).")
            return None, None
        data, name = upload.getvalue(), upload.name
    else:
        text = st.text_area("Text", key=NS.key("paste"), height=150, placeholder="Paste a few paragraphs…")
        if not text.strip():
            st.info("Paste some text to evaluate on (a few thousand words is plenty).")
            return None, None
        data, name = text.encode("utf-8"), "pasted text"
    # The engine reads a file: write this session's text to a file named by its content hash.
    folder = Path(tempfile.gettempdir()) / "quantexplorer-texts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.txt"
    if not path.exists():
        path.write_bytes(data)
    try:
        text = load_text(path)
    except Exception as exc:  # noqa: BLE001 - binary, not UTF-8, empty...
        st.error(f"Could not use {name} as evaluation text: " + str(exc).replace(str(path), name),
                 icon=":material/error:")
        st.caption("What to do: save the text as UTF-8 plain text (not .docx/.pdf), or use the built-in text.")
        return None, None
    st.caption(f"{name}: {len(text):,} characters.")
    return str(path), name


# ------------------------------------------------------------------------------------ results

def _num(value) -> str:
    return f"{value:,}" if isinstance(value, (int, float)) else "?"


def show_run(run, where: str) -> None:
    """The summary table, figures and downloads of a run (fresh or reopened)."""
    import pandas as pd

    from quantlib.reports import (check_lines, partial_text, phase_text, ranking_text, readable_summary, render_html,
                                  run_figures)

    summary = run.tables.get("summary", pd.DataFrame())
    settings, model = run.settings, run.model
    st.caption(f"Run `{run.run_id}` · {run.created} · model **{model.get('architecture', '')}** "
               f"({'default model' if model.get('source') == 'default' else model.get('source', '')}, "
               f"{model.get('n_params', 0) / 1e6:,.1f} M params) · {_num(settings.get('n_tokens'))} tokens, window "
               f"{settings.get('window')} · backend **{settings.get('backend', '?')}** · "
               f"{settings.get('seconds', 0):.0f} s in all" + (f" ({phases})" if (phases := phase_text(run)) else ""))
    for note in model.get("notes", []):
        if "Loaded from the converted cache" not in note:
            st.caption(f":material/info: {note}")
    partial = partial_text(run)
    if partial:
        st.info(partial, icon=":material/timelapse:")
    st.table(readable_summary(summary), hide_index=True)
    ranking = ranking_text(run)
    if ranking:
        (st.success if run.extra.get("ranking_settled") else st.warning)(ranking)
    for line in check_lines(run):
        st.caption(f":material/verified: {line}")
    tool_checks(run, where)
    if run.extra.get("baseline_source") in ("cache", "cache+forward"):
        st.caption(":material/cached: The baseline's log-probs came from its cached final hidden states "
                   f"({run.extra.get('baseline_cache_note', '')}): one output-head matmul, the same numbers.")
    st.caption("Same tokens for every row; lower perplexity and KL are better. KL is KL(baseline ‖ quantized) in "
               "nats per token; top-1 agreement is the share of positions where both models predict the same next "
               "token; layer error is ‖W − Ŵ‖_F / ‖W‖_F of the linear weights; bits/param counts codes and scales "
               "of the quantized layers. Rows marked “(simulated)” replaced weights by their quantize→dequantize "
               "result; their memory is the packed size. Rows marked “(exact simulation)” computed what the "
               "library's kernels compute, bit for bit (4-bit: the weights dequantized once, or the fused bf16 "
               "kernel mirrored on CPUs with AVX512-BF16; LLM.int8() from its int8 codes), cross-checked against the kernels in every run, as noted above; their memory is the "
               "library's packed size. ± is one standard error from batch means over 64-token "
               "blocks (neighbouring tokens are correlated); ln(PPL/PPL base) and Δp (the quantized model's "
               "probability of the actual next token minus the baseline's) are paired on the same tokens. The CSV "
               "download keeps full precision.")
    figs = run_figures(run)
    if "Memory vs perplexity" in figs and not summary.empty:  # keep the end markers' labels inside the plot
        lo, hi = float(summary["memory_mib"].min()), float(summary["memory_mib"].max())
        pad = max(0.12 * (hi - lo), 0.05 * hi, 1.0)
        figs["Memory vs perplexity"].update_xaxes(range=[max(0.0, lo - pad), hi + pad])
    if "Memory by component" in figs:
        figs["Memory by component"].update_layout(legend={"orientation": "h", "y": -0.2, "x": 0})
    order = ["Memory vs perplexity", "KL divergence to the baseline", "Per-layer weight error", "Memory by component"]
    names = [n for n in order if n in figs] + [n for n in figs if n not in order]
    for i in range(0, len(names), 2):
        cols = st.columns(2)
        for col, name in zip(cols, names[i:i + 2]):
            with col:
                st.plotly_chart(figs[name], width="stretch", key=NS.key(where, "fig", name))
    d1, d2, d3, _ = st.columns([1, 1, 1, 3])
    d1.download_button("Table (CSV)", summary.to_csv(index=False), file_name=f"{run.run_id}-summary.csv",
                       mime="text/csv", key=NS.key(where, "csv"), icon=":material/download:")
    d2.download_button("Run (JSON)", json.dumps(run.to_dict(), indent=1, default=str),
                       file_name=f"{run.run_id}.run.json", mime="application/json", key=NS.key(where, "json"),
                       icon=":material/download:")
    d3.download_button("Report (HTML)", render_html(run), file_name=f"{run.run_id}-report.html", mime="text/html",
                       key=NS.key(where, "html"), icon=":material/download:")


def tool_checks(run, where: str) -> None:
    """A method's own tools on this run's config (GGUF: llama-quantize and llama-perplexity), where they are installed:
    their figures join the check lines above, the saved run and its report. The button only marks the check; it runs
    below the expander, so its progress bar stays in view."""
    from quantlib.tool_checks import available_checks, run_tool_check

    checks = [(label, check, why) for label, check, why in available_checks(run)
              if label not in run.extra.get("tool_checks", {})]
    if not checks:
        return
    pending = NS.pop(where, "tool_pending")
    with st.expander("Check with the method's own tools", icon=":material/fact_check:"):
        for label, check, why in checks:
            if why:
                st.caption(f"{label}: {check.check_title} cannot run here: {why}")
                continue
            st.caption(f"{label}: runs {check.check_title} on the run's model and the built-in text, then quantlib "
                       "on the same file and tokens (a few minutes on a CPU).")
            st.button(f"Check {label} with {check.check_title.split(' (')[0]}", key=NS.key(where, "tool", label),
                      icon=":material/fact_check:", on_click=NS.set, args=(label, where, "tool_pending"))
    chosen = next((c for c in checks if c[0] == pending and not c[2]), None)  # by the scheme's label, not position
    if chosen is None:
        return
    label, check, _ = chosen
    progress = Progress(NS, f"Checking {label} with {check.check_title}…")
    with guard(f"check {label}"):
        run_tool_check(run, label, check, progress)
        st.rerun()  # the check lines above now hold its figures


def earlier_runs() -> None:
    from quantlib.runs import list_runs, load_run, runs_dir

    st.header("Earlier runs")
    folder = runs_dir()
    runs = list_runs()
    st.caption(f"Saved under `{folder}` (set QUANTLIB_RUNS_DIR to change). Shared with the `quantlib` command line.")
    if runs.empty:
        st.info("No saved runs yet: a finished comparison is saved automatically.")
        return
    st.dataframe(runs.drop(columns=["path"]), width="stretch", hide_index=True)
    labels = {row.path: f"{row.run_id} · {row.schemes} · {row.model}" for row in runs.itertuples()}
    path = st.selectbox("Run to reopen", list(labels), format_func=labels.get, key=NS.key("earlier", "choice"))
    if st.button("Open this run", key=NS.key("earlier", "open"), icon=":material/folder_open:"):
        try:
            NS.set(load_run(path), "earlier", "run")
        except Exception as exc:  # noqa: BLE001 - a broken file is a message, not a traceback
            NS.pop("earlier", "run")
            show_exception(exc, "open this run")
    opened = NS.get("earlier", "run")
    if opened is not None:
        st.subheader(f"Run {opened.run_id}")
        with guard("show this run"):
            show_run(opened, "earlier")


# ------------------------------------------------------------------------------------ page

def main() -> None:
    st.title("Compare Schemes")
    st.caption("Several configs against one unquantized baseline, on the same tokens: memory, perplexity, "
               f"KL divergence, top-1 agreement and per-layer weight error. Backend: **{backend_label()}**.")

    st.subheader("1 · Model")
    choice = model_picker(NS)

    st.subheader("2 · Configs")
    configs, problems = choose_configs()
    if choice is not None:
        for cfg in configs:
            try:
                bad = preflight_problems(config_json(cfg), choice.source)
            except Exception as exc:  # noqa: BLE001
                show_exception(exc, "check the configs against the model")
                bad = ["preflight failed"]
            if bad:
                from quantlib.registry import parse_config

                label = parse_config(cfg).label
                problems.append(f"{label} does not fit this model: " + "; ".join(bad[:4])
                                + (f"; … {len(bad) - 4} more" if len(bad) > 4 else "")
                                + ". Pick a group/block size that divides these widths.")

    st.subheader("3 · Text and length")
    text_path, text_name = choose_text()
    c1, c2, _ = st.columns([1, 1, 2])
    tokens = c1.number_input("Tokens", min_value=16, max_value=65536, value=1024, step=256, key=NS.key("tokens"),
                             help="How many tokens of the text to evaluate on (the same for every config).")
    window = c2.number_input("Window", min_value=16, max_value=8192, value=512, step=128, key=NS.key("window"),
                             help="Tokens per forward pass (context length of each window).")
    if text_name is None:
        problems.append("Provide the evaluation text (or choose the built-in one).")

    for p in problems:
        st.warning(p, icon=":material/warning:")
    from quantlib.compare import estimate_seconds

    if choice is not None and configs:
        estimate = estimate_seconds(n_params(choice), int(tokens), configs, resolve(choice.device))
        last = NS.get("timing")
        st.caption(f"Estimated run time: about **{format_seconds(estimate)}** for {len(configs)} config(s) on "
                   f"{backend_label()}." + estimate_note(configs, resolve(choice.device))
                   + (f" Your last run here took {format_seconds(last[1])} (estimated {format_seconds(last[0])})."
                      if last else ""))
    until_settled = st.checkbox(
        "Stop when the ranking is settled", key=NS.key("until_settled"),
        help="Ends the run once every adjacent pair of schemes, ranked by mean KL, is at least 2 standard errors "
             "apart on its paired per-token difference (after at least 1,024 tokens). The run is saved as a "
             "partial run with its token count.")
    baseline_cache_caption()
    offload = offload_controls(choice, configs, text_path) if choice is not None else None
    clicked = run_buttons(NS, disabled=bool(problems) or choice is None, label="Run comparison",
                          keep=None if offload else keep_partial_run)
    if clicked and choice is not None:
        try:
            if offload is not None:
                run_offloaded_now(choice, configs, int(tokens), int(window), offload)
            else:
                estimate = estimate_seconds(n_params(choice), int(tokens), configs, resolve(choice.device))
                run_comparison_now(choice, configs, text_path, int(tokens), int(window), estimate, until_settled)
        finally:
            clicked.finish()
    elif NS.get("kept") is not None:
        st.success(f"Stopped: the partial run was saved as {NS.get('kept')}.", icon=":material/save:")
    elif was_cancelled(NS):
        st.warning("Comparison cancelled; nothing was saved. Earlier results are kept.", icon=":material/stop:")

    offloaded = NS.get("offloaded")
    if offloaded is not None:
        st.divider()
        st.header("Results (offloaded)")
        st.caption(" · ".join(offloaded.notes) + f" · ran in {format_seconds(offloaded.seconds)} (estimated "
                   f"{format_seconds(offloaded.estimate_seconds)}, {offloaded.estimate_basis})")
        st.table(offloaded.table)
    result = NS.get("result")
    if result is not None:
        st.divider()
        st.header("Results")
        with guard("show the results"):
            show_run(result, "latest")
    st.divider()
    earlier_runs()


def baseline_cache_caption() -> None:
    """What the baseline cache holds, and a button to empty it."""
    from quantlib import baseline_cache

    rows = baseline_cache.entries()
    c1, c2 = st.columns([3, 1], vertical_alignment="center")
    c1.caption(f"Baseline cache: {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}, "
               f"{sum(r['bytes'] for r in rows) / 2**20:,.1f} of {baseline_cache.max_bytes() / 2**20:,.0f} MiB "
               f"(`{baseline_cache.cache_folder()}`). A comparison on the same model, text, tokens and window reuses "
               "the baseline's final hidden states instead of running it again; the numbers are identical.")
    if c2.button("Clear cache", key=NS.key("clear_cache"), disabled=not rows, icon=":material/delete:"):
        st.toast(f"Removed {baseline_cache.clear()} cached baseline(s).")
        st.rerun()


def keep_partial_run(ns) -> None:
    """'Stop and keep results': save the latest partial result the running comparison streamed."""
    from quantlib.runs import save_run

    partial = ns.get("partial")
    if partial is None:
        ns.pop("kept")
        return
    partial.extra["stop_reason"] = "cancelled"
    path = save_run(partial)
    ns.set(partial, "result")
    ns.set(str(path), "kept")
    ns.pop("partial")


def show_live(placeholder, result, count: int) -> None:
    """The partial table, ranking verdict and KL chart of a running comparison, replaced window by window."""
    from quantlib import figures
    from quantlib.reports import ranking_text, readable_summary, running_text

    NS.set(result.run, "partial")
    with placeholder.container():
        st.caption(f":material/hourglass_top: Running: {running_text(result.run).split(' | ')[0]} so far; "
                   "figures update as windows finish, and ± narrows.")
        st.table(readable_summary(result.table), hide_index=True)
        verdict = ranking_text(result.run)
        if verdict:
            (st.success if result.run.extra.get("ranking_settled") else st.info)(verdict)
        if len(result.table) > 1:
            st.plotly_chart(figures.kl_figure(result.table.iloc[1:]), width="stretch", key=NS.key("live", count))


def offload_controls(choice: ModelChoice, configs: list[dict], text_path: str | None):
    """When the model does not fit in memory (or on request): accelerate offload settings, else None."""
    import psutil

    from quantlib.registry import parse_config
    from quantlib.models import estimate_load_bytes, read_model_config
    from quantlib.offload import OffloadSettings, offload_problems

    try:
        needed = estimate_load_bytes(read_model_config(choice.source), getattr(__import__("torch"), choice.dtype))
    except Exception:  # noqa: BLE001 - the model picker already reported an unreadable config
        return None
    available = psutil.virtual_memory().available
    fits = needed <= available
    if not fits:
        st.warning(f"This model needs about {needed / 2**30:.1f} GiB in {choice.dtype}, but only "
                   f"{available / 2**30:.1f} GiB is available: it cannot be loaded whole. Evaluate it offloaded "
                   "below (slow, but real).", icon=":material/memory:")
    on = st.checkbox("Evaluate offloaded (accelerate: device_map='auto', the rest on disk)", value=not fits,
                     key=NS.key("offload", "on"),
                     help="Every model is loaded within the memory limit below and the rest stays on disk; each "
                          "scheme is evaluated from a checkpoint of its dequantized weights written beside it. "
                          "Slow: every window reads the offloaded weights again.")
    if not on:
        return None
    limit = st.number_input("Memory per model (GiB)", min_value=0.01, max_value=4096.0,
                            value=float(min(max(available / 2**30 / 4, 0.5), 64.0)), step=0.5,
                            key=NS.key("offload", "gib"))
    bad = offload_problems([parse_config(c) for c in configs], choice.dtype)
    for p in bad:
        st.error(f"Cannot run offloaded: {p}", icon=":material/block:")
    if text_path:
        st.error("Offloaded evaluation uses the built-in text; choose it above.", icon=":material/block:")
    if bad or text_path:
        return None
    return OffloadSettings(max_memory_gib=float(limit))


def run_offloaded_now(choice: ModelChoice, configs: list[dict], tokens: int, window: int, settings) -> None:
    from quantlib.errors import Cancelled
    from quantlib.offload import compare_offloaded

    progress = Progress(NS, "Loading the model offloaded…")
    note = st.empty()
    try:
        result = compare_offloaded(configs, source=choice.source, settings=settings, dtype=choice.dtype,
                                   max_tokens=tokens, window=window, progress=progress, cancel=progress.cancel,
                                   on_estimate=lambda s, basis: note.info(
                                       f"Estimated evaluation time: about {format_seconds(s)} ({basis}).",
                                       icon=":material/schedule:"))
    except Cancelled:
        st.warning("Offloaded comparison cancelled.", icon=":material/stop:")
        return
    except Exception as exc:  # noqa: BLE001
        show_exception(exc, "run the offloaded comparison")
        return
    progress.done("Done (offloaded).")
    NS.set(result, "offloaded")


def run_comparison_now(choice: ModelChoice, configs: list[dict], text_path: str | None, tokens: int,
                       window: int, estimate: float, until_settled: bool = False) -> None:
    from quantlib.compare import CompareSettings, run_comparison
    from quantlib.errors import Cancelled

    progress = Progress(NS, "Loading the model…")
    live = st.empty()
    updates = [0]
    NS.pop("partial")
    NS.pop("kept")

    def on_update(partial) -> None:
        updates[0] += 1
        show_live(live, partial, updates[0])

    try:
        device = resolve(choice.device)
        base = load_base(choice)
        settings = CompareSettings(source=choice.source, text_path=text_path, max_tokens=tokens, window=window,
                                   device=device, dtype=choice.dtype, trust_remote_code=choice.trust_remote_code,
                                   allow_pickle=choice.allow_pickle, until_settled=until_settled)
        result = run_comparison(configs, settings, progress=progress, cancel=progress.cancel, base=base,
                                on_update=on_update)
    except Cancelled:
        st.warning("Comparison cancelled; nothing was saved.", icon=":material/stop:")
        return
    except Exception as exc:  # noqa: BLE001
        show_exception(exc, "run the comparison")
        st.caption("What to do: check the model source, the text and the configs; a model too large for this "
                   "machine needs a smaller model or dtype, or fewer tokens.")
        return
    live.empty()
    NS.pop("partial")
    progress.done(f"Done: saved as {result.path}")
    NS.set(result.run, "result")
    NS.set((estimate, float(result.run.settings.get("seconds", 0.0))), "timing")
    NS.pop("earlier", "run")


run_page(main)
