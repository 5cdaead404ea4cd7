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
from quantlib.schemes import BackendReport, Quantizer, get_quantizer
from quantlib.shapes import WeightShape, describe_model, model_shapes

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
    calibration_seconds: float = 0.0  # GPTQ/AWQ: gptqmodel's calibration alone (0 for other schemes)
    checkpoint_dir: str | None = None  # GPTQ/AWQ: where the quantized checkpoint was saved

    @property
    def simulated(self) -> bool:
        return self.backend.simulated


@dataclass
class MatrixRef:
    """One quantizable weight matrix of a loaded model: a linear weight, a Conv1D weight (stored
    input x output) or one expert's slice of a fused 3-D expert tensor, read and written as out x in."""

    name: str  # the module name, or `param[e]` for expert e of a fused tensor
    param: torch.nn.Parameter
    shape: WeightShape
    index: int | None = None

    def get(self) -> torch.Tensor:
        t = self.param.data if self.index is None else self.param.data[self.index]
        return t.t() if self.shape.transposed else t

    def set(self, value: torch.Tensor) -> None:
        dst = self.get()  # a view: writes go into the parameter
        dst.copy_(value.to(dst.dtype))


def quantizable_layers(model: torch.nn.Module, quantizer: Quantizer) -> list[MatrixRef]:
    """Every matrix the quantizer quantizes in this model, by the same rules the planner uses."""
    shapes = describe_model(model)
    decisions = type(quantizer).classify(quantizer.config, shapes)
    params = dict(model.named_parameters())
    refs = []
    for w in shapes.weights:
        if decisions[w.name] is not None:
            continue
        if w.kind == "experts":
            refs += [MatrixRef(f"{w.name}[{e}]", params[w.name], w, e) for e in range(w.n_matrices)]
        else:
            refs.append(MatrixRef(w.module, params[w.name], w))
    return refs


def check_model_shapes(model: torch.nn.Module, quantizer: Quantizer) -> None:
    """Refuse before any work when a layer's width does not fit the scheme's groups or blocks."""
    problems = [p for ref in quantizable_layers(model, quantizer)
                if (p := quantizer.check_shape(quantizer.config, ref.name, tuple(ref.get().shape))) is not None]
    if problems:
        raise ShapeError(problems)


def quantize_model(config: QuantConfig | dict | str, *, base: LoadedModel | None = None, source: str = "default",
                   device: str = "auto", dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   allow_pickle: bool = False, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None, calibration: Any = None) -> QuantizedModel:
    """Quantize a model with a config and measure its footprint.

    `base` (an unquantized model already in memory) saves a reload for simulated schemes; the
    bitsandbytes path always loads from `source`, because bitsandbytes quantizes while loading,
    with the same `trust_remote_code` / `allow_pickle` choices the baseline was loaded with.
    GPTQ and AWQ (`quantizer.calibrated`) run gptqmodel on the model's safetensors folder with
    `calibration` (a `quantlib.calibration.CalibrationSettings`; default 128 x 512 tokens of the
    built-in calibration text) and load the saved checkpoint back (see `quantlib.calibration`).
    """
    quantizer = get_quantizer(parse_config(config), device=device)
    started = time.perf_counter()
    if getattr(quantizer, "calibrated", False):
        return _quantize_calibrated(quantizer, source, trust_remote_code, progress, cancel, calibration, started)
    if not quantizer.simulated:
        loaded = load_model(source, dtype=dtype, device=quantizer.backend.device, trust_remote_code=trust_remote_code,
                            allow_pickle=allow_pickle, quantization_config=quantizer.config.to_transformers(),
                            progress=progress)
        _own_unquantized_tensors(loaded.model)
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


def calibration_model_dir(source: str) -> str:
    """The safetensors folder gptqmodel reads: the default model's converted folder, or a user folder."""
    from pathlib import Path

    from quantlib.models import default_model_dir

    if source in ("", "default"):
        return str(default_model_dir())
    path = Path(source).expanduser()
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        raise QuantlibError(f"GPTQ/AWQ calibration needs a local folder with config.json and safetensors weights; "
                            f"{source!r} is not one (convert GGUF or hub models to a folder first)")
    return str(path)


def _quantize_calibrated(quantizer: Quantizer, source: str, trust_remote_code: bool, progress: ProgressFn | None,
                         cancel: CancelFn | None, calibration: Any, started: float) -> QuantizedModel:
    from quantlib.calibration import calibrate
    model_dir = calibration_model_dir(source)
    # Refuse unfit shapes from config.json before any calibration starts.
    import json
    from pathlib import Path

    problems = preflight(quantizer.config, json.loads((Path(model_dir) / "config.json").read_text()))
    if problems:
        raise ShapeError(problems)
    result = calibrate(quantizer.config, model_dir, settings=calibration, progress=progress, cancel=cancel,
                       trust_remote_code=trust_remote_code)
    memory = measure_footprint(result.model)
    memory.notes.extend(result.notes)
    desc = {"source": source, "path": model_dir, "quantized_checkpoint": str(result.checkpoint_dir),
            "calibration": {**(calibration.to_dict() if calibration is not None else {}),
                            "tokens": result.n_tokens}}
    return QuantizedModel(result.model, result.tokenizer, quantizer.config, quantizer.backend, memory,
                          time.perf_counter() - started, desc, calibration_seconds=result.calibration_seconds,
                          checkpoint_dir=str(result.checkpoint_dir))


@torch.no_grad()
def _own_unquantized_tensors(model: torch.nn.Module) -> None:
    """Copy the tensors bitsandbytes left unquantized out of the checkpoint's memory map.

    Loaded from safetensors, they are views into a mapping of the whole file; each loaded model
    would keep its own 0.5 GB mapping resident (measured on the default model) for 0.1 GB of
    embeddings and norms. Copying them lets the mapping go; sizes and values are unchanged.
    """
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen or getattr(param, "quant_state", None) is not None or not param.is_floating_point():
            continue
        seen.add(id(param))
        param.data = param.data.clone()
    release_memory()


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@torch.no_grad()
def simulate_quantization(model: torch.nn.Module, quantizer: Quantizer, progress: ProgressFn | None = None,
                          cancel: CancelFn | None = None) -> MemoryBreakdown:
    """Replace each quantizable linear weight in place by quantize→dequantize; return the packed size."""
    check_model_shapes(model, quantizer)
    layers = quantizable_layers(model, quantizer)
    parts = {c: 0.0 for c in COMPONENTS}
    quantized_ids: set[int] = set()
    quantized_params = 0
    for i, ref in enumerate(layers):
        if cancel is not None and cancel():
            raise Cancelled(f"quantization cancelled at layer {ref.name}")
        packed = quantizer.quantize_tensor(ref.get().contiguous())
        ref.set(packed.dequantize())
        for comp, nbytes in packed_storage_bytes(packed, quantizer).items():
            parts[comp] += nbytes
        quantized_ids.add(id(ref.param))
        quantized_params += ref.get().numel()
        if progress and (i % 8 == 0 or i == len(layers) - 1):
            progress((i + 1) / len(layers), f"{quantizer.config.label}: layer {i + 1}/{len(layers)} {ref.name}")
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
                 cancel: CancelFn | None = None, quantized: Any = None) -> pd.DataFrame:
    """Weight error of every quantizable linear layer, quantizing one layer at a time.

    Streaming keeps peak memory at the model plus one layer's packed and dequantized copies,
    whatever the model size. Uses the scheme's own tensor path (bitsandbytes' kernels for the
    bitsandbytes schemes, the same ones `from_pretrained` uses).

    GPTQ/AWQ quantize whole models from activations, so their errors come from the loaded
    checkpoint: pass `quantized` (the `QuantizedModel` or its model) and each QuantLinear's
    weight, dequantized by gptqmodel, is compared with the base weight of the same name.
    """
    if getattr(quantizer, "calibrated", False):
        if quantized is None:
            raise QuantlibError(f"{quantizer.config.label}: layer errors of a calibration-based scheme need the "
                                "quantized model (quantize_model first, then layer_errors(..., quantized=qm))")
        return calibrated_layer_errors(base_model, getattr(quantized, "model", quantized), quantizer, progress,
                                       cancel)
    check_model_shapes(base_model, quantizer)
    rows = []
    layers = quantizable_layers(base_model, quantizer)
    for i, ref in enumerate(layers):
        name = ref.name
        if cancel is not None and cancel():
            raise Cancelled(f"layer errors cancelled at {name}")
        w = ref.get().contiguous()
        packed = quantizer.quantize_tensor(w)
        metrics = error_metrics(w, packed.dequantize())
        _, entropy = code_usage(packed)
        rows.append({"layer": name, "out_features": w.shape[0], "in_features": w.shape[1], **metrics,
                     "bits_per_param": packed.bits_per_param, "code_entropy_bits": entropy})
        if progress and (i % 8 == 0 or i == len(layers) - 1):
            progress((i + 1) / len(layers), f"{quantizer.config.label}: weight error {i + 1}/{len(layers)}")
    return pd.DataFrame(rows)


@torch.no_grad()
def calibrated_layer_errors(base_model: torch.nn.Module, quantized_model: torch.nn.Module, quantizer: Quantizer,
                            progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> pd.DataFrame:
    """Error of each GPTQ/AWQ layer of a loaded checkpoint against the base weight of the same name.

    AWQ folds its per-channel scales into the preceding norm/linear before rounding, so its layer
    weights differ from the base by those scales as well as by rounding: its relative errors
    measure what was stored, not rounding alone (the perplexity is the honest end-to-end figure).
    """
    from quantlib.calibration import dequantized_weight, quant_linear_modules

    base = dict(base_model.named_modules())
    layers = quant_linear_modules(quantized_model)
    rows = []
    for i, (name, module) in enumerate(layers):
        if cancel is not None and cancel():
            raise Cancelled(f"layer errors cancelled at {name}")
        if name not in base:
            continue
        w = base[name].weight.data.float()
        deq = dequantized_weight(module)
        metrics = error_metrics(w, deq.to(w.device))
        nbytes = sum(t.numel() * t.element_size() for t in (getattr(module, k, None) for k in
                                                              ("qweight", "qzeros", "scales", "g_idx"))
                     if isinstance(t, torch.Tensor))
        rows.append({"layer": name, "out_features": w.shape[0], "in_features": w.shape[1], **metrics,
                     "bits_per_param": 8 * nbytes / w.numel(), "code_entropy_bits": float("nan")})
        if progress and (i % 8 == 0 or i == len(layers) - 1):
            progress((i + 1) / len(layers), f"{quantizer.config.label}: weight error {i + 1}/{len(layers)}")
    return pd.DataFrame(rows)


def layer_detail(base_model: torch.nn.Module, quantizer: Quantizer, layer: str) -> dict[str, Any]:
    """Everything the inspector shows for one layer: metrics, code usage, histogram data."""
    from quantlib.distributions import block_normalized_histogram
    from quantlib.outliers import weight_outlier_stats

    refs = {ref.name: ref for ref in quantizable_layers(base_model, quantizer)}
    if layer not in refs:
        names = list(refs)
        raise QuantlibError(f"no layer named {layer!r} that {quantizer.config.label} quantizes; e.g. "
                            f"{', '.join(names[:3])} ({len(names)} in all)")
    w = refs[layer].get().contiguous()
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
    from quantlib.schemes import QUANTIZER_MAPPING

    config = parse_config(config)
    quantizer_cls = QUANTIZER_MAPPING[config.quantizer_key]
    shapes = model_shapes(model_config)
    decisions = quantizer_cls.classify(config, shapes)
    problems = []
    for w in shapes.matmul_weights:
        if decisions[w.name] is not None:
            continue
        name = w.module if w.kind != "experts" else f"{w.name}[*] ({w.n_matrices} experts)"
        problem = quantizer_cls.check_shape(config, name, (w.out_features, w.in_features))
        if problem is not None:
            problems.append(problem)
    return problems
