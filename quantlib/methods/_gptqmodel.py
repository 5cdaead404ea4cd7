"""The gptqmodel helper shared by GPTQ and AWQ: their common config keys, and the real calibration.

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
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch

from quantlib.configs import FieldSpec, QuantConfig, _copy, _json_problem
from quantlib.corpus import builtin_text
from quantlib.errors import _MISSING, BackendUnavailableError, Cancelled, FieldError, QuantlibError
from quantlib.methods.base import CalibratedQuantizer, group_size_problem, LayerWeight, QuantizedModel, ShapeError

#: String names transformers' GPTQConfig accepts for `dataset` (a list of texts is the alternative).
GPTQ_DATASET_NAMES = ("wikitext2", "c4", "c4-new")
#: GPTQ checkpoint formats: transformers documents "gptq" (v1) and "gptq_v2"; gptqmodel 7.x
#: (`gptqmodel.quantization.config.FORMAT`) also writes "gptq_p", "marlin", "bitblas" and "qqq".
GPTQ_FORMATS = ("gptq", "gptq_v2", "gptq_p", "marlin", "bitblas", "qqq")
#: Kernel names: transformers passes `backend` through to gptqmodel; these are gptqmodel 7.7's
#: `BACKEND` values for GPTQ plus the shorter names of gptqmodel <= 5 still found in saved configs.
GPTQ_BACKENDS = (
    "auto", "auto_trainable", "gptq_torch", "gptq_torch_fused", "gptq_torch_int8", "gptq_triton",
    "gptq_exllama_v2", "gptq_machete", "gptq_marlin", "gptq_bitblas", "gptq_torch_aten",
    "gptq_torch_cpu_avx512", "torch", "torch_fused", "triton", "exllama_v1", "exllama_v2", "marlin",
    "bitblas", "ipex", "machete", "qqq",
)
#: transformers' `AwqFormat` and `AwqBackend` enums (AwqConfig.post_init checks against them).
AWQ_FORMATS = ("gemm", "gemv", "gemv_fast", "llm-awq")
AWQ_BACKENDS = ("auto", "auto_trainable", "machete", "marlin", "exllama_v2", "exllama_v1", "gemm",
                "gemm_triton", "gemv", "gemv_fast", "torch_awq", "torch_fused_awq")
#: gptqmodel's `pack_dtype` choices (integer container the codes are packed into).
PACK_DTYPES = ("int8", "int16", "int32", "int64")


def _group_size_rule(value: int) -> str | None:
    return "must be positive, or -1 for one group per output channel" if value == 0 else None


def _dataset_rule(value: Any) -> str | None:
    if isinstance(value, str):
        return None if value in GPTQ_DATASET_NAMES else "is not a dataset name transformers knows"
    if isinstance(value, list):
        if not value:
            return "must hold at least one calibration text"
        return None if all(isinstance(v, str) and v for v in value) else "every entry must be a non-empty string"
    return "must be a dataset name or a list of calibration texts"


def _modules_in_block_rule(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of module-name lists"
    for group in value:
        names = group if isinstance(group, list) else [group]
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            return "every entry must be a module name or a non-empty list of module names"
    return None


def _non_empty_string_rule(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def _activation_rule(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return None
    if isinstance(value, dict):
        return _json_problem(value)
    return "must be a mode name or a JSON object"


#: The `dynamic` override keys that change what a layer stores (the planner models these); others are kept.
DYNAMIC_STORAGE_KEYS = ("bits", "group_size")


def dynamic_override(dynamic: dict[str, Any] | None, module: str) -> dict[str, Any] | bool | None:
    """What gptqmodel's `dynamic` says about `module` (its full name, e.g. "model.layers.3.mlp.up_proj"):
    the overrides of the first pattern that matches, False where that pattern is negative ("-:" prefix:
    the module stays unquantized), None where none matches. gptqmodel's rule
    (`quantization.config.dynamic_get`): patterns are tried in order, "+:" or no prefix is positive, and a
    pattern matches when the regex matches at the start of the name (anchor with "$" for a full match)."""
    for pattern, overrides in (dynamic or {}).items():
        negative = pattern.startswith("-:")
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if re.match(raw, module):
            return False if negative else dict(overrides)
    return None


def _dynamic_rule(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "must be an object of module regex -> overrides"
    for pattern, overrides in value.items():
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        try:
            re.compile(raw)
        except re.error as exc:
            return f"pattern {pattern!r} is not a regular expression ({exc})"
        if not isinstance(overrides, dict):
            return f"pattern {pattern!r}: overrides must be an object such as {{\"bits\": 8}}"
        bits = overrides.get("bits", 4)
        if isinstance(bits, bool) or bits not in (2, 3, 4, 8):
            return f"pattern {pattern!r}: bits {bits!r} is not one of 2, 3, 4, 8"
        group = overrides.get("group_size", 128)
        if isinstance(group, bool) or not isinstance(group, int) or group == 0 or group < -1:
            return f"pattern {pattern!r}: group_size {group!r} must be a positive integer or -1"
        problem = _json_problem(overrides)
        if problem:
            return f"pattern {pattern!r}: {problem}"
    return None


def _gptq_family_fields(*, bits: tuple[int, ...], bits_default: int, formats: tuple[str, ...], format_default: str,
                        backends: tuple[str, ...], backend_nullable: bool, method: str) -> tuple[FieldSpec, ...]:
    """The keys transformers' GPTQConfig writes (AwqConfig inherits all of them)."""
    return (
        FieldSpec("bits", int, bits_default, f"Bits per weight code ({', '.join(map(str, bits))}).",
                  choices=bits, title="Bits"),
        FieldSpec("tokenizer", str, None, "Tokenizer id or path used to tokenize the calibration texts "
                  "(quantlib uses the model's own tokenizer when null).", nullable=True,
                  validator=_non_empty_string_rule, title="Tokenizer"),
        FieldSpec("dataset", object, None,
                  "Calibration data: one of transformers' dataset names or a list of texts. quantlib never "
                  "downloads datasets; its calibration text comes from the built-in corpus "
                  "(quantlib.corpus), so a name here is kept for transformers only.",
                  nullable=True, validator=_dataset_rule, json_type=["string", "array"],
                  allowed=f"one of {', '.join(json.dumps(d) for d in GPTQ_DATASET_NAMES)} or a non-empty list "
                          "of strings", title="Calibration dataset"),
        FieldSpec("group_size", int, 128, "Input features per scale/zero-point group (must divide every layer "
                  "width); -1 means one group per output channel.", minimum=-1, validator=_group_size_rule,
                  allowed="a positive integer or -1", title="Group size"),
        FieldSpec("damp_percent", float, 0.1, f"{method}: fraction of the mean Hessian diagonal added as dampening.",
                  minimum=0.0, maximum=1.0, exclusive_minimum=True, exclusive_maximum=True, title="Damping"),
        FieldSpec("desc_act", bool, False, "Act-order: quantize columns by decreasing activation size "
                  "(better accuracy, g_idx reordering at inference).", title="Act-order (desc_act)"),
        FieldSpec("act_group_aware", bool, True, "Group-aware activation ordering (GAR); only with desc_act "
                  "false (transformers turns it off when desc_act is true).", title="Group-aware order"),
        FieldSpec("sym", bool, True, "Symmetric integer codes (zero points are still stored).", title="Symmetric"),
        FieldSpec("true_sequential", bool, True, "Quantize layers inside a block one after another, each seeing "
                  "the already-quantized outputs.", title="True sequential"),
        FieldSpec("format", str, format_default, "Checkpoint weight layout.", choices=formats, title="Format"),
        FieldSpec("meta", dict, None, "Tool metadata (quantizer versions and the like); kept as is.",
                  nullable=True, title="Metadata"),
        FieldSpec("backend", str, "auto" if not backend_nullable else "auto", "Inference kernel to load with.",
                  choices=backends, nullable=backend_nullable, title="Kernel backend"),
        FieldSpec("model_seqlen", int, None, "Sequence length of the calibration samples.", minimum=1,
                  nullable=True, title="Calibration sequence length"),
        FieldSpec("block_name_to_quantize", str, None, "Name of the module list holding the transformer blocks "
                  "(inferred when null, e.g. model.layers).", nullable=True, validator=_non_empty_string_rule,
                  title="Block name"),
        FieldSpec("module_name_preceding_first_block", list, None, "Modules run before the first block.",
                  nullable=True, title="Modules before first block"),
        FieldSpec("batch_size", int, 1, "Calibration batch size.", minimum=1, title="Batch size"),
        FieldSpec("pad_token_id", int, None, "Pad token id (needed when batch_size > 1).", minimum=0,
                  nullable=True, title="Pad token id"),
        FieldSpec("max_input_length", int, None, "Maximum input length (exllama act-order buffer).", minimum=1,
                  nullable=True, title="Max input length"),
        FieldSpec("cache_block_outputs", bool, True, "Cache each block's outputs as the next block's inputs.",
                  title="Cache block outputs"),
        FieldSpec("modules_in_block_to_quantize", object, None,
                  "Module names inside each block to quantize, as sequential groups (all linears when null). "
                  "transformers needs the optimum package to accept it.", nullable=True,
                  validator=_modules_in_block_rule, json_type=["array"],
                  allowed="a non-empty list of module-name lists", title="Modules in block"),
    )


def _extra(name: str, kind: type, description: str, **kw: Any) -> FieldSpec:
    return FieldSpec(name, kind, None, description, **kw)


#: Keys GPTQ/AWQ checkpoints carry beyond transformers' own, with the tool that writes them.
_TOOL_EXTRAS = (
    _extra("method", str, "gptqmodel 7.x: the method name again (must equal quant_method)."),
    _extra("pack_dtype", str, "gptqmodel: integer type the codes are packed into (storage plan uses it).",
           choices=PACK_DTYPES),
    _extra("lm_head", bool, "gptqmodel: whether the output head is quantized too."),
    _extra("dynamic", dict, "gptqmodel: per-module overrides, module regex -> settings (bits, group_size, ...); "
           "a \"-:\" pattern leaves the module unquantized. The first matching pattern wins.",
           nullable=True, validator=_dynamic_rule, allowed='an object such as {"-:^model\\\\.layers\\\\.0\\\\.": {}, '
           '"+:.*down_proj$": {"bits": 8}}'),
    _extra("rotation", str, "gptqmodel: rotation preprocessing name.", nullable=True),
    _extra("activation", object, "gptqmodel 7.x: activation stream mode.", nullable=True,
           validator=_activation_rule, allowed="a mode name or a JSON object", json_type=["string", "object"]),
    _extra("adapter", dict, "gptqmodel: EoRA/LoRA adapter settings.", nullable=True),
    _extra("hyb_act", bool, "gptqmodel: hybrid act-order flag."),
    _extra("modules_to_not_convert", list, "Module names left unquantized.", nullable=True, patterns=True),
)
GPTQ_EXTRA_FIELDS = (
    _extra("checkpoint_format", str, "Legacy mirror of `format` (transformers writes both; they must agree).",
           choices=GPTQ_FORMATS, nullable=True),
    *_TOOL_EXTRAS,
    _extra("static_groups", bool, "AutoGPTQ: groups fixed before act-order reordering."),
    _extra("model_name_or_path", str, "AutoGPTQ: source model path.", nullable=True),
    _extra("model_file_base_name", str, "AutoGPTQ: weight file base name.", nullable=True),
    _extra("is_marlin_format", bool, "AutoGPTQ: weights saved in Marlin layout."),
    _extra("use_exllama", bool, "optimum / transformers < 4.49: use the exllama kernel.", nullable=True),
    _extra("disable_exllama", bool, "optimum / older transformers: disable the exllama kernel.", nullable=True),
    _extra("exllama_config", dict, "optimum / older transformers: exllama settings, e.g. {\"version\": 1}.",
           nullable=True),
    _extra("use_cuda_fp16", bool, "optimum / older transformers: fp16 CUDA kernel.", nullable=True),
)
AWQ_EXTRA_FIELDS = (
    _extra("checkpoint_format", str, "gptqmodel: mirror of `format` (must agree).", choices=AWQ_FORMATS,
           nullable=True),
    *[f for f in _TOOL_EXTRAS if f.name != "modules_to_not_convert"],
)


class _GPTQFamilyConfig(QuantConfig):
    """Shared validation of GPTQ and AWQ: transformers' keys, its normalisation, the file mirrors."""

    #: Keys of `to_dict()` that only mirror `format` (written for older readers).
    FORMAT_MIRRORS: ClassVar[tuple[str, ...]] = ()
    FORMATS: ClassVar[tuple[str, ...]] = ()
    #: What the warnings say about a non-empty `dynamic`.
    DYNAMIC_NOTE: ClassVar[str] = "dynamic per-module overrides are kept but not modelled by the memory planner"

    def __init__(self, **values: Any):
        object.__setattr__(self, "_values", self._validate(self._normalise(dict(values))))

    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """transformers lower-cases format and backend names (and `version`/`checkpoint_format`)."""
        for key in ("format", "backend", *cls.FORMAT_MIRRORS):
            value = raw.get(key)
            if isinstance(value, str):
                raw[key] = value.lower()
            elif value is not None and isinstance(getattr(value, "value", None), str):  # a transformers enum
                raw[key] = value.value.lower()
        return raw

    @classmethod
    def _absorb(cls, raw: dict[str, Any], values: dict[str, Any]) -> list[FieldError]:
        """Fold the legacy mirrors of `format` in: alone they set it, next to it they must agree."""
        problems = []
        extra_names = {f.name for f in cls.EXTRA_FIELDS}
        source = "format" if "format" in raw else None
        for mirror in cls.FORMAT_MIRRORS:
            value = raw.get(mirror)
            if value is None:
                continue
            if value not in cls.FORMATS:
                if mirror not in extra_names:  # extra fields were already checked against FORMATS
                    problems.append(FieldError(mirror, value, "is not a known value",
                                               ", ".join(json.dumps(f) for f in cls.FORMATS)))
                continue
            if source is None:
                values["format"], source = value, mirror  # an older file may carry only the mirror
            elif "format" in values and values["format"] != value:
                problems.append(FieldError(mirror, value, f"contradicts {source}", json.dumps(values["format"])))
        method = raw.get("method", _MISSING)
        if method is not _MISSING and method is not None and method != cls.quant_method:
            problems.append(FieldError("method", method, "does not match quant_method", json.dumps(cls.quant_method)))
        return problems

    @classmethod
    def rules(cls) -> list[str]:
        return ["group_size is a positive divisor of every quantized layer's input width, or -1."]

    def replace(self, **changes: Any) -> "QuantConfig":
        raw = dict(self._values)
        if "format" in changes:  # mirrors follow the new format
            raw.update({m: changes["format"] for m in self.FORMAT_MIRRORS if raw.get(m) is not None})
        return type(self)(**{**raw, **changes})

    @property
    def dynamic(self) -> dict[str, Any] | None:
        """gptqmodel's per-module overrides (an extra key: None where the file has none)."""
        return self._values.get("dynamic")

    def extras(self) -> dict[str, Any]:
        """The checkpoint-file keys beyond transformers' own that this config carries."""
        return {f.name: _copy(self._values[f.name]) for f in self.EXTRA_FIELDS if f.name in self._values}

    def to_dict(self) -> dict[str, Any]:
        """transformers' `to_dict()` for the same settings, then the file's extra keys unchanged."""
        base = self._transformers_dict()
        return {**base, **{k: v for k, v in self.extras().items() if k not in base}}

    def to_diff_dict(self) -> dict[str, Any]:
        diff = super().to_diff_dict()
        return {k: v for k, v in diff.items() if k not in ("checkpoint_format", "version") or k in self.extras()}

    def warnings(self) -> list[str]:
        notes = super().warnings()
        if self._values.get("dynamic"):
            notes.append(self.DYNAMIC_NOTE)
        if self._values.get("lm_head"):
            notes.append("lm_head is quantized in this checkpoint; the memory planner counts it unquantized")
        if self._values.get("modules_in_block_to_quantize") or self._values.get("block_name_to_quantize"):
            notes.append("block/module selection is kept but the memory planner quantizes every linear layer")
        return notes

    #: transformers' config class and the key its to_dict() mirrors `format` into.
    TRANSFORMERS_CLASS: ClassVar[str] = ""
    TRANSFORMERS_MIRROR: ClassVar[str] = ""

    def _transformers_dict(self) -> dict[str, Any]:
        out = {"quant_method": self.quant_method}
        out.update({f.name: _copy(self._values[f.name]) for f in self.FIELDS})
        out[self.TRANSFORMERS_MIRROR] = self._values["format"]
        return out

    def to_transformers(self) -> Any:
        """transformers' GPTQConfig / AwqConfig (which keep none of the extra file keys)."""
        return self._build_transformers(self.TRANSFORMERS_CLASS)

    def _build_transformers(self, cls_name: str) -> Any:
        import importlib.metadata

        import transformers

        from quantlib.errors import BackendUnavailableError

        hf_cls = getattr(transformers, cls_name)
        try:
            return hf_cls.from_dict(self._transformers_dict())
        except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
            raise BackendUnavailableError(
                self.label, f"transformers' {cls_name} needs a package that is not installed ({exc})",
                "Install it with: pip install optimum (modules_in_block_to_quantize needs optimum>=1.15), "
                "or leave modules_in_block_to_quantize null.") from None




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
    def check_shape(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
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

    say(0.96, f"{method}: loading the checkpoint back with gptqmodel's torch CPU kernel")
    loaded = GPTQModel.load(str(target), device="cpu", backend=load_backend, dtype=dtype,
                            trust_remote_code=trust_remote_code)
    hf_model = loaded.model
    hf_model.eval()
    say(1.0, f"{method}: done")
    notes = [f"calibrated with gptqmodel on {len(samples)} x {settings.seq_len} tokens of the built-in calibration "
             "text" if settings.text is None else "calibrated on user text",
             f"calibrated in {str(calib_dtype).removeprefix('torch.')}, runs in {str(dtype).removeprefix('torch.')} "
             f"with gptqmodel's {load_backend.value} CPU kernel", *quantizer.calibration_notes(settings)]
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
