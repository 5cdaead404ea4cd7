"""Values in the copyable Python snippets the methods show (`Quantizer.snippet` and the methods' own)."""

from __future__ import annotations

import json
from typing import Any


def _py(value: Any) -> str:
    """A JSON value as Python source (True/False/None, floats with a point)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    return repr(value)
