"""The config side of the gptqmodel helper shared by GPTQ and AWQ: the keys transformers' GPTQConfig writes
(AwqConfig inherits them), the keys gptqmodel and older tools add to a checkpoint's config, their validation
(gptqmodel's `dynamic` per-module overrides included) and `_GPTQFamilyConfig`, the config base both share.
The calibration and the shared quantizer are in `_gptqmodel`."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

from quantlib.configs import FieldSpec, QuantConfig, _copy, _json_problem
from quantlib.errors import _MISSING, FieldError

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
