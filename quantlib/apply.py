"""Apply a validated config to a real model, and measure its weights layer by layer.

bitsandbytes configs go through `transformers`' `from_pretrained(..., quantization_config=...)`,
the path users will run. Other schemes are simulated: each linear weight is replaced by its
quantize→dequantize result, and the memory reported is that of the packed format (what a
checkpoint in that format would hold), labelled as such.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import torch

from quantlib.configs import QuantConfig, parse_config
from quantlib.errors import Cancelled, QuantlibError
from quantlib.memory import COMPONENTS, MemoryBreakdown, measure_footprint
from quantlib.metrics import code_histogram, error_metrics
from quantlib.models import LoadedModel, load_model
from quantlib.outliers import linear_modules
from quantlib.schemes import BackendReport, Quantizer, get_quantizer, is_skipped

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

#: How each packed-tensor storage component counts in the memory breakdown.
STORAGE_COMPONENT = {"codes": "codes", "absmax": "scales", "row_absmax": "scales", "scale": "scales",
                     "zero": "scales", "dq_absmax": "dq_constants", "dq_offset": "dq_constants"}


class ShapeError(QuantlibError, ValueError):
    """Some layers cannot be quantized with this config (group or block size does not divide)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} layer(s) do not fit this config:\n  - " + "\n  - ".join(problems))


@dataclass
class QuantizedModel:
    """A model quantized with one config, with the backend that did it and what it occupies."""

    model: Any
    tokenizer: Any
    config: QuantConfig
    backend: BackendReport
    memory: MemoryBreakdown
    seconds: float
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def simulated(self) -> bool:
        return self.backend.simulated


def quantizable_layers(model: torch.nn.Module, quantizer: Quantizer) -> list[tuple[str, torch.nn.Module]]:
    skip = quantizer.modules_to_not_convert()
    return [(n, m) for n, m in linear_modules(model) if not is_skipped(n, skip)]


def check_model_shapes(model: torch.nn.Module, quantizer: Quantizer) -> None:
    """Refuse before any work when a layer's width does not fit the scheme's groups or blocks."""
    problems = [p for n, m in quantizable_layers(model, quantizer)
                if (p := quantizer.check_shape(quantizer.config, n, tuple(m.weight.shape))) is not None]
    if problems:
        raise ShapeError(problems)


def quantize_model(config: QuantConfig | dict | str, *, base: LoadedModel | None = None, source: str = "default",
                   device: str = "auto", dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   allow_pickle: bool = False, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> QuantizedModel:
    """Quantize a model with a config and measure its footprint.

    `base` (an unquantized model already in memory) saves a reload for simulated schemes; the
    bitsandbytes path always loads from `source`, because bitsandbytes quantizes while loading,
    with the same `trust_remote_code` / `allow_pickle` choices the baseline was loaded with.
    """
    quantizer = get_quantizer(parse_config(config), device=device)
    started = time.perf_counter()
    if not quantizer.simulated:
        loaded = load_model(source, dtype=dtype, device=quantizer.backend.device, trust_remote_code=trust_remote_code,
                            allow_pickle=allow_pickle, quantization_config=quantizer.config.to_transformers(),
                            progress=progress)
        memory = measure_footprint(loaded.model)
        model, tokenizer, desc = loaded.model, loaded.tokenizer, loaded.description.to_dict()
    else:
        if base is None:
            base = load_model(source, dtype=dtype, device=quantizer.backend.device,
                              trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=progress)
        model = copy.deepcopy(base.model).to(quantizer.backend.device)
        memory = simulate_quantization(model, quantizer, progress=progress, cancel=cancel)
        tokenizer, desc = base.tokenizer, base.description.to_dict()
    model.eval()
    return QuantizedModel(model, tokenizer, quantizer.config, quantizer.backend, memory,
                          time.perf_counter() - started, desc)


@torch.no_grad()
def simulate_quantization(model: torch.nn.Module, quantizer: Quantizer, progress: ProgressFn | None = None,
                          cancel: CancelFn | None = None) -> MemoryBreakdown:
    """Replace each quantizable linear weight in place by quantize→dequantize; return the packed size."""
    check_model_shapes(model, quantizer)
    layers = quantizable_layers(model, quantizer)
    parts = {c: 0.0 for c in COMPONENTS}
    quantized_ids: set[int] = set()
    quantized_params = 0
    for i, (name, module) in enumerate(layers):
        if cancel is not None and cancel():
            raise Cancelled(f"quantization cancelled at layer {name}")
        packed = quantizer.quantize_tensor(module.weight.data)
        module.weight.data.copy_(packed.dequantize().to(module.weight.dtype))
        for comp, nbytes in packed_storage_bytes(packed, quantizer).items():
            parts[comp] += nbytes
        quantized_ids.add(id(module.weight))
        quantized_params += module.weight.numel()
        if progress and (i % 8 == 0 or i == len(layers) - 1):
            progress((i + 1) / len(layers), f"{quantizer.config.label}: layer {i + 1}/{len(layers)} {name}")
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) not in quantized_ids:
            parts["unquantized"] += p.numel() * p.element_size()
    for b in model.buffers():  # rotary inv_freq and the like stay as they are
        if id(b) not in seen:
            seen.add(id(b))
            parts["unquantized"] += b.numel() * b.element_size()
    notes = ["simulated: quantized layers counted at their packed size; in memory they are dequantized"]
    return MemoryBreakdown(parts, quantized_params, total, "packed (simulated)", notes)


def packed_storage_bytes(packed: Any, quantizer: Quantizer) -> dict[str, float]:
    """A packed tensor's storage in bytes by memory component."""
    out: dict[str, float] = {}
    bits = packed.storage_bits
    if set(bits) == {"blocks"}:  # GGUF blocks interleave scales and codes; split by the codes' share
        shape = packed.shape
        split = type(quantizer).storage_bytes(quantizer.config, int(torch.Size(shape[:-1]).numel()), shape[-1])
        return split
    for key, nbits in bits.items():
        comp = STORAGE_COMPONENT.get(key, "scales")
        out[comp] = out.get(comp, 0.0) + nbits / 8
    return out


def code_usage(packed: Any) -> tuple[torch.Tensor | None, float]:
    """Code histogram and its entropy; (None, nan) for formats whose codes are not unpacked
    (e.g. GGUF Q5 types interleave the fifth bit) or that have no codes (F16/BF16)."""
    if not packed.n_codes:
        return None, float("nan")
    try:
        return code_histogram(packed.codes_unpacked(), packed.n_codes)
    except NotImplementedError:
        return None, float("nan")


@torch.no_grad()
def layer_errors(base_model: torch.nn.Module, quantizer: Quantizer, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None) -> pd.DataFrame:
    """Weight error of every quantizable linear layer, quantizing one layer at a time.

    Streaming keeps peak memory at the model plus one layer's packed and dequantized copies,
    whatever the model size. Uses the scheme's own tensor path (bitsandbytes' kernels for the
    bitsandbytes schemes, the same ones `from_pretrained` uses).
    """
    check_model_shapes(base_model, quantizer)
    rows = []
    layers = quantizable_layers(base_model, quantizer)
    for i, (name, module) in enumerate(layers):
        if cancel is not None and cancel():
            raise Cancelled(f"layer errors cancelled at {name}")
        w = module.weight.data
        packed = quantizer.quantize_tensor(w)
        metrics = error_metrics(w, packed.dequantize())
        _, entropy = code_usage(packed)
        rows.append({"layer": name, "out_features": w.shape[0], "in_features": w.shape[1], **metrics,
                     "bits_per_param": packed.bits_per_param, "code_entropy_bits": entropy})
        if progress and (i % 8 == 0 or i == len(layers) - 1):
            progress((i + 1) / len(layers), f"{quantizer.config.label}: weight error {i + 1}/{len(layers)}")
    return pd.DataFrame(rows)


def layer_detail(base_model: torch.nn.Module, quantizer: Quantizer, layer: str) -> dict[str, Any]:
    """Everything the inspector shows for one layer: metrics, code usage, histogram data."""
    from quantlib.distributions import block_normalized_histogram
    from quantlib.outliers import weight_outlier_stats

    modules = dict(base_model.named_modules())
    if layer not in modules or not isinstance(modules[layer], torch.nn.Linear):
        names = [n for n, _ in linear_modules(base_model)]
        raise QuantlibError(f"no linear layer named {layer!r}; e.g. {', '.join(names[:3])} ({len(names)} in all)")
    w = modules[layer].weight.data
    packed = quantizer.quantize_tensor(w)
    counts, entropy = code_usage(packed)
    return {
        "layer": layer,
        "shape": list(w.shape),
        "metrics": error_metrics(w, packed.dequantize()),
        "bits_per_param": packed.bits_per_param,
        "code_counts": [int(c) for c in counts] if counts is not None else None,
        "code_entropy_bits": entropy,
        "n_codes": packed.n_codes,
        "weight_stats": weight_outlier_stats(w),
        "histogram": block_normalized_histogram(w),
    }


def preflight(config: QuantConfig | dict | str, model_config: dict[str, Any]) -> list[str]:
    """Problems a config will hit on a model, from `config.json` alone, before any weights are read.

    Names every layer whose input width the scheme's group or block size does not divide, with
    the sizes that would fit. An empty list means the config fits the model.
    """
    from quantlib.architecture import describe_architecture
    from quantlib.schemes import QUANTIZER_MAPPING

    config = parse_config(config)
    quantizer_cls = QUANTIZER_MAPPING[config.quantizer_key]
    skip = quantizer_cls.skip_modules(config)
    arch = describe_architecture(model_config)
    problems = []
    for layer in arch.linears:
        if is_skipped(layer.name, skip):
            continue
        problem = quantizer_cls.check_shape(config, layer.name, (layer.out_features, layer.in_features))
        if problem is not None:
            problems.append(problem)
    return problems
