"""GPTQ and AWQ for real: gptqmodel calibrates on the built-in calibration text, we load the result back.

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

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from quantlib.configs import AwqQuantConfig, GPTQQuantConfig, QuantConfig
from quantlib.corpus import builtin_text
from quantlib.errors import BackendUnavailableError, Cancelled, QuantlibError

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

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


def gptqmodel_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gptqmodel") is not None


def _import_gptqmodel():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", DEFAULT_CPU_WORKERS)
    try:
        from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    except ImportError as exc:  # pragma: no cover - exercised only without the library
        raise BackendUnavailableError("GPTQ/AWQ", f"gptqmodel cannot be imported ({exc})",
                                      "Install it with: pip install --no-deps -r requirements-gptq.txt") from exc
    _allow_fp32_torch_kernels()
    # gptqmodel writes per-run logs to ./logs (the caller's working directory, e.g. the repo): redirect.
    from gptqmodel.looper import loop_processor

    loop_processor._PROJECT_LOG_DIR = Path(tempfile.gettempdir()) / "quantlib-gptqmodel-logs"
    return GPTQModel, QuantizeConfig, BACKEND


def _allow_fp32_torch_kernels() -> None:
    """Let gptqmodel's pure-torch CPU kernels run in fp32, like the baseline and the RTN schemes.

    They declare fp16/bf16 only (`SUPPORTS_DTYPES`), the GPU kernels' limits; their math is plain
    torch (unpack, scale, matmul) and runs in fp32 unchanged. Without this the quantized model
    would run in bf16, which this CPU has no instructions for (7x slower) and which would add
    bf16 activation error to the comparison. Must run before gptqmodel validates a kernel (it
    caches the verdict).
    """
    from gptqmodel.nn_modules.qlinear import torch as gptq_torch
    from gptqmodel.nn_modules.qlinear import torch_awq

    for cls in (*[c for c in vars(gptq_torch).values() if isinstance(c, type)
                  and getattr(c, "SUPPORTS_DTYPES", None) and c.__module__ == gptq_torch.__name__],
                torch_awq.AwqTorchLinear):
        if torch.float32 not in cls.SUPPORTS_DTYPES:
            cls.SUPPORTS_DTYPES = [*cls.SUPPORTS_DTYPES, torch.float32]
    # AwqTorchLinear computes fp32 inputs in fp16 (its GPU habit): SmolLM2's MLP activations
    # overflow fp16 (perplexity in the millions). Give fp32 inputs an fp32 path: same unpacking
    # (gptqmodel's dequantize_gemm), fp32 scales and matmul.
    if not getattr(torch_awq.AwqTorchLinear, "_quantlib_fp32", False):
        original_forward = torch_awq.AwqTorchLinear.forward

        def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
            if x.dtype != torch.float32 or self.adapter:
                return original_forward(self, x)
            out = x.reshape(-1, x.shape[-1]) @ awq_dequantize(self).to(x.device)
            if self.bias is not None:
                out = out + self.bias.float()
            return out.reshape(*x.shape[:-1], self.out_features)

        torch_awq.AwqTorchLinear.forward = forward
        torch_awq.AwqTorchLinear._quantlib_fp32 = True


def awq_dequantize(module: Any) -> torch.Tensor:
    """(in, out) fp32 weight of an AWQ GEMM QuantLinear, through gptqmodel's own unpacking."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(qweight=module.qweight, qzeros=module.qzeros, scales=module.scales.float(),
                           bits=module.bits, group_size=module.group_size).float()


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


def gptqmodel_quantize_config(config: QuantConfig, QuantizeConfig: Any) -> Any:
    """Our validated config as gptqmodel's QuantizeConfig (offload to disk off: it is 3x slower on CPU)."""
    common = dict(bits=config.bits, group_size=config.group_size, desc_act=bool(config.desc_act),
                  offload_to_disk=False)
    if isinstance(config, GPTQQuantConfig):
        return QuantizeConfig(sym=bool(config.sym), damp_percent=config.damp_percent, **common)
    if isinstance(config, AwqQuantConfig):
        # AutoAWQ's zero_point=True means asymmetric codes (gptqmodel: sym=False).
        return QuantizeConfig(method="awq", format="gemm", sym=not config.zero_point, **common)
    raise TypeError(f"not a calibration-based config: {type(config).__name__}")


def _backends(config: QuantConfig, BACKEND: Any) -> tuple[Any, Any, torch.dtype, torch.dtype]:
    """(quantize backend, load backend, calibration dtype, evaluation dtype): gptqmodel's torch kernels.

    The loaded checkpoint always runs in fp32, like the baseline. AWQ calibrates in bf16, its
    native dtype: gptqmodel 7.6.0's AWQ calibrated in fp32 folds scales into the norms that do not
    match those applied to q/k/v (layer 0's effective q_proj off by 138%, perplexity in the millions);
    in bf16 the same check gives 8%.
    """
    if isinstance(config, AwqQuantConfig):
        return BACKEND.AWQ_TORCH, BACKEND.AWQ_TORCH, torch.bfloat16, torch.float32
    return BACKEND.GPTQ_TORCH, BACKEND.GPTQ_TORCH, torch.float32, torch.float32


def calibrate(config: QuantConfig, model_dir: str | Path, *, settings: CalibrationSettings | None = None,
              out_dir: str | Path | None = None, progress: ProgressFn | None = None,
              cancel: CancelFn | None = None, trust_remote_code: bool = False) -> CalibrationResult:
    """Quantize the model in `model_dir` with gptqmodel's GPTQ or AWQ and load the result back.

    The checkpoint goes to `out_dir` (default: a fresh folder under the system temp dir), written
    first to a sibling temporary folder and renamed into place when complete.
    """
    GPTQModel, QuantizeConfig, BACKEND = _import_gptqmodel()
    from gptqmodel.looper.module_looper import StopMainLoop

    settings = settings or CalibrationSettings()
    model_dir = Path(model_dir)
    method = "AWQ" if isinstance(config, AwqQuantConfig) else "GPTQ"
    quant_backend, load_backend, calib_dtype, dtype = _backends(config, BACKEND)
    started = time.perf_counter()

    def say(fraction: float, message: str) -> None:
        if progress is not None:
            progress(min(1.0, max(0.0, fraction)), message)

    say(0.0, f"{method}: loading {model_dir.name} for calibration")
    qconfig = gptqmodel_quantize_config(config, QuantizeConfig)
    model = GPTQModel.load(str(model_dir), qconfig, device="cpu", dtype=calib_dtype,
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
    from gptqmodel.looper import awq_processor

    original_init = awq_processor.AWQProcessor.__init__

    def awq_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.apply_clip = settings.awq_clip_search

    awq_processor.AWQProcessor.__init__ = awq_init
    t0 = time.perf_counter()
    try:
        model.quantize(samples, batch_size=settings.batch_size, backend=quant_backend)
    finally:
        awq_processor.AWQProcessor.__init__ = original_init
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

    say(0.96, f"{method}: loading the checkpoint back with gptqmodel's torch CPU kernel")
    loaded = GPTQModel.load(str(target), device="cpu", backend=load_backend, dtype=dtype,
                            trust_remote_code=trust_remote_code)
    hf_model = loaded.model
    hf_model.eval()
    say(1.0, f"{method}: done")
    notes = [f"calibrated with gptqmodel on {len(samples)} x {settings.seq_len} tokens of the built-in calibration "
             "text" if settings.text is None else "calibrated on user text",
             f"calibrated in {str(calib_dtype).removeprefix('torch.')}, runs in {str(dtype).removeprefix('torch.')} "
             f"with gptqmodel's {load_backend.value} CPU kernel"]
    if method == "AWQ" and not settings.awq_clip_search:
        notes.append("AWQ weight-clipping search off (CPU time); scale search on")
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


@torch.no_grad()
def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The (out, in) fp32 weight a QuantLinear computes with, through gptqmodel's own dequantize path."""
    if hasattr(module, "dequantize_weight"):  # GPTQ QuantLinear
        w = module.dequantize_weight().float()
    else:  # AWQ (AwqTorchLinear has no dequantize method; its forward unpacks with dequantize_gemm)
        w = awq_dequantize(module)
    out_f, in_f = int(module.out_features), int(module.in_features)
    if w.shape == (in_f, out_f):  # gptqmodel returns (in, out) like qweight's layout
        w = w.t()
    if w.shape != (out_f, in_f):
        raise QuantlibError(f"dequantized weight has shape {tuple(w.shape)}, expected {(out_f, in_f)}")
    return w.contiguous()
