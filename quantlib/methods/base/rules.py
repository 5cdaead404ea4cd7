"""Plain rules every method shares: the modules transformers leaves unquantized (its matcher, its defaults,
a config's own list), module names in model order, and the group sizes that fit a layer."""

from __future__ import annotations

import re

from quantlib.shapes import ModelShapes


def should_convert_module(name: str, patterns: list[str]) -> bool:
    """transformers' matcher of `modules_to_not_convert` patterns (imported lazily: it is cheap)."""
    from transformers.quantizers.quantizers_utils import should_convert_module as _should

    return _should(name, patterns)


def natural_key(name: str) -> tuple:
    """Sort key of module names in model order: numbers compare as numbers (layers.3 before layers.11)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def default_skip_rules(shapes: ModelShapes) -> list[tuple[str, str]]:
    """transformers' default modules left unquantized for this model, each with why."""
    tied = {a.removesuffix(".weight") for pair in shapes.tied for a in pair}
    heads = {w.module for w in shapes.weights if w.role == "head"}
    rules = []
    for pattern in shapes.default_not_convert:
        if pattern in heads or pattern == "lm_head":
            why = "output head (transformers leaves it unquantized by default)"
        elif pattern in tied:
            why = "tied to the output head (transformers leaves tied weights unquantized)"
        else:
            why = "last module of the model (transformers leaves it unquantized by default)"
        rules.append((pattern, why))
    rules += [(p, "kept in fp32 by the model (_keep_in_fp32_modules)") for p in shapes.keep_in_fp32_modules]
    return rules


def transformers_skip_rules(shapes: ModelShapes, own: list[str] | None, field_name: str) -> list[tuple[str, str]]:
    """transformers' `HfQuantizer.get_modules_to_not_convert`: its defaults (output head, tied weights,
    last module) apply only when the config's list is None (a list replaces them); the model's fp32
    modules always stay unquantized."""
    rules = [r for r in default_skip_rules(shapes) if own is None or r[1].startswith("kept in fp32")]
    return [*rules, *((p, f"skipped by {field_name} ({p!r})") for p in own or [])]


#: Group sizes worth suggesting when one does not divide a layer's width.
COMMON_GROUP_SIZES = (16, 32, 64, 96, 128, 192, 256, 512, 1024)


def fitting_group_sizes(width: int, candidates: tuple[int, ...] = COMMON_GROUP_SIZES) -> list[int]:
    """Group sizes among `candidates` that divide `width` (the one suggestion rule of every method);
    where none does, the three largest divisors of `width`."""
    return [g for g in candidates if width % g == 0] or [d for d in range(1, width + 1) if width % d == 0][-3:]


def group_size_problem(name: str, width: int, group_size: int, candidates: tuple[int, ...] = COMMON_GROUP_SIZES,
                       minus_one: bool = False) -> str | None:
    """Why `group_size` does not fit a layer of input width `width`, with the sizes that would, or None."""
    if (minus_one and group_size == -1) or (group_size > 0 and width % group_size == 0):
        return None
    fits = ", ".join(map(str, fitting_group_sizes(width, candidates)))
    return (f"{name}: input width {width} is not divisible by group_size {group_size}; sizes that fit: {fits}"
            + (", or -1 (one group per output channel)" if minus_one else ""))
