"""Namespaced `st.session_state` keys, so pages never collide (`builder.*`, `planner.*`, ...)."""

from __future__ import annotations

from typing import Any

import streamlit as st

#: The Config Builder's last valid config as a dict (`QuantConfig.to_dict()`); other pages read it.
BUILDER_CONFIG = "builder.config"
#: Its label (e.g. "NF4+DQ"), for multiselects on other pages.
BUILDER_LABEL = "builder.label"


class Namespace:
    """Keys of one page: `Namespace("builder").key("method")` -> "builder.method"."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def key(self, *parts: Any) -> str:
        return ".".join([self.prefix, *map(str, parts)])

    def get(self, *parts: Any, default: Any = None) -> Any:
        return st.session_state.get(self.key(*parts), default)

    def set(self, value: Any, *parts: Any) -> None:
        st.session_state[self.key(*parts)] = value

    def pop(self, *parts: Any, default: Any = None) -> Any:
        return st.session_state.pop(self.key(*parts), default)

    def setdefault(self, value: Any, *parts: Any) -> Any:
        key = self.key(*parts)
        if key not in st.session_state:
            st.session_state[key] = value
        return st.session_state[key]

    def __contains__(self, key: str) -> bool:
        return self.key(key) in st.session_state


def builder_config() -> dict[str, Any] | None:
    """The Config Builder's current valid config dict, or None if it was never opened."""
    value = st.session_state.get(BUILDER_CONFIG)
    return dict(value) if isinstance(value, dict) else None
