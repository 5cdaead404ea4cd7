"""Validated, serialisable quantization configs: one class per `quant_method`.

Why not reuse `transformers`' config classes directly? They validate one field at a time, raise
on the first problem with a bare `TypeError`, and silently drop unknown keys (a typo such as
`bnb_4bit_quant_typ` is lost without a word). Here every config is checked completely and every
problem comes back at once in a `ConfigError`, each naming its field, the bad value and what is
allowed. The bitsandbytes config uses exactly transformers' keys and serialises to exactly what
`transformers.BitsAndBytesConfig.to_dict()` gives, so exported JSON loads there unchanged.

Each field is declared once as a `FieldSpec`; validation, defaults, the JSON Schema that the app
draws its forms from, and `to_diff_dict()` are all derived from those declarations.
"""

from __future__ import annotations

import copy
import json
import re
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from quantlib.errors import _MISSING, ConfigError, FieldError

JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


@dataclass(frozen=True)
class FieldSpec:
    """Declaration of one config key: its type, default, allowed values and how to explain it.

    `kind` is one of bool, int, float, str, list (a list of strings), dict (a JSON object) or
    object (any JSON value; `validator` alone decides, `json_type` and `allowed` describe it).
    `visible_when` names another boolean/enum field and the value it must have for this field to
    matter; the app uses it to grey out irrelevant controls, and `warnings()` uses it to flag
    settings that are ignored. `validator`, when given, runs after the type and range checks and
    returns a message for a bad value (or None).
    """

    name: str
    kind: type
    default: Any
    description: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    nullable: bool = False
    visible_when: tuple[str, Any] | None = None
    title: str = ""
    exclusive_maximum: bool = False
    validator: Callable[[Any], str | None] | None = None
    json_type: Any = None
    allowed: str = ""

    def allowed_text(self) -> str:
        """What a user may write here, in words, for error messages."""
        if self.allowed:
            text = self.allowed
        elif self.choices is not None:
            text = ", ".join(json.dumps(c) for c in self.choices)
        elif self.kind is bool:
            text = "true or false"
        elif self.kind is list:
            text = "a list of module-name strings"
        elif self.kind is dict:
            text = "a JSON object"
        elif self.kind in (int, float):
            noun = "an integer" if self.kind is int else "a number"
            bounds = []
            if self.minimum is not None:
                bounds.append(f"{'>' if self.exclusive_minimum else '>='} {_fmt_num(self.minimum)}")
            if self.maximum is not None:
                bounds.append(f"{'<' if self.exclusive_maximum else '<='} {_fmt_num(self.maximum)}")
            text = noun + (" " + " and ".join(bounds) if bounds else "")
        else:
            text = "a string"
        return text + (" or null" if self.nullable else "")

    def check(self, value: Any) -> tuple[Any, FieldError | None]:
        """Validate one value; return it normalised (ints to floats for number fields) or an error."""
        if value is None:
            if self.nullable:
                return None, None
            return None, self._error(value, "must not be null")
        value, error = self._check_kind(value)
        if error is None and self.validator is not None:
            message = self.validator(value)
            if message is not None:
                return None, self._error(value, message)
        return value, error

    def _check_kind(self, value: Any) -> tuple[Any, FieldError | None]:
        if self.kind is object:
            return copy.deepcopy(value), None
        if self.kind is dict:
            return self._check_object(value)
        if self.kind is bool:
            return (value, None) if isinstance(value, bool) else (None, self._error(value, "must be a boolean"))
        if self.kind is list:
            return self._check_list(value)
        if self.kind in (int, float):
            return self._check_number(value)
        if not isinstance(value, str):
            return None, self._error(value, "must be a string")
        if self.choices is not None and value not in self.choices:
            return None, self._error(value, "is not a known value")
        return value, None

    def _check_list(self, value: Any) -> tuple[Any, FieldError | None]:
        if not isinstance(value, list):
            return None, self._error(value, "must be a list of strings")
        bad = [v for v in value if not isinstance(v, str) or not v.strip()]
        if bad:
            return None, self._error(value, "every entry must be a non-empty string")
        return list(value), None

    def _check_object(self, value: Any) -> tuple[Any, FieldError | None]:
        if not isinstance(value, dict):
            return None, self._error(value, "must be a JSON object")
        problem = _json_problem(value)
        if problem:
            return None, self._error(value, problem)
        return copy.deepcopy(value), None

    def _check_number(self, value: Any) -> tuple[Any, FieldError | None]:
        # bool is a subclass of int in Python; in a config it is always a mistake for a number.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, self._error(value, f"must be {'an integer' if self.kind is int else 'a number'}")
        if self.kind is int and not isinstance(value, int):
            return None, self._error(value, "must be an integer")
        if isinstance(value, float) and not math.isfinite(value):
            return None, self._error(value, "must be finite")
        if self.choices is not None and value not in self.choices:
            return None, self._error(value, "is not a supported value")
        too_low = self.minimum is not None and (
            value <= self.minimum if self.exclusive_minimum else value < self.minimum
        )
        too_high = self.maximum is not None and (
            value >= self.maximum if self.exclusive_maximum else value > self.maximum
        )
        if too_low or too_high:
            return None, self._error(value, "is out of range")
        return (float(value) if self.kind is float else int(value)), None

    def _error(self, value: Any, message: str) -> FieldError:
        return FieldError(self.name, value, message, self.allowed_text())

    def json_schema(self) -> dict[str, Any]:
        """This field as a JSON Schema property, with `x-` hints the app's form builder reads."""
        json_type: Any = self.json_type if self.json_type is not None else JSON_TYPES[self.kind]
        if isinstance(json_type, list):
            json_type = list(json_type)
        if self.nullable and isinstance(json_type, list):
            json_type = json_type + ["null"]
        elif self.nullable:
            json_type = [json_type, "null"]
        schema: dict[str, Any] = {"type": json_type, "default": self.default, "description": self.description}
        if self.title:
            schema["title"] = self.title
        if self.kind is list:
            schema["items"] = {"type": "string", "minLength": 1}
        if self.choices is not None:
            schema["enum"] = list(self.choices) + ([None] if self.nullable else [])
        if self.minimum is not None:
            schema["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = self.minimum
        if self.maximum is not None:
            schema["exclusiveMaximum" if self.exclusive_maximum else "maximum"] = self.maximum
        if self.visible_when is not None:
            schema["x-visible-when"] = {"field": self.visible_when[0], "equals": self.visible_when[1]}
        return schema


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _json_problem(value: Any, depth: int = 0) -> str | None:
    """Why `value` is not plain JSON data (string keys, finite numbers), or None if it is."""
    if depth > 32:
        return "is nested too deeply"
    if value is None or isinstance(value, (bool, str, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "must contain only finite numbers"
    if isinstance(value, list):
        return next((p for v in value if (p := _json_problem(v, depth + 1))), None)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return "must have string keys only"
        return next((p for v in value.values() if (p := _json_problem(v, depth + 1))), None)
    return "must contain only JSON values (objects, arrays, strings, numbers, booleans, null)"


class QuantConfig:
    """Base of all configs. Subclasses declare `quant_method`, `FIELDS` and optionally `check()`.

    Instances are immutable value objects: construct them with keyword arguments (validated at
    once, like transformers' `post_init`, but reporting every problem) or via `parse_config`.
    """

    quant_method: ClassVar[str]
    FIELDS: ClassVar[tuple[FieldSpec, ...]]
    #: Extra keys a real-world file may carry that mean nothing on their own but must not be
    #: rejected (e.g. transformers' private `_load_in_4bit` mirror). Mapped to a checker in `_absorb`.
    ACCEPTED_EXTRA_KEYS: ClassVar[tuple[str, ...]] = ()
    #: Keys that real checkpoint files carry beyond transformers' own (e.g. gptqmodel's
    #: `pack_dtype`, AutoGPTQ's `model_file_base_name`). Each is type-checked like a field and, when
    #: present, kept in `to_dict()` unchanged; absent ones are not invented. Not in the form schema
    #: (listed under `x-accepted-extra-keys`), since they describe a file, not a choice to make.
    EXTRA_FIELDS: ClassVar[tuple[FieldSpec, ...]] = ()
    description: ClassVar[str] = ""

    def __init__(self, **values: Any):
        object.__setattr__(self, "_values", self._validate(values))

    # ----- validation -------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in cls.FIELDS)

    @classmethod
    def _validate(cls, raw: dict[str, Any]) -> dict[str, Any]:
        errors: list[FieldError] = []
        values: dict[str, Any] = {}
        known = (set(cls.field_names()) | set(cls.ACCEPTED_EXTRA_KEYS) | {s.name for s in cls.EXTRA_FIELDS}
                 | {"quant_method"})
        for key in raw:
            if key not in known:
                errors.append(FieldError(str(key), raw[key], "unknown key", _closest_keys(str(key), cls)))
        if "quant_method" in raw and raw["quant_method"] != cls.quant_method:
            errors.append(FieldError("quant_method", raw["quant_method"], "does not match this config class",
                                     json.dumps(cls.quant_method)))
        for spec in cls.FIELDS:
            if spec.name not in raw:
                values[spec.name] = _copy(spec.default)
                continue
            value, error = spec.check(raw[spec.name])
            if error is not None:
                errors.append(error)
            else:
                values[spec.name] = value
        for spec in cls.EXTRA_FIELDS:
            if spec.name in raw:
                value, error = spec.check(raw[spec.name])
                if error is not None:
                    errors.append(error)
                else:
                    values[spec.name] = value
        errors.extend(cls._absorb(raw, values))
        failed = {e.field for e in errors}
        # Cross-field rules run on every field that itself passed, so they are reported together
        # with the per-field problems instead of only after those are fixed.
        errors.extend(cls.check(values, failed))
        if errors:
            raise ConfigError(errors, method=cls.quant_method)
        return values

    @classmethod
    def _absorb(cls, raw: dict[str, Any], values: dict[str, Any]) -> list[FieldError]:
        """Fold `ACCEPTED_EXTRA_KEYS` into `values` (fields that failed are absent from it)."""
        return []

    @classmethod
    def check(cls, values: dict[str, Any], failed: set[str]) -> list[FieldError]:
        """Cross-field rules (the `post_init` of transformers). `failed` names fields already wrong."""
        return []

    # ----- access -----------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("configs are immutable; use .replace(**changes)")

    def replace(self, **changes: Any) -> "QuantConfig":
        """A new config with some fields changed, validated like any other."""
        return type(self)(**{**self._values, **changes})

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_diff_dict().items() if k != "quant_method")
        return f"{type(self).__name__}({args})"

    # ----- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, with `quant_method` first; JSON-safe."""
        return {"quant_method": self.quant_method, **{k: _copy(v) for k, v in self._values.items()}}

    def to_json(self, indent: int | None = 2, diff: bool = False) -> str:
        return json.dumps(self.to_diff_dict() if diff else self.to_dict(), indent=indent)

    def to_diff_dict(self) -> dict[str, Any]:
        """Only what differs from the defaults, plus `quant_method` so the result parses back."""
        defaults = {f.name: f.default for f in self.FIELDS}
        full = self.to_dict()
        return {k: v for k, v in full.items() if k == "quant_method" or k not in defaults or defaults[k] != v}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        """Parse through `parse_config`, insisting the result is of this class."""
        config = parse_config(data if "quant_method" in data else {**data, "quant_method": cls.quant_method})
        if not isinstance(config, cls):
            raise ConfigError([FieldError("quant_method", data.get("quant_method"), "does not match this config class",
                                          json.dumps(cls.quant_method))], method=cls.quant_method)
        return config

    def to_transformers(self) -> Any | None:
        """The equivalent `transformers` config object, or None where transformers has none."""
        return None

    # ----- description ------------------------------------------------------------------
    @property
    def quantizer_key(self) -> str:
        """Key into the quantizer registry (one config class may map to several quantizers)."""
        return self.quant_method

    @property
    def label(self) -> str:
        """Short human name for tables and legends."""
        return self.quant_method

    def warnings(self) -> list[str]:
        """Settings that are valid but have no effect with the rest of this config."""
        notes = []
        for spec in self.FIELDS:
            if spec.visible_when is None:
                continue
            other, wanted = spec.visible_when
            if self._values[other] != wanted and self._values[spec.name] != spec.default:
                notes.append(f"{spec.name} is ignored unless {other} is {json.dumps(wanted)}")
        return notes

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """JSON Schema of this config class (draft 2020-12), which the app draws its forms from."""
        properties = {"quant_method": {"const": cls.quant_method, "type": "string"}}
        properties.update({f.name: f.json_schema() for f in cls.FIELDS})
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": cls.__name__,
            "description": cls.description,
            "type": "object",
            "properties": properties,
            "required": ["quant_method"],
            # Keys transformers writes besides the choices (mirrors such as `_load_in_4bit`, checkpoint
            # extras): accepted by exact name, kept out of `properties` so forms do not offer them.
            "patternProperties": {
                **{f"^{re.escape(k)}$": {"description": "transformers' mirror of another field; must agree with it"}
                   for k in cls.ACCEPTED_EXTRA_KEYS},
                **{f"^{re.escape(f.name)}$": f.json_schema() for f in cls.EXTRA_FIELDS},
            },
            "additionalProperties": False,
            "x-rules": cls.rules(),
            "x-accepted-extra-keys": {f.name: f.description for f in cls.EXTRA_FIELDS},
        }

    @classmethod
    def rules(cls) -> list[str]:
        """Cross-field rules in words (JSON Schema cannot say them all readably)."""
        return []


def _copy(value: Any) -> Any:
    return copy.deepcopy(value) if isinstance(value, (list, dict)) else value


def _closest_keys(key: str, cls: type[QuantConfig]) -> str:
    """Suggest the nearest known keys for a typo, then list them all."""
    import difflib

    names = list(cls.field_names())
    close = difflib.get_close_matches(key, names + [f.name for f in cls.EXTRA_FIELDS], n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return hint + "known keys: " + ", ".join(["quant_method", *names])


# ======================================================================================
# bitsandbytes
# ======================================================================================

BNB_COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
BNB_STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32", "float64")
BNB_QUANT_TYPES = ("nf4", "fp4")


class BitsAndBytesQuantConfig(QuantConfig):
    """bitsandbytes 4-bit (NF4/FP4, optional double quantization) or 8-bit LLM.int8().

    The keys are exactly those of `transformers.BitsAndBytesConfig`; `to_dict()` equals what that
    class's `to_dict()` gives for the same settings, including its private `_load_in_4bit` and
    `_load_in_8bit` mirrors, so a saved model's `quantization_config` block imports unchanged.
    """

    quant_method = "bitsandbytes"
    description = "bitsandbytes: 4-bit NF4/FP4 (QLoRA) or 8-bit LLM.int8() with outlier decomposition."
    ACCEPTED_EXTRA_KEYS = ("_load_in_4bit", "_load_in_8bit")
    FIELDS = (
        FieldSpec("load_in_4bit", bool, False, "Quantize linear layers to 4 bits (NF4 or FP4).",
                  title="4-bit"),
        FieldSpec("load_in_8bit", bool, False, "Quantize linear layers to 8 bits with LLM.int8().",
                  title="8-bit (LLM.int8())"),
        FieldSpec("llm_int8_threshold", float, 6.0,
                  "Outlier threshold of LLM.int8(): input feature dimensions whose magnitude reaches it "
                  "are multiplied in 16 bits. 0 disables the decomposition.",
                  minimum=0.0, visible_when=("load_in_8bit", True), title="Outlier threshold"),
        FieldSpec("llm_int8_skip_modules", list, None,
                  "Module names kept unquantized (default: transformers skips the output head).",
                  nullable=True, title="Skip modules"),
        FieldSpec("llm_int8_enable_fp32_cpu_offload", bool, False,
                  "Allow modules offloaded to CPU to stay in fp32 (device_map offloading).",
                  title="fp32 CPU offload"),
        FieldSpec("llm_int8_has_fp16_weight", bool, False,
                  "Keep fp16 master weights next to the int8 ones (for fine-tuning with LLM.int8()).",
                  visible_when=("load_in_8bit", True), title="Keep fp16 weights"),
        FieldSpec("bnb_4bit_quant_type", str, "fp4", "4-bit data type: NF4 (normal float, QLoRA) or FP4.",
                  choices=BNB_QUANT_TYPES, visible_when=("load_in_4bit", True), title="4-bit type"),
        FieldSpec("bnb_4bit_use_double_quant", bool, False,
                  "Double quantization: store the per-block absmax in 8 bits (blocks of 256), "
                  "saving about 0.37 bits per parameter.",
                  visible_when=("load_in_4bit", True), title="Double quantization"),
        FieldSpec("bnb_4bit_compute_dtype", str, "float32", "Data type of the matmul after dequantization.",
                  choices=BNB_COMPUTE_DTYPES, visible_when=("load_in_4bit", True), title="Compute dtype"),
        FieldSpec("bnb_4bit_quant_storage", str, "uint8",
                  "Container dtype the packed 4-bit codes are stored in (matters for FSDP).",
                  choices=BNB_STORAGE_DTYPES, visible_when=("load_in_4bit", True), title="Storage dtype"),
    )

    @classmethod
    def _absorb(cls, raw: dict[str, Any], values: dict[str, Any]) -> list[FieldError]:
        """Accept transformers' `_load_in_Nbit` mirrors; they must agree with the public keys."""
        problems = []
        for bits in ("4", "8"):
            private, public = f"_load_in_{bits}bit", f"load_in_{bits}bit"
            if private not in raw:
                continue
            value = raw[private]
            if not isinstance(value, bool):
                problems.append(FieldError(private, value, "must be a boolean", "true or false"))
            elif public not in raw:
                values[public] = value  # an old file may carry only the private key
            elif public in values and values[public] != value:
                problems.append(FieldError(private, value, f"contradicts {public}", json.dumps(values[public])))
        return problems

    def __init__(self, **values: Any):
        raw = dict(values)
        # transformers treats a missing compute dtype as float32; accept null for the same reason.
        if raw.get("bnb_4bit_compute_dtype", "x") is None:
            raw["bnb_4bit_compute_dtype"] = "float32"
        if raw.get("bnb_4bit_quant_storage", "x") is None:
            raw["bnb_4bit_quant_storage"] = "uint8"
        # transformers accepts dtype objects and "torch.float16" spellings; normalise them to names.
        for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if key in raw and not isinstance(raw[key], (str, type(None))) and "torch" in type(raw[key]).__module__:
                raw[key] = str(raw[key])
            if isinstance(raw.get(key), str) and raw[key].startswith("torch."):
                raw[key] = raw[key][len("torch."):]
        object.__setattr__(self, "_values", self._validate(raw))

    @classmethod
    def check(cls, values: dict[str, Any], failed: set[str]) -> list[FieldError]:
        if {"load_in_4bit", "load_in_8bit"} & failed:
            return []
        four, eight = values["load_in_4bit"], values["load_in_8bit"]
        if four and eight:
            return [FieldError("load_in_8bit", True, "cannot be combined with load_in_4bit=true",
                               "exactly one of load_in_4bit / load_in_8bit set to true")]
        if not four and not eight:
            return [FieldError("load_in_4bit", False, "neither load_in_4bit nor load_in_8bit is true",
                               "exactly one of load_in_4bit / load_in_8bit set to true")]
        return []

    @classmethod
    def rules(cls) -> list[str]:
        return ["Exactly one of load_in_4bit and load_in_8bit is true."]

    def to_dict(self) -> dict[str, Any]:
        """Same keys, order and values as `transformers.BitsAndBytesConfig(...).to_dict()`."""
        v = self._values
        return {
            "quant_method": "bitsandbytes",
            "_load_in_8bit": v["load_in_8bit"],
            "_load_in_4bit": v["load_in_4bit"],
            "llm_int8_threshold": float(v["llm_int8_threshold"]),
            "llm_int8_skip_modules": _copy(v["llm_int8_skip_modules"]),
            "llm_int8_enable_fp32_cpu_offload": v["llm_int8_enable_fp32_cpu_offload"],
            "llm_int8_has_fp16_weight": v["llm_int8_has_fp16_weight"],
            "bnb_4bit_quant_type": v["bnb_4bit_quant_type"],
            "bnb_4bit_use_double_quant": v["bnb_4bit_use_double_quant"],
            "bnb_4bit_compute_dtype": v["bnb_4bit_compute_dtype"],
            "bnb_4bit_quant_storage": v["bnb_4bit_quant_storage"],
            "load_in_4bit": v["load_in_4bit"],
            "load_in_8bit": v["load_in_8bit"],
        }

    def to_diff_dict(self) -> dict[str, Any]:
        diff = super().to_diff_dict()
        return {k: v for k, v in diff.items() if not k.startswith("_")}

    def to_transformers(self) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig.from_dict(self.to_dict())

    @property
    def quantizer_key(self) -> str:
        return "bitsandbytes_4bit" if self.load_in_4bit else "bitsandbytes_8bit"

    @property
    def label(self) -> str:
        if self.load_in_8bit:
            return f"INT8 (t={_fmt_num(self.llm_int8_threshold)})"
        name = self.bnb_4bit_quant_type.upper()
        return f"{name}+DQ" if self.bnb_4bit_use_double_quant else name


# ======================================================================================
# Round-to-nearest integer baselines
# ======================================================================================


class RTNQuantConfig(QuantConfig):
    """Round-to-nearest integer weights: the baseline every smarter method must beat.

    Symmetric (absmax) or asymmetric (min/max with a zero point) integer codes, with one scale per
    tensor, per output channel, or per group of `group_size` input features. Applied as simulated
    quantization (weights replaced by their quantize→dequantize result).
    """

    quant_method = "rtn"
    description = "Round-to-nearest integer baseline (absmax or min/max), per tensor, channel or group."
    FIELDS = (
        FieldSpec("bits", int, 8, "Bits per weight.", choices=(2, 3, 4, 5, 6, 7, 8), title="Bits"),
        FieldSpec("granularity", str, "channel", "One scale per whole tensor, per output channel, or per group.",
                  choices=("tensor", "channel", "group"), title="Granularity"),
        FieldSpec("group_size", int, 64, "Input features per scale group (must divide the layer width).",
                  minimum=1, maximum=65536, visible_when=("granularity", "group"), title="Group size"),
        FieldSpec("symmetric", bool, True, "Symmetric absmax codes (true) or asymmetric min/max with a zero point.",
                  title="Symmetric"),
        FieldSpec("modules_to_not_convert", list, None,
                  "Module names left unquantized (default: the output head, as transformers does).",
                  nullable=True, title="Skip modules"),
    )

    @property
    def label(self) -> str:
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        return f"RTN int{self.bits} {gran}{'' if self.symmetric else ' asym'}"


# ======================================================================================
# GGUF block types
# ======================================================================================

#: Block types the `gguf` package can quantize in numpy (others it can only read).
GGUF_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "MXFP4", "BF16", "F16")


class GGUFQuantConfig(QuantConfig):
    """llama.cpp GGUF block quantization, done with the `gguf` package's reference quantizers.

    Simulated: weights are replaced by their quantize→dequantize result, so the numbers show what
    the format loses, not how fast llama.cpp runs it.
    """

    quant_method = "gguf"
    description = "llama.cpp GGUF block types (Q8_0, Q4_0, Q4_1, …) via the gguf package."
    FIELDS = (
        FieldSpec("quant_type", str, "Q8_0", "GGUF block type.", choices=GGUF_TYPES, title="Block type"),
        FieldSpec("modules_to_not_convert", list, None,
                  "Module names left unquantized (default: the output head, as transformers does).",
                  nullable=True, title="Skip modules"),
    )

    @property
    def label(self) -> str:
        return f"GGUF {self.quant_type}"


# ======================================================================================
# Calibration-based methods: GPTQ, AWQ (gptqmodel) and AQLM (aqlm)
# ======================================================================================

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
    _extra("dynamic", dict, "gptqmodel: per-module overrides (regex -> settings); kept, not modelled.",
           nullable=True),
    _extra("rotation", str, "gptqmodel: rotation preprocessing name.", nullable=True),
    _extra("activation", object, "gptqmodel 7.x: activation stream mode.", nullable=True,
           validator=_activation_rule, allowed="a mode name or a JSON object", json_type=["string", "object"]),
    _extra("adapter", dict, "gptqmodel: EoRA/LoRA adapter settings.", nullable=True),
    _extra("hyb_act", bool, "gptqmodel: hybrid act-order flag."),
    _extra("modules_to_not_convert", list, "Module names left unquantized.", nullable=True),
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

    def extras(self) -> dict[str, Any]:
        """The checkpoint-file keys beyond transformers' own that this config carries."""
        return {f.name: _copy(self._values[f.name]) for f in self.EXTRA_FIELDS if f.name in self._values}

    def _transformers_dict(self) -> dict[str, Any]:
        raise NotImplementedError

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
            notes.append("dynamic per-module overrides are kept but not modelled by the memory planner")
        if self._values.get("lm_head"):
            notes.append("lm_head is quantized in this checkpoint; the memory planner counts it unquantized")
        if self._values.get("modules_in_block_to_quantize") or self._values.get("block_name_to_quantize"):
            notes.append("block/module selection is kept but the memory planner quantizes every linear layer")
        return notes

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


class GPTQQuantConfig(_GPTQFamilyConfig):
    """GPTQ (Frantar et al. 2022): Hessian-aware rounding, calibrated on text, run by gptqmodel.

    The keys are exactly those of `transformers.GPTQConfig.to_dict()` (including its legacy
    `checkpoint_format` mirror of `format`), with its normalisation: names lower-cased, a null
    backend becomes "auto", `act_group_aware` switched off under `desc_act`. Unlike transformers,
    `bits` has a default (4) so that a partial config can be filled in by the app. Keys written by
    AutoGPTQ, optimum and gptqmodel (`EXTRA_FIELDS`) are type-checked and kept, so a checkpoint's
    `quantization_config` block imports and exports unchanged; transformers itself drops them.
    """

    quant_method = "gptq"
    description = ("GPTQ: second-order (Hessian) rounding of int2/3/4/8 weights with per-group fp16 scales, "
                   "calibrated on text from the built-in corpus; needs gptqmodel to run.")
    FORMAT_MIRRORS = ("checkpoint_format",)
    FORMATS = GPTQ_FORMATS
    FIELDS = _gptq_family_fields(bits=(2, 3, 4, 8), bits_default=4, formats=GPTQ_FORMATS, format_default="gptq",
                                 backends=GPTQ_BACKENDS, backend_nullable=True, method="GPTQ")
    EXTRA_FIELDS = GPTQ_EXTRA_FIELDS

    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = super()._normalise(raw)
        if "backend" in raw and raw["backend"] is None:
            raw["backend"] = "auto"  # transformers' post_init does the same
        if raw.get("act_group_aware", _MISSING) is _MISSING and raw.get("desc_act") is True:
            raw["act_group_aware"] = False  # transformers' post_init turns it off under desc_act
        return raw

    @classmethod
    def check(cls, values: dict[str, Any], failed: set[str]) -> list[FieldError]:
        if {"desc_act", "act_group_aware"} & failed:
            return []
        if values["desc_act"] and values["act_group_aware"]:
            return [FieldError("act_group_aware", True, "cannot be true when desc_act is true",
                               "false (transformers' GPTQConfig turns it off under act-order)")]
        return []

    @classmethod
    def rules(cls) -> list[str]:
        return [*super().rules(), "act_group_aware must be false when desc_act is true."]

    def _transformers_dict(self) -> dict[str, Any]:
        v = self._values
        out = {"quant_method": "gptq"}
        out.update({f.name: _copy(v[f.name]) for f in self.FIELDS})
        out["checkpoint_format"] = v["format"]
        return out

    def to_transformers(self) -> Any:
        """`transformers.GPTQConfig` (which keeps none of the extra file keys)."""
        return self._build_transformers("GPTQConfig")

    @property
    def label(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        text = f"GPTQ int{self.bits} {group}"
        if self.desc_act:
            text += " act-order"
        return text + ("" if self.sym else " asym")


class AwqQuantConfig(_GPTQFamilyConfig):
    """AWQ (Lin et al. 2023): activation-aware per-channel scaling before 4-bit group rounding.

    Keys exactly as `transformers.AwqConfig.to_dict()` (it inherits GPTQConfig's keys and adds
    `zero_point`, `modules_to_not_convert` and the `version` mirror of `format`), with its
    normalisation: backend "autoawq" becomes "auto", backend "llm-awq" means format "llm-awq".
    transformers checks only format and backend for AWQ; here bits must be 4 (the only width the
    AWQ GEMM/GEMV kernels and gptqmodel's AWQ path pack) and the inherited keys are validated
    as for GPTQ. gptqmodel's extra keys are kept as for GPTQ.
    """

    quant_method = "awq"
    description = ("AWQ: activation-aware scaling, then int4 group quantization with zero points, calibrated "
                   "on text from the built-in corpus; needs gptqmodel to run.")
    FORMAT_MIRRORS = ("version", "checkpoint_format")
    FORMATS = AWQ_FORMATS
    ACCEPTED_EXTRA_KEYS = ("version",)
    FIELDS = (
        FieldSpec("zero_point", bool, True, "Asymmetric codes with a zero point per group.", title="Zero point"),
        FieldSpec("modules_to_not_convert", list, None, "Module names left unquantized (e.g. vision towers, "
                  "MoE gates).", nullable=True, title="Skip modules"),
        *_gptq_family_fields(bits=(4,), bits_default=4, formats=AWQ_FORMATS, format_default="gemm",
                             backends=AWQ_BACKENDS, backend_nullable=False, method="AWQ (unused by AWQ itself)"),
    )
    EXTRA_FIELDS = AWQ_EXTRA_FIELDS

    @classmethod
    def _normalise(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = super()._normalise(raw)
        if raw.get("backend") == "autoawq":
            raw["backend"] = "auto"  # transformers' legacy backend name
        elif raw.get("backend") == "llm-awq":
            raw["backend"], raw["format"] = "auto", "llm-awq"
        return raw

    def _transformers_dict(self) -> dict[str, Any]:
        v = self._values
        out = {"quant_method": "awq"}
        out.update({f.name: _copy(v[f.name]) for f in self.FIELDS})
        out["version"] = v["format"]
        return out

    def to_transformers(self) -> Any:
        """`transformers.AwqConfig` (which keeps none of the extra file keys)."""
        return self._build_transformers("AwqConfig")

    @property
    def label(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"AWQ int{self.bits} {group}" + ("" if self.zero_point else " sym")


class AqlmQuantConfig(QuantConfig):
    """AQLM (Egiazarian et al. 2024): additive multi-codebook quantization of weight groups.

    Each group of `in_group_size` x `out_group_size` weights is the sum of `num_codebooks` learned
    vectors, each chosen by a `nbits_per_codebook`-bit code. Keys exactly as
    `transformers.AqlmConfig.to_dict()`; a null `linear_weights_not_to_quantize` becomes [] as
    there. transformers only checks that the sizes are integers; here they must be positive, and
    codebooks hold at most 2^16 vectors (what the aqlm kernels and published checkpoints use).
    """

    quant_method = "aqlm"
    description = ("AQLM: groups of 8 weights encoded as sums of learned codebook vectors (~2 bits/param), "
                   "calibrated for GPU-days; needs the aqlm package to run, plannable here.")
    FIELDS = (
        FieldSpec("in_group_size", int, 8, "Weights per group along the input dimension (must divide every "
                  "layer's input width).", minimum=1, maximum=65536, title="Input group size"),
        FieldSpec("out_group_size", int, 1, "Weights per group along the output dimension (1 recommended).",
                  minimum=1, maximum=65536, title="Output group size"),
        FieldSpec("num_codebooks", int, 1, "Codebooks summed per group (1x16 and 2x8 are the common setups).",
                  minimum=1, maximum=64, title="Codebooks"),
        FieldSpec("nbits_per_codebook", int, 16, "Bits per code: each codebook holds 2^bits vectors.",
                  minimum=1, maximum=16, title="Bits per codebook"),
        FieldSpec("linear_weights_not_to_quantize", list, [], "Full parameter names kept in 16 bits, e.g. "
                  "lm_head.weight.", nullable=True, title="Weights not to quantize"),
    )

    def __init__(self, **values: Any):
        raw = dict(values)
        if "linear_weights_not_to_quantize" in raw and raw["linear_weights_not_to_quantize"] is None:
            raw["linear_weights_not_to_quantize"] = []  # transformers' post_init does the same
        object.__setattr__(self, "_values", self._validate(raw))

    def to_transformers(self) -> Any:
        from transformers import AqlmConfig

        return AqlmConfig.from_dict(self.to_dict())

    @property
    def bits_per_code_group(self) -> int:
        return self.num_codebooks * self.nbits_per_codebook

    @property
    def label(self) -> str:
        group = f"g{self.in_group_size}" + (f"x{self.out_group_size}" if self.out_group_size != 1 else "")
        return f"AQLM {self.num_codebooks}x{self.nbits_per_codebook} {group}"


# ======================================================================================
# Registry of config classes and the parser
# ======================================================================================

#: quant_method -> config class. A new method is one class added here (and its quantizer in
#: `quantlib.schemes.QUANTIZER_MAPPING`).
CONFIG_MAPPING: dict[str, type[QuantConfig]] = {
    "bitsandbytes": BitsAndBytesQuantConfig,
    "rtn": RTNQuantConfig,
    "gguf": GGUFQuantConfig,
    "gptq": GPTQQuantConfig,
    "awq": AwqQuantConfig,
    "aqlm": AqlmQuantConfig,
}


def registered_methods() -> list[str]:
    return list(CONFIG_MAPPING)


def parse_config(obj: Any) -> QuantConfig:
    """Turn a dict or JSON text into a validated config; `ConfigError` is the only error raised.

    Also accepts a whole model `config.json` (its `quantization_config` block is used) and old
    bitsandbytes blocks that predate `quant_method` (inferred from `load_in_4bit`/`load_in_8bit`).
    """
    if isinstance(obj, QuantConfig):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        try:
            obj = obj.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError([FieldError("<file>", _MISSING, f"is not UTF-8 text ({exc.reason})",
                                          "a JSON object")]) from None
    if isinstance(obj, str):
        obj = _load_json(obj)
    if not isinstance(obj, dict):
        raise ConfigError([FieldError("<root>", obj, "must be a JSON object", "a JSON object with a quant_method")])
    if "quant_method" not in obj and isinstance(obj.get("quantization_config"), dict):
        obj = obj["quantization_config"]  # a model's config.json
    elif "quant_method" not in obj and "quantization_config" in obj:
        raise ConfigError([FieldError("quantization_config", obj["quantization_config"], "must be a JSON object",
                                      "a quantization config object")])
    method = obj.get("quant_method", _MISSING)
    if method is _MISSING and ("load_in_4bit" in obj or "load_in_8bit" in obj):
        method = "bitsandbytes"
    if method is _MISSING or not isinstance(method, str) or method not in CONFIG_MAPPING:
        message = "is missing" if method is _MISSING else "is not a registered method"
        raise ConfigError([FieldError("quant_method", method, message,
                                      "one of " + ", ".join(json.dumps(m) for m in CONFIG_MAPPING))])
    cls = CONFIG_MAPPING[method]
    return cls(**{str(k): v for k, v in obj.items()})


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([FieldError("<json>", _MISSING, f"is not valid JSON: {exc.msg} at line {exc.lineno} "
                                      f"column {exc.colno}", "a JSON object")]) from None
    except RecursionError:
        raise ConfigError([FieldError("<json>", _MISSING, "is nested too deeply", "a JSON object")]) from None


def config_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every registered config class, keyed by quant_method."""
    return {method: cls.json_schema() for method, cls in CONFIG_MAPPING.items()}
