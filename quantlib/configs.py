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

import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from quantlib.errors import _MISSING, ConfigError, FieldError

JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}


@dataclass(frozen=True)
class FieldSpec:
    """Declaration of one config key: its type, default, allowed values and how to explain it.

    `kind` is one of bool, int, float, str or list (a list of strings). `visible_when` names
    another boolean/enum field and the value it must have for this field to matter; the app uses
    it to grey out irrelevant controls, and `warnings()` uses it to flag settings that are ignored.
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

    def allowed_text(self) -> str:
        """What a user may write here, in words, for error messages."""
        if self.choices is not None:
            text = ", ".join(json.dumps(c) for c in self.choices)
        elif self.kind is bool:
            text = "true or false"
        elif self.kind is list:
            text = "a list of module-name strings"
        elif self.kind in (int, float):
            noun = "an integer" if self.kind is int else "a number"
            bounds = []
            if self.minimum is not None:
                bounds.append(f"{'>' if self.exclusive_minimum else '>='} {_fmt_num(self.minimum)}")
            if self.maximum is not None:
                bounds.append(f"<= {_fmt_num(self.maximum)}")
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
        too_high = self.maximum is not None and value > self.maximum
        if too_low or too_high:
            return None, self._error(value, "is out of range")
        return (float(value) if self.kind is float else int(value)), None

    def _error(self, value: Any, message: str) -> FieldError:
        return FieldError(self.name, value, message, self.allowed_text())

    def json_schema(self) -> dict[str, Any]:
        """This field as a JSON Schema property, with `x-` hints the app's form builder reads."""
        json_type: Any = JSON_TYPES[self.kind]
        if self.nullable:
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
            schema["maximum"] = self.maximum
        if self.visible_when is not None:
            schema["x-visible-when"] = {"field": self.visible_when[0], "equals": self.visible_when[1]}
        return schema


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


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
        known = set(cls.field_names()) | set(cls.ACCEPTED_EXTRA_KEYS) | {"quant_method"}
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
            "additionalProperties": False,
            "x-rules": cls.rules(),
        }

    @classmethod
    def rules(cls) -> list[str]:
        """Cross-field rules in words (JSON Schema cannot say them all readably)."""
        return []


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _closest_keys(key: str, cls: type[QuantConfig]) -> str:
    """Suggest the nearest known keys for a typo, then list them all."""
    import difflib

    names = list(cls.field_names())
    close = difflib.get_close_matches(key, names, n=2, cutoff=0.6)
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
# Registry of config classes and the parser
# ======================================================================================

#: quant_method -> config class. A new method is one class added here (and its quantizer in
#: `quantlib.schemes.QUANTIZER_MAPPING`).
CONFIG_MAPPING: dict[str, type[QuantConfig]] = {
    "bitsandbytes": BitsAndBytesQuantConfig,
    "rtn": RTNQuantConfig,
    "gguf": GGUFQuantConfig,
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
