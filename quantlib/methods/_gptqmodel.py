"""The gptqmodel helper shared by GPTQ and AWQ: the real calibration, the model-level quantizer both
share and the reading of their packed buffers (their common config keys are in `_gptqmodel_config`).

GPTQ and AWQ for real: gptqmodel calibrates on the built-in calibration text, we load the result back.

`calibrate` runs gptqmodel's own GPTQ or AWQ on a model folder (the default model's converted
safetensors folder, or a user's) with token windows cut from `builtin_text("calib")` (disjoint
from the evaluation text), saves the quantized checkpoint atomically (a temporary folder renamed
into place) and loads it back through gptqmodel's loader with its pure-torch CPU kernels
(`TorchLinear` for GPTQ, `AwqTorchLinear` for AWQ). The loaded object is the plain transformers
model (`model(input_ids).logits`), its linear layers replaced by gptqmodel's QuantLinear modules
holding the packed buffers (qweight, qzeros, scales, g_idx), so evaluation and memory counting
work on what a user would deploy.

Progress comes from gptqmodel's layer-complete callback (one call per decoder layer); cancel is
checked there, so a run stops at the next decoder-layer boundary and nothing is saved. Transformer
blocks are quantized in order, so the callback also gives an honest fraction done.

Why not transformers + optimum for loading: transformers 5 loads GPTQ checkpoints through
gptqmodel itself (no optimum); going through gptqmodel directly lets us pick the CPU kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch

from quantlib.callbacks import CancelFn, ProgressFn
from quantlib.configs import QuantConfig
from quantlib.corpus import builtin_text
from quantlib.errors import BackendUnavailableError, Cancelled, QuantlibError
from quantlib.methods.base.families import CalibratedQuantizer
from quantlib.methods.base.records import LayerWeight, QuantizedModel, ShapeError
from quantlib.methods.base.rules import group_size_problem


#: The issue's defaults: 128 windows of 512 tokens of calibration text.
DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
#: gptqmodel's CPU worker pool; 2 matches the 2-core machines this runs on.
DEFAULT_CPU_WORKERS = "2"


@dataclass
class CalibrationSettings:
    """How much calibration text, in which batches."""

    n_samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = 4
    text: str | None = None  # None: the built-in calibration split (never the evaluation split)
    #: AWQ's weight-clipping search (AutoAWQ's `apply_clip`) costs ~45 s per decoder layer on a 2-core
    #: CPU whatever the calibration size (7x the scale search); off by default on CPU, so AWQ here is
    #: the activation-aware scale search plus plain min/max group rounding.
    awq_clip_search: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"n_samples": self.n_samples, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "awq_clip_search": self.awq_clip_search,
                "text": "builtin calib" if self.text is None else f"user text ({len(self.text)} chars)"}


@dataclass
class CalibrationResult:
    """The loaded quantized model and what it took to make it."""

    model: torch.nn.Module  # transformers model with gptqmodel QuantLinear layers
    tokenizer: Any
    checkpoint_dir: Path
    calibration_seconds: float  # gptqmodel's quantize() call alone
    total_seconds: float  # load + calibrate + save + reload
    n_tokens: int
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)


def _import_gptqmodel():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", DEFAULT_CPU_WORKERS)
    try:
        from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    except ImportError as exc:  # pragma: no cover - exercised only without the library
        raise BackendUnavailableError("GPTQ/AWQ", f"gptqmodel cannot be imported ({exc})",
                                      "Install it with: pip install --no-deps -r requirements-gptq.txt") from exc
    # gptqmodel writes per-run logs to ./logs (the caller's working directory, e.g. the repo): redirect.
    from gptqmodel.looper import loop_processor

    loop_processor._PROJECT_LOG_DIR = Path(tempfile.gettempdir()) / "quantlib-gptqmodel-logs"
    return GPTQModel, QuantizeConfig, BACKEND


def allow_fp32(kernel_classes: list[type]) -> None:
    """Let gptqmodel's pure-torch CPU kernels run in fp32, like the baseline and the RTN schemes.

    They declare fp16/bf16 only (`SUPPORTS_DTYPES`), the GPU kernels' limits; their math is plain
    torch (unpack, scale, matmul) and runs in fp32 unchanged. Without this the quantized model
    would run in bf16, which this CPU has no instructions for (7x slower) and which would add
    bf16 activation error to the comparison. Must run before gptqmodel validates a kernel (it
    caches the verdict).
    """
    for cls in kernel_classes:
        if torch.float32 not in cls.SUPPORTS_DTYPES:
            cls.SUPPORTS_DTYPES = [*cls.SUPPORTS_DTYPES, torch.float32]


def calibration_samples(tokenizer: Any, n_samples: int, seq_len: int, text: str | None = None) -> list[dict]:
    """`n_samples` windows of `seq_len` tokens from the calibration text, evenly spread.

    The built-in calibration split holds about 40k tokens: when more tokens are asked for than it
    has (128 x 512 = 65k), windows overlap (evenly spaced starts) rather than repeat.
    """
    if n_samples < 1 or seq_len < 8:
        raise QuantlibError(f"calibration needs n_samples >= 1 and seq_len >= 8 (got {n_samples} x {seq_len})")
    ids = tokenizer(text if text is not None else builtin_text("calib"), return_tensors="pt").input_ids[0]
    if ids.numel() < seq_len:
        raise QuantlibError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    last = ids.numel() - seq_len
    starts = [round(i * last / max(1, n_samples - 1)) for i in range(n_samples)] if n_samples > 1 else [0]
    if n_samples * seq_len <= ids.numel():  # enough text: consecutive, non-overlapping windows
        starts = [i * seq_len for i in range(n_samples)]
    return [{"input_ids": ids[s:s + seq_len].tolist(), "attention_mask": [1] * seq_len} for s in starts]


def calibration_model_dir(source: str) -> str:
    """The safetensors folder gptqmodel reads: the default model's converted folder, or a user folder."""
    from quantlib.models import default_model_dir

    if source in ("", "default"):
        return str(default_model_dir())
    path = Path(source).expanduser()
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        raise QuantlibError(f"GPTQ/AWQ calibration needs a local folder with config.json and safetensors weights; "
                            f"{source!r} is not one (convert GGUF or hub models to a folder first)")
    return str(path)


PACK_DTYPE_BITS = {"int8": 8, "int16": 16, "int32": 32, "int64": 64}
#: Group sizes worth suggesting for GPTQ/AWQ (what the gptqmodel kernels are built for).
CALIBRATED_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)


def groups(config: QuantConfig, in_features: int) -> tuple[int, int]:
    """(group size, number of groups) with -1 meaning one group spanning the input."""
    size = in_features if config.group_size == -1 else config.group_size
    return size, -(-in_features // size)


def group_problem(config: QuantConfig, name: str, in_features: int) -> str | None:
    return group_size_problem(name, in_features, config.group_size, CALIBRATED_GROUP_SIZES, minus_one=True)


def pack_word_bits(config: QuantConfig) -> int:
    return PACK_DTYPE_BITS[getattr(config, "pack_dtype", None) or "int32"]


class GptqmodelQuantizer(CalibratedQuantizer):
    """A method gptqmodel calibrates here (GPTQ, AWQ): the shared model-level pipeline.

    Subclasses say how to build gptqmodel's QuantizeConfig, which kernels and dtypes to use, which
    library workarounds to install, and how to read a packed layer back as a dense weight.
    """

    requires = (("gptqmodel", "gptqmodel"),)
    library = "gptqmodel"
    calibrated = True
    #: (fixed seconds, seconds per calibration token) on the 2-core CPU for the 135M default model,
    #: from benchmarks/bench_calibrated.py and tests/test_gptq_awq.py; scaled by size. Subclasses set theirs.
    CPU_CALIBRATION_COST: ClassVar[tuple[float, float]] = (0.0, 0.0)

    def environment_notes(self, device: str) -> list[str]:
        if device == "cuda":
            return [f"{self.method_name} calibrates with gptqmodel on the GPU and runs with its pure-torch kernel there"]
        return [f"{self.method_name} calibrates with gptqmodel on the CPU (GPTQMODEL_CPU_WORKERS=2) and runs with its "
                "pure-torch kernel; calibration takes minutes, not seconds"]

    @classmethod
    def calibration_settings(cls, n_tokens: int) -> "CalibrationSettings":
        """Windows of up to 512 tokens, as many as `n_tokens` fill (at least one)."""
        seq_len = max(16, min(DEFAULT_SEQ_LEN, int(n_tokens)))
        return CalibrationSettings(n_samples=max(1, int(n_tokens) // seq_len), seq_len=seq_len)

    @classmethod
    def calibration_seconds(cls, config: QuantConfig, n_params: int, n_tokens: int) -> float:
        fixed, per_token = cls.CPU_CALIBRATION_COST
        return n_params / 135e6 * (fixed + per_token * n_tokens)

    @classmethod
    def shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        out_features, in_features = shape[0], shape[-1]
        return group_problem(config, name, in_features) or cls.pack_problem(config, name, out_features, in_features)

    @classmethod
    def pack_problem(cls, config: QuantConfig, name: str, out_features: int, in_features: int) -> str | None:
        """Why the packed layout cannot hold a layer of this shape, or None."""
        return None

    # ----- hooks -------------------------------------------------------------------------
    def gptqmodel_config(self, QuantizeConfig: Any) -> Any:
        """Our validated config as gptqmodel's QuantizeConfig."""
        raise NotImplementedError

    def gptqmodel_backends(self, BACKEND: Any) -> tuple[Any, Any, torch.dtype, torch.dtype]:
        """(quantize backend, load backend, calibration dtype, evaluation dtype)."""
        raise NotImplementedError

    def prepare_library(self) -> None:
        """Install this method's workarounds of gptqmodel (idempotent, safe for concurrent runs)."""

    def calibration_context(self, settings: CalibrationSettings) -> contextlib.AbstractContextManager:
        """A context the library's quantize() call runs in (per-run switches)."""
        return contextlib.nullcontext()

    def calibration_notes(self, settings: CalibrationSettings) -> list[str]:
        return []

    def dequantize_module(self, module: torch.nn.Module) -> torch.Tensor:
        """The weight a QuantLinear computes with, through gptqmodel's own unpacking (any layout)."""
        raise NotImplementedError

    # ----- the pipeline --------------------------------------------------------------------
    def quantize_model(self, *, base: Any = None, source: str = "default", dtype: torch.dtype = torch.float32,
                       trust_remote_code: bool = False, allow_pickle: bool = False, progress: Any = None,
                       cancel: Any = None, calibration: Any = None) -> QuantizedModel:
        """Calibrate with gptqmodel on the model's safetensors folder (`calibration`: a
        `CalibrationSettings`; default 128 x 512 tokens of the built-in calibration text) and load
        the saved checkpoint back."""
        from quantlib.footprint import measure_footprint

        started = time.perf_counter()
        model_dir = calibration_model_dir(source)
        # Refuse unfit shapes from config.json before any calibration starts.
        problems = self.shape_problems(self.config, json.loads((Path(model_dir) / "config.json").read_text()))
        if problems:
            raise ShapeError(problems)
        result = calibrate(self, model_dir, settings=calibration, progress=progress, cancel=cancel,
                           trust_remote_code=trust_remote_code)
        memory = measure_footprint(result.model)
        memory.notes.extend(result.notes)
        desc = {"source": source, "path": model_dir, "quantized_checkpoint": str(result.checkpoint_dir),
                "calibration": {**(calibration.to_dict() if calibration is not None else {}),
                                "tokens": result.n_tokens}}
        return QuantizedModel(result.model, result.tokenizer, self.config, self.backend, memory,
                              time.perf_counter() - started, desc, calibration_seconds=result.calibration_seconds,
                              checkpoint_dir=str(result.checkpoint_dir))

    @torch.no_grad()
    def layer_weights(self, base_model: torch.nn.Module, quantized: Any = None,
                      cancel: Any = None) -> Iterator[LayerWeight]:
        """Each QuantLinear of the calibrated checkpoint, dequantized by gptqmodel, against the base
        weight of the same name. (AWQ folds its per-channel scales into the weights: there the error
        measures what was stored, not rounding alone; perplexity is the honest end-to-end figure.)"""
        if quantized is None:
            raise QuantlibError(f"{self.config.label}: layer errors of a calibration-based scheme need the "
                                "quantized model (quantize_model first, then layer_errors(..., quantized=qm))")
        base = dict(base_model.named_modules())
        for name, module in quant_linear_modules(getattr(quantized, "model", quantized)):
            if cancel is not None and cancel():
                raise Cancelled(f"layer errors cancelled at {name}")
            if name not in base:
                continue
            w = base[name].weight.data.float()
            deq = self.dequantize_module(module).to(w.device)
            nbytes = sum(t.numel() * t.element_size() for t in (getattr(module, k, None) for k in
                                                                  ("qweight", "qzeros", "scales", "g_idx"))
                         if isinstance(t, torch.Tensor))
            yield LayerWeight(name, w, deq, None, 8 * nbytes / w.numel())

    def count_layers(self, base_model: torch.nn.Module, quantized: Any = None) -> int:
        return len(quant_linear_modules(getattr(quantized, "model", quantized))) if quantized is not None else 0


def calibrate(quantizer: GptqmodelQuantizer, model_dir: str | Path, *, settings: CalibrationSettings | None = None,
              out_dir: str | Path | None = None, progress: ProgressFn | None = None,
              cancel: CancelFn | None = None, trust_remote_code: bool = False) -> CalibrationResult:
    """Quantize the model in `model_dir` with gptqmodel (the quantizer's method) and load the result back.

    The checkpoint goes to `out_dir` (default: a fresh folder under the system temp dir), written
    first to a sibling temporary folder and renamed into place when complete.
    """
    GPTQModel, QuantizeConfig, BACKEND = _import_gptqmodel()
    quantizer.prepare_library()
    from gptqmodel.looper.module_looper import StopMainLoop

    settings = settings or CalibrationSettings()
    model_dir = Path(model_dir)
    method = quantizer.method_name
    quant_backend, load_backend, calib_dtype, dtype = quantizer.gptqmodel_backends(BACKEND)
    started = time.perf_counter()

    def say(fraction: float, message: str) -> None:
        if progress is not None:
            progress(min(1.0, max(0.0, fraction)), message)

    say(0.0, f"{method}: loading {model_dir.name} for calibration")
    qconfig = quantizer.gptqmodel_config(QuantizeConfig)
    device = quantizer.backend.device  # calibrate where the comparison runs: the GPU when there is one
    model = GPTQModel.load(str(model_dir), qconfig, device=device, dtype=calib_dtype,
                           trust_remote_code=trust_remote_code)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    hf_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # gptqmodel wraps it in a Tokenicer
    samples = calibration_samples(hf_tokenizer, settings.n_samples, settings.seq_len, settings.text)
    n_layers = int(getattr(model.model.config, "num_hidden_layers", 0)) or 1
    cancelled: list[int] = []

    def layer_complete(layer_idx: int, submodule_finalized: bool) -> Any:
        if submodule_finalized:  # the second call per layer, once its modules are packed
            say(0.05 + 0.85 * (layer_idx + 1) / n_layers,
                f"{method}: decoder layer {layer_idx + 1}/{n_layers} quantized")
        if cancel is not None and cancel():
            cancelled.append(layer_idx)
            raise StopMainLoop(f"cancelled after layer {layer_idx}")
        return None

    model.layer_callback = layer_complete
    say(0.05, f"{method}: calibrating on {len(samples)} x {settings.seq_len} tokens")
    t0 = time.perf_counter()
    with quantizer.calibration_context(settings):
        model.quantize(samples, batch_size=settings.batch_size, backend=quant_backend)
    calibration_seconds = time.perf_counter() - t0
    if cancelled or (cancel is not None and cancel()):
        raise Cancelled(f"{method} calibration cancelled after decoder layer {cancelled[0] + 1 if cancelled else '?'}")

    say(0.92, f"{method}: saving the quantized checkpoint")
    target = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"quantlib-{method.lower()}-"))
    if target.exists() and any(target.iterdir()):
        raise QuantlibError(f"{target} exists and is not empty; choose a new folder for the checkpoint")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        model.save(str(staging))
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    del model

    say(0.96, f"{method}: loading the checkpoint back with gptqmodel's torch kernel on {device}")
    loaded = GPTQModel.load(str(target), device=device, backend=load_backend, dtype=dtype,
                            trust_remote_code=trust_remote_code)
    hf_model = loaded.model
    hf_model.eval()
    say(1.0, f"{method}: done")
    notes = [f"calibrated with gptqmodel on {len(samples)} x {settings.seq_len} tokens of the built-in calibration "
             "text" if settings.text is None else "calibrated on user text",
             f"calibrated in {str(calib_dtype).removeprefix('torch.')}, runs in {str(dtype).removeprefix('torch.')} "
             f"with gptqmodel's {load_backend.value} kernel on {device}", *quantizer.calibration_notes(settings)]
    return CalibrationResult(hf_model, hf_tokenizer, target, calibration_seconds, time.perf_counter() - started,
                             len(samples) * settings.seq_len, dtype, notes)


# ----------------------------------------------------------------------------------------
# reading the packed buffers back
# ----------------------------------------------------------------------------------------

def is_quant_linear(module: torch.nn.Module) -> bool:
    """gptqmodel (and AutoGPTQ/AutoAWQ-style) QuantLinear: holds a packed `qweight` buffer."""
    return isinstance(getattr(module, "qweight", None), torch.Tensor) and hasattr(module, "scales")


def quant_linear_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_quant_linear(m)]


def as_out_in(module: torch.nn.Module, w: torch.Tensor) -> torch.Tensor:
    """A dequantized QuantLinear weight as (out, in): gptqmodel returns (in, out) like qweight's layout."""
    out_f, in_f = int(module.out_features), int(module.in_features)
    if w.shape == (in_f, out_f):
        w = w.t()
    if w.shape != (out_f, in_f):
        raise QuantlibError(f"dequantized weight has shape {tuple(w.shape)}, expected {(out_f, in_f)}")
    return w.contiguous()
