"""Long engine calls from a Streamlit page: a progress bar, and a cancel button that really stops.

How cancel works (and why it is honest): Streamlit runs the page script in a thread. Clicking
*Cancel* while a run is in progress makes Streamlit stop the running script at its next UI
update — here, the next progress report the engine makes (every few layers or every evaluation
window) — by raising its own control-flow exception (a BaseException, so no `except Exception` in
quantlib or in our pages swallows it). The script then reruns; the button's `on_click` callback
sets a per-session flag `<ns>.cancel` first, which the page reads to say "cancelled" and which
`Progress.cancelled` returns to the engine's `cancel` callable, so nothing restarts by accident.
A new click on *Run* clears the flag. Models are never modified in place (quantization works on a
copy), so an interrupted run leaves nothing half-done behind. A page that streams partial results
keeps the latest in session state; its *Stop and keep results* button saves that one.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import streamlit as st
from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

from app_support.state import Namespace


def request_cancel(ns: Namespace) -> None:
    ns.set(True, "cancel")


def start_run(ns: Namespace) -> None:
    ns.set(False, "cancel")


class RunButtons:
    """What `run_buttons` drew: true when Run was clicked. `finish()` (call it once the run has ended, however it
    ended) redraws Cancel and *Stop and keep results* disabled: the script run that did the work would otherwise
    leave them live beside finished results, where a click only says "cancelled"."""

    def __init__(self, clicked: bool, slot: Any, ns: Namespace, keep: Callable[[Namespace], None] | None):
        self.clicked, self.slot, self.ns, self.keep = clicked, slot, ns, keep

    def __bool__(self) -> bool:
        return self.clicked

    def finish(self) -> None:
        if self.clicked:
            _stop_buttons(self.slot, self.ns, live=False, keep=self.keep, suffix="_done")


def run_buttons(ns: Namespace, *, disabled: bool, label: str = "Run", help: str | None = None,
                keep: Callable[[Namespace], None] | None = None) -> RunButtons:
    """Run and Cancel side by side; true when Run was clicked (Cancel is live only then, until `finish()`).

    With `keep`, a third button "Stop and keep results" stops the run like Cancel and then calls
    `keep(ns)` (in its on_click callback, before the page reruns), which saves what was computed."""
    with st.container(horizontal=True):
        clicked = st.button(label, key=ns.key("run"), type="primary", disabled=disabled, help=help,
                            on_click=start_run, args=(ns,), icon=":material/play_arrow:")
        slot = st.empty()
    _stop_buttons(slot, ns, live=clicked, keep=keep)
    return RunButtons(clicked, slot, ns, keep)


def _stop_buttons(slot: Any, ns: Namespace, *, live: bool, keep: Callable[[Namespace], None] | None,
                  suffix: str = "") -> None:
    with slot.container(horizontal=True):
        st.button("Cancel", key=ns.key("cancel_button" + suffix), disabled=not live, on_click=request_cancel,
                  args=(ns,), icon=":material/stop:",
                  help="Stops the run at its next progress step and discards it; results of earlier runs are kept.")
        if keep is not None:
            st.button("Stop and keep results", key=ns.key("keep_button" + suffix), disabled=not live,
                      on_click=_stop_and_keep, args=(ns, keep), icon=":material/save:",
                      help="Stops the run and saves what it has computed so far as a partial run, marked with "
                           "its token count.")


def _stop_and_keep(ns: Namespace, keep: Callable[[Namespace], None]) -> None:
    request_cancel(ns)
    keep(ns)


def was_cancelled(ns: Namespace) -> bool:
    return bool(ns.get("cancel", default=False))


class Progress:
    """A progress bar the engine reports into; stages map engine fractions into one overall bar."""

    def __init__(self, ns: Namespace, text: str = "Starting…"):
        self.ns = ns
        self.bar = st.progress(0.0, text=text)
        self.lo, self.hi = 0.0, 1.0
        self._ctx = get_script_run_ctx(suppress_warning=True)

    def _attach(self) -> None:
        """Libraries may report from their own worker threads (gptqmodel's layer callback does): give such a
        thread this script run's context, or Streamlit refuses the update (NoSessionContext) and the run fails."""
        if self._ctx is not None and get_script_run_ctx(suppress_warning=True) is None:
            add_script_run_ctx(threading.current_thread(), self._ctx)

    def stage(self, lo: float, hi: float) -> "Progress":
        self.lo, self.hi = lo, hi
        return self

    def __call__(self, fraction: float, message: str) -> None:
        self._attach()
        overall = self.lo + (self.hi - self.lo) * min(max(float(fraction), 0.0), 1.0)
        self.bar.progress(min(max(overall, 0.0), 1.0), text=f"{overall:.0%} · {message}")

    def cancelled(self) -> bool:
        self._attach()
        return was_cancelled(self.ns)

    @property
    def cancel(self) -> Callable[[], bool]:
        return self.cancelled

    def done(self, text: str = "Done.") -> None:
        self.bar.progress(1.0, text=text)
