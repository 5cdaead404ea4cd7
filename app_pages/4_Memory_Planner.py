"""Memory Planner: predicted footprint per config from config.json alone, against this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

# Pages import the repo's packages whichever way they are started (streamlit run, AppTest).
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from app_support.errors import guard, run_page
from app_support.planner import (ARCH_FIELDS, SMOLLM2_ARCH, UNQUANTIZED, arch_config, config_choices, gib,
                                 memory_sources)
from app_support.presets import BUILDER_PREFIX, option_text
from app_support.state import BUILDER_CONFIG, BUILDER_LABEL, Namespace
from quantlib.memory import (COMPONENT_LABELS, DTYPE_BYTES, KV_DTYPE_BYTES, RUNTIME_LABELS, plan_memory, plan_table,
                             short_reason, stored_quantization)
from quantlib.shapes import ArchitectureError, ForwardMemory, ModelShapes, forward_memory, model_shapes

st.set_page_config(layout="wide")  # title and icon: app_support/home.py PAGES, read by the navigation

NS = Namespace("planner")
SOURCE_DEFAULT = "Default model (SmolLM2-135M-Instruct)"
SOURCE_PATH = "Folder, .gguf file or hub id"
SOURCE_NUMBERS = "Architecture numbers"
SOURCE_PASTE = "Paste or upload config.json"
CUSTOM_MEMORY = "A number I enter"
#: Short column names for the table (quantlib's labels become the tooltips).
SHORT = {"codes": "codes", "scales": "scales", "dq_constants": "DQ constants", "code_tables": "code tables",
         "unquantized": "unquantized"}
#: column -> (short label, tooltip)
OTHER_COLUMNS = {"total MiB": ("total MiB", "Predicted memory: weights, plus the KV cache and activations when "
                                             "they are included."),
                 RUNTIME_LABELS["kv_cache"]: ("KV cache", "MiB of the key/value cache (and any recurrent state) "
                                                          "after the context, for the batch."),
                 RUNTIME_LABELS["activations"]: ("activations", "MiB of the activation peak of one prefill "
                                                               "forward over the context."),
                 "bits/param (quantized layers)": ("bits/param (q)", "Bits per parameter of the quantized linear "
                                                                      "weights, their scales and tables included."),
                 "bits/param (whole model)": ("bits/param (all)", "Bits per parameter over the whole model.")}
DEFAULT_SELECTION = ["NF4+DQ", "NF4", "INT8 (t=6)", "RTN int4 g64", "GGUF Q4_0"]


@st.cache_data(show_spinner="Reading config.json (no weights are loaded)…", max_entries=32)
def cached_model_config(source: str) -> dict:
    from quantlib.models import read_model_config

    return read_model_config(source)


@st.cache_data(show_spinner="Reading the safetensors headers for the stored dtype…", max_entries=32)
def cached_checkpoint_dtypes(source: str) -> dict | None:
    from quantlib.models import checkpoint_dtypes

    try:
        return checkpoint_dtypes(source)
    except Exception:  # noqa: BLE001 - the stored dtype is a hint; planning goes on without it
        return None


@st.cache_resource(show_spinner="Building the model on the meta device (no memory, no weights)…", max_entries=16)
def cached_shapes(config_json: str, trust_remote_code: bool, source_dir: str | None) -> ModelShapes:
    return model_shapes(json.loads(config_json), trust_remote_code, source_dir)


@st.cache_data(show_spinner="Tracing one forward on the meta device for the KV cache and activations…",
               max_entries=32)
def cached_forward(config_json: str, context: int, batch: int, dtype: str, trust_remote_code: bool,
                   source_dir: str | None) -> ForwardMemory:
    return forward_memory(json.loads(config_json), context, batch, dtype, trust_remote_code, source_dir)


def choose_model() -> tuple[dict | None, str | None]:
    """The config.json dict to plan and, for a folder or hub id, the source it came from."""
    kind = st.radio("Model", [SOURCE_DEFAULT, SOURCE_PATH, SOURCE_PASTE, SOURCE_NUMBERS], key=NS.key("source_kind"),
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
        st.caption("Starts from SmolLM2-135M's shapes and builds a Llama model from them (q/k/v/o projections, "
                   "gated MLP). For any other architecture, paste its config.json.")
        with guard("use these architecture numbers"):
            return arch_config(numbers), None
        return None, None
    if kind == SOURCE_PASTE:
        upload = st.file_uploader("config.json", type=["json"], key=NS.key("upload"))
        text = upload.getvalue().decode("utf-8", errors="replace") if upload is not None else st.text_area(
            "config.json", key=NS.key("pasted"), height=160,
            placeholder='{"model_type": "mixtral", "hidden_size": 4096, ...}')
        if not text.strip():
            st.info("Paste a transformers config.json (or upload one): it is planned exactly as the model "
                    "transformers builds from it, MoE and multimodal models included.")
            return None, None
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as exc:
            st.error(f"config.json is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.",
                     icon=":material/error:")
            return None, None
        if not isinstance(cfg, dict):
            st.error("config.json must be a JSON object ({...}).", icon=":material/error:")
            return None, None
        return cfg, None
    if kind == SOURCE_PATH:
        source = st.text_input("Folder, .gguf file or hub id", key=NS.key("source"),
                               placeholder="/path/to/model  ·  model.gguf  ·  org/name")
        if not source.strip():
            st.info("Enter a local folder with config.json, a .gguf file, or a Hugging Face hub id "
                    "(its config.json only, from the local cache or downloaded when online — never the weights).")
            return None, None
        source = source.strip()
    else:
        source = "default"
    try:
        return cached_model_config(source), source
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        from app_support.errors import show_exception

        show_exception(exc, f"read the config of {source!r}")
        st.caption("What to do: check the path or hub id (hub ids need the local Hugging Face cache or a "
                   "network connection), or paste the model's config.json.")
        return None, None


def choose_runtime(config_json: str, trust_remote_code: bool, source_dir: str | None,
                   dtype: str) -> tuple[ForwardMemory | None, float | None]:
    """The KV cache and activation inputs, and the traced forward (None when left out or refused)."""
    NS.setdefault(True, "runtime")
    if not st.checkbox("Add the KV cache and the activations of one forward", key=NS.key("runtime"),
                       help="Traced through transformers' own forward on the meta device: nothing is computed."):
        return None, None
    cols = st.columns(3)
    NS.setdefault(4096, "context")
    NS.setdefault(1, "batch")
    context = cols[0].number_input("Context length (tokens)", min_value=1, max_value=1_048_576, step=1024,
                                   key=NS.key("context"))
    batch = cols[1].number_input("Batch size", min_value=1, max_value=1024, step=1, key=NS.key("batch"))
    kv_dtype = cols[2].selectbox("KV cache dtype", list(KV_DTYPE_BYTES), key=NS.key("kv_dtype"),
                                 help="float8 prices the cache at one byte per element (as an fp8 KV cache in vLLM or TensorRT-LLM).")
    compute = dtype if dtype in ("float16", "bfloat16") else "float32"
    try:
        fm = cached_forward(config_json, int(context), int(batch), compute, trust_remote_code, source_dir)
    except ArchitectureError as exc:
        st.warning(f"KV cache and activations left out: {exc}.", icon=":material/warning:")
        return None, None
    kv = fm.kv_bytes_as(KV_DTYPE_BYTES[kv_dtype])
    per_token = kv / (fm.context * fm.batch)
    st.caption(f"KV cache {gib(kv)} ({per_token / 1024:,.1f} KiB per token in {kv_dtype}; "
               f"{fm.layers_full} full-attention and {fm.layers_sliding} sliding-window layers)"
               + (f" + {gib(fm.state_bytes)} of recurrent state" if fm.state_bytes else "")
               + f" · activation peak {gib(fm.activation_peak_bytes)}. Assumptions: " + "; ".join(fm.assumptions) + ".")
    return fm, float(KV_DTYPE_BYTES[kv_dtype])


def show_unquantized(model_config: dict, names: list[str], configs: list, dtype: str, shapes: ModelShapes) -> None:
    """What each scheme leaves unquantized, and why, with counts: what the totals are made of."""
    with st.expander("What stays unquantized, and why", expanded=False):
        which = st.selectbox("Scheme", names, key=NS.key("why_scheme"))
        cfg = configs[names.index(which)]
        plan = plan_memory(model_config, cfg, dtype, shapes=shapes)
        frame = plan.unquantized_frame()
        frame["MiB"] = frame.pop("bytes") / 2**20
        # What, in a few words, and why, in its own wide column: one long cell was cut off.
        frame.insert(0, "what", frame["why"].map(short_reason))
        frame["why"] = [w[len(short) + 2:-1] if w != short and w.endswith(")") else "" for w, short
                        in zip(frame["why"], frame["what"])]
        st.dataframe(frame[["what", "tensors", "params", "MiB", "why"]], hide_index=True, width="stretch",
                     column_config={"MiB": st.column_config.NumberColumn("MiB", format="%.2f"),
                                    "params": st.column_config.NumberColumn("parameters", format="localized"),
                                    "why": st.column_config.TextColumn("why", width="large")})
        if plan.experts_policy:
            st.caption(f"Mixture of experts ({shapes.n_experts} experts per block): {plan.experts_policy}.")


def show_tensor_plan(names: list[str], configs: list, shapes: ModelShapes) -> None:
    """For configs that type each tensor by a rule (llama-quantize's file types): every tensor's type and the rule."""
    from quantlib.registry import quantizer_class

    tables = {}
    for name, cfg in zip(names, configs):
        if cfg is None:  # the unquantized model
            continue
        try:
            rows = quantizer_class(cfg).tensor_plan(cfg, shapes)
        except ValueError as exc:
            tables[name] = str(exc)
            continue
        if rows is not None:
            tables[name] = rows
    if not tables:
        return
    with st.expander("Per-tensor types, and the llama-quantize rule that chose each", expanded=False):
        which = st.selectbox("Scheme", list(tables), key=NS.key("tensor_plan_scheme"))
        rows = tables[which]
        if isinstance(rows, str):
            st.info(f"Not planned tensor by tensor: {rows}.", icon=":material/info:")
            return
        frame = pd.DataFrame(rows)
        counts = frame["type"].value_counts()
        st.caption(f"{len(frame)} tensors in llama-quantize's order: "
                   + ", ".join(f"{n} {t}" for t, n in counts.items())
                   + ". \"rule type\" is what the rule asks for; \"type\" what is written after the shape fallback.")
        st.dataframe(frame[["weight", "tensor", "rule type", "type", "rule", "fallback"]], hide_index=True,
                     width="stretch", column_config={"rule": st.column_config.TextColumn("rule", width="large"),
                                                     "fallback": st.column_config.TextColumn("fallback", width="large")})


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
    model_config, source = choose_model()
    if model_config is None:
        return
    trust = st.checkbox("Trust remote code", key=NS.key("trust_remote_code"),
                        help="Only for a repository you trust: models whose code is not part of transformers "
                             "run the repository's own Python to build. Off by default.")
    source_dir = None
    if trust and source not in (None, "default"):
        from quantlib.models import resolve_source_dir

        with guard("find the model's code"):
            source_dir = resolve_source_dir(source)
    config_json = json.dumps(model_config, sort_keys=True)
    try:
        shapes = cached_shapes(config_json, trust, source_dir)
    except ArchitectureError as exc:
        st.error(f"{exc}.\n\nThe planner builds the model transformers maps this config.json to, on the meta "
                 "device; fix the config.json or choose another model.", icon=":material/error:")
        return
    NS.set(model_config, "model_config")  # the Config Builder checks group sizes against it
    matmuls = shapes.matmul_weights
    experts = sum(w.n_matrices for w in matmuls if w.kind == "experts")
    st.caption(f"**{shapes.class_name}** ({shapes.model_type}) · {shapes.n_params / 1e6:,.1f} M parameters · "
               f"{len(matmuls)} matmul weights"
               + (f" ({experts:,} expert matrices, {shapes.n_experts} experts per block)" if shapes.n_experts else "")
               + f" · {'tied' if shapes.tied_embeddings else 'separate'} output head · shapes from the model "
                 "transformers builds on the meta device")
    stored, stored_problem = stored_quantization(model_config)
    if stored_problem:
        st.warning(stored_problem, icon=":material/warning:")
    stored_dtypes = cached_checkpoint_dtypes(source) if source not in (None, "default") else None

    choices = config_choices(st.session_state.get(BUILDER_CONFIG), st.session_state.get(BUILDER_LABEL))
    # the whole width: beside other controls, the chosen configs' names were cut at 1000 px
    NS.setdefault([n for n in DEFAULT_SELECTION if n in choices]
                  + [n for n in choices if n.startswith(BUILDER_PREFIX)], "configs")
    st.session_state[NS.key("configs")] = [n for n in st.session_state[NS.key("configs")] if n in choices]
    selected = st.multiselect("Configs", list(choices), key=NS.key("configs"), format_func=option_text,
                              help="The presets, plus the Config Builder's current config when you have built one.")
    left, right = st.columns([3, 2])
    with left:
        include_base = st.checkbox("Include the unquantized model", value=True, key=NS.key("baseline"))
    with right:
        dtypes = list(DTYPE_BYTES)[:3]
        stored_dtype = _majority_dtype(stored_dtypes) or model_config.get("dtype") or model_config.get("torch_dtype")
        # The model's own dtype; for a config.json that names none, bf16 (what most checkpoints are), said below. A new
        # model (another default) resets the choice; the user's own choice stands while the model stays.
        default = stored_dtype if stored_dtype in dtypes else ASSUMED_DTYPE
        if NS.get("dtype_default") != default:
            NS.set(default, "dtype_default")
            NS.set(default, "dtype")
        dtype = st.selectbox("dtype of unquantized tensors", dtypes, key=NS.key("dtype"),
                             help="Embeddings, norms, skipped layers and biases stay in this dtype.")
        if stored_dtype not in dtypes and not stored_dtypes:
            st.caption(f"config.json names no dtype{f' it can use ({stored_dtype})' if stored_dtype else ''}: "
                       f"{ASSUMED_DTYPE} is assumed, what most checkpoints store; choose float32 for a model kept "
                       "in full precision.")
        if stored_dtypes:
            st.caption("Stored in the checkpoint: " + ", ".join(f"{n / 1e6:,.1f} M {d}" for d, n in
                                                               sorted(stored_dtypes.items(), key=lambda kv: -kv[1]))
                       + " (safetensors headers).")
        budget, budget_text = choose_budget()
    runtime, kv_unit = choose_runtime(config_json, trust, source_dir, dtype)

    rows = [choices[name] for name in selected]
    configs = [c.config for c in rows]
    names = [c.name for c in rows]
    if stored is not None:
        configs.insert(0, stored)
        names.insert(0, f"as stored ({stored.label})")
    if include_base:
        configs.append(None)
        names.append(f"{UNQUANTIZED} {dtype}")
    if not configs:
        st.info("Choose at least one config.")
        return

    with guard("plan the memory"):
        table = plan_table(model_config, configs, dtype, budget, runtime=runtime, kv_dtype_bytes=kv_unit,
                           trust_remote_code=trust)
        table["scheme"] = names
        table = table.set_index("scheme")
        fits = table.get("fits")
        warnings = {name: text for name, text in table.pop("warning").items() if text}
        for name, text in warnings.items():
            st.warning(f"**{name}** {text}: its footprint is close to the unquantized model's.",
                       icon=":material/warning:")
        st.subheader("Predicted footprint (MiB)")
        names_short = {COMPONENT_LABELS[k]: v for k, v in SHORT.items()}
        display = table.rename(columns=names_short)
        runtime_cols = [c for c in RUNTIME_LABELS.values() if c in display.columns]
        order = (["total MiB", *names_short.values(), *runtime_cols,
                  *[c for c in OTHER_COLUMNS if c.startswith("bits/")]] + (["fits"] if fits is not None else []))
        column_config = {short: st.column_config.NumberColumn(short, format="%.2f", help=f"MiB of {long}")
                         for long, short in names_short.items()}
        column_config.update({c: st.column_config.NumberColumn(label, format="%.2f", help=h)
                              for c, (label, h) in OTHER_COLUMNS.items()})
        # The unquantized model has no quantized layers: "—", not a raw None, in its bits/param (q) cell.
        quantized_bits = "bits/param (quantized layers)"
        display[quantized_bits] = [f"{v:.2f}" if pd.notna(v) else "—" for v in display[quantized_bits]]
        label, text = OTHER_COLUMNS[quantized_bits]
        column_config[quantized_bits] = st.column_config.TextColumn(label, help=text)
        column_config["fits"] = st.column_config.CheckboxColumn("fits", help=f"Total ≤ {budget_text}")
        if warnings:  # on the row too, where the numbers are read
            display["mostly unquantized"] = [warnings.get(name, "") for name in display.index]
            order.append("mostly unquantized")
            column_config["mostly unquantized"] = st.column_config.TextColumn(
                "mostly unquantized", help="Configs that leave most of the parameters unquantized, and the largest "
                                           "part they leave")
        st.dataframe(display[order], width="stretch", column_config=column_config)
        if fits is not None:
            too_big = [n for n, ok in fits.items() if not ok]
            if too_big:
                st.warning(f"Does not fit in {gib(budget)}: {', '.join(too_big)}.")
            else:
                st.success(f"Every selected option fits in {budget_text}.")
        breakdowns = {name: plan_memory(model_config, cfg, dtype, shapes=shapes) for name, cfg in zip(names, configs)}
        notes = sorted({n for b in breakdowns.values() for n in b.notes})
        st.caption(("Weights, KV cache and activations" if runtime is not None else
                    "Weights only: activations and the KV cache come on top") + "; framework overhead (CUDA "
                   "context, allocator slack) is not included. " + "; ".join(notes) + ".")
        from quantlib.figures import add_available_line, memory_figure

        extra = None
        if runtime is not None:
            extra = {RUNTIME_LABELS["kv_cache"]: runtime.kv_bytes_as(kv_unit) + runtime.state_bytes,
                     RUNTIME_LABELS["activations"]: runtime.activation_peak_bytes}
        fig = memory_figure(breakdowns, extra)
        largest = max(b.total_bytes for b in breakdowns.values()) + sum((extra or {}).values())
        if budget is not None and budget <= 1.5 * largest:
            add_available_line(fig, budget, f"available: {gib(budget)}")
        st.plotly_chart(fig, width="stretch")
        show_unquantized(model_config, names, configs, dtype, shapes)
        show_tensor_plan(names, configs, shapes)


#: The dtype planned when config.json names none (most published checkpoints are bf16).
ASSUMED_DTYPE = "bfloat16"


def _majority_dtype(counts: dict | None) -> str | None:
    """The planner dtype most of a checkpoint is stored in (safetensors names: BF16, F16, F32)."""
    from quantlib.models import SAFETENSORS_DTYPES

    if not counts:
        return None
    return SAFETENSORS_DTYPES.get(max(counts.items(), key=lambda kv: kv[1])[0])


run_page(main)
