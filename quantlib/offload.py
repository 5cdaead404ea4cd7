"""Evaluate models bigger than memory through accelerate's offload (`device_map="auto"`, `max_memory`, disk).

The unquantized baseline is loaded by transformers with `device_map="auto"`: what does not fit in `max_memory`
stays on disk (the checkpoint's own safetensors, or an offload folder) and accelerate's hooks bring each module
in for its forward. A quantized scheme is evaluated the same way from a *simulated checkpoint*: the source
streamed tensor by tensor (`quantlib.checkpoint`), every layer the config quantizes replaced by its
quantize->dequantize result in the model's dtype, written to a folder beside the others (the disk cost of one
more copy of the model). That is exact only for methods whose layers compute with their dequantized weights
in the model's dtype; the others are refused with the reason (`Quantizer.offload_problem`).

It is slow (every window reads every offloaded weight from disk), but real; every result says it ran
offloaded, and the time is estimated beforehand from the measured time of the first decoder blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from quantlib.configs import QuantConfig
from quantlib.registry import parse_config
from quantlib.errors import Cancelled, QuantlibError
from quantlib.callbacks import CancelFn, ProgressFn

SHARD_BYTES = 512 * 2**20


class OffloadError(QuantlibError, ValueError):
    """An offloaded evaluation that cannot run: a method that cannot be simulated from its weights, no disk."""


@dataclass
class OffloadSettings:
    """How much memory the offloaded models may hold, and where offloaded and simulated weights go."""

    max_memory_gib: float = 2.0
    folder: str | None = None  # None: a temporary folder, removed afterwards

    def max_memory(self) -> dict[str, int]:
        if not self.max_memory_gib > 0:
            raise OffloadError(f"max_memory_gib: got {self.max_memory_gib!r}; allowed: a positive number of GiB")
        return {"cpu": int(self.max_memory_gib * 2**30)}


def offload_problems(configs: Sequence[QuantConfig], dtype: str) -> list[str]:
    """Why each config cannot be evaluated offloaded (empty when all can)."""
    from quantlib.registry import quantizer_class

    return [f"{c.label}: {p}" for c in configs if (p := quantizer_class(c).offload_problem(c, dtype)) is not None]


def _source_folder(source: str) -> Path:
    from quantlib.models import default_model_dir, resolve_source_dir

    if source == "default":
        return Path(default_model_dir())
    return Path(resolve_source_dir(source))


def load_offloaded(folder: str | Path, *, dtype: str, settings: OffloadSettings, offload_folder: str,
                   source_label: str | None = None) -> Any:
    """A `LoadedModel` loaded with `device_map="auto"` within `settings.max_memory()`, the rest on disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlib.models import LoadedModel, _describe

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype), device_map="auto",
                                                 max_memory=settings.max_memory(), offload_folder=offload_folder)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    placement = dict(getattr(model, "hf_device_map", {}) or {})
    on_disk = sum(1 for where in placement.values() if where == "disk")
    notes = [f"offloaded with accelerate: device_map='auto', max_memory {settings.max_memory_gib:g} GiB; "
             f"{on_disk} of {len(placement)} placed modules on disk"]
    description = _describe(model, "folder", source_label or str(folder), getattr(torch, dtype), "cpu", notes)
    return LoadedModel(model=model, tokenizer=tokenizer, description=description)


def write_simulated_checkpoint(source: str, config: QuantConfig | dict | str, out: str | Path, *,
                               dtype: str = "float32", progress: ProgressFn | None = None,
                               cancel: CancelFn | None = None) -> dict[str, Any]:
    """Stream `source`'s safetensors tensor by tensor into `out` (config.json, tokenizer, shards and index):
    each layer `config` quantizes as quantize->dequantize, everything cast to `dtype`. Written into a
    temporary folder and renamed into place, so `out` is complete or absent. Returns what was written."""
    from quantlib.checkpoint import ShardWriter, _items, _locate, checkpoint_files, read_tensor
    from quantlib.registry import get_quantizer, quantizer_class
    from quantlib.models import read_model_config
    from quantlib.shapes import model_shapes

    config = parse_config(config)
    problem = quantizer_class(config).offload_problem(config, dtype)
    if problem is not None:
        raise OffloadError(f"{config.label}: {problem}")
    quantizer = get_quantizer(config, device="cpu")
    folder = _source_folder(source)
    files = checkpoint_files(folder)
    items = _items(config, model_shapes(read_model_config(source)))
    by_tensor: dict[str, list[Any]] = {}
    for item in items:
        key = _locate(item.tensor, files)
        if key is None:
            raise OffloadError(f"{item.name}: {item.tensor} is absent from the checkpoint")
        by_tensor.setdefault(key, []).append(item)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    started = time.perf_counter()
    try:
        for name in os.listdir(folder):  # config and tokenizer files, never weights
            if name.endswith((".json", ".txt", ".model", ".jinja")) and name != "model.safetensors.index.json":
                shutil.copy2(folder / name, staging / name)
        writer = ShardWriter(staging, "model-simulated", SHARD_BYTES)
        names = list(files)
        for i, key in enumerate(names):
            if cancel is not None and cancel():
                raise Cancelled("writing the simulated checkpoint was cancelled")
            tensor = read_tensor(files[key], key)
            if tensor.is_floating_point():
                tensor = tensor.to(getattr(torch, dtype))
            for item in by_tensor.get(key, []):
                view = tensor if item.expert is None else tensor[item.expert]
                w = (view.t() if item.transposed else view).contiguous()
                deq = quantizer.quantize_layer(item.name, w).dequantize().to(tensor.dtype)
                view.copy_(deq.t() if item.transposed else deq)
            writer.add(key, tensor)
            if progress is not None:
                progress((i + 1) / len(names), f"{config.label}: simulated checkpoint {i + 1}/{len(names)} {key}")
        total = writer.close({"quantlib_simulated": json.dumps(config.to_dict())})
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"folder": str(out), "bytes": total, "seconds": time.perf_counter() - started,
            "layers": len(items)}


class _StopForward(Exception):
    pass


def estimate_window_seconds(model: Any, window: int, sample_blocks: int = 2) -> tuple[float, str]:
    """Seconds of one forward over `window` tokens, from the measured time of the first `sample_blocks`
    decoder blocks (the forward is stopped there) times the number of blocks; with how it was measured."""
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    if not blocks:
        raise OffloadError("no stack of decoder blocks found to time")
    stack = max(blocks, key=len)
    k = min(sample_blocks, len(stack))
    marks: list[float] = []

    def pre(_m: Any, _a: Any) -> None:
        marks.append(time.perf_counter())

    def post(_m: Any, _a: Any, _o: Any) -> None:
        marks.append(time.perf_counter())
        if len(marks) >= 2 * k:
            raise _StopForward

    handles = [stack[i].register_forward_pre_hook(pre) for i in range(k)]
    handles += [stack[i].register_forward_hook(post) for i in range(k)]
    ids = torch.zeros(1, window, dtype=torch.long)
    try:
        with torch.inference_mode():
            model(ids)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    per_block = sum(marks[2 * i + 1] - marks[2 * i] for i in range(k)) / k
    return per_block * len(stack), f"{k} of {len(stack)} decoder blocks timed on {window} tokens"


@dataclass
class OffloadedComparison:
    table: pd.DataFrame
    estimate_seconds: float
    estimate_basis: str
    seconds: float
    notes: list[str] = field(default_factory=list)


def compare_offloaded(configs: Sequence[QuantConfig | dict | str], *, source: str, settings: OffloadSettings,
                      dtype: str = "float32", max_tokens: int = 1024, window: int = 512,
                      progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                      on_estimate: Callable[[float, str], None] | None = None) -> OffloadedComparison:
    """Perplexity of the baseline and perplexity, KL and top-1 of every config, every model offloaded."""
    from quantlib.corpus import builtin_text
    from quantlib.evaluation import perplexity_and_kl, tokenize_for_eval
    from quantlib.statistics import statistic_row

    parsed = [parse_config(c) for c in configs]
    problems = offload_problems(parsed, dtype)
    if problems:
        raise OffloadError("cannot run offloaded: " + "; ".join(problems))
    started = time.perf_counter()
    own = settings.folder is None
    root = Path(settings.folder or tempfile.mkdtemp(prefix="quantlib-offload-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        folder = _source_folder(source)
        base = load_offloaded(folder, dtype=dtype, settings=settings, offload_folder=str(root / "offload-base"),
                              source_label=source)
        ids = tokenize_for_eval(base.tokenizer, builtin_text("eval"), max_tokens)
        per_window, basis = estimate_window_seconds(base.model, min(window, ids.numel()))
        n_windows = -(-ids.numel() // window)
        estimate = per_window * n_windows * (1 + len(parsed))
        if on_estimate is not None:
            on_estimate(estimate, basis)
        from quantlib.registry import quantizer_class

        models, notes = {}, [base.description.notes[-1]]
        notes += [n for c in parsed if (n := quantizer_class(c).offload_kernel_note(c, dtype)) is not None]
        for i, config in enumerate(parsed):
            written = write_simulated_checkpoint(source, config, root / f"simulated-{i}", dtype=dtype,
                                                 progress=progress, cancel=cancel)
            loaded = load_offloaded(written["folder"], dtype=dtype, settings=settings,
                                    offload_folder=str(root / f"offload-{i}"), source_label=config.label)
            models[config.label] = loaded.model
            notes.append(f"{config.label}: simulated checkpoint of {written['bytes'] / 2**30:.2f} GiB written in "
                         f"{written['seconds']:.1f} s; {loaded.description.notes[-1]}")
        report = perplexity_and_kl(base.model, models, ids, window=window, progress=progress, cancel=cancel)
        rows = [{"scheme": f"baseline {dtype}", "n_tokens": report.base.n_tokens,
                 **statistic_row(report.base.figures), "offloaded": True}]
        for label, comp in report.comparison.items():
            rows.append({"scheme": label, "n_tokens": comp.n_tokens, **statistic_row(comp.figures), "offloaded": True})
        table = pd.DataFrame(rows)
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    return OffloadedComparison(table, estimate, basis, time.perf_counter() - started,
                               ["every model ran offloaded through accelerate (device_map='auto', "
                                f"max_memory {settings.max_memory_gib:g} GiB, the rest on disk)", *notes])
