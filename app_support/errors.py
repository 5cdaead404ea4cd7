"""Showing failures as `st.error` messages, never as tracebacks.

Expected failures (bad input, missing capability) are `quantlib.errors.QuantlibError` or
`ValueError` and are shown with their message. Anything else is a bug: it is shown with its type
and message and a hint to report it, and never passes silently. Streamlit's own control-flow
exceptions (rerun, stop) derive from BaseException and pass through untouched.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import streamlit as st

from quantlib.errors import ConfigError, FieldError, QuantlibError

REPORT_HINT = ("This is a bug in Quantization Explorer, not in your input: please report it with the steps "
               "that led here (the server log has the full traceback).")


def config_error_markdown(error: ConfigError, heading: str | None = None) -> str:
    lines = [heading or f"{len(error.errors)} problem(s) in the config:"]
    lines += [f"- `{e.field}`: {_escape(e.message)}" + (f" (got `{_short(e)}`)" if _short(e) else "")
              + (f"; allowed: {_escape(e.allowed)}" if e.allowed else "") for e in error.errors]
    return "\n".join(lines)


def _short(error: FieldError) -> str:
    value = error.to_dict()["value"]
    return "" if value is None and error.value is not None else str(value).replace("`", "'")


def _escape(text: str) -> str:
    return text.replace("$", "\\$")


def describe_exception(exc: BaseException, action: str = "") -> tuple[str, bool]:
    """(message, expected): the text to show and whether it was an expected user-facing error."""
    where = f"Could not {action}: " if action else ""
    if isinstance(exc, ConfigError):
        return where + config_error_markdown(exc), True
    if isinstance(exc, (QuantlibError, ValueError)):
        return f"{where}{exc}", True
    return (f"Unexpected error{' while trying to ' + action if action else ''}: "
            f"{type(exc).__name__}: {exc}\n\n{REPORT_HINT}"), False


def show_exception(exc: BaseException, action: str = "") -> None:
    message, expected = describe_exception(exc, action)
    if not expected:
        import logging

        logging.getLogger("quantexplorer").error("unexpected error", exc_info=exc)
    st.error(message, icon=":material/error:" if expected else ":material/bug_report:")


@contextlib.contextmanager
def guard(action: str = "") -> Iterator[None]:
    """Run a block; any Exception becomes an `st.error` (the rest of the block is skipped)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - shown to the user, never swallowed
        show_exception(exc, action)


def run_page(main: Callable[[], None]) -> None:
    """Call a page's main function with a last-resort guard around it."""
    with guard():
        main()
