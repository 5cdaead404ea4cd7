"""Recommend a per-layer mix under a memory budget: measure, optimize, export, verify.

1. **Sensitivity** (`measure_sensitivity`). Every quantizable layer's inputs are captured on calibration
   text (the built-in corpus' "calib" half, disjoint from the evaluation text). For every setting a method's
   config can give a layer (`Quantizer.mix_spaces`), the layer is quantized with the method's own tensor
   path and its output recomputed from the captured inputs (`Quantizer.layer_output`, so LLM.int8()'s
   activation quantization counts). Two errors are recorded: the relative output error power
   ``||dY||^2 / ||Y||^2``, and the predicted increase of the mean KL per token, ``0.5 * sum_t (g_t . dY_t)^2``
   with g the gradient of the log-likelihood of next tokens sampled from the model itself (the Fisher
   information of the output distribution, `_output_scores`); the optimizer sums the second by default. On a
   handful of layers both are checked against the end-to-end KL of quantizing that layer alone, and their rank
   correlations (Spearman) are reported with the recommendation. Results are cached per model fingerprint,
   calibration tokens and the settings measured.
2. **Optimization** (`recommend`). One choice per group (the unit the exported config can address: a
   module for bitsandbytes, a linear tag for HQQ) minimizing the summed proxy with the total size at most
   the budget, sizes from the planner's per-layer storage so the predicted total is exact (checked against
   `plan_memory` of the built config). Method: the Lagrangian relaxation solved exactly on each group's lower
   convex hull of (bytes, error), i.e. greedy by error saved per byte along the hulls, then greedy fill and
   single-move refinement with what is left. The LP relaxation's value at the budget is a lower bound on the
   optimum, reported with the gap.
3. **Export**: the built config is a normal quantlib config: `to_dict()` is what transformers' class loads.
4. **Verification** (`verify`): the mix and the uniform settings are quantized and evaluated by
   `quantlib.compare.run_comparison`, and the mix is judged against the uniform points around it.

No method is named here: everything method-specific comes from the quantizer classes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from quantlib.configs import QuantConfig
from quantlib.errors import Cancelled, QuantlibError
from quantlib.methods.base.records import MixChoice, MixSpace
from quantlib.registry import QUANTIZER_MAPPING, get_quantizer
from quantlib.shapes import ModelShapes, describe_model
from quantlib.callbacks import CancelFn, ProgressFn


GIB = 1024 ** 3
#: Calibration tokens whose layer inputs are captured (one window).
CALIB_TOKENS = 512
#: Layers whose proxy is checked against end-to-end KL, and the evaluation tokens of that check.
CHECK_LAYERS = 6
CHECK_TOKENS = 512
#: The error a setting causes in a layer, as the optimizer sums it: "fisher" (the predicted increase of the mean
#: KL per token, from the output's Fisher information; additive over layers to second order) or "relative"
#: (the relative output error power ||dY||^2/||Y||^2, exllamav2's kind of measure). Both are always recorded.
PROXIES = ("fisher", "relative")
#: Sampled next tokens per calibration token for the Fisher estimate.
SCORE_SAMPLES = 1
#: Calibration tokens of each config a verification quantizes, for families that calibrate (GPTQ): 8 windows of
#: 512 (the library default, 128 x 512, takes about 14 minutes per config for the default model on this CPU).
VERIFY_CALIB_TOKENS = 4096
#: Bump when the measurement changes, so cached sensitivities are not reused across versions.
MEASURE_VERSION = 3


class RecommendError(QuantlibError, ValueError):
    """A recommendation that cannot be made: unknown family, infeasible budget, unsupported model."""


# --------------------------------------------------------------------------------------------
# Families: methods whose config can express a per-layer mix
# --------------------------------------------------------------------------------------------


def families() -> dict[str, type]:
    """quant_method -> quantizer class, for every registered method with a per-layer mix (registry order)."""
    from quantlib.methods.base import Quantizer

    out: dict[str, type] = {}
    for cls in QUANTIZER_MAPPING.values():
        method = cls.config_class.quant_method
        if method not in out and cls.mix_spaces.__func__ is not Quantizer.mix_spaces.__func__:
            out[method] = cls
    return out


def family_class(family: str) -> type:
    found = families()
    if family not in found:
        others = {cls.config_class.quant_method: cls for cls in QUANTIZER_MAPPING.values()}
        why = f" ({others[family].mix_problem()})" if family in others else ""
        raise RecommendError(f"method: {family!r} has no per-layer mix{why}; allowed: {', '.join(found)}")
    return found[family]


# --------------------------------------------------------------------------------------------
# Sensitivity
# --------------------------------------------------------------------------------------------


@dataclass
class Sensitivity:
    """Per layer and per setting: the proxy error and the planned bytes, plus the proxy's check."""

    family: str
    dtype: str
    fingerprint: str
    calib_tokens: int
    #: one row per (layer, choice): layer, group, block, role, params, choice, bits, bytes, error
    rows: pd.DataFrame
    fixed_bytes: float  # what the planner counts outside the mixed layers (embeddings, norms, buffers...)
    n_params: int
    check: dict[str, Any] = field(default_factory=dict)  # pairs (layer, choice, proxy, kl), spearman
    seconds: float = 0.0
    source: str = "measured"  # or "cache"
    notes: list[str] = field(default_factory=list)
    proxy: str = "fisher"  # which error `rows["error"]` holds (PROXIES)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "dtype": self.dtype, "fingerprint": self.fingerprint, "proxy": self.proxy,
                "calib_tokens": self.calib_tokens, "rows": self.rows.to_dict(orient="list"),
                "fixed_bytes": self.fixed_bytes, "n_params": self.n_params, "check": self.check,
                "seconds": self.seconds, "notes": self.notes, "version": MEASURE_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Sensitivity":
        return cls(data["family"], data["dtype"], data["fingerprint"], int(data["calib_tokens"]),
                   pd.DataFrame(data["rows"]), float(data["fixed_bytes"]), int(data["n_params"]), data["check"],
                   float(data["seconds"]), "cache", list(data.get("notes", [])), data.get("proxy", "fisher"))


def _block_of(module: str) -> int:
    """The decoder block a module belongs to (the first integer in its name), -1 where none."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return -1


def _choices(spaces: Sequence[MixSpace]) -> dict[str, MixChoice]:
    """Every quantizing choice of the family, by key (a key names one setting across spaces)."""
    out: dict[str, MixChoice] = {}
    for space in spaces:
        for c in space.choices:
            if c.config is not None:
                known = out.get(c.key)
                if known is not None and known.config.to_dict() != c.config.to_dict():
                    raise AssertionError(f"mix choice {c.key!r} names two settings")
                out[c.key] = c
    return out


def _cache_path(key: str) -> Path:
    from quantlib.models import cache_dir

    return cache_dir() / "sensitivity" / f"{key}.json"


def _cache_key(family: str, fingerprint: str, dtype: str, calib_tokens: int, check_layers: int,
               check_tokens: int, choices: dict[str, MixChoice], proxy: str, samples: int,
               device: str = "cpu") -> str:
    """The measurement's identity. A measurement made off the CPU (its own sampled tokens, its own kernels) has
    another key; a CPU one keeps the key it always had, so earlier CPU caches stay valid."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"v": MEASURE_VERSION, "family": family, "model": fingerprint, "dtype": dtype,
                         "calib": calib_tokens, "check": [check_layers, check_tokens],
                         "proxy": proxy, "samples": samples,
                         "choices": {k: c.config.to_dict() for k, c in sorted(choices.items())},
                         **({} if device == "cpu" else {"device": device})},
                        sort_keys=True).encode())
    return h.hexdigest()


def _capture_inputs(model: torch.nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass over `ids`; the input rows (tokens x in, fp32) of every named module. Modules fed the
    same tensor (q/k/v, gate/up) share one stored copy."""
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    by_source: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (the input, kept alive; its copy)
    handles = []

    def hook(name: str) -> Callable:
        def pre(_module: Any, args: tuple) -> None:
            x = args[0]
            known = by_source.get(id(x))
            if known is None or known[0] is not x:
                known = by_source[id(x)] = (x, x.detach().reshape(-1, x.shape[-1]).float().clone())
            captured[name] = known[1]
        return pre

    for name in names:
        handles.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        with torch.inference_mode():
            model(ids.reshape(1, -1).to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        by_source.clear()
    missing = [n for n in names if n not in captured]
    if missing:
        raise RecommendError(f"no input reached {', '.join(missing[:3])} in a forward pass: cannot measure it")
    return captured


def _output_scores(model: torch.nn.Module, names: list[str], ids: torch.Tensor, samples: int,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Per named module, the gradient of ``sum_t log p(y_t)`` with respect to its output rows (tokens x out),
    for next tokens y_t drawn from the model's own distribution (`samples` draws, stacked on a first axis).

    For a perturbation dY of one layer's output, ``0.5 * sum_t (G_t . dY_t)^2`` is an unbiased estimate of the
    second-order term of the summed KL(base || perturbed) over the tokens, within each token's row (the
    Fisher information of the output distribution; cross-token terms are dropped), since the score of each
    sampled token has zero mean. Parameters are not given gradients."""
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []

    def hook(name: str) -> Callable:
        def post(_module: Any, _args: tuple, out: torch.Tensor) -> None:
            if not out.requires_grad:
                out.requires_grad_(True)
            outputs[name] = out
        return post

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for name in names:
        handles.append(modules[name].register_forward_hook(hook(name)))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)  # the draws happen where the logits are
    try:
        with torch.inference_mode(False), torch.enable_grad():
            logits = model(ids.reshape(1, -1).to(device)).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            probs = logp.detach().exp()
            targets = [t for t in outputs.values()]
            for i in range(samples):
                y = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                total = logp.gather(-1, y.unsqueeze(-1)).sum()
                got = torch.autograd.grad(total, targets, retain_graph=i < samples - 1)
                for name, g in zip(outputs, got):
                    grads[name].append(g.reshape(-1, g.shape[-1]).float())
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return {n: torch.stack(g) for n, g in grads.items()}


def _rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho (pandas ranks, ties averaged); NaN with fewer than 3 points."""
    if len(a) < 3:
        return float("nan")
    return float(pd.Series(list(a)).corr(pd.Series(list(b)), method="spearman"))


def _check_layers(layers: list[str], k: int) -> list[str]:
    """`k` layers spread over depth and roles (every ~n/k-th in model order, first and last included)."""
    if k <= 0 or not layers:
        return []
    if k >= len(layers):
        return list(layers)
    step = (len(layers) - 1) / (k - 1) if k > 1 else 0
    return [layers[round(i * step)] for i in range(k)]


@torch.no_grad()
def _proxy_check(model: torch.nn.Module, packed_layers: dict[tuple[str, str], Any], quantizers: dict[str, Any],
                 pairs: list[tuple[str, str]], errors: dict[tuple[str, str], tuple[float, float]], ids: torch.Tensor,
                 report: Callable[[float, str], None]) -> dict[str, Any]:
    """End-to-end mean KL(base || quantized) with one layer quantized at a time (the layer's output replaced
    by the method's `layer_output`, so the base model is never modified), against the proxy."""
    from quantlib.evaluation import window_logprobs

    modules = dict(model.named_modules())
    base_lp = window_logprobs(model, ids)
    p = base_lp.exp()
    rows = []
    for i, (layer, key) in enumerate(pairs):
        report(i / max(len(pairs), 1), f"proxy check: {layer} at {key} ({i + 1}/{len(pairs)})")
        module = modules[layer]
        packed, q = packed_layers[(layer, key)], quantizers[key]

        def replace(mod: Any, args: tuple, output: torch.Tensor, packed: Any = packed, q: Any = q) -> torch.Tensor:
            x = args[0]
            out = q.layer_output(x.reshape(-1, x.shape[-1]).float(), packed).to(output.dtype)
            if getattr(mod, "bias", None) is not None:
                out = out + mod.bias
            return out.reshape(output.shape)

        handle = module.register_forward_hook(replace)
        try:
            lp = window_logprobs(model, ids)
        finally:
            handle.remove()
        kl = float((p * (base_lp - lp)).sum(-1).mean())
        fisher, rel = errors[(layer, key)]
        rows.append({"layer": layer, "choice": key, "fisher_kl": fisher, "rel_error": rel, "kl": kl})
    kls = [r["kl"] for r in rows]
    return {"pairs": rows, "tokens": int(ids.numel()),
            "spearman_fisher": _rank_correlation([r["fisher_kl"] for r in rows], kls),
            "spearman_relative": _rank_correlation([r["rel_error"] for r in rows], kls)}


def measure_sensitivity(base: Any, family: str, *, dtype: str = "float32", calib_tokens: int = CALIB_TOKENS,
                        check_layers: int = CHECK_LAYERS, check_tokens: int = CHECK_TOKENS, use_cache: bool = True,
                        proxy: str = "fisher", samples: int = SCORE_SAMPLES,
                        progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> Sensitivity:
    """Measure every layer of `base` (a `LoadedModel`) at every setting of `family`'s per-layer mix."""
    from quantlib.baseline_cache import model_fingerprint
    from quantlib.corpus import builtin_text
    from quantlib.evaluation import tokenize_for_eval
    from quantlib.memory import plan_memory
    from quantlib.runs import atomic_write_text

    def report(fraction: float, message: str) -> None:
        if cancel is not None and cancel():
            raise Cancelled("sensitivity measurement cancelled")
        if progress is not None:
            progress(min(1.0, max(0.0, fraction)), message)

    if proxy not in PROXIES:
        raise RecommendError(f"proxy: got {proxy!r}; allowed: {', '.join(PROXIES)}")
    if calib_tokens < 16:
        raise RecommendError(f"calib_tokens: got {calib_tokens}; allowed: at least 16")
    started = time.perf_counter()
    cls = family_class(family)
    model = base.model
    shapes = describe_model(model)
    spaces = cls.mix_spaces(shapes)
    if not spaces:
        raise RecommendError(f"{family}: no per-layer mix fits this model ({cls.mix_problem()})")
    choices = _choices(spaces)
    report(0.0, "fingerprinting the model")
    fingerprint = model_fingerprint(model)
    device = next(model.parameters()).device  # every layer's measurement runs where the model lives
    key = _cache_key(family, fingerprint, dtype, calib_tokens, check_layers, check_tokens, choices, proxy, samples,
                     device.type)
    path = _cache_path(key)
    if use_cache and path.exists():
        try:
            cached = Sensitivity.from_dict(json.loads(path.read_text(encoding="utf-8")))
            report(1.0, f"sensitivity from the cache ({path.name})")
            return cached
        except (ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # a damaged entry is a miss

    quantizers = {k: get_quantizer(c.config, device=device.type) for k, c in choices.items()}
    by_module = {w.module: w for w in shapes.weights if w.is_matmul}
    layer_refs: dict[str, Any] = {}
    quantized_by: dict[str, set[str]] = {}
    for k, q in quantizers.items():
        refs = q.quantizable_layers(model)
        quantized_by[k] = {ref.name for ref in refs}
        for ref in refs:
            if ref.index is not None:
                raise RecommendError(f"{ref.name}: fused expert tensors are not measured per layer yet; "
                                     "a per-layer mix of a model with fused experts is refused")
            layer_refs.setdefault(ref.name, ref)
    # each layer once, in model order (a module's bias is a weight of the same module)
    order = list(dict.fromkeys(w.module for w in shapes.weights if w.is_matmul and w.module in layer_refs))
    if not order:
        raise RecommendError(f"{family}: no layer of this model is quantizable by its mix")

    text = builtin_text("calib")
    ids = tokenize_for_eval(base.tokenizer, text, calib_tokens)
    report(0.02, f"capturing layer inputs on {ids.numel()} calibration tokens")
    inputs = _capture_inputs(model, order, ids)
    report(0.04, f"output sensitivities: {samples} backward pass(es) with sampled next tokens")
    scores = _output_scores(model, order, ids, samples)

    rows: list[dict[str, Any]] = []
    errors: dict[tuple[str, str], tuple[float, float]] = {}  # (layer, choice) -> (fisher, relative)
    picked = set(_check_layers(order, check_layers))
    packed_layers: dict[tuple[str, str], Any] = {}  # the checked layers' quantized weights, for the proxy check
    n = len(order)
    with torch.no_grad():
        for i, name in enumerate(order):
            report(0.05 + 0.75 * i / n, f"layer {i + 1}/{n} {name}")
            ref, w = layer_refs[name], by_module[name]
            weight = ref.read()
            x = inputs[name]
            y = x @ weight.float().t()
            energy = float(y.square().sum())
            group_keys = {space.group_of(name) for space in spaces}
            group = group_keys.pop() if len(group_keys) == 1 else name
            common = {"layer": name, "group": group, "block": _block_of(name), "role": w.role,
                      "params": w.numel}
            g = scores[name]
            for key, choice in choices.items():
                q = quantizers[key]
                problem = type(q).layer_shape_problem(choice.config, name, tuple(weight.shape))
                if problem is not None or name not in quantized_by[key]:
                    continue
                packed = q.quantize_layer_calibrated(name, weight, x)
                if name in picked:
                    packed_layers[(name, key)] = packed
                d = q.layer_output(x, packed).float() - y
                rel = float(d.square().sum()) / energy if energy > 0 else 0.0
                fisher = float(0.5 * (g * d).sum(-1).square().sum() / (g.shape[0] * g.shape[1]))
                err = fisher if proxy == "fisher" else rel
                errors[(name, key)] = (fisher, rel)
                nbytes = sum(type(q).layer_storage_bytes(choice.config, w, dtype).values()) * w.n_matrices
                rows.append({**common, "choice": key, "bits": choice.bits, "bytes": float(nbytes), "error": err,
                             "fisher_kl": fisher, "rel_error": rel})
            rows.append({**common, "choice": "keep", "bits": 16.0, "bytes": float(w.bytes_in(dtype)), "error": 0.0,
                         "fisher_kl": 0.0, "rel_error": 0.0})
    del inputs, scores
    frame = pd.DataFrame(rows)

    # What the planner counts outside the mixed layers: everything kept, minus the layers' own bytes.
    any_space = spaces[0]
    all_keep = any_space.build({g: "keep" for g in frame["group"].unique()})
    plan = plan_memory(model.config.to_dict(), all_keep, dtype, shapes=shapes)
    kept = frame[frame["choice"] == "keep"]["bytes"].sum()
    fixed = plan.total_bytes - float(kept)

    check: dict[str, Any] = {}
    if check_layers > 0:
        # the family's default setting and the one that hurts most in total: a spread of errors to rank
        totals = frame[frame["choice"] != "keep"].groupby("choice")["error"].sum()
        keys = list(dict.fromkeys([spaces[0].choices[0].key, str(totals.idxmax())]))
        pairs = [(layer, k) for layer in _check_layers(order, check_layers) for k in keys if (layer, k) in errors]
        eval_ids = tokenize_for_eval(base.tokenizer, builtin_text("eval"), check_tokens)
        check = _proxy_check(model, packed_layers, quantizers, pairs, errors, eval_ids,
                             lambda f, m: report(0.8 + 0.2 * f, m))
    result = Sensitivity(family, dtype, fingerprint, int(ids.numel()), frame, fixed, plan.total_params, check,
                         time.perf_counter() - started, proxy=proxy)
    if use_cache:
        atomic_write_text(path, json.dumps(result.to_dict()))
    report(1.0, f"measured {n} layers x {len(choices)} settings in {result.seconds:.1f} s")
    return result


# --------------------------------------------------------------------------------------------
# Optimization under a budget
# --------------------------------------------------------------------------------------------

ALGORITHM = ("Lagrangian relaxation solved exactly on each group's lower convex hull of (bytes, error) (greedy by "
             "error saved per byte), then greedy fill and local search (best single or pair move) with the bytes left; the LP "
             "relaxation's value at the budget bounds the optimum from below")


@dataclass
class Recommendation:
    """One setting per group, the config that says so, its exact planned size and predicted error."""

    family: str
    space: str
    budget_bytes: float
    total_bytes: float
    n_params: int
    predicted_error: float
    lower_bound: float
    assignment: dict[str, str]
    config: QuantConfig
    layers: pd.DataFrame
    spaces: pd.DataFrame
    reachable: tuple[float, float]
    seconds: float
    grouping: str
    export_kind: str
    limits: str
    check: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    algorithm: str = ALGORITHM
    #: the method's own tools' commands that produce the mix (tool -> shell text), e.g. llama-quantize
    commands: dict[str, str] = field(default_factory=dict)
    proxy: str = "fisher"
    #: False where transformers' own config class drops part of the exported mix (`MixSpace.transformers_keeps`)
    transformers_keeps: bool = True

    @property
    def bits_per_param(self) -> float:
        return 8 * self.total_bytes / self.n_params

    @property
    def gap(self) -> float:
        """Relative distance of the predicted error from the lower bound (0: provably optimal)."""
        return (self.predicted_error - self.lower_bound) / self.predicted_error if self.predicted_error > 0 else 0.0

    def export(self) -> dict[str, Any]:
        """The config as transformers' class saves it (what `parse_config` and the class both load)."""
        return self.config.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "space": self.space, "budget_bytes": self.budget_bytes,
                "total_bytes": self.total_bytes, "bits_per_param": self.bits_per_param,
                "predicted_error": self.predicted_error, "lower_bound": self.lower_bound, "gap": self.gap,
                "assignment": self.assignment, "config": self.export(), "label": self.config.label,
                "reachable_bytes": list(self.reachable), "algorithm": self.algorithm, "grouping": self.grouping,
                "export_kind": self.export_kind, "limits": self.limits, "seconds": self.seconds,
                "proxy_check": self.check, "notes": self.notes, "commands": self.commands, "proxy": self.proxy,
                "transformers_keeps": self.transformers_keeps,
                "layers": self.layers.to_dict(orient="records"), "spaces": self.spaces.to_dict(orient="records")}


def _group_options(frame: pd.DataFrame, keys: list[str]) -> dict[str, list[tuple[float, float, str]]]:
    """group -> [(bytes, error, choice)] for the choices every layer of the group can take."""
    sub = frame[frame["choice"].isin(keys)]
    n_layers = frame[frame["choice"] == "keep"].groupby("group")["layer"].count()
    agg = sub.groupby(["group", "choice"], sort=False).agg(bytes=("bytes", "sum"), error=("error", "sum"),
                                                            layers=("layer", "count")).reset_index()
    options: dict[str, list[tuple[float, float, str]]] = {}
    for row in agg.itertuples(index=False):
        if row.layers == n_layers[row.group]:
            options.setdefault(row.group, []).append((float(row.bytes), float(row.error), row.choice))
    return options


def _hull(options: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Lower convex hull of (bytes, error), from the smallest option to the least error."""
    pts = sorted(options, key=lambda o: (o[0], o[1]))
    frontier: list[tuple[float, float, str]] = []
    for o in pts:  # Pareto: each next option must lower the error
        if not frontier or o[1] < frontier[-1][1]:
            frontier.append(o)
    hull: list[tuple[float, float, str]] = []
    for o in frontier:
        while len(hull) >= 2:
            (b1, e1, _), (b2, e2, _) = hull[-2], hull[-1]
            # drop hull[-1] when it lies on or above the segment hull[-2] -> o
            if (e2 - e1) * (o[0] - b1) >= (o[1] - e1) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


#: Above this many possible moves, refinement tries single moves only (the pair table grows as its square).
MAX_PAIR_MOVES = 4000


def _refine(options: dict[str, list[tuple[float, float, str]]], choice: dict[str, tuple[float, float, str]],
            capacity: float) -> None:
    """Local search in place: apply the best single change, or change of two groups together, that fits the
    bytes left and lowers the summed error, until none does."""
    groups = list(options)
    for _ in range(10 * len(groups) + 10):
        slack = capacity - sum(c[0] for c in choice.values())
        moves = [(i, o) for i, g in enumerate(groups) for o in options[g] if o[2] != choice[g][2]]
        if not moves:
            return
        gi = np.array([i for i, _ in moves])
        db = np.array([o[0] - choice[groups[i]][0] for i, o in moves])
        de = np.array([o[1] - choice[groups[i]][1] for i, o in moves])
        single = np.where(db <= slack, de, np.inf)
        best_single = int(np.argmin(single))
        best = (single[best_single], (best_single,))
        if len(moves) <= MAX_PAIR_MOVES:
            pair = de[:, None] + de[None, :]
            pair[(db[:, None] + db[None, :] > slack) | (gi[:, None] == gi[None, :])] = np.inf
            flat = int(np.argmin(pair))
            if pair.flat[flat] < best[0]:
                best = (pair.flat[flat], divmod(flat, len(moves)))
        gain, picked = best
        if not gain < -1e-15:
            return
        for m in picked:
            i, o = moves[m]
            choice[groups[i]] = o


def solve(options: dict[str, list[tuple[float, float, str]]], budget: float,
          fixed: float = 0.0) -> tuple[dict[str, str], float, float, float] | None:
    """Multiple-choice knapsack: one option per group, total bytes (plus `fixed`) <= `budget`, least summed
    error. Returns (assignment, total bytes, error, LP lower bound), or None where even the smallest options
    exceed the budget. See `ALGORITHM`."""
    hulls = {g: _hull(o) for g, o in options.items()}
    current = {g: 0 for g in hulls}
    total = fixed + sum(h[0][0] for h in hulls.values())
    if total > budget * (1 + 1e-12):
        return None
    error = sum(h[0][1] for h in hulls.values())
    segments = [((h[j - 1][1] - h[j][1]) / (h[j][0] - h[j - 1][0]), g, j)
                for g, h in hulls.items() for j in range(1, len(h))]
    segments.sort(key=lambda s: -s[0])
    bound = None
    blocked: set[str] = set()
    for slope, g, j in segments:
        if g in blocked:
            continue
        h = hulls[g]
        step = h[j][0] - h[j - 1][0]
        if total + step <= budget:
            total += step
            error += h[j][1] - h[j - 1][1]
            current[g] = j
        else:
            if bound is None:
                bound = error - slope * (budget - total)
            blocked.add(g)
    if bound is None:
        bound = error  # every upgrade fitted: the least-error option of every group
    choice = {g: hulls[g][current[g]] for g in hulls}
    _refine(options, choice, budget - fixed)
    error = sum(c[1] for c in choice.values())  # re-add: no drift from incremental sums
    total = fixed + sum(c[0] for c in choice.values())
    return {g: c[2] for g, c in choice.items()}, total, error, min(bound, error)


def reachable_range(sens: Sensitivity, spaces: Sequence[MixSpace]) -> tuple[float, float]:
    """Smallest and largest total bytes any assignment of the family reaches."""
    lo, hi = math.inf, 0.0
    for space in spaces:
        opts = _group_options(sens.rows, [c.key for c in space.choices])
        if opts:
            lo = min(lo, sens.fixed_bytes + sum(min(o[0] for o in v) for v in opts.values()))
            hi = max(hi, sens.fixed_bytes + sum(max(o[0] for o in v) for v in opts.values()))
    return lo, hi


def size_text(nbytes: float) -> str:
    """Bytes as GiB with four decimals and MiB with one (tiny models read in MiB)."""
    return f"{nbytes / GIB:.4f} GiB ({nbytes / 2**20:,.1f} MiB)"


def budget_bytes(sens: Sensitivity, budget_gib: float | None = None, bits: float | None = None) -> float:
    """The budget in bytes from GiB (total weights as the planner counts them) or from average bits per
    parameter over every parameter of the model."""
    if (budget_gib is None) == (bits is None):
        raise RecommendError("budget: give exactly one of budget_gib (GiB) or bits (average bits per parameter)")
    value = budget_gib if budget_gib is not None else bits
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        name = "budget_gib" if budget_gib is not None else "bits"
        raise RecommendError(f"{name}: got {value!r}; allowed: a positive number")
    return float(budget_gib) * GIB if budget_gib is not None else float(bits) * sens.n_params / 8


def recommend(sens: Sensitivity, model_config: dict[str, Any], *, budget_gib: float | None = None,
              bits: float | None = None, shapes: ModelShapes | None = None) -> Recommendation:
    """The mix with the least predicted error within the budget, over every space of the family."""
    from quantlib.memory import plan_memory
    from quantlib.shapes import model_shapes

    started = time.perf_counter()
    budget = budget_bytes(sens, budget_gib, bits)
    shapes = shapes if shapes is not None else model_shapes(model_config)
    cls = family_class(sens.family)
    spaces = cls.mix_spaces(shapes)
    lo, hi = reachable_range(sens, spaces)
    if budget < lo:
        raise RecommendError(
            f"budget: {size_text(budget)} ({8 * budget / sens.n_params:.2f} bits/param) is below the smallest "
            f"size {sens.family} reaches on this model, {size_text(lo)} ({8 * lo / sens.n_params:.2f} bits/param); "
            f"reachable: {size_text(lo)} to {size_text(hi)} ({8 * lo / sens.n_params:.2f} to "
            f"{8 * hi / sens.n_params:.2f} bits/param)")
    results, best = [], None
    for space in spaces:
        keys = [c.key for c in space.choices]
        opts = _group_options(sens.rows, keys)
        solved = solve(opts, budget, sens.fixed_bytes) if opts else None
        row = {"space": space.name, "min_gib": (sens.fixed_bytes + sum(min(o[0] for o in v) for v in opts.values()))
               / GIB if opts else math.nan, "feasible": solved is not None, "gib": math.nan,
               "predicted_error": math.nan, "lower_bound": math.nan}
        if solved is not None:
            assignment, total, error, bound = solved
            row.update(gib=total / GIB, predicted_error=error, lower_bound=bound)
            if best is None or error < best[1][2]:
                best = (space, solved)
        results.append(row)
    assert best is not None  # budget >= the smallest reachable size
    space, (assignment, total, error, bound) = best
    config = space.build(assignment)
    planned = plan_memory(model_config, config, sens.dtype, shapes=shapes).total_bytes
    if abs(planned - total) > 0.5:
        raise QuantlibError(f"internal: the recommended {config.label} plans to {planned:.0f} bytes, the optimizer "
                            f"counted {total:.0f}; refusing a size that is not exact")
    layers = sens.rows.copy()
    chosen = layers["group"].map(assignment)
    layers = layers[layers["choice"] == chosen].copy()
    labels = {c.key: c.label for c in space.choices}
    layers["setting"] = layers["choice"].map(labels)
    layers = layers[["layer", "group", "block", "role", "params", "choice", "setting", "bits", "bytes", "error"]]
    notes = []
    if budget >= hi:
        notes.append("the budget holds the whole model unquantized: nothing needs quantizing")
    commands = cls.tool_commands(config, model_config, shapes, sens.dtype)
    return Recommendation(sens.family, space.name, budget, total, sens.n_params, error, bound, assignment, config,
                          layers.reset_index(drop=True), pd.DataFrame(results), (lo, hi),
                          time.perf_counter() - started, space.grouping, space.export, space.limits, sens.check,
                          notes, commands=commands, proxy=sens.proxy, transformers_keeps=space.transformers_keeps)


def uniform_configs(family: str, shapes: ModelShapes) -> list[QuantConfig]:
    """Every quantizing setting of the family applied to the whole model (the points a mix is judged by)."""
    return [c.config for c in _choices(family_class(family).mix_spaces(shapes)).values()]


def uniform_problems(family: str, model_config: dict[str, Any]) -> dict[str, str]:
    """Label -> why a uniform setting of the family cannot quantize this model as it is (a layer's width that no
    block of it divides: GGUF Q4_K on SmolLM2's 576-wide rows), for the settings where one can not: the planner's
    preflight (`Quantizer.shape_problems`), its first problem and how many more."""
    from quantlib.shapes import model_shapes

    cls = family_class(family)
    out: dict[str, str] = {}
    for config in uniform_configs(family, model_shapes(model_config)):
        problems = cls.shape_problems(config, model_config)
        if problems:
            out[config.label] = problems[0] + (f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else "")
    return out


# --------------------------------------------------------------------------------------------
# Verification: the mix quantized and evaluated like every scheme
# --------------------------------------------------------------------------------------------


def judge(table: pd.DataFrame, mix_label: str) -> dict[str, Any]:
    """The measured mix against the uniform points of a comparison table (memory_mib, kl, kl_se per scheme):
    is its KL below every uniform scheme of equal or smaller size, and below the straight line joining the
    uniform points on either side of its size?"""
    mix = table[table["scheme"] == mix_label].iloc[0]
    uniform = table[table["scheme"] != mix_label]
    smaller = uniform[uniform["memory_mib"] <= mix["memory_mib"]]
    larger = uniform[uniform["memory_mib"] > mix["memory_mib"]]
    verdict: dict[str, Any] = {"mix": mix_label, "mix_kl": float(mix["kl"]), "mix_kl_se": float(mix["kl_se"]),
                               "mix_mib": float(mix["memory_mib"]),
                               "smaller": smaller["scheme"].tolist(),
                               "beats_smaller": bool((mix["kl"] < smaller["kl"]).all()) if len(smaller) else None,
                               "line_kl": None, "below_line": None, "neighbours": None}
    if len(smaller) and len(larger):
        # the nearest uniform size on either side; of settings the same size, the better one
        lo = smaller[smaller["memory_mib"] == smaller["memory_mib"].max()].sort_values("kl").iloc[0]
        hi = larger[larger["memory_mib"] == larger["memory_mib"].min()].sort_values("kl").iloc[0]
        t = (mix["memory_mib"] - lo["memory_mib"]) / (hi["memory_mib"] - lo["memory_mib"])
        line = float(lo["kl"] + t * (hi["kl"] - lo["kl"]))
        verdict.update(line_kl=line, below_line=bool(mix["kl"] < line), neighbours=[lo["scheme"], hi["scheme"]],
                       line_margin_se=float((line - mix["kl"]) / mix["kl_se"]) if mix["kl_se"] > 0 else math.inf)
    return verdict


@dataclass
class Verification:
    table: pd.DataFrame
    mix_label: str
    verdict: dict[str, Any]
    comparison: Any  # quantlib.compare.ComparisonResult


def verify(rec: Recommendation, settings: Any = None, *, uniform: Sequence[QuantConfig] | None = None,
           base: Any = None, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
           save: bool = True, runs_folder: Any = None, calib_tokens: int = VERIFY_CALIB_TOKENS) -> Verification:
    """Quantize with the recommended mix and with every uniform setting of the family that fits the model (the others
    are named in `verdict["left_out"]` with the reason), evaluate them as every
    comparison does (`run_comparison`: perplexity, KL, top-1 with standard errors) and judge the mix. A family
    that calibrates (GPTQ) calibrates every config on the same `calib_tokens` of the built-in calibration text,
    unless `settings.calibration` says otherwise."""
    import dataclasses

    from quantlib.compare import CompareSettings, run_comparison, unique_labels
    from quantlib.shapes import model_shapes

    settings = settings or CompareSettings()
    if settings.calibration is None:
        calibration = family_class(rec.family).calibration_settings(calib_tokens)
        if calibration is not None:
            settings = dataclasses.replace(settings, calibration=calibration)
    left_out: dict[str, str] = {}
    if uniform is None:
        model_config = base.model.config.to_dict() if base is not None else _model_config(settings)
        shapes = describe_model(base.model) if base is not None else model_shapes(model_config)
        left_out = uniform_problems(rec.family, model_config)
        uniform = [c for c in uniform_configs(rec.family, shapes) if c.label not in left_out]
    configs = [rec.config, *uniform]
    labels = unique_labels(configs)
    result = run_comparison(configs, settings, progress=progress, cancel=cancel, save=save, base=base,
                            runs_folder=runs_folder)
    table = result.table[result.table["scheme"] != "baseline"] if "scheme" in result.table else result.table
    table = table[table["scheme"].isin(labels)].reset_index(drop=True)
    table.insert(1, "kind", ["recommended mix" if s == labels[0] else "uniform" for s in table["scheme"]])
    verdict = judge(table, labels[0])
    verdict["left_out"] = left_out
    return Verification(table, labels[0], verdict, result)


def _model_config(settings: Any) -> dict[str, Any]:
    from quantlib.models import read_model_config

    return read_model_config(settings.source)


def _skip_list_lines(rec: Recommendation) -> list[str]:
    """Why the exported skip list (and the config's label, which counts it) holds more entries than the layers kept
    here: a list replaces transformers' default skips, so the export repeats them."""
    from quantlib.registry import quantizer_class

    skip = quantizer_class(rec.config).skip_modules(rec.config)
    kept = {group for group, choice in rec.assignment.items() if choice == "keep"}
    defaults = [entry for entry in skip if entry not in kept]
    if not skip or not defaults:
        return []
    return [f"the exported skip list has {len(skip)} entries: the {len(skip) - len(defaults)} kept unquantized here "
            f"and transformers' {len(defaults)} default skip{'s' if len(defaults) > 1 else ''} "
            f"({', '.join(defaults)}), repeated because a list replaces them"]


def summary_lines(rec: Recommendation) -> list[str]:
    """The recommendation in words, as the CLI prints it and the page captions it."""
    kept = rec.layers.groupby("setting")["params"].agg(["count", "sum"])
    lines = [f"recommended: {rec.config.label} ({rec.space})",
             f"size {size_text(rec.total_bytes)}, {rec.bits_per_param:.3f} bits/param (budget "
             f"{size_text(rec.budget_bytes)}; planned exactly; reachable {size_text(rec.reachable[0])} to "
             f"{size_text(rec.reachable[1])})",
             (f"predicted mean KL {rec.predicted_error:.5g} nats/token" if rec.proxy == "fisher" else
              f"predicted summed relative output error {rec.predicted_error:.5g}")
             + f" (optimizer's lower bound {rec.lower_bound:.5g}, gap {100 * rec.gap:.2f}%)",
             "layers: " + ", ".join(f"{n} x {setting} ({p / 1e6:.1f}M params)"
                                    for setting, (n, p) in kept.iterrows()),
             f"one setting per {rec.grouping}; export: {rec.export_kind}"]
    lines += _skip_list_lines(rec)
    if rec.limits:
        lines.append(f"limits: {rec.limits}")
    check = rec.check or {}
    if check.get("pairs"):
        lines.append(f"proxy check on {len(check['pairs'])} single-layer quantizations over {check['tokens']} tokens: "
                     f"Spearman rank correlation with the measured KL {check['spearman_fisher']:.2f} (Fisher "
                     f"proxy), {check['spearman_relative']:.2f} (relative output error)")
    lines += rec.notes
    return lines


def verdict_lines(verdict: dict[str, Any]) -> list[str]:
    """The verification verdict in words."""
    lines = [f"measured: {verdict['mix']} KL {verdict['mix_kl']:.5f} ± {verdict['mix_kl_se']:.5f} at "
             f"{verdict['mix_mib']:.1f} MiB"]
    if verdict["beats_smaller"] is not None:
        lines.append(("lower" if verdict["beats_smaller"] else "NOT lower") + " KL than every uniform setting of "
                     f"equal or smaller size ({', '.join(verdict['smaller'])})")
    else:
        lines.append("no uniform setting is as small as the mix")
    if verdict["below_line"] is not None:
        lines.append(("below" if verdict["below_line"] else "NOT below") + " the line joining "
                     f"{verdict['neighbours'][0]} and {verdict['neighbours'][1]} (KL {verdict['line_kl']:.5f} there; "
                     f"{verdict['line_margin_se']:.1f} SE)")
    for label, why in verdict.get("left_out", {}).items():
        lines.append(f"not compared: uniform {label}, which cannot quantize this model: {why}")
    return lines
