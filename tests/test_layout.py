"""The one-file-per-method layout holds: outside `quantlib/methods/` no code names a method.

The pipeline, the app and its pages must reach methods only through the registry and the quantizer
base class, so that adding a method is adding one module (and a preset line).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from quantlib.configs import CONFIG_MAPPING
from quantlib.methods import QUANTIZER_MAPPING

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = sorted([*ROOT.glob("quantlib/*.py"), ROOT / "app.py", *ROOT.glob("pages/*.py"), *ROOT.glob("app_support/*.py")])
#: Files allowed to name methods, and why.
ALLOWED = {
    "quantlib/presets.py": "the preset lines (one per preset: the only line a new method adds outside its module)",
}
PATTERNS = {
    "compares quant_method with a name": re.compile(r"quant_method\W*\s*[!=]=\s*[\"']|[\"']\s*[!=]=\s*\S*quant_method\b(?![\"'])"),
    "isinstance on a method's config class": re.compile(r"isinstance\([^)]*\b(?!QuantConfig\b)\w+Config\b"),
    "getattr on a quantizer": re.compile(r"getattr\(\s*(quantizer|q|cls|quantizer_cls)\s*,"),
    "imports a method module": re.compile(r"quantlib\.methods\.(?!base\b)(\w+)"),
}


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Source lines without comments and docstrings (they may mention methods in prose)."""
    text = path.read_text()
    tree = ast.parse(text)
    doc_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return [(i, line.split("#", 1)[0]) for i, line in enumerate(text.splitlines(), 1) if i not in doc_lines]


@pytest.mark.parametrize("path", OUTSIDE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_method_named_outside_methods(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    if rel in ALLOWED:
        pytest.skip(f"allowed: {ALLOWED[rel]}")
    method_literal = re.compile("[\"'](" + "|".join(map(re.escape, [*CONFIG_MAPPING, *QUANTIZER_MAPPING]))
                                + ")[\"']")
    hits = []
    for lineno, line in _code_lines(path):
        for what, pattern in {**PATTERNS, "names a method in a string": method_literal}.items():
            if pattern.search(line):
                hits.append(f"{rel}:{lineno}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_the_patterns_catch_what_they_are_for() -> None:
    """The grep would fail on the leaks it is meant to catch (so a pass means something)."""
    leaks = ['if config.quant_method == "rtn":', "if isinstance(config, AwqQuantConfig):",
             'if getattr(quantizer, "calibrated", False):', "from quantlib.methods.gptq import GPTQQuantizer"]
    for leak, pattern in zip(leaks, PATTERNS.values()):
        assert pattern.search(leak), leak


def test_every_method_module_registers_itself() -> None:
    """Each module under quantlib/methods/ (helpers start with an underscore) registers a quantizer
    whose config class lives in the same module."""
    modules = {p.stem for p in (ROOT / "quantlib" / "methods").glob("*.py") if not p.stem.startswith("_")} - {"base"}
    registered = {cls.__module__.rsplit(".", 1)[-1] for cls in QUANTIZER_MAPPING.values()}
    assert registered == modules
    for cls in QUANTIZER_MAPPING.values():
        assert cls.config_class.__module__ == cls.__module__
