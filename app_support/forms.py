"""Form controls generated from `quantlib.configs.config_schemas()` (JSON Schema per method).

Per property: checkbox for booleans, selectbox for enums, number_input for numbers (min/max from
the schema), a comma-separated text input for lists of module names, text input for free strings.
A property whose `x-visible-when` condition is not met is drawn disabled with a caption saying
when it matters. Widget values live in namespaced session-state keys
(`<ns>.f.<method>.<field>`), so a loaded config, preset or link only has to write those keys.

bitsandbytes' two booleans `load_in_4bit`/`load_in_8bit` (exactly one must be true) are drawn as
one "Bits" radio (4 / 8); the raw dict handed to `parse_config` still uses transformers' keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from quantlib.configs import QuantConfig


@dataclass(frozen=True)
class RadioOverride:
    """One radio that stands for several boolean fields of a method."""

    key: str
    label: str
    help: str
    options: dict[Any, dict[str, Any]]  # option -> the field values it means

    @property
    def replaces(self) -> tuple[str, ...]:
        return tuple(next(iter(self.options.values())))

    def option_for(self, values: dict[str, Any]) -> Any:
        for option, meaning in self.options.items():
            if all(values.get(k) == v for k, v in meaning.items()):
                return option
        return next(iter(self.options))

    def option_where(self, field: str, wanted: Any) -> Any | None:
        for option, meaning in self.options.items():
            if meaning.get(field) == wanted:
                return option
        return None


def radio_override(method: str) -> RadioOverride | None:
    """The one radio a config class asks for in place of several exported keys (its `FORM_CHOICE`)."""
    from quantlib.registry import CONFIG_MAPPING

    choice = getattr(CONFIG_MAPPING.get(method), "FORM_CHOICE", None)
    return RadioOverride(**choice) if choice else None

NONE_LABEL = "(none)"


# ------------------------------------------------------------------------------ pure helpers

def _types(prop: dict[str, Any]) -> list[str]:
    t = prop.get("type", "string")
    return list(t) if isinstance(t, list) else [t]


def widget_kind(prop: dict[str, Any]) -> str:
    """checkbox | selectbox | integer | number | list | json | text."""
    types = [t for t in _types(prop) if t != "null"]
    main = types[0] if types else "string"
    if "enum" in prop:
        return "selectbox"
    if main == "boolean":
        return "checkbox"
    if main in ("integer", "number"):
        return main
    if main == "array":  # a list of names; any other array (FP8's weight_block_size) is edited as JSON
        return "list" if prop.get("items", {}).get("type") == "string" else "json"
    if main == "object":
        return "json"
    return "text"


def is_visible(prop: dict[str, Any], values: dict[str, Any]) -> bool:
    cond = prop.get("x-visible-when")
    return cond is None or values.get(cond["field"]) == cond["equals"]


def range_text(prop: dict[str, Any]) -> str:
    """The allowed range of a numeric property in words ("Allowed: 0 or more."), or ""."""
    lo, hi = prop.get("minimum", prop.get("exclusiveMinimum")), prop.get("maximum", prop.get("exclusiveMaximum"))
    above = "more than" if "exclusiveMinimum" in prop else "or more"
    below = "less than" if "exclusiveMaximum" in prop else "or less"
    if lo is not None and hi is not None:
        return f"Allowed: from {lo:g} to {hi:g}."
    if lo is not None:
        return f"Allowed: {above} {lo:g}." if above == "more than" else f"Allowed: {lo:g} or more."
    if hi is not None:
        return f"Allowed: {below} {hi:g}." if below == "less than" else f"Allowed: {hi:g} or less."
    return ""


def format_list(value: list[str] | None) -> str:
    if value is None:
        return ""
    return "[]" if value == [] else ", ".join(value)


def parse_list(text: str) -> list[str] | None:
    """Comma-separated names -> list; empty text -> None (the default); "[]" -> empty list.

    Empty entries (a trailing comma, two commas in a row) are dropped: in a config file an empty entry would make
    transformers skip every module, and nobody means that by a stray comma. Text of commas alone is the default."""
    text = (text or "").strip()
    if not text:
        return None
    if text == "[]":
        return []
    return [part.strip() for part in text.split(",") if part.strip()] or None


def to_widget_value(prop: dict[str, Any], value: Any) -> Any:
    kind = widget_kind(prop)
    if kind == "list":
        return format_list(value)
    if kind == "text":
        return "" if value is None else str(value)
    if kind == "json":
        return "" if value is None else json.dumps(value)
    if kind == "number" and value is not None:
        return float(value)
    return value


def from_widget_value(prop: dict[str, Any], value: Any) -> Any:
    kind = widget_kind(prop)
    if kind == "list":
        return parse_list(value)
    if kind == "text":
        return value if value else (None if "null" in _types(prop) else "")
    if kind == "json":
        if not value or not value.strip():
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # the config's validation names the field: "must be a JSON object"
    return value


def field_key(ns_prefix: str, method: str, field: str) -> str:
    return f"{ns_prefix}.f.{method}.{field}"


def config_to_state(ns_prefix: str, schema: dict[str, Any], method: str, values: dict[str, Any]) -> dict[str, Any]:
    """Session-state entries (widget key -> widget value) that show `values` in the form."""
    props = schema["properties"]
    out = {}
    override = radio_override(method)
    for name, prop in props.items():
        if name == "quant_method" or (override and name in override.replaces):
            continue
        out[field_key(ns_prefix, method, name)] = to_widget_value(prop, values.get(name, prop.get("default")))
    if override:
        out[field_key(ns_prefix, method, override.key)] = override.option_for(values)
    return out


def defaults_of(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: p.get("default") for k, p in schema["properties"].items() if k != "quant_method"}


def state_to_values(ns_prefix: str, schema: dict[str, Any], method: str, state: Any) -> dict[str, Any]:
    """The raw config dict (transformers' keys) the form's widgets currently say."""
    props = schema["properties"]
    values: dict[str, Any] = {"quant_method": method}
    override = radio_override(method)
    if override:
        option = state.get(field_key(ns_prefix, method, override.key), next(iter(override.options)))
        values.update(override.options.get(option, next(iter(override.options.values()))))
    for name, prop in props.items():
        if name == "quant_method" or (override and name in override.replaces):
            continue
        key = field_key(ns_prefix, method, name)
        raw = state.get(key, to_widget_value(prop, prop.get("default")))
        values[name] = from_widget_value(prop, raw)
    return values


def hidden_caption(method: str, prop: dict[str, Any], props: dict[str, Any]) -> str:
    cond = prop["x-visible-when"]
    field, wanted = cond["field"], cond["equals"]
    override = radio_override(method)
    if override and field in override.replaces:
        option = override.option_where(field, wanted)
        if option is not None:
            return f"Only used when {override.label} is {option}."
    title = props.get(field, {}).get("title", field)
    shown = {True: "on", False: "off"}.get(wanted, wanted) if isinstance(wanted, bool) else wanted
    return f"Only used when {title} (`{field}`) is {shown}."


# ------------------------------------------------------------------------------ widgets

def ensure_state(state: Any, ns_prefix: str, schema: dict[str, Any], method: str) -> None:
    """Give every widget key of `method` its default unless it already has a value."""
    for key, value in config_to_state(ns_prefix, schema, method, defaults_of(schema)).items():
        if key not in state:
            state[key] = value


def render_form(ns_prefix: str, schema: dict[str, Any], method: str,
                on_change: Callable[[], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Draw the fields of `method`; return (raw config dict, field -> placeholder for its errors).

    Reads and writes only `st.session_state` keys `<ns>.f.<method>.*`.
    """
    import streamlit as st

    ensure_state(st.session_state, ns_prefix, schema, method)
    props = schema["properties"]
    values = state_to_values(ns_prefix, schema, method, st.session_state)
    slots: dict[str, Any] = {}
    override = radio_override(method)
    if override:
        key = field_key(ns_prefix, method, override.key)
        st.radio(override.label, list(override.options), key=key, horizontal=True, help=override.help,
                 format_func=lambda o: f"{o}-bit", on_change=on_change)
        slot = st.empty()
        for name in override.replaces:
            slots[name] = slot
    for name, prop in props.items():
        if name == "quant_method" or (override and name in override.replaces):
            continue
        key = field_key(ns_prefix, method, name)
        visible = is_visible(prop, values)
        label = prop.get("title") or name
        label = f"{label} · `{name}`"
        help_text = prop.get("description", "")
        kind = widget_kind(prop)
        common = dict(key=key, help=help_text, disabled=not visible, on_change=on_change)
        if kind == "checkbox":
            st.checkbox(label, **common)
        elif kind == "selectbox":
            options = list(prop["enum"])
            st.selectbox(label, options, format_func=lambda o: NONE_LABEL if o is None else str(o), **common)
        elif kind in ("integer", "number"):
            # No min_value/max_value: with them, the browser keeps an out-of-range entry in the box ("Press Enter
            # to apply", the reason only on hover) while the server keeps the old value and exports it. Without
            # them the entry reaches the config's validation, whose error shows under the field and blocks export.
            cast = int if kind == "integer" else float
            st.number_input(label, step=cast(1) if kind == "integer" else 0.5,
                            format=None if kind == "integer" else "%g",
                            **{**common, "help": (help_text + " " + range_text(prop)).strip()})
        elif kind == "list":
            st.text_input(label, placeholder="default (comma-separated module names; [] for none)", **common)
        elif kind == "json":
            shape = "a JSON array" if "array" in _types(prop) else "a JSON object"
            st.text_area(label, placeholder=f"none ({shape})", height=80, **common)
        else:
            st.text_input(label, **common)
        if not visible:
            st.caption(hidden_caption(method, prop, props))
        slots[name] = st.empty()
    return state_to_values(ns_prefix, schema, method, st.session_state), slots


def config_values(config: QuantConfig) -> dict[str, Any]:
    """Field values of a config (no private mirrors), for `config_to_state`."""
    return config.field_values()
