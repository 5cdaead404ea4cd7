"""Recommend: the per-layer mix with the least predicted damage under a memory budget.

`quantlib.recommend` does the work: `measure_sensitivity` (every layer at every setting of a method family,
on calibration text, with progress and cancel, cached per model), `recommend` (the optimizer, fast enough to
rerun on every slider move), `verify` (a real comparison run of the mix against the uniform settings). This
page reads the widgets, calls them and draws their tables and figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import streamlit as st

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from app_support.errors import guard, run_page  # noqa: E402
from app_support.models_ui import ModelChoice, backend_label, load_base, model_picker  # noqa: E402
from app_support.runner import Progress, run_buttons, was_cancelled  # noqa: E402
from app_support.state import Namespace  # noqa: E402

st.set_page_config(layout="wide")  # title and icon: app_support/home.py PAGES, read by the navigation

NS = Namespace("recommend")
VERIFY_NS = Namespace("recommend.verify")
GIB = 1024 ** 3


def family_picker() -> str:
    from quantlib.recommend import family_class, families

    names = list(families())
    family = st.selectbox("Method family", names, key=NS.key("family"),
                          help="Methods whose config can give layers different settings (and be loaded back).")
    doc = (family_class(family).mix_spaces.__doc__ or "").split("\n\n")[0]
    st.caption(" ".join(doc.split()))
    return family


def measure(choice: ModelChoice, family: str, calib_tokens: int, proxy: str) -> None:
    from quantlib.recommend import measure_sensitivity

    progress = Progress(NS, "Loading the model…")
    base = load_base(choice)
    sens = measure_sensitivity(base, family, dtype=choice.dtype, calib_tokens=calib_tokens, proxy=proxy,
                               progress=progress, cancel=progress.cancel)
    progress.done(f"Measured {sens.rows['layer'].nunique()} layers in {sens.seconds:.1f} s"
                  + (" (from the cache)" if sens.source == "cache" else ""))
    NS.set(sens, "sens")
    NS.set((choice.source, choice.dtype), "sens_model")
    NS.pop("verification")


def show_recommendation(choice: ModelChoice, sens) -> None:
    from quantlib import figures
    from quantlib import recommend as rc
    from quantlib.registry import quantizer_class

    cfg_dict = _model_config(choice.source)
    shapes = _shapes(choice.source)
    lo, hi = rc.reachable_range(sens, rc.family_class(sens.family).mix_spaces(shapes))
    unit = st.radio("Budget in", ["GiB", "bits per parameter"], horizontal=True, key=NS.key("unit"))
    if unit == "GiB":
        budget = st.slider("Memory budget (GiB, weights as the planner counts them)", min_value=lo / GIB,
                           max_value=hi / GIB, value=min(hi, lo * 1.1) / GIB, step=(hi - lo) / GIB / 200,
                           format="%.4f", key=NS.key("budget_gib"),
                           help=f"Reachable with this family: {lo / GIB:.4f} to {hi / GIB:.4f} GiB.")
        rec = rc.recommend(sens, cfg_dict, budget_gib=budget, shapes=shapes)
    else:
        bits_lo, bits_hi = 8 * lo / sens.n_params, 8 * hi / sens.n_params
        bits = st.slider("Average bits per parameter (whole model)", min_value=bits_lo, max_value=bits_hi,
                         value=min(bits_hi, bits_lo * 1.1), step=(bits_hi - bits_lo) / 200, format="%.3f",
                         key=NS.key("bits"), help=f"Reachable: {bits_lo:.3f} to {bits_hi:.3f} bits/param.")
        rec = rc.recommend(sens, cfg_dict, bits=bits, shapes=shapes)
        fixed = sens.n_params - int(rec.layers["params"].sum())
        st.caption(f"The average is over all {sens.n_params / 1e6:,.1f} M parameters. The {fixed / 1e6:,.1f} M "
                   f"({fixed / sens.n_params:.0%}) that no setting here quantizes (embeddings, norms, the output head "
                   f"by default) stay in {choice.dtype}, which is why the lowest reachable average is "
                   f"{bits_lo:.3f} bits and not 4.")
    NS.set(rec, "rec")
    st.markdown("\n".join(f"- {line}" for line in rc.summary_lines(rec)))
    st.caption(f"Optimizer: {rec.algorithm}; {rec.seconds * 1000:.0f} ms.")
    with st.expander("Every space of the family at this budget"):
        st.dataframe(rec.spaces, hide_index=True, width="stretch")
    st.plotly_chart(figures.mix_depth_figure(rec.layers), key=NS.key("depth"))
    with st.expander("Per-layer table"):
        st.dataframe(rec.layers, hide_index=True, width="stretch")
    if rec.check.get("pairs"):
        with st.expander("Proxy check: single layers quantized, measured KL against the predicted"):
            import pandas as pd

            st.dataframe(pd.DataFrame(rec.check["pairs"]), hide_index=True, width="stretch")
    st.subheader("Export")
    if not rec.transformers_keeps:
        st.info(f"transformers' own config class drops part of this mix: {rec.export_kind}. Quantize and load it "
                "with the method's library, as the snippet below does.", icon=":material/info:")
    exported = json.dumps(rec.export(), indent=1)
    st.code(exported, language="json")
    st.download_button("quantization_config.json", exported, file_name="quantization_config.json",
                       mime="application/json", key=NS.key("download"), icon=":material/download:")
    snippet = quantizer_class(rec.config).snippet(rec.config, choice.source if choice.source != "default"
                                                  else "HuggingFaceTB/SmolLM2-135M-Instruct")
    if snippet:
        st.code(snippet, language="python")
    for tool, text in rec.commands.items():
        st.caption(f"{tool}: the command that writes this mix")
        st.code(text, language="bash")


@st.cache_data(show_spinner=False, max_entries=4)
def _model_config(source: str) -> dict:
    from quantlib.models import read_model_config

    return read_model_config(source)


@st.cache_resource(show_spinner=False, max_entries=4)
def _shapes(source: str):
    from quantlib.shapes import model_shapes

    return model_shapes(_model_config(source))


def verify_section(choice: ModelChoice) -> None:
    from quantlib import figures
    from quantlib import recommend as rc
    from quantlib.compare import CompareSettings

    rec = NS.get("rec")
    st.caption("Quantizes the recommended mix and every uniform setting of the family, and evaluates them "
               "against the baseline as a comparison run does (saved with the comparison runs).")
    tokens = st.number_input("Evaluation tokens", min_value=256, max_value=16384, value=1024, step=256,
                             key=VERIFY_NS.key("tokens"))
    calib_tokens = rc.VERIFY_CALIB_TOKENS
    if rec is not None and rc.family_class(rec.family).calibrated:
        st.caption("This family calibrates: every config the verification quantizes (the mix and "
                   f"{len(rc.uniform_configs(rec.family, _shapes(choice.source)))} uniform settings) is calibrated "
                   "in turn, a minute or two each for the default model on this CPU.")
        calib_tokens = st.number_input(
            "Calibration tokens per config", min_value=256, max_value=65536, value=rc.VERIFY_CALIB_TOKENS, step=512,
            key=VERIFY_NS.key("calib_tokens"),
            help="Every config (the mix and each uniform setting) is calibrated on the same built-in text. About "
                 "a minute and a half per config for the default model on 2 CPU cores at 4,096 tokens.")
    verify = run_buttons(VERIFY_NS, disabled=rec is None, label="Verify the recommendation")
    if verify:
        try:
            progress = Progress(VERIFY_NS, "Loading the model…")
            base = load_base(choice)
            settings = CompareSettings(source=choice.source, max_tokens=int(tokens), window=min(1024, int(tokens)),
                                       dtype=choice.dtype, device="cpu", trust_remote_code=choice.trust_remote_code,
                                       allow_pickle=choice.allow_pickle)
            verification = rc.verify(rec, settings, base=base, progress=progress, cancel=progress.cancel,
                                     calib_tokens=int(calib_tokens))
            progress.done(f"Verified: run {verification.comparison.run.run_id}")
            NS.set(verification, "verification")
        finally:
            verify.finish()
    elif was_cancelled(VERIFY_NS):
        st.warning("Verification cancelled; nothing was saved.", icon=":material/stop:")
    verification = NS.get("verification")
    if verification is not None:
        st.markdown("\n".join(f"- {line}" for line in rc.verdict_lines(verification.verdict)))
        st.plotly_chart(figures.mix_frontier_figure(verification.table, verification.mix_label,
                                                    verification.verdict), key=NS.key("frontier"))
        st.dataframe(verification.table[["scheme", "kind", "memory_mib", "bits_per_param", "kl", "kl_se",
                                         "perplexity", "perplexity_se", "top1_agreement", "n_tokens"]],
                     hide_index=True, width="stretch")


def main() -> None:
    st.title("Recommend")
    st.caption("Which layers can be quantized harder and which must stay in higher precision to fit a budget "
               "with the least damage: every layer measured at every setting, the best mix chosen under the "
               f"budget, exported as the method's config, then verified for real. Backend: **{backend_label()}**.")
    st.subheader("1 · Model")
    choice = model_picker(NS)
    st.subheader("2 · Method family and measurement")
    with guard("list the method families"):
        family = family_picker()
    c1, c2 = st.columns(2)
    calib = c1.number_input("Calibration tokens", min_value=64, max_value=4096, value=512, step=64,
                            key=NS.key("calib"), help="Tokens of the built-in calibration text (disjoint from the "
                                                      "evaluation text) whose layer inputs are captured.")
    proxy = c2.radio("Error the optimizer sums", ["fisher", "relative"], horizontal=True, key=NS.key("proxy"),
                     format_func={"fisher": "predicted KL (Fisher)", "relative": "relative output error"}.get,
                     help="Predicted KL: each layer's output error weighted by how much the output distribution "
                          "depends on it (a backward pass with sampled next tokens). Relative: ||ΔY||²/||Y||².")
    measuring = run_buttons(NS, disabled=choice is None, label="Measure sensitivity")
    if measuring and choice is not None:
        try:
            measure(choice, family, int(calib), proxy)
        finally:
            measuring.finish()
    elif was_cancelled(NS):
        st.warning("Measurement cancelled; nothing was cached.", icon=":material/stop:")
    sens = NS.get("sens")
    if sens is not None and choice is not None and (NS.get("sens_model") != (choice.source, choice.dtype)
                                                    or sens.family != family):
        st.info("The measurement shown is for another model or family: measure again.")
        sens = None
    if sens is None or choice is None:
        return
    st.subheader("3 · Budget and recommendation")
    with guard("recommend a mix"):
        show_recommendation(choice, sens)
    st.subheader("4 · Verify")
    with guard("verify the recommendation"):
        verify_section(choice)


run_page(main)
