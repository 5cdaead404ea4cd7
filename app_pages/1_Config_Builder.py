"""Config Builder: a validated quantization config, generated form, live errors, export and links."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import streamlit as st

# Pages import the repo's packages whichever way they are started (streamlit run, AppTest).
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from app_support import forms
from app_support.errors import config_error_markdown, describe_exception, guard, run_page
from app_support.presets import PRESETS, preset_config
from app_support.querystring import decode_params, encode_config
from app_support.snippets import quantlib_snippet, transformers_snippet
from app_support.state import BUILDER_CONFIG, BUILDER_LABEL, Namespace
from quantlib.configs import QuantConfig
from quantlib.registry import CONFIG_MAPPING, config_schemas, parse_config
from quantlib.errors import ConfigError

st.set_page_config(layout="wide")  # title and icon: app_support/home.py PAGES, read by the navigation

NS = Namespace("builder")
METHOD_KEY = NS.key("method")
PRESET_KEY = NS.key("preset")
CUSTOM = "(custom)"
DEFAULT_METHOD = next(iter(CONFIG_MAPPING))  # the first registered method


@st.cache_data(show_spinner=False)
def schemas() -> dict:
    return config_schemas()


def apply_config(config: QuantConfig) -> None:
    """Write a config into the form's widget keys (call before the widgets are drawn)."""
    st.session_state[METHOD_KEY] = config.quant_method
    for key, value in forms.config_to_state(NS.prefix, schemas()[config.quant_method], config.quant_method,
                                            forms.config_values(config)).items():
        st.session_state[key] = value


def load_text(data: bytes | str, what: str) -> None:
    """Parse an uploaded/pasted config (or whole config.json) into the form, or record why not."""
    try:
        config = parse_config(data)
    except Exception as exc:  # noqa: BLE001 - shown to the user
        if isinstance(exc, ConfigError):
            message = config_error_markdown(exc, f"Could not load {what}: {len(exc.errors)} problem(s).")
        else:
            message = describe_exception(exc, f"load {what}")[0]
        NS.set(message, "load_error")
        NS.pop("load_ok")
        return
    apply_config(config)
    st.session_state[PRESET_KEY] = CUSTOM
    NS.pop("load_error")
    NS.set(f"Loaded a {config.quant_method} config ({config.label}) from {what}.", "load_ok")


# ------------------------------------------------------------------------------ callbacks

def on_preset() -> None:
    name = st.session_state.get(PRESET_KEY, CUSTOM)
    if name in PRESETS:
        apply_config(preset_config(name))
        NS.pop("load_error")


def on_field_change() -> None:
    st.session_state[PRESET_KEY] = CUSTOM


def on_upload() -> None:
    upload = st.session_state.get(NS.key("upload"))
    if upload is not None:
        load_text(upload.getvalue(), f"the file {upload.name}")


def on_paste() -> None:
    text = st.session_state.get(NS.key("paste"), "")
    if not text.strip():
        NS.set("Nothing to load: paste a quantization config or a model's config.json first.", "load_error")
        NS.pop("load_ok")
        return
    load_text(text, "the pasted JSON")


# ------------------------------------------------------------------------------ first run

def initialise() -> None:
    """Fill the form once per visit: from the link, else the last config, else the defaults."""
    if METHOD_KEY in st.session_state:
        return
    st.session_state.setdefault(PRESET_KEY, CUSTOM)
    params = {k: st.query_params.get(k) for k in ("method", "cfg") if k in st.query_params}
    if params:
        try:
            config = decode_params(params)
        except Exception as exc:  # noqa: BLE001 - a bad link must not break the page
            if isinstance(exc, ConfigError):
                detail = config_error_markdown(exc, "The config in the link is invalid:")
            else:
                detail = describe_exception(exc)[0]
            NS.set(f"{detail}\n\nThe link's config was ignored; the form shows the defaults.", "qs_error")
        else:
            if config is not None:
                apply_config(config)
                return
    previous = st.session_state.get(BUILDER_CONFIG)
    if isinstance(previous, dict):
        try:
            apply_config(parse_config(previous))
            return
        except ConfigError:
            pass
    st.session_state[METHOD_KEY] = DEFAULT_METHOD


# ------------------------------------------------------------------------------ page

def main() -> None:
    st.title("Config Builder")
    st.caption("Build a quantization config from the engine's own schema, validated as you type. "
               "Export it as JSON for `transformers`, share it as a link, or use it on the other pages.")
    initialise()
    if NS.get("qs_error"):
        st.error(NS.pop("qs_error"), icon=":material/link_off:")

    all_schemas = schemas()
    form_col, out_col = st.columns([5, 6], gap="large")
    with form_col:
        # one above the other: side by side, both were cut to a few characters at 1000 px
        st.selectbox("Preset", [CUSTOM, *PRESETS], key=PRESET_KEY, on_change=on_preset,
                     help="Load a named config into the form; editing any field makes it custom.")
        methods = list(CONFIG_MAPPING)
        st.selectbox("Method (`quant_method`)", methods, key=METHOD_KEY, on_change=on_field_change,
                     help="Every registered quantization method; the fields below come from its JSON Schema.")
        method = st.session_state[METHOD_KEY]
        schema = all_schemas[method]
        st.caption(schema.get("description", ""))
        with st.expander("Load an existing config (JSON file or pasted text)",
                         expanded=bool(NS.get("load_error"))):
            st.file_uploader("Upload quantization_config.json or a model's config.json", type=["json"],
                             key=NS.key("upload"), on_change=on_upload)
            st.text_area("…or paste JSON", key=NS.key("paste"), height=120,
                         placeholder=json.dumps(next(iter(PRESETS.values()))))
            st.button("Load pasted JSON", key=NS.key("paste_button"), on_click=on_paste)
        if NS.get("load_error"):
            st.error(NS.get("load_error"), icon=":material/description:")
        if NS.get("load_ok"):
            st.success(NS.pop("load_ok"))
        st.subheader("Fields")
        raw, slots = forms.render_form(NS.prefix, schema, method, on_change=on_field_change)

    config: QuantConfig | None = None
    try:
        config = parse_config(raw)
    except ConfigError as exc:
        unplaced = []
        for error in exc.errors:
            slot = slots.get(error.field)
            text = f"**{error.field}** {error.message}" + (f" — allowed: {error.allowed}" if error.allowed else "")
            if slot is not None:
                slot.error(text)
            else:
                unplaced.append(error)
        with out_col:
            st.error(config_error_markdown(exc, f"The config is invalid: {len(exc.errors)} problem(s). "
                                                "Fix the fields marked in red; nothing is exported until then."))

    if config is None:
        return
    check_against_model(config, slots)
    st.session_state[BUILDER_CONFIG] = config.to_dict()
    st.session_state[BUILDER_LABEL] = config.label
    params = encode_config(config)
    if {k: st.query_params.get(k) for k in ("method", "cfg") if k in st.query_params} != params:
        st.query_params.from_dict(params)
    with out_col:
        render_output(config, params)


def check_against_model(config: QuantConfig, slots: dict) -> None:
    """The config must fit every layer it quantizes (group and block sizes): check the planner's model,
    else SmolLM2-135M, with the method's own shape rules."""
    from app_support.planner import SMOLLM2_ARCH, arch_config, shape_problem

    model_config = st.session_state.get("planner.model_config")
    name = "the Memory Planner's model" if isinstance(model_config, dict) else "SmolLM2-135M (the default model)"
    if not isinstance(model_config, dict):
        model_config = arch_config(SMOLLM2_ARCH)
    with guard("check the config against the model"):
        problem = shape_problem(config, model_config, name)
        if problem:
            slot = next((slots[k] for k in ("group_size", "quant_type", "in_group_size") if k in slots), st)
            slot.warning(problem)


def render_output(config: QuantConfig, params: dict[str, str]) -> None:
    from quantlib.registry import quantizer_class

    st.subheader(f"Config: {config.label}")
    problem = quantizer_class(config).config_problem(config)
    if problem is None:
        st.success("Valid config. It is also what the Memory Planner offers as “Builder”.",
                   icon=":material/check_circle:")
    else:  # transformers takes it; quantlib refuses to plan, quantize or compare it rather than guess
        st.warning(f"Valid for transformers, but quantlib can neither plan nor quantize it: {problem}.",
                   icon=":material/block:")
    for note in config.warnings():
        st.warning(note)
    diff = st.toggle("only non-default keys (diff)", key=NS.key("diff"),
                     help="Show only what differs from the defaults; the download always holds every key.")
    st.code(config.to_json(diff=diff), language="json")  # scrolls sideways when narrow: wrapped JSON misreads
    for note in config.export_notes():
        st.caption(note)
    st.download_button("Download quantization_config.json", icon=":material/download:", data=config.to_json(),
                       file_name="quantization_config.json", mime="application/json", key=NS.key("download"),
                       on_click="ignore")
    query = "&".join(f"{k}={v}" for k, v in params.items())
    st.caption("Share: the address bar now holds this config; this query string reproduces it.")
    st.code("?" + query, language=None, wrap_lines=True)

    st.subheader("Python")
    snippet = transformers_snippet(config)
    if snippet is not None:
        from quantlib.registry import quantizer_class

        st.caption(quantizer_class(config).snippet_heading)
        st.code(snippet, language="python", wrap_lines=True)
    else:
        st.info(f"transformers has no quantization config class for `{config.quant_method}`: "
                "this method exists in quantlib only (simulated quantization). Use it like this:")
        st.code(quantlib_snippet(config), language="python", wrap_lines=True)


run_page(main)
