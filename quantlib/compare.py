"""Compare schemes: several configs against one unquantized baseline, in one table.

The baseline is loaded and evaluated once; each config is then quantized, measured (weights layer
by layer, memory, perplexity, KL and top-1 agreement against the baseline's distributions) and
freed before the next, so peak memory is the baseline plus one quantized model plus the stored
baseline log-probs. Progress is reported through a callback and the run can be cancelled between
steps; the finished run is saved atomically so a page reload loses nothing.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
import psutil
import torch

from quantlib.apply import layer_errors, quantize_model
from quantlib.configs import QuantConfig, parse_config
from quantlib.corpus import builtin_text, load_text
from quantlib.errors import Cancelled
from quantlib.evaluation import compare_logits, reference_logprobs, tokenize_for_eval
from quantlib.memory import measure_footprint
from quantlib.models import LoadedModel, load_model
from quantlib.runs import Run, environment_info, new_run_id, now_iso, save_run
from quantlib.schemes import get_quantizer, resolve_device

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

TABLE_COLUMNS = ["scheme", "backend", "bits_per_param", "memory_mib", "perplexity", "kl", "top1_agreement",
                 "mean_layer_rel_error", "worst_layer_rel_error", "worst_layer", "seconds"]


@dataclass
class CompareSettings:
    """What to compare on: the model, the text, how many tokens, window and stride, device."""

    source: str = "default"
    text_path: str | None = None  # None: the built-in evaluation text
    max_tokens: int = 4096
    window: int = 1024
    stride: int | None = None
    device: str = "auto"
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ComparisonResult:
    """The summary table, the per-layer errors of every scheme, and the saved run."""

    table: pd.DataFrame
    layers: pd.DataFrame
    memory: dict[str, Any]
    run: Run
    path: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def estimate_seconds(n_params: int, n_tokens: int, n_configs: int, device: str) -> float:
    """Rough wall time of a comparison, shown before it starts (forward ≈ 2·params FLOPs/token).

    Effective throughput is a conservative figure for this kind of hardware: ~40 GFLOP/s on a
    2-core CPU, ~20 TFLOP/s on a GPU for small batches. Loading and layer errors add a few seconds
    per scheme.
    """
    flops_per_pass = 2.0 * n_params * n_tokens
    rate = 20e12 if device == "cuda" else 40e9
    return flops_per_pass * (1 + n_configs) / rate + 5.0 * n_configs + 3.0


def _reference_budget() -> int:
    """Keep baseline log-probs when they take at most a quarter of free RAM (and 2 GiB)."""
    return int(min(2 * 2**30, psutil.virtual_memory().available / 4))


def run_comparison(configs: Sequence[QuantConfig | dict | str], settings: CompareSettings | None = None, *,
                   progress: ProgressFn | None = None, cancel: CancelFn | None = None, save: bool = True,
                   base: LoadedModel | None = None, runs_folder: Any = None) -> ComparisonResult:
    """Run every config against the baseline; returns (and by default saves) one table."""
    settings = settings or CompareSettings()
    parsed = [parse_config(c) for c in configs]
    quantizers = [get_quantizer(c, device=settings.device) for c in parsed]  # fail before loading anything
    device, _ = resolve_device(settings.device)
    dtype = getattr(torch, settings.dtype)
    n_steps = 2 + 2 * len(parsed)
    step = [0]

    def report(fraction: float, message: str) -> None:
        if cancel is not None and cancel():
            raise Cancelled("comparison cancelled")
        if progress is not None:
            progress(min(1.0, (step[0] + fraction) / n_steps), message)

    started = time.perf_counter()
    if base is None:
        base = load_model(settings.source, dtype=dtype, device=device, progress=report)
    step[0] += 1
    text = load_text(settings.text_path) if settings.text_path else builtin_text("eval")
    ids = tokenize_for_eval(base.tokenizer, text, settings.max_tokens)
    ref = reference_logprobs(base.model, ids, window=settings.window, stride=settings.stride,
                             max_bytes=_reference_budget(), progress=report, cancel=cancel)
    step[0] += 1
    base_mem = measure_footprint(base.model)
    rows = [{"scheme": f"baseline {settings.dtype}", "backend": ref.perplexity.backend,
             "bits_per_param": float(torch.finfo(dtype).bits), "memory_mib": base_mem.total_bytes / 2**20,
             "perplexity": ref.perplexity.ppl, "kl": 0.0, "top1_agreement": 1.0, "mean_layer_rel_error": 0.0,
             "worst_layer_rel_error": 0.0, "worst_layer": "", "seconds": ref.perplexity.seconds}]
    layer_frames, memory, details = [], {"baseline": base_mem.to_dict()}, {}
    for config, quantizer in zip(parsed, quantizers):
        t0 = time.perf_counter()
        errors = layer_errors(base.model, quantizer, progress=report, cancel=cancel)
        errors.insert(0, "scheme", config.label)
        layer_frames.append(errors)
        qm = quantize_model(config, base=base, source=settings.source, device=device, dtype=dtype,
                            progress=report, cancel=cancel)
        step[0] += 1
        comparison = compare_logits(ref, qm.model, progress=report, cancel=cancel)
        step[0] += 1
        worst = errors.loc[errors["rel_fro_error"].idxmax()]
        rows.append({"scheme": config.label, "backend": f"{comparison.backend}" + (" (simulated)" if qm.simulated else ""),
                     "bits_per_param": qm.memory.quantized_bits_per_param, "memory_mib": qm.memory.total_bytes / 2**20,
                     "perplexity": comparison.quant_ppl, "kl": comparison.kl_mean,
                     "top1_agreement": comparison.top1_agreement,
                     "mean_layer_rel_error": float(errors["rel_fro_error"].mean()),
                     "worst_layer_rel_error": float(worst["rel_fro_error"]), "worst_layer": str(worst["layer"]),
                     "seconds": time.perf_counter() - t0})
        memory[config.label] = qm.memory.to_dict()
        details[config.label] = {"backend": qm.backend.to_dict(), "kl": comparison.to_dict()}
        del qm
        gc.collect()
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    layers = pd.concat(layer_frames, ignore_index=True) if layer_frames else pd.DataFrame()
    run = Run(run_id=new_run_id(), created=now_iso(), model=base.description.to_dict(),
              configs=[{**c.to_dict(), "label": c.label} for c in parsed],
              settings={**settings.to_dict(), "backend": ref.perplexity.backend, "n_tokens": int(ids.numel()),
                        "seconds": time.perf_counter() - started},
              environment=environment_info(), tables={"summary": table, "layers": layers},
              extra={"memory": memory, "details": details, "baseline": ref.perplexity.to_dict()})
    path = str(save_run(run, runs_folder)) if save else None
    return ComparisonResult(table, layers, memory, run, path, details)
