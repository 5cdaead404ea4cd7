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

from quantlib.layers import layer_errors
from quantlib.runtime import device_clock, objects_frozen, release_memory, trim_heap
from quantlib.configs import QuantConfig
from quantlib.registry import parse_config
from quantlib.corpus import builtin_text, load_text
from quantlib.errors import Cancelled
from quantlib.evaluation import perplexity_and_kl, tokenize_for_eval, window_logprobs
from quantlib.memory import plan_memory
from quantlib.footprint import measure_footprint
from quantlib.models import LoadedModel, load_model
from quantlib.runs import Run, environment_info, new_run_id, now_iso, save_run
from quantlib.statistics import statistic_row, table_columns
from quantlib.uncertainty import MIN_SETTLE_TOKENS, SETTLED_Z, paired_ranking
from quantlib.registry import get_quantizer, quantizer_class
from quantlib.methods.base.sharing import share_identical_tensors
from quantlib.runtime import resolve_device
from quantlib.callbacks import CancelFn, ProgressFn

KERNEL_CHOICES = ("auto", "library", "exact")
RANKING_COLUMNS = ["better", "worse", "difference", "se", "z", "separated"]



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
    #: Stop once the ranking by mean KL is settled (every adjacent pair >= SETTLED_Z paired SEs apart).
    until_settled: bool = False
    #: Read and write the baseline's final hidden states in the cache (quantlib.baseline_cache).
    baseline_cache: bool = True
    #: Library layers with an exact simulation: "library" runs the library's kernels; "exact" evaluates the exact
    #: simulation where it exists (CPU), cross-checked against the kernels in every run. "auto" is the simulation
    #: where the method sets `exact_simulation_by_default` (LLM.int8(): faster in the same memory) and the
    #: kernels elsewhere (bitsandbytes 4-bit: as fast, where the simulation would hold fp32 weights).
    kernels: str = "auto"
    #: Tokens on which the kernels and the exact simulation are compared, in every run that uses it.
    crosscheck_tokens: int = 128

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


def with_weights_only(configs: Sequence[QuantConfig | dict | str]) -> list[QuantConfig]:
    """`configs` with each one's "weights only" twin (`QuantConfig.weights_only`) right after it, where it has one."""
    from quantlib.registry import parse_config

    out: list[QuantConfig] = []
    for config in map(parse_config, configs):
        out.append(config)
        twin = config.weights_only()
        if twin is not None and twin not in out:
            out.append(twin)
    return out


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
                 budget: float, exact: bool = False) -> list[list[int]]:
    """Group configs so the models of each group fit in memory together.

    Each group costs one baseline pass over the text (its log-probs are compared with every model
    of the group window by window, never stored), so fewer groups are faster. A bitsandbytes model
    occupies its planned footprint; a simulated one (or an exact simulation of a library's kernels, `exact`)
    a full dequantized copy of the baseline.
    """
    batches: list[list[int]] = []
    used = 0.0
    for index, config in enumerate(configs):
        cls = quantizer_class(config)
        dequantized = cls.simulated or (exact and cls.has_exact_simulation)
        cost = base_bytes if dequantized else plan_memory(model_config, config, dtype).total_bytes
        if not batches or used + cost > budget:
            batches.append([])
            used = 0.0
        batches[-1].append(index)
        used += cost
    return batches


def _scheme_row(label: str, qm: Any, errors: pd.DataFrame, comparison: Any, quant_seconds: float,
                backend_note: str) -> dict[str, Any]:
    if len(errors) and "rel_fro_error" in errors:
        worst = errors.loc[errors["rel_fro_error"].idxmax()]
    else:  # a config that leaves every layer unquantized (e.g. a mix under a budget that holds the whole model)
        worst = pd.Series({"rel_fro_error": float("nan"), "layer": "none quantized"})
    return {"scheme": label, "backend": comparison.backend + backend_note,
            "bits_per_param": qm.memory.quantized_bits_per_param,
            "memory_mib": qm.memory.total_bytes / 2**20, "n_tokens": comparison.n_tokens,
            **statistic_row(comparison.figures),
            "mean_layer_rel_error": float(errors["rel_fro_error"].mean()) if len(errors) else float("nan"),
            "worst_layer_rel_error": float(worst["rel_fro_error"]), "worst_layer": str(worst["layer"]),
            "seconds": quant_seconds + comparison.seconds,
            "calibration_seconds": qm.calibration_seconds}


def _backend_note(qm: Any, exact: bool) -> str:
    if exact:
        return " (exact simulation)"
    return " (simulated)" if qm.simulated else ""


def settled_ranking(kl_tokens: dict[str, torch.Tensor]) -> tuple[pd.DataFrame, bool]:
    """The paired ranking by mean KL on the tokens every scheme saw (the common prefix: schemes are
    evaluated in text order, so a shorter series is a prefix of a longer one)."""
    if len(kl_tokens) < 2:  # nothing to rank
        return pd.DataFrame(columns=RANKING_COLUMNS), False
    n = min(int(v.numel()) for v in kl_tokens.values())
    pairs, settled = paired_ranking({k: v[:n] for k, v in kl_tokens.items()})
    return pd.DataFrame(pairs, columns=RANKING_COLUMNS), settled and n >= MIN_SETTLE_TOKENS


def _crosscheck(quantizer: Any, model: Any, ids: torch.Tensor, tokens: int) -> dict[str, Any]:
    """Run the library's kernels and then the exact simulation (swapped in, in place) on the first
    `tokens` tokens; record how far apart their log-probs are. Every exact number links to the library."""
    n = max(1, min(int(tokens), int(ids.numel())))
    t0 = time.perf_counter()
    kernel = window_logprobs(model, ids[:n])
    t_kernel = time.perf_counter() - t0
    swapped = quantizer.to_exact_simulation(model)
    t0 = time.perf_counter()
    exact = window_logprobs(model, ids[:n])
    t_exact = time.perf_counter() - t0
    diff = (kernel - exact).abs()
    return {"tokens": n, "layers_swapped": swapped, "identical": bool(torch.equal(kernel, exact)),
            "max_abs_logprob_diff": float(diff.max()),
            "top1_agreement": float((kernel.argmax(-1) == exact.argmax(-1)).double().mean()),
            "kl_mean": float((kernel.exp() * (kernel - exact)).sum(-1).clamp_min(0).double().mean()),
            "kernel_seconds": t_kernel, "simulation_seconds": t_exact}


def run_comparison(configs: Sequence[QuantConfig | dict | str], settings: CompareSettings | None = None, *,
                   progress: ProgressFn | None = None, cancel: CancelFn | None = None, save: bool = True,
                   base: LoadedModel | None = None, runs_folder: Any = None,
                   on_update: Callable[[ComparisonResult], None] | None = None,
                   keep_partial: bool = False) -> ComparisonResult:
    """Run every config against the baseline; returns (and by default saves) one table.

    Streaming: `on_update` receives an unsaved partial result after every evaluated window (table,
    ranking and run with `extra["partial"]`). `settings.until_settled` stops once the ranking by mean
    KL is settled (at least `MIN_SETTLE_TOKENS` tokens). With `keep_partial`, `cancel()` during the
    evaluation ends the run with what was computed, saved and marked partial with its token count,
    instead of raising `Cancelled`. The objects alive before the run are frozen for the garbage collector
    meanwhile (`objects_frozen`): each model dropped during the run costs a collection of its own objects only.
    """
    with objects_frozen():
        return _run_comparison(configs, settings, progress=progress, cancel=cancel, save=save, base=base,
                               runs_folder=runs_folder, on_update=on_update, keep_partial=keep_partial)


def _run_comparison(configs: Sequence[QuantConfig | dict | str], settings: CompareSettings | None, *,
                    progress: ProgressFn | None, cancel: CancelFn | None, save: bool, base: LoadedModel | None,
                    runs_folder: Any, on_update: Callable[[ComparisonResult], None] | None,
                    keep_partial: bool) -> ComparisonResult:
    settings = settings or CompareSettings()
    if settings.kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels: got {settings.kernels!r}; allowed: {', '.join(KERNEL_CHOICES)}")
    parsed = [parse_config(c) for c in configs]
    labels = unique_labels(parsed)
    device, _ = resolve_device(settings.device)
    quantizers = [get_quantizer(c, device=device) for c in parsed]  # fail before loading anything
    dtype = getattr(torch, settings.dtype)
    n_steps = 2 + 2 * len(parsed)
    step = [0]

    def report(fraction: float, message: str) -> None:
        if cancel is not None and cancel():
            raise Cancelled("comparison cancelled")
        if progress is not None:
            progress(min(1.0, (step[0] + fraction) / n_steps), message)

    started = time.perf_counter()
    # seconds by phase, for the run's record and the benchmark (`phase_table`); forwards and output head come
    # from the evaluation, bookkeeping is the rest
    phases = {"load": 0.0, "quantize": 0.0, "crosscheck": 0.0, "errors": 0.0, "forwards": 0.0, "output_head": 0.0}
    if base is None:
        base = load_model(settings.source, dtype=dtype, device=device, trust_remote_code=settings.trust_remote_code,
                          allow_pickle=settings.allow_pickle, progress=report)
        phases["load"] = device_clock() - started
    step[0] += 1
    text = load_text(settings.text_path) if settings.text_path else builtin_text("eval")
    ids = tokenize_for_eval(base.tokenizer, text, settings.max_tokens)
    base_mem = measure_footprint(base.model)
    batches = plan_batches(parsed, base.model.config.to_dict(), base_mem.total_bytes, settings.dtype,
                           _resident_budget(device),
                           exact=settings.kernels == "exact")
    done: dict[str, dict[str, Any]] = {}  # label -> row, errors, memory, details, kl tokens
    environment = environment_info()  # once: partial results are assembled after every window
    notes: list[str] = []
    baseline: Any = None
    eval_info: dict[str, Any] = {}
    stop_reason = ""
    if settings.until_settled and len(batches) > 1:
        notes.append(f"--until-settled needs every scheme in memory at once; these {len(parsed)} schemes took "
                     f"{len(batches)} evaluation passes, so the run went on to the end of the text")

    def assemble(current: dict[str, Any], evaluation: Any, partial: bool) -> ComparisonResult:
        entries = dict(done)
        if evaluation is not None:
            for label, (config, qm, errors, quant_seconds, exact, crosscheck) in current.items():
                entries[label] = _entry(label, qm, errors, quant_seconds, exact, crosscheck,
                                        evaluation.comparison[label])
        base_result = baseline if evaluation is None else evaluation.base
        return _assemble(entries, labels, parsed, settings, dtype, base_mem, base_result, base, ids, batches,
                         started, notes, eval_info, stop_reason, partial, environment)

    def _run_batch(batch: list[int], quantized: dict[str, tuple[Any, ...]]) -> Any:
        for index in batch:
            config, quantizer, label = parsed[index], quantizers[index], labels[index]
            t0 = device_clock()
            # the quantizer built (and checked) before anything was loaded: one per config per run
            if quantizer.calibrated:  # layers come from the calibrated model
                qm = quantizer.quantize_model(source=settings.source, dtype=dtype,
                                              trust_remote_code=settings.trust_remote_code, progress=report,
                                              cancel=cancel, calibration=settings.calibration)
            else:
                qm = quantizer.quantize_model(base=base, source=settings.source, dtype=dtype,
                                              trust_remote_code=settings.trust_remote_code,
                                              allow_pickle=settings.allow_pickle, progress=report, cancel=cancel)
            exact, crosscheck = False, None
            t_quantized = device_clock()
            phases["quantize"] += t_quantized - t0
            wants_exact = settings.kernels == "exact" or (settings.kernels == "auto"
                                                          and quantizer.exact_simulation_by_default)
            if not qm.simulated and wants_exact:
                problem = quantizer.exact_simulation_problem(qm.model)
                if problem is None:
                    report(0.9, f"{label}: cross-checking the exact simulation against the library's kernels")
                    crosscheck = _crosscheck(quantizer, qm.model, ids, settings.crosscheck_tokens)
                    crosscheck["shared_bytes"] = share_identical_tensors(qm.model, base.model)
                    exact = True
                elif settings.kernels == "exact":
                    notes.append(f"{label} ran on its library's kernels: {problem}")
            qm.kernel_paths = quantizer.kernel_paths(qm.model)  # once, as evaluated (the swap above included)
            t_errors = device_clock()
            phases["crosscheck"] += t_errors - t_quantized
            if not qm.simulated and not exact:  # loaded from disk: its embeddings and norms equal the baseline's
                share_identical_tensors(qm.model, base.model)
            # Every model gives its layers' stored tensors (calibrated checkpoints, bitsandbytes' layers, the packed
            # tensors simulation kept): no weight is quantized twice.
            errors = layer_errors(base.model, quantizer, progress=report, cancel=cancel, quantized=qm)
            phases["errors"] += device_clock() - t_errors
            qm.release_packed()  # read: the packed copies would otherwise stay resident for the whole run
            trim_heap()  # quantizing and the layer errors free ~1 GB of per-layer copies: give the pages back
            errors.insert(0, "scheme", label)
            quantized[label] = (config, qm, errors, time.perf_counter() - t0, exact, crosscheck)
            step[0] += 1

        def update(partial_eval: Any) -> None:
            if on_update is not None and not partial_eval.complete:
                on_update(assemble(quantized, partial_eval, True))

        def stop(partial_eval: Any) -> bool:
            if not settings.until_settled or len(batches) > 1:
                return False
            return settled_ranking({k: c.kl_tokens for k, c in partial_eval.comparison.items()})[1]

        # One pass over the text: each window's baseline log-probs are computed once (or read from the
        # cached hidden states) and compared with every resident model.
        return perplexity_and_kl(base.model, {label: q[1].model for label, q in quantized.items()},
                                 evaluated_ids, window=settings.window, stride=settings.stride,
                                 progress=report, cancel=cancel, on_update=update, stop=stop,
                                 keep_partial=keep_partial, baseline_cache=settings.baseline_cache)

    evaluated_ids = ids
    for batch in batches:
        quantized: dict[str, tuple[Any, ...]] = {}
        try:
            evaluation = _run_batch(batch, quantized)
        except Cancelled:
            if not keep_partial or not done:
                raise
            stop_reason = "cancelled"  # this batch never reached its first window: keep the finished ones
            break
        step[0] += len(batch)
        baseline = baseline or evaluation.base
        eval_info.setdefault("baseline_source", evaluation.baseline_source)
        eval_info.setdefault("baseline_cache_note", evaluation.baseline_cache_note)
        eval_info.setdefault("output_head", {}).update(evaluation.output_head)
        for phase, seconds in evaluation.phase_seconds.items():
            phases[phase] += seconds
        for label, (config, qm, errors, quant_seconds, exact, crosscheck) in quantized.items():
            done[label] = _entry(label, qm, errors, quant_seconds, exact, crosscheck, evaluation.comparison[label])
        quantized.clear()
        release_memory()
        if evaluation.stop_reason:
            stop_reason = "settled" if evaluation.stop_reason == "stopped" else evaluation.stop_reason
            if stop_reason == "cancelled":
                break
            evaluated_ids = ids[:evaluation.base.n_tokens]  # later batches: the same tokens
    total = device_clock() - started
    eval_info["phase_seconds"] = {**phases, "bookkeeping": max(0.0, total - sum(phases.values())), "total": total}
    result = assemble({}, None, bool(stop_reason) or len(done) < len(parsed))
    if save:
        result.path = str(save_run(result.run, runs_folder))
    return result


def _entry(label: str, qm: Any, errors: pd.DataFrame, quant_seconds: float, exact: bool, crosscheck: Any,
           comparison: Any) -> dict[str, Any]:
    detail = {"backend": qm.backend.to_dict(), "kl": comparison.to_dict(), "quantize_seconds": quant_seconds,
              "kernel_path": list(qm.kernel_paths),
              "evaluated_with": ("exact simulation of the library's kernels" if exact else
                                 "quantize→dequantize simulation" if qm.simulated else "the library's kernels")}
    if crosscheck is not None:
        detail["crosscheck"] = crosscheck
    return {"row": _scheme_row(label, qm, errors, comparison, quant_seconds, _backend_note(qm, exact)),
            "errors": errors, "memory": qm.memory.to_dict(), "details": detail, "kl_tokens": comparison.kl_tokens}


def _assemble(entries: dict[str, dict[str, Any]], labels: list[str], parsed: list[QuantConfig],
              settings: CompareSettings, dtype: torch.dtype, base_mem: Any, baseline: Any, base: LoadedModel,
              ids: torch.Tensor, batches: list[list[int]], started: float, notes: list[str],
              eval_info: dict[str, Any], stop_reason: str, partial: bool,
              environment: dict[str, Any]) -> ComparisonResult:
    order = {label: i for i, label in enumerate(labels)}
    present = sorted(entries, key=order.get)
    rows = [entries[label]["row"] for label in present]
    n_tokens = baseline.n_tokens if baseline is not None else 0
    rows.insert(0, {"scheme": f"baseline {settings.dtype}",
                    "backend": (baseline.backend if baseline is not None else "")
                    + (" (cached states)" if eval_info.get("baseline_source") == "cache" else ""),
                    "bits_per_param": float(torch.finfo(dtype).bits), "memory_mib": base_mem.total_bytes / 2**20,
                    "n_tokens": n_tokens, **statistic_row(baseline.figures if baseline is not None else {}),
                    "mean_layer_rel_error": 0.0,
                    "worst_layer_rel_error": 0.0, "worst_layer": "",
                    "seconds": baseline.seconds if baseline is not None else 0.0, "calibration_seconds": 0.0})
    table = pd.DataFrame(rows, columns=table_columns())  # each declared in quantlib.statistics
    frames = [entries[label]["errors"] for label in present]
    layers = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    ranking, settled = settled_ranking({label: entries[label]["kl_tokens"] for label in present})
    run = Run(run_id=new_run_id(), created=now_iso(), model=base.description.to_dict(),
              configs=[{**c.to_dict(), "label": label} for c, label in zip(parsed, labels)],
              settings={**settings.to_dict(), "backend": baseline.backend if baseline is not None else "",
                        "n_tokens": n_tokens, "tokens_planned": int(ids.numel()),
                        "baseline_passes": len(batches), "seconds": time.perf_counter() - started},
              environment=environment, tables={"summary": table, "layers": layers, "ranking": ranking},
              status="partial" if partial else "complete",
              extra={"memory": {"baseline": base_mem.to_dict(), **{k: entries[k]["memory"] for k in present}},
                     "details": {k: entries[k]["details"] for k in present},
                     "baseline": baseline.to_dict() if baseline is not None else {},
                     "ranking_settled": settled, "settled_z": SETTLED_Z, "min_settle_tokens": MIN_SETTLE_TOKENS,
                     "partial": partial, "stop_reason": stop_reason, "notes": list(notes),
                     "schemes_missing": [label for label in labels if label not in entries], **eval_info})
    return ComparisonResult(table, layers, run.extra["memory"], run, None, run.extra["details"])
