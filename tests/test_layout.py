"""The one-file-per-method layout holds: outside `quantlib/methods/` no code names a method.

The pipeline, the app and its pages must reach methods only through the registry and the quantizer
base class, so that adding a method is adding one module (and a preset line).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from quantlib.registry import CONFIG_MAPPING
from quantlib.registry import QUANTIZER_MAPPING

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = sorted([*ROOT.glob("quantlib/*.py"), ROOT / "app.py", *ROOT.glob("app_pages/*.py"), *ROOT.glob("app_support/*.py")])
METHODS = ROOT / "quantlib" / "methods"
#: The most lines a module under quantlib/methods/ may hold.
MAX_METHOD_MODULE_LINES = 500
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


def _method_of(module: str) -> str:
    """The method module or package a class's module belongs to: the name after `quantlib.methods.`."""
    return module.split(".")[2]


def test_every_method_module_registers_itself() -> None:
    """Each module or package under quantlib/methods/ (helpers start with an underscore; `base` is the base
    class) registers a quantizer whose config class lives in the same module or package."""
    modules = {p.stem for p in METHODS.glob("*.py") if not p.stem.startswith("_")}
    modules |= {p.parent.name for p in METHODS.glob("*/__init__.py") if not p.parent.name.startswith("_")}
    modules -= {"base"}
    registered = {_method_of(cls.__module__) for cls in QUANTIZER_MAPPING.values()}
    assert registered == modules
    for cls in QUANTIZER_MAPPING.values():
        assert _method_of(cls.config_class.__module__) == _method_of(cls.__module__)


def test_method_modules_stay_short() -> None:
    """Every module under quantlib/methods/ (packages included) holds at most `MAX_METHOD_MODULE_LINES` lines:
    a longer one is split by what it holds (as bitsandbytes is: config, formats, rounding, exact, quantizers)."""
    long = [f"{p.relative_to(ROOT)} has {n} lines" for p in sorted(METHODS.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_METHOD_MODULE_LINES]
    assert not long, f"over {MAX_METHOD_MODULE_LINES} lines:\n" + "\n".join(long)


# ------------------------------------------------------------------ import structure


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """quantlib's own imports, module to module: every import statement, at module level or inside a function
    (a function-level import still makes the importer depend on the imported). `from quantlib import x` where x
    is a module counts as importing x."""
    modules = {_module_name(p): p for p in (ROOT / "quantlib").rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("quantlib"):
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets += subs or [node.module]
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.startswith("quantlib")]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != name and target != "quantlib":  # the package's own __init__ imports nothing heavy
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_quantlib() -> None:
    """Data flows one way: configs -> quantizers -> registry -> pipeline -> figures. No module imports one that
    (directly or not) imports it back, not even inside a function."""
    assert not _cycles(_import_graph())


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_config_framework_knows_no_method() -> None:
    """`quantlib.configs` imports no method module and not the registry (transformers' split between
    `quantization_config.py` and `quantizers/auto.py`)."""
    graph = _import_graph()
    assert not {m for m in graph["quantlib.configs"] if m.startswith("quantlib.methods") or m == "quantlib.registry"}
    for module, imports in graph.items():  # a method module never reaches the registry, which imports it
        if module.startswith("quantlib.methods"):
            assert "quantlib.registry" not in imports, module


def test_import_quantlib_stays_light() -> None:
    """`import quantlib` loads neither torch nor any method: config work and `--help` start fast. The time is
    measured in a fresh interpreter and printed (it was about 0.01 s on this project's CI machine)."""
    import subprocess
    import sys

    code = ("import sys, time; t = time.perf_counter(); import quantlib; dt = time.perf_counter() - t; "
            "print(dt); print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', "
            "'pandas', 'numpy') or m.startswith('quantlib.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    seconds, loaded = out.stdout.splitlines()
    print(f"import quantlib: {float(seconds):.3f} s")
    assert loaded == "['quantlib.errors']", loaded


def test_every_package_is_installed() -> None:
    """pyproject.toml lists the packages setuptools installs: a sub-package left out (methods/bitsandbytes/ once it
    became one) is missing from a non-editable install."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "quantlib").rglob("__init__.py")}
    assert found == listed, f"in the tree, not listed: {sorted(found - listed)}; listed, not in the tree: " \
                            f"{sorted(listed - found)}"
