"""Quantize and Inspect: quantize one model with one config and look at where the error goes.

Per-layer weight error, one layer's block-normalized histogram against the NF4/FP4 levels and its
code usage, memory by component, perplexity / KL / top-1 agreement against the unquantized
baseline, and activation outliers (what LLM.int8() would run in 16 bits). Results live in this
session's `inspect.*` state, so changing a widget redraws without recomputing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import streamlit as st

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from app_support.errors import guard, run_page, show_exception  # noqa: E402
from app_support.models_ui import (ModelChoice, backend_label, config_json, config_options, estimate_note,  # noqa: E402
                                   format_seconds, get_reference, load_base, model_picker, n_params, preflight_problems,
                                   put_reference, resolve)
from app_support.presets import option_text  # noqa: E402
from app_support.runner import Progress, run_buttons, was_cancelled  # noqa: E402
from app_support.state import BUILDER_LABEL, Namespace, builder_config  # noqa: E402
from quantlib.statistics import statistic_lines  # noqa: E402

st.set_page_config(layout="wide")  # title and icon: app_support/home.py PAGES, read by the navigation

NS = Namespace("inspect")
OUTLIER_TOKENS = 2048  # activation-outlier scan: at most 4 batches of 512 calibration tokens

LAYER_COLUMNS = {
    "layer": st.column_config.TextColumn("layer", width="large"),
    "rel_fro_error": st.column_config.NumberColumn("rel. error", format="%.4f",
                                                   help="‖W − Ŵ‖_F / ‖W‖_F (relative Frobenius error)"),
    "bits_per_param": st.column_config.NumberColumn("bits/param", format="%.3f",
                                                    help="Stored bits per weight, scales included"),
    "code_entropy_bits": st.column_config.NumberColumn("code entropy (bits)", format="%.3f",
                                                       help="Shannon entropy of the code usage: the bits the "
                                                            "codes really carry"),
}


# ------------------------------------------------------------------------------------ caches

@st.cache_data(show_spinner="Quantizing this layer…", max_entries=128)
def cached_layer_detail(_base, model_key: str, cfg_json: str, layer: str, device: str) -> dict:
    """`layer_detail` for one layer; keyed by the model, the config's JSON and the layer name."""
    from quantlib.layers import layer_detail
    from quantlib.registry import get_quantizer

    return layer_detail(_base.model, get_quantizer(json.loads(cfg_json), device=device), layer)


def code_levels(detail: dict) -> tuple[list[float], str]:
    """The value each code stands for where the method has a fixed code table, else the code index."""
    if detail.get("code_levels") is not None and len(detail["code_levels"]) == detail["n_codes"]:
        return detail["code_levels"], "code index: level (× block scale)"
    return [float(i) for i in range(detail["n_codes"])], "code index (integer codes; the value is set by scale/zero)"


# ------------------------------------------------------------------------------------ run

def run_inspection(choice: ModelChoice, cfg: dict, tokens: int, window: int, run_key: str) -> None:
    """Run `quantlib.inspection.inspect_scheme` once; store the result under inspect.result."""
    from quantlib.inspection import inspect_scheme

    started = time.perf_counter()
    progress = Progress(NS, "Loading the model…")
    device = resolve(choice.device)
    base = load_base(choice)
    ref_key = json.dumps([choice.key(), device, tokens, window])
    result, reference = inspect_scheme(
        base, cfg, source=choice.source, device=device, dtype=choice.torch_dtype, tokens=tokens, window=window,
        outlier_tokens=OUTLIER_TOKENS, reference=get_reference(ref_key), trust_remote_code=choice.trust_remote_code,
        allow_pickle=choice.allow_pickle, progress=progress, cancel=progress.cancel)
    put_reference(ref_key, reference)
    progress.done(f"Done in {time.perf_counter() - started:.1f} s.")
    NS.set({"key": run_key, "source": choice.source, "label": result.label, "config": cfg,
            "config_json": config_json(cfg), "model_key": choice.key(), "device": device, "backend": result.backend,
            "backend_name": backend_label(), "layers": result.layers, "memory": result.memory,
            "comparison": result.comparison.to_dict(), "baseline": result.baseline.to_dict(),
            "outliers": result.outliers, "seconds": time.perf_counter() - started, "model": result.model}, "result")


# ------------------------------------------------------------------------------------ views

def show_layers(result: dict) -> None:
    from quantlib.figures import layer_error_figure

    layers = result["layers"]
    backend = result["backend_name"]
    st.subheader("Per-layer weight error")
    st.caption(f"{len(layers)} quantized linear layers, in model order · computed by "
               f"{result['backend']['library']} on {backend}")
    worst = layers.loc[layers["rel_fro_error"].idxmax()]
    c1, c2, c3 = st.columns(3)
    c1.metric("Mean relative error", f"{layers['rel_fro_error'].mean():.4f}", help=f"Backend: {backend}")
    c2.metric("Worst layer", f"{worst['rel_fro_error']:.4f}", help=str(worst["layer"]))
    c3.metric("Bits per weight", f"{layers['bits_per_param'].mean():.3f}", help="Codes plus scales, mean over layers")
    st.caption(f"Worst layer: `{worst['layer']}`")
    fig = layer_error_figure(layers.assign(scheme=result["label"]))
    st.plotly_chart(fig, width="stretch", key=NS.key("fig", "layers"))
    with st.expander("Layer table (all metrics)", expanded=False):
        st.dataframe(layers, width="stretch", hide_index=True, column_config=LAYER_COLUMNS)


def show_layer_detail(result: dict, choice: ModelChoice | None) -> None:
    from quantlib.figures import code_usage_figure, histogram_figure

    st.subheader("Inside one layer")
    layers = list(result["layers"]["layer"])
    worst = result["layers"].loc[result["layers"]["rel_fro_error"].idxmax(), "layer"]
    if NS.get("layer") not in layers:
        NS.set(worst, "layer")
    layer = st.selectbox("Layer", layers, key=NS.key("layer"), help="Defaults to the layer with the largest error.")
    if choice is None or choice.key() != result["model_key"]:
        st.info("Choose the model these results were computed on to look inside a layer.")
        return
    with guard(f"inspect layer {layer}"):
        base = load_base(choice)
        detail = cached_layer_detail(base, result["model_key"], result["config_json"], layer, result["device"])
        m = detail["metrics"]
        st.caption(f"`{layer}` · shape {detail['shape'][0]}×{detail['shape'][1]} · relative error "
                   f"{m['rel_fro_error']:.4f} · {detail['bits_per_param']:.3f} bits/param · kurtosis "
                   f"{detail['weight_stats']['kurtosis']:.2f} · max|w|/σ {detail['weight_stats']['max_over_sigma']:.1f}"
                   f" · backend {result['backend_name']}")
        left, right = st.columns(2)
        with left:
            hist = histogram_figure(detail["histogram"], title="Weights / block absmax vs NF4 & FP4 levels")
            st.plotly_chart(hist, width="stretch", key=NS.key("fig", "hist"))
        with right:
            levels, axis = code_levels(detail)
            usage = code_usage_figure(detail["code_counts"], levels, detail["code_entropy_bits"], result["label"])
            usage.update_layout(xaxis_title=axis)
            st.plotly_chart(usage, width="stretch", key=NS.key("fig", "codes"))
        with st.expander("All metrics of this layer"):
            st.json({"metrics": m, "weight_stats": detail["weight_stats"]})


def show_memory(result: dict) -> None:
    import pandas as pd

    from quantlib.figures import memory_figure
    from quantlib.footprint import COMPONENT_LABELS, COMPONENTS

    st.subheader("Memory (weights)")
    memory = result["memory"]
    names = list(memory)
    rows = {COMPONENT_LABELS[c]: [f"{memory[n].bytes_by_component.get(c, 0.0) / 2**20:,.2f}" for n in names]
            for c in COMPONENTS}
    rows["total"] = [f"{memory[n].total_bytes / 2**20:,.2f}" for n in names]
    rows["bits/param, quantized layers"] = ["—"] + [f"{memory[n].quantized_bits_per_param:.3f}" for n in names[1:]]
    rows["bits/param, whole model"] = [f"{memory[n].model_bits_per_param:.3f}" for n in names]
    rows["how it was counted"] = [memory[n].source for n in names]
    table = pd.DataFrame(rows, index=names).T
    table.index.name = "MiB"
    left, right = st.columns([2, 3])
    with left:
        fig = memory_figure(memory)
        fig.update_layout(legend={"orientation": "h", "y": -0.25, "x": 0}, height=520, xaxis={"tickangle": 0})
        st.plotly_chart(fig, width="stretch", key=NS.key("fig", "memory"))
    with right:
        st.table(table)
        st.caption("Sizes in MiB. “measured”: every tensor the loaded model holds was counted (bitsandbytes quant "
                   "state included). “packed (simulated)”: the weights were replaced by their quantize→dequantize "
                   "result, and the size is what the packed format would store. Activations and the KV cache "
                   f"come on top. Backend: {result['backend_name']}.")
        for note in memory[names[-1]].notes:
            st.caption(note)


def show_quality(result: dict) -> None:
    comp = result["comparison"]
    base = result["baseline"]
    st.subheader("Perplexity and divergence from the baseline")
    st.caption(f"{comp['n_tokens']:,} tokens of the built-in evaluation text, window {comp['window']}, "
               f"stride {comp['stride']} · backend: {comp['backend']}"
               + (" (baseline recomputed per window)" if comp.get("baseline_recomputed") else ""))
    fig = comp["figures"]  # every statistic declared in quantlib.statistics, keyed by its column
    c1, c2, c3, c4 = st.columns(4)
    delta = fig["perplexity"] - comp["base_ppl"]
    def pm(value: float, se: float | None, fmt: str) -> str:
        """The value and its standard error to two significant digits (short enough for a metric at 1000 px)."""
        return fmt.format(value) + (f" ± {se:.2g}" if se is not None and se == se and se > 0 else "")

    se_note = (f"± one standard error, batch means over {comp.get('se_block', 64)}-token blocks (neighbouring "
               "tokens are correlated).")
    c1.metric("Perplexity (baseline)", pm(comp["base_ppl"], comp.get("base_ppl_se"), "{:.3f}"),
              help=f"{base['backend']}; {se_note}")
    c2.metric(f"Perplexity ({result['label']})", pm(fig["perplexity"], fig.get("perplexity_se"), "{:.3f}"),
              f"{delta:+.3f}", delta_color="inverse",
              help=f"Backend: {comp['backend']}; {se_note} ln(PPL/PPL base) on the same tokens: "
                   f"{pm(fig.get('ln_ppl_ratio', float('nan')), fig.get('ln_ppl_ratio_se'), '{:.5f}')}.")
    c3.metric("KL (nats/token)", pm(fig["kl"], fig.get("kl_se"), "{:.4f}"),
              help="KL(baseline ‖ quantized), the mean over tokens. Per-token percentiles: " + ", ".join(f"{k} {v:.4f}" for k, v in comp["kl_percentiles"].items())
                   + f". {se_note}")
    c4.metric("Top-1 agreement", pm(100 * fig["top1_agreement"], 100 * fig.get("top1_se", float("nan")), "{:.2f}")
              + " %", help="Share of positions where both models' most likely next token is the same. " + se_note)
    st.caption(" · ".join(statistic_lines(fig, ("perplexity", "kl", "top1_agreement"))))


def show_outliers(result: dict) -> None:
    from quantlib.figures import outlier_figure

    outliers = result["outliers"]
    st.subheader("Activation outliers (baseline)")
    st.caption(f"Largest |activation| per input dimension of every linear layer over {outliers.n_tokens:,} "
               f"calibration tokens, recorded once on {outliers.backend.upper()}. LLM.int8() runs the input "
               "dimensions that reach the threshold in 16 bits; moving the slider recomputes the share without "
               "another forward pass.")
    threshold = st.slider("LLM.int8() outlier threshold", min_value=0.5, max_value=20.0, value=6.0, step=0.5,
                          key=NS.key("threshold"))
    table = outliers.table(threshold)
    summary = outliers.summary(threshold)
    c1, c2 = st.columns(2)
    c1.metric("Layers with outlier dims", f"{summary['layers_with_outliers']} of {summary['layers']}")
    c2.metric("Share of matmul in 16-bit", f"{summary['fp16_fraction']:.2%}",
              help="Outlier input dimensions over all input dimensions, weighted by layer width.")
    st.plotly_chart(outlier_figure(table, threshold), width="stretch", key=NS.key("fig", "outliers"))
    with st.expander("Outlier table"):
        st.dataframe(table, width="stretch", hide_index=True, column_config={
            "fp16_fraction": st.column_config.NumberColumn("fp16 share", format="%.4f"),
            "max_abs_activation": st.column_config.NumberColumn("max |activation|", format="%.2f")})


# ------------------------------------------------------------------------------------ page

def main() -> None:
    st.title("Quantize and Inspect")
    st.caption("Quantize one model with one config and look inside: per-layer error, the weights of one layer "
               "against the code levels, memory, perplexity / KL against the unquantized model, activation "
               f"outliers. Backend: **{backend_label()}**.")

    st.subheader("1 · Model")
    choice = model_picker(NS)

    st.subheader("2 · Config")
    options = config_options(builder_config(), st.session_state.get(BUILDER_LABEL))
    left, right = st.columns([2, 1])
    with left:
        name = st.selectbox("Config", list(options), key=NS.key("config_name"), format_func=option_text,
                            help="A preset, or the config you built on the Config Builder page (listed first).")
        if not builder_config():
            st.caption("Build your own on the Config Builder page: it then appears first in this list.")
    with right:
        tokens = st.number_input("Evaluation tokens", min_value=16, max_value=65536, value=1024, step=256,
                                 key=NS.key("tokens"), help="Tokens of the built-in evaluation text for "
                                 "perplexity and KL.")
        window = st.number_input("Window", min_value=16, max_value=8192, value=512, step=128, key=NS.key("window"),
                                 help="Tokens per forward pass (context length of each window).")
    cfg = None
    with guard("read this config"):
        from quantlib.registry import parse_config

        cfg = parse_config(options[name]).to_dict()
        with st.expander("Config JSON"):
            st.code(json.dumps(cfg, indent=2), language="json")
    if choice is None or cfg is None:
        show_results(choice)
        return

    problems: list[str] = []
    try:
        problems = preflight_problems(config_json(cfg), choice.source)
    except Exception as exc:  # noqa: BLE001
        show_exception(exc, "check this config against the model")
        problems = ["preflight failed"]
    if problems and problems != ["preflight failed"]:
        st.error("**This config does not fit the model** — "
                 f"{len(problems)} layer(s) cannot be quantized with it:\n\n"
                 + "\n".join(f"- {p}" for p in problems[:12])
                 + (f"\n- … and {len(problems) - 12} more" if len(problems) > 12 else "")
                 + "\n\nWhat to do: pick a group/block size that divides these widths (the messages list "
                   "sizes that fit), in the Config Builder, or another preset.", icon=":material/error:")
    elif not problems:
        st.success("Preflight: every quantizable layer's shape fits this config (checked from config.json).",
                   icon=":material/check_circle:")

    from quantlib.compare import estimate_seconds

    device = resolve(choice.device)
    estimate = estimate_seconds(n_params(choice), int(tokens) + OUTLIER_TOKENS // 2, [cfg], device)
    last = NS.get("timing")
    st.caption(f"Estimated run time: about **{format_seconds(estimate)}** on {backend_label()} "
               "(load, quantize, baseline + quantized forward passes, outlier scan)."
               + estimate_note([cfg], device)
               + (f" Your last run here took {format_seconds(last[1])} (estimated {format_seconds(last[0])})."
                  if last else ""))
    run_key = json.dumps([choice.key(), config_json(cfg), int(tokens), int(window)])
    clicked = run_buttons(NS, disabled=bool(problems), label="Quantize and inspect")
    if clicked:
        try:
            run_inspection(choice, cfg, int(tokens), int(window), run_key)
            NS.set((estimate, NS.get("result")["seconds"]), "timing")
        except Exception as exc:  # noqa: BLE001 - Cancelled and bad input alike become messages
            from quantlib.errors import Cancelled

            if isinstance(exc, Cancelled):
                st.warning("Cancelled. Earlier results (if any) are kept below.", icon=":material/stop:")
            else:
                show_exception(exc, "quantize and inspect")
                st.caption("What to do: check the model source and the config; a model too large for this "
                           "machine needs a smaller model, a smaller dtype or a machine with more memory.")
        finally:
            clicked.finish()
    elif was_cancelled(NS):
        st.warning("Run cancelled. Earlier results (if any) are kept below.", icon=":material/stop:")
    show_results(choice, run_key)
    st.divider()
    with guard("analyze the checkpoint"):
        streamed_section(choice, cfg)


STREAM_NS = Namespace("inspect.stream")


def streamed_section(choice: ModelChoice, cfg: dict) -> None:
    """Every layer, read one tensor at a time from the checkpoint's safetensors: weight error, storage, outlier
    statistics and histograms for models bigger than this machine's memory (no evaluation)."""
    import hashlib

    from quantlib import figures
    from quantlib.checkpoint import analyze_checkpoint, flat_rows
    from quantlib.models import cache_dir

    st.header("Every layer, streamed from the checkpoint")
    st.caption("Reads the model's safetensors one tensor at a time (memory: the largest tensor and its quantized "
               "copy, never the model), so it works on checkpoints bigger than this machine. Finished layers are "
               "kept on disk: a cancelled or interrupted analysis resumes where it stopped.")
    key = hashlib.blake2b(json.dumps([choice.source, cfg]).encode(), digest_size=10).hexdigest()
    out = cache_dir() / "checkpoint-analysis" / key
    analyze = run_buttons(STREAM_NS, disabled=False, label="Analyze every layer")
    if analyze:
        try:
            progress = Progress(STREAM_NS, "Reading the checkpoint…")
            result = analyze_checkpoint(choice.source, cfg, out=out, trust_remote_code=choice.trust_remote_code,
                                        progress=progress, cancel=progress.cancel)
            progress.done(f"{len(result.layers)} layers, {result.bytes_read / 1e9:.2f} GB read in "
                          f"{result.seconds:.1f} s")
            STREAM_NS.set({"key": key, "result": result}, "result")
        finally:
            analyze.finish()
    elif was_cancelled(STREAM_NS):
        st.warning("Stopped; the finished layers are kept and the next run resumes from them.", icon=":material/stop:")
    stored = STREAM_NS.get("result")
    if not stored or stored["key"] != key:
        return
    result = stored["result"]
    state = "complete" if result.complete else "stopped early (finished layers kept)"
    st.caption(f"{result.label}: {len(result.layers)} layers, {state}; "
               f"{result.bytes_read / 1e9:.2f} GB read at {result.gb_per_second:.3f} GB/s · " + " · ".join(result.notes))
    for p in result.problems:
        st.error(f"{p['layer']} ({p['tensor']}): {p['problem']}", icon=":material/error:")
    table = flat_rows(result.layers)
    if len(table):
        st.plotly_chart(figures.layer_error_figure(table.assign(scheme=result.label)), key=STREAM_NS.key("chart"))
        st.dataframe(table, hide_index=True, width="stretch")
        st.download_button("Per-layer table (CSV)", table.to_csv(index=False), file_name="layers.csv",
                           mime="text/csv", key=STREAM_NS.key("csv"), icon=":material/download:")


def show_results(choice: ModelChoice | None, run_key: str | None = None) -> None:
    result = NS.get("result")
    if not result:
        st.info("Press **Quantize and inspect** to compute the results for this model and config.")
        return
    st.divider()
    st.header(f"{result['label']} on {result['model'].get('architecture', '')} "
              f"({'default model' if result['source'] == 'default' else result['source']})")
    if run_key is not None and run_key != result["key"]:
        st.info("These results are for an earlier choice of model/config/tokens; press the button above to "
                "compute the current one.")
    b = result["backend"]
    st.caption(f"Backend: **{b['device_name']}** · {b['library']} · {b['reason']}"
               + "".join(f" · {n}" for n in b.get("notes", [])) + f" · run took {result['seconds']:.1f} s")
    show_quality(result)
    show_layers(result)
    show_layer_detail(result, choice)
    show_memory(result)
    show_outliers(result)


run_page(main)
