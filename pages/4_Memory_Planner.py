"""Memory Planner: predicted footprint per config from config.json alone, against this machine."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# Pages import the repo's packages whichever way they are started (streamlit run, AppTest).
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from app_support.errors import guard, run_page
from app_support.planner import (ARCH_FIELDS, SMOLLM2_ARCH, UNQUANTIZED, arch_config, config_choices, gib,
                                 memory_sources)
from app_support.state import BUILDER_CONFIG, BUILDER_LABEL, Namespace
from quantlib.architecture import ArchitectureError, describe_architecture
from quantlib.memory import COMPONENT_LABELS, DTYPE_BYTES, plan_memory, plan_table

st.set_page_config(page_title="Memory Planner · Quantization Explorer", page_icon=":material/straighten:",
                   layout="wide")

NS = Namespace("planner")
SOURCE_DEFAULT = "Default model (SmolLM2-135M-Instruct)"
SOURCE_PATH = "Folder, .gguf file or hub id"
SOURCE_NUMBERS = "Architecture numbers"
CUSTOM_MEMORY = "A number I enter"
#: Short column names for the table (quantlib's labels become the tooltips).
SHORT = {"codes": "codes", "scales": "scales", "dq_constants": "DQ constants", "code_tables": "code tables",
         "unquantized": "unquantized"}
#: column -> (short label, tooltip)
OTHER_COLUMNS = {"total MiB": ("total MiB", "Predicted weight memory."),
                 "bits/param (quantized layers)": ("bits/param (q)", "Bits per parameter of the quantized linear "
                                                                      "weights, their scales and tables included."),
                 "bits/param (whole model)": ("bits/param (all)", "Bits per parameter over the whole model.")}
DEFAULT_SELECTION = ["NF4+DQ", "NF4", "INT8 (t=6)", "RTN int4 g64", "GGUF Q4_0"]


@st.cache_data(show_spinner="Reading config.json (no weights are loaded)…", max_entries=32)
def cached_model_config(source: str) -> dict:
    from quantlib.models import read_model_config

    return read_model_config(source)


def choose_model() -> dict | None:
    kind = st.radio("Model", [SOURCE_DEFAULT, SOURCE_PATH, SOURCE_NUMBERS], key=NS.key("source_kind"),
                    horizontal=True, help="Only config.json is read; no weights are loaded on this page.")
    if kind == SOURCE_NUMBERS:
        cols = st.columns(4)
        numbers = {}
        for i, (key, label) in enumerate(ARCH_FIELDS.items()):
            NS.setdefault(SMOLLM2_ARCH[key], "arch", key)
            numbers[key] = cols[i % 4].number_input(label, min_value=1, step=1, key=NS.key("arch", key))
        NS.setdefault(SMOLLM2_ARCH["tie_word_embeddings"], "arch", "tie_word_embeddings")
        numbers["tie_word_embeddings"] = cols[len(ARCH_FIELDS) % 4].checkbox(
            "Tied embeddings", key=NS.key("arch", "tie_word_embeddings"),
            help="Output head shares the input embedding (no separate lm_head matrix).")
        st.caption("Starts from SmolLM2-135M's shapes. A Llama-style decoder is assumed "
                   "(q/k/v/o projections, gated MLP).")
        with guard("use these architecture numbers"):
            return arch_config(numbers)
        return None
    if kind == SOURCE_PATH:
        source = st.text_input("Folder, .gguf file or hub id", key=NS.key("source"),
                               placeholder="/path/to/model  ·  model.gguf  ·  org/name")
        if not source.strip():
            st.info("Enter a local folder with config.json, a .gguf file, or a Hugging Face hub id "
                    "(read from the local cache, or downloaded — config only — when online).")
            return None
        source = source.strip()
    else:
        source = "default"
    try:
        return cached_model_config(source)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        from app_support.errors import show_exception

        show_exception(exc, f"read the config of {source!r}")
        st.caption("What to do: check the path or hub id (hub ids need the local Hugging Face cache or a "
                   "network connection), or choose “Architecture numbers” and type the shapes in.")
        return None


def choose_budget() -> tuple[float | None, str]:
    sources = memory_sources()
    names = [*sources, CUSTOM_MEMORY]
    which = st.radio("Compare against", names, key=NS.key("budget_kind"), horizontal=True)
    if which == CUSTOM_MEMORY:
        NS.setdefault(8.0, "budget_gib")
        value = st.number_input("Memory available (GiB)", min_value=0.0, step=0.5, format="%.2f",
                                key=NS.key("budget_gib"))
        return value * 2**30, f"{value:.2f} GiB entered"
    available, text = sources[which]
    st.caption(text)
    return available, text


def main() -> None:
    st.title("Memory Planner")
    st.caption("Predicts what a model occupies under each config — quantized codes, scales, double-quant "
               "constants, code tables and the parts left unquantized — from config.json alone.")
    model_config = choose_model()
    if model_config is None:
        return
    try:
        arch = describe_architecture(model_config)
    except ArchitectureError as exc:
        st.error(f"{exc}.\n\nThis config.json does not describe a model whose shapes can be derived "
                 "(Llama-style decoders and GPT-2 are understood). Choose “Architecture numbers” and "
                 "type the shapes in instead.", icon=":material/error:")
        return
    NS.set(model_config, "model_config")  # the Config Builder checks group sizes against it
    st.caption(f"**{arch.model_type}** · {arch.n_params / 1e6:,.1f} M parameters · "
               f"{len(arch.linears)} linear layers · "
               f"{'tied' if arch.tied_embeddings else 'separate'} output head")

    choices = config_choices(st.session_state.get(BUILDER_CONFIG), st.session_state.get(BUILDER_LABEL))
    left, right = st.columns([3, 2])
    with left:
        NS.setdefault([n for n in DEFAULT_SELECTION if n in choices]
                      + [n for n in choices if n.startswith("Builder")], "configs")
        st.session_state[NS.key("configs")] = [n for n in st.session_state[NS.key("configs")] if n in choices]
        selected = st.multiselect("Configs", list(choices), key=NS.key("configs"),
                                  help="The presets, plus the Config Builder's current config when you have "
                                       "built one.")
        include_base = st.checkbox("Include the unquantized model", value=True, key=NS.key("baseline"))
    with right:
        dtype = st.selectbox("dtype of unquantized tensors", list(DTYPE_BYTES)[:3], key=NS.key("dtype"),
                             help="Embeddings, norms, skipped layers and biases stay in this dtype.")
        budget, budget_text = choose_budget()

    rows = [choices[name] for name in selected]
    configs = [c.config for c in rows]
    names = [c.name for c in rows]
    if include_base:
        configs.append(None)
        names.append(f"{UNQUANTIZED} {dtype}")
    if not configs:
        st.info("Choose at least one config.")
        return

    with guard("plan the memory"):
        table = plan_table(model_config, configs, dtype, budget)
        table["scheme"] = names
        table = table.set_index("scheme")
        fits = table.get("fits")
        st.subheader("Predicted footprint (MiB)")
        names_short = {COMPONENT_LABELS[k]: v for k, v in SHORT.items()}
        display = table.rename(columns=names_short)
        order = ["total MiB", *names_short.values(), *list(OTHER_COLUMNS)[1:]] + (["fits"] if fits is not None else [])
        column_config = {short: st.column_config.NumberColumn(short, format="%.2f", help=f"MiB of {long}")
                         for long, short in names_short.items()}
        column_config.update({c: st.column_config.NumberColumn(label, format="%.2f", help=h)
                              for c, (label, h) in OTHER_COLUMNS.items()})
        column_config["fits"] = st.column_config.CheckboxColumn("fits", help=f"Total ≤ {budget_text}")
        st.dataframe(display[order], width="stretch", column_config=column_config)
        if fits is not None:
            too_big = [n for n, ok in fits.items() if not ok]
            if too_big:
                st.warning(f"Does not fit in {gib(budget)}: {', '.join(too_big)}.")
            else:
                st.success(f"Every selected option fits in {budget_text}.")
        st.caption("Weights only: activations, the KV cache and framework overhead come on top. "
                   + "; ".join(plan_memory(model_config, None, dtype).notes) + ".")
        breakdowns = {name: plan_memory(model_config, cfg, dtype) for name, cfg in zip(names, configs)}
        from quantlib.figures import memory_figure

        fig = memory_figure(breakdowns)
        largest = max(b.total_bytes for b in breakdowns.values()) / 2**20
        if budget is not None and budget / 2**20 <= 1.5 * largest:
            fig.add_hline(y=budget / 2**20, line_dash="dash", line_color="#d62728",
                          annotation_text=f"available: {gib(budget)}")
        st.plotly_chart(fig, width="stretch")


run_page(main)
