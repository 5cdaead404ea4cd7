"""A finished comparison checked with a method's own tools (GGUF: llama.cpp's llama-quantize and llama-perplexity).

A method offers such a check among its `Quantizer.cli_commands()`: a command object that also has `check_title`,
`applies(config)`, `unavailable(source)` (why it cannot run here on a run of that model, or None) and
`check(config, source, evaluate, progress)`, whose result `summary_lines(result)` reads. The CLI runs it as a
subcommand. The Compare page runs it on a finished run's config (`run_tool_check`), which stores the figures in the
run (`run.extra["tool_checks"]`) and saves it again, so the page, the report and the CLI (`check_lines`) show them
beside quantlib's own. This module names no method: the registry hands out the checks.
"""

from __future__ import annotations

from typing import Any

from quantlib.callbacks import ProgressFn
from quantlib.errors import QuantlibError
from quantlib.runs import Run

__all__ = ["available_checks", "run_tool_check", "tool_check_text"]


def _checks_of(config: Any) -> list[Any]:
    from quantlib.registry import quantizer_class

    return [c for c in quantizer_class(config).cli_commands() if hasattr(c, "check_title") and c.applies(config)]


def available_checks(run: Run) -> list[tuple[str, Any, str | None]]:
    """(scheme label, check, why it cannot run here or None) for every config of `run` that a check applies to."""
    from quantlib.registry import parse_config

    out = []
    for entry in run.configs:
        raw = {k: v for k, v in entry.items() if k != "label"}
        try:
            config = parse_config(raw)
        except QuantlibError:
            continue
        for check in _checks_of(config):
            out.append((entry.get("label", config.label), check, check.unavailable(run.model.get("source", "default"))))
    return out


def evaluate(config: Any, source: str, tokens: int, window: int, stride: int,
             progress: ProgressFn | None = None) -> Any:
    """quantlib's comparison row of `config` on `source`, on the tokens and context the tool scores."""
    from quantlib.compare import CompareSettings, run_comparison

    settings = CompareSettings(source=source, max_tokens=tokens, window=window, stride=stride, device="cpu")
    result = run_comparison([config], settings, save=False, progress=progress)
    return result.table.set_index("scheme").loc[config.label]


def run_tool_check(run: Run, label: str, check: Any, progress: ProgressFn | None = None,
                   save: bool = True) -> dict[str, Any]:
    """Run `check` on the config of `run` named `label`, on the run's model; store its figures in the run and, with
    `save`, write the run again (atomically, under the same id). Returns the stored entry."""
    from quantlib.registry import parse_config
    from quantlib.runs import save_run

    entry = next((c for c in run.configs if c.get("label") == label), None)
    if entry is None:
        raise QuantlibError(f"run {run.run_id} has no scheme {label!r}; its schemes: "
                            + ", ".join(str(c.get("label")) for c in run.configs))
    source = run.model.get("source", "default")
    why = check.unavailable(source)
    if why:
        raise QuantlibError(f"{check.check_title} cannot run here: {why}")
    config = parse_config({k: v for k, v in entry.items() if k != "label"})
    result = check.check(config, source, evaluate, progress)
    stored = {"title": check.check_title, "lines": check.summary_lines(result), "result": result}
    checks = run.extra.setdefault("tool_checks", {})
    checks[label] = stored
    if save:
        try:
            save_run(run)
        except BaseException:
            del checks[label]  # not saved: the run shows nothing it could not keep
            raise
    return stored


def tool_check_text(run: Run) -> list[str]:
    """One line per stored check: the tool's title, the scheme and its figures beside quantlib's."""
    return [f"{entry['title']}, {label}: " + "; ".join(line.strip() for line in entry["lines"] if line.strip())
            for label, entry in run.extra.get("tool_checks", {}).items()]
