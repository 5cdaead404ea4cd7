"""Compare schemes: several configs against one unquantized baseline, in one table.

The baseline is loaded and evaluated once; each config is then quantized, measured (weights layer
by layer, memory, perplexity, KL and top-1 agreement against the baseline's distributions) and
freed before the next, so peak memory is the baseline plus one quantized model plus the stored
baseline log-probs. Progress is reported through a callback and the run can be cancelled between
steps; the finished run is saved atomically so a page reload loses nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
import psutil
import torch

from quantlib.apply import layer_errors, quantize_model, release_memory
from quantlib.configs import QuantConfig, parse_config
from quantlib.corpus import builtin_text, load_text
from quantlib.errors import Cancelled
from quantlib.evaluation import perplexity_and_kl, tokenize_for_eval
from quantlib.memory import measure_footprint, plan_memory
from quantlib.models import LoadedModel, load_model
from quantlib.runs import Run, environment_info, new_run_id, now_iso, save_run
from quantlib.uncertainty import SETTLED_Z, paired_ranking
from quantlib.methods import get_quantizer, quantizer_class
from quantlib.runtime import resolve_device

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

TABLE_COLUMNS = ["scheme", "backend", "bits_per_param", "memory_mib", "perplexity", "perplexity_se", "kl", "kl_se",
                 "top1_agreement", "top1_se", "ln_ppl_ratio", "ln_ppl_ratio_se", "dp_mean", "dp_rms",
                 "mean_layer_rel_error", "worst_layer_rel_error", "worst_layer", "seconds", "calibration_seconds"]


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
    trust_remote_code: bool = False  # off unless the user turns it on
    allow_pickle: bool = False  # pickle-only checkpoints are refused unless allowed
    calibration: Any = None  # GPTQ/AWQ: the method's calibration settings, e.g. quantlib.methods._gptqmodel.CalibrationSettings (None: 128 x 512 tokens)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        if data.get("calibration") is not None:
            data["calibration"] = data["calibration"].to_dict()
        return data


@dataclass
class ComparisonResult:
    """The summary table, the per-layer errors of every scheme, and the saved run."""

    table: pd.DataFrame
    layers: pd.DataFrame
    memory: dict[str, Any]
    run: Run
    path: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def estimate_seconds(n_params: int, n_tokens: int, configs: Sequence[QuantConfig | dict], device: str,
                     calibration_tokens: int = 128 * 512) -> float:
    """Rough wall time of a comparison, shown before it starts.

    A forward pass costs about 2·params FLOPs per token; the effective rates (~25 GFLOP/s on a
    2-core CPU, ~20 TFLOP/s on a GPU for small batches) were measured with
    `benchmarks/bench_compare.py`, and each method states its CPU evaluation slowdown
    (`Quantizer.cpu_eval_slowdown`) and calibration time (`Quantizer.calibration_seconds`, divided by
    20 on a GPU). Loading, quantizing and layer errors add about one second per 20M parameters per
    scheme.
    """
    rate = 20e12 if device == "cuda" else 25e9
    one_pass = 2.0 * n_params * n_tokens / rate
    total = one_pass  # the baseline
    for config in map(parse_config, configs):
        cls = quantizer_class(config)
        slowdown = 1.0 if device == "cuda" else cls.cpu_eval_slowdown
        total += one_pass * slowdown + n_params / 20e6
        total += cls.calibration_seconds(config, n_params, calibration_tokens) / (20.0 if device == "cuda" else 1.0)
    return total + 3.0


def unique_labels(configs: Sequence[QuantConfig]) -> list[str]:
    """Table labels, numbered where two configs would otherwise share one (e.g. the same preset twice)."""
    seen: dict[str, int] = {}
    labels = []
    for config in configs:
        seen[config.label] = seen.get(config.label, 0) + 1
        labels.append(config.label if seen[config.label] == 1 else f"{config.label} #{seen[config.label]}")
    return labels


def _resident_budget(device: str) -> float:
    """Bytes the quantized models of one evaluation pass may occupy together: half of what is free."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free / 2
    return psutil.virtual_memory().available / 2


def plan_batches(configs: Sequence[QuantConfig], model_config: dict[str, Any], base_bytes: float, dtype: str,
                 budget: float) -> list[list[int]]:
    """Group configs so the models of each group fit in memory together.

    Each group costs one baseline pass over the text (its log-probs are compared with every model
    of the group window by window, never stored), so fewer groups are faster. A bitsandbytes model
    occupies its planned footprint; a simulated one a full dequantized copy of the baseline.
    """
    batches: list[list[int]] = []
    used = 0.0
    for index, config in enumerate(configs):
        simulated = quantizer_class(config).simulated
        cost = base_bytes if simulated else plan_memory(model_config, config, dtype).total_bytes
        if not batches or used + cost > budget:
            batches.append([])
            used = 0.0
        batches[-1].append(index)
        used += cost
    return batches


def run_comparison(configs: Sequence[QuantConfig | dict | str], settings: CompareSettings | None = None, *,
                   progress: ProgressFn | None = None, cancel: CancelFn | None = None, save: bool = True,
                   base: LoadedModel | None = None, runs_folder: Any = None) -> ComparisonResult:
    """Run every config against the baseline; returns (and by default saves) one table."""
    settings = settings or CompareSettings()
    parsed = [parse_config(c) for c in configs]
    labels = unique_labels(parsed)
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
        base = load_model(settings.source, dtype=dtype, device=device, trust_remote_code=settings.trust_remote_code,
                          allow_pickle=settings.allow_pickle, progress=report)
    step[0] += 1
    text = load_text(settings.text_path) if settings.text_path else builtin_text("eval")
    ids = tokenize_for_eval(base.tokenizer, text, settings.max_tokens)
    base_mem = measure_footprint(base.model)
    batches = plan_batches(parsed, base.model.config.to_dict(), base_mem.total_bytes, settings.dtype,
                           _resident_budget(device))
    rows: list[dict[str, Any]] = []
    layer_frames, memory, details = [], {"baseline": base_mem.to_dict()}, {}
    kl_tokens: dict[str, torch.Tensor] = {}
    baseline: Any = None
    for batch in batches:
        quantized: dict[str, tuple[QuantConfig, Any, pd.DataFrame, float]] = {}
        for index in batch:
            config, quantizer, label = parsed[index], quantizers[index], labels[index]
            t0 = time.perf_counter()
            if quantizer.calibrated:  # layers come from the calibrated model
                qm = quantize_model(config, source=settings.source, device=device, dtype=dtype,
                                    trust_remote_code=settings.trust_remote_code, progress=report, cancel=cancel,
                                    calibration=settings.calibration)
                errors = layer_errors(base.model, quantizer, progress=report, cancel=cancel, quantized=qm)
            else:
                errors = layer_errors(base.model, quantizer, progress=report, cancel=cancel)
                qm = quantize_model(config, base=base, source=settings.source, device=device, dtype=dtype,
                                    trust_remote_code=settings.trust_remote_code, allow_pickle=settings.allow_pickle,
                                    progress=report, cancel=cancel)
            errors.insert(0, "scheme", label)
            quantized[label] = (config, qm, errors, time.perf_counter() - t0)
            step[0] += 1
        # One pass over the text: each window's baseline log-probs are computed once and compared
        # with every resident model, so no baseline distribution is ever stored.
        evaluation = perplexity_and_kl(base.model, {label: q[1].model for label, q in quantized.items()}, ids,
                                       window=settings.window, stride=settings.stride, progress=report,
                                       cancel=cancel)
        step[0] += len(batch)
        baseline = baseline or evaluation.base
        for label, (config, qm, errors, quant_seconds) in quantized.items():
            comparison = evaluation.comparison[label]
            worst = errors.loc[errors["rel_fro_error"].idxmax()]
            rows.append({"scheme": label,
                         "backend": comparison.backend + (" (simulated)" if qm.simulated else ""),
                         "bits_per_param": qm.memory.quantized_bits_per_param,
                         "memory_mib": qm.memory.total_bytes / 2**20, "perplexity": comparison.quant_ppl,
                         "perplexity_se": comparison.quant_ppl_se, "kl": comparison.kl_mean,
                         "kl_se": comparison.kl_se, "top1_agreement": comparison.top1_agreement,
                         "top1_se": comparison.top1_se, "ln_ppl_ratio": comparison.ln_ppl_ratio,
                         "ln_ppl_ratio_se": comparison.ln_ppl_ratio_se, "dp_mean": comparison.dp_mean,
                         "dp_rms": comparison.dp_rms,
                         "mean_layer_rel_error": float(errors["rel_fro_error"].mean()),
                         "worst_layer_rel_error": float(worst["rel_fro_error"]), "worst_layer": str(worst["layer"]),
                         "seconds": quant_seconds + comparison.seconds,
                         "calibration_seconds": qm.calibration_seconds})
            layer_frames.append(errors)
            memory[label] = qm.memory.to_dict()
            kl_tokens[label] = comparison.kl_tokens
            details[label] = {"backend": qm.backend.to_dict(), "kl": comparison.to_dict(),
                              "quantize_seconds": quant_seconds}
        quantized.clear()
        release_memory()
    order = {label: i for i, label in enumerate(labels)}
    rows.sort(key=lambda r: order[r["scheme"]])
    rows.insert(0, {"scheme": f"baseline {settings.dtype}", "backend": baseline.backend,
                    "bits_per_param": float(torch.finfo(dtype).bits), "memory_mib": base_mem.total_bytes / 2**20,
                    "perplexity": baseline.ppl, "perplexity_se": baseline.ppl_se, "kl": 0.0, "kl_se": 0.0,
                    "top1_agreement": 1.0, "top1_se": 0.0, "ln_ppl_ratio": 0.0, "ln_ppl_ratio_se": 0.0,
                    "dp_mean": 0.0, "dp_rms": 0.0, "mean_layer_rel_error": 0.0,
                    "worst_layer_rel_error": 0.0, "worst_layer": "", "seconds": baseline.seconds,
                    "calibration_seconds": 0.0})
    layer_frames.sort(key=lambda f: order[f["scheme"].iloc[0]] if len(f) else 0)
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    layers = pd.concat(layer_frames, ignore_index=True) if layer_frames else pd.DataFrame()
    # Every scheme saw the same tokens (one tokenisation; batches only split the baseline passes).
    pairs, settled = paired_ranking(kl_tokens)
    ranking = pd.DataFrame(pairs, columns=["better", "worse", "difference", "se", "z", "separated"])
    run = Run(run_id=new_run_id(), created=now_iso(), model=base.description.to_dict(),
              configs=[{**c.to_dict(), "label": label} for c, label in zip(parsed, labels)],
              settings={**settings.to_dict(), "backend": baseline.backend, "n_tokens": int(ids.numel()),
                        "baseline_passes": len(batches), "seconds": time.perf_counter() - started},
              environment=environment_info(), tables={"summary": table, "layers": layers, "ranking": ranking},
              extra={"memory": memory, "details": details, "baseline": baseline.to_dict(),
                     "ranking_settled": settled, "settled_z": SETTLED_Z})
    path = str(save_run(run, runs_folder)) if save else None
    return ComparisonResult(table, layers, memory, run, path, details)
