"""Inspect one scheme on one model: everything the Quantize and Inspect page shows, in one call.

Per-layer weight error, the quantized model's memory next to the baseline's, perplexity, KL and
top-1 agreement against the baseline on the evaluation text, and LLM.int8()-style activation
outliers of the baseline on calibration text. The baseline's reference log-probs can be passed in
and are returned, so a caller (the app) can reuse them across schemes on the same text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
import torch

from quantlib.layers import layer_errors
from quantlib.configs import QuantConfig
from quantlib.registry import parse_config
from quantlib.corpus import builtin_text
from quantlib.evaluation import (DistributionComparison, PerplexityResult, ReferenceLogprobs, compare_logits,
                                 reference_logprobs, tokenize_for_eval)
from quantlib.footprint import MemoryBreakdown, measure_footprint
from quantlib.models import LoadedModel
from quantlib.outliers import ActivationOutliers, activation_outliers
from quantlib.registry import get_quantizer
from quantlib.callbacks import CancelFn, ProgressFn


#: Share of the overall progress bar each step takes (they add up to 1).
STEPS = (("quantize", 0.3), ("layer errors", 0.1), ("baseline", 0.2), ("compare", 0.25), ("outliers", 0.15))


@dataclass
class Inspection:
    """The result of `inspect_scheme`; `backend` says which device and library produced it."""

    label: str
    config: dict[str, Any]
    backend: dict[str, Any]
    layers: pd.DataFrame
    memory: dict[str, MemoryBreakdown]
    comparison: DistributionComparison
    baseline: PerplexityResult
    outliers: ActivationOutliers
    seconds: float
    model: dict[str, Any]


def _staged(progress: ProgressFn | None) -> Callable[[str], ProgressFn | None]:
    """Map each step's own 0..1 progress into its slice of one overall bar."""
    if progress is None:
        return lambda _name: None
    starts, acc = {}, 0.0
    for name, share in STEPS:
        starts[name] = (acc, share)
        acc += share

    def stage(name: str) -> ProgressFn:
        lo, share = starts[name]
        return lambda fraction, message: progress(lo + share * min(max(fraction, 0.0), 1.0), message)

    return stage


def inspect_scheme(base: LoadedModel, config: QuantConfig | dict | str, *, source: str = "default",
                   device: str = "auto", dtype: torch.dtype = torch.float32, tokens: int = 1024, window: int = 512,
                   outlier_tokens: int = 1024, reference: ReferenceLogprobs | None = None,
                   trust_remote_code: bool = False, allow_pickle: bool = False, calibration: Any = None,
                   progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> tuple[Inspection, ReferenceLogprobs]:
    """Quantize `base` with `config` and measure it against `base`; returns the result and the reference.

    `reference` (from an earlier call on the same model, text and window) skips the baseline pass;
    `calibration` (the method's calibration settings) sizes GPTQ/AWQ calibration.
    """
    started = time.perf_counter()
    stage = _staged(progress)
    config = parse_config(config)
    quantizer = get_quantizer(config, device=device)
    qm = quantizer.quantize_model(base=base, source=source, dtype=dtype, trust_remote_code=trust_remote_code,
                                  allow_pickle=allow_pickle, progress=stage("quantize"), cancel=cancel,
                                  calibration=calibration)
    # the layers as the quantized model stores them (calibrated checkpoints, bitsandbytes' layers, the packed
    # tensors simulation kept): nothing is quantized twice
    errors = layer_errors(base.model, quantizer, progress=stage("layer errors"), cancel=cancel, quantized=qm)
    qm.release_packed()
    try:
        if reference is None:
            ids = tokenize_for_eval(base.tokenizer, builtin_text("eval"), tokens)
            reference = reference_logprobs(base.model, ids, window=window, progress=stage("baseline"), cancel=cancel)
        comparison = compare_logits(reference, qm.model, progress=stage("compare"), cancel=cancel)
        memory = {"baseline (unquantized)": measure_footprint(base.model), config.label: qm.memory}
        backend = qm.backend.to_dict()
    finally:
        del qm
    calib = tokenize_for_eval(base.tokenizer, builtin_text("calib"), outlier_tokens)
    outliers = activation_outliers(base.model, calib, bos_token_id=getattr(base.model.config, "bos_token_id", None),
                                   progress=stage("outliers"), cancel=cancel)
    result = Inspection(label=config.label, config=config.to_dict(), backend=backend, layers=errors, memory=memory,
                        comparison=comparison, baseline=reference.perplexity, outliers=outliers,
                        seconds=time.perf_counter() - started, model=base.description.to_dict())
    return result, reference
