"""Exceptions the engine raises for bad input, each carrying what a user needs to fix it.

Every user-facing failure in `quantlib` is one of these, so the app and the command line can
catch one family and show a message instead of a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    """One problem with one field: where, what was given, and what is allowed."""

    field: str
    value: Any
    message: str
    allowed: str = ""

    def __str__(self) -> str:
        text = f"{self.field}: {self.message}"
        if self.value is not _MISSING:
            text += f" (got {_short_repr(self.value)})"
        if self.allowed:
            text += f"; allowed: {self.allowed}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe form, for `--json` output and the app."""
        value = None if self.value is _MISSING else _short_repr(self.value)
        return {"field": self.field, "value": value, "message": self.message, "allowed": self.allowed}


class _Missing:
    """Marks a required field that was absent, so its message does not print a bogus value."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


def _short_repr(value: Any, limit: int = 80) -> str:
    """JSON-ish rendering of a bad value, clipped so a pasted megabyte does not flood the message."""
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class QuantlibError(Exception):
    """Base of every error `quantlib` raises on purpose for bad input or a missing capability."""


class ConfigError(QuantlibError, ValueError):
    """A quantization config is invalid; `.errors` lists every problem found, not just the first."""

    def __init__(self, errors: list[FieldError], *, method: str | None = None):
        self.errors = list(errors)
        self.method = method
        head = f"invalid {method} config" if method else "invalid quantization config"
        lines = [f"{head}: {len(self.errors)} problem(s)"] + [f"  - {e}" for e in self.errors]
        super().__init__("\n".join(lines))

    def fields(self) -> list[str]:
        """Names of the fields that have a problem, in the order found."""
        return [e.field for e in self.errors]


class BackendUnavailableError(QuantlibError, RuntimeError):
    """A scheme cannot run here: names the method, what is missing, and how to get it."""

    def __init__(self, method: str, missing: str, fix: str):
        self.method, self.missing, self.fix = method, missing, fix
        super().__init__(f"{method} cannot run here: {missing}. {fix}")


class Cancelled(QuantlibError):
    """The user asked to stop; raised between steps so nothing is left half-done."""
