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
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from quantlib.errors import ConfigError, FieldError

JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def module_pattern_problem(entry: str) -> str | None:
    """Why transformers cannot use `entry` of a module list as it does (transformers 5.23's
    `should_convert_module`: `re.match(rf"(?:{entry})<boundary>", name)`), or None. The entry must compile on its
    own too: one that compiles only inside transformers' group, like `a)|(b`, escapes it and matches otherwise
    than it reads."""
    import re

    for pattern in (entry, rf"(?:{entry})(?:(?<=\.)|(?=\.|$))"):
        try:
            re.compile(pattern)
        except re.error as error:
            return (f"entry {entry!r} is not a valid pattern: transformers matches each entry as a regular "
                    f"expression ({error.msg} at position {error.pos}); escape special characters such as [ ( * "
                    "with a backslash")
    return None


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
    #: A list whose entries transformers matches as module-name patterns (`should_convert_module`): each must
    #: compile the way transformers uses it.
    patterns: bool = False

    def allowed_text(self) -> str:
        """What a user may write here, in words, for error messages."""
        if self.allowed:
            text = self.allowed
        elif self.choices is not None:
            text = ", ".join(json.dumps(c) for c in self.choices)
        elif self.kind is bool:
            text = "true or false"
        elif self.kind is list and self.patterns:
            text = ("a list of module names or regular expressions (transformers matches each from the start of a "
                    "module's name up to a dot, or as a suffix)")
        elif self.kind is list:
            text = "a list of module-name strings"
        elif self.kind is dict:
            text = "a JSON object"
        elif self.kind in (int, float):
            noun = "an integer" if self.kind is int else "a number"
            bounds = []
            if self.minimum is not None:
                bounds.append(f"{'>' if self.exclusive_minimum else '>='} {fmt_num(self.minimum)}")
            if self.maximum is not None:
                bounds.append(f"{'<' if self.exclusive_maximum else '<='} {fmt_num(self.maximum)}")
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
            return None, self._error(value, "every entry must be a non-empty string" + (
                " (transformers would skip every module for an empty one: it tests name.endswith(entry))"
                if self.patterns else ""))
        if self.patterns:
            problems = [p for p in map(module_pattern_problem, value) if p]
            if problems:
                return None, self._error(value, "; ".join(problems))
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


def fmt_num(x: float) -> str:
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
    #: A form shows one radio in place of several exported keys (e.g. bits for load_in_4bit/8bit):
    #: {"key", "label", "help", "options": {choice: {field: value}}}; None for none.
    FORM_CHOICE: ClassVar[dict[str, Any] | None] = None
    #: Where `to_dict()` writes a nested form transformers saves (HQQ's quant_config, torchao's
    #: quant_type object) instead of the form's flat keys: JSON Schema of each of its keys. Both forms
    #: parse; the schema accepts either.
    SAVED_FORM: ClassVar[dict[str, Any] | None] = None

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
    def field_values(self) -> dict[str, Any]:
        """The form's fields and their values (what the Config Builder edits), whatever `to_dict` writes."""
        return {name: _copy(self._values[name]) for name in self.field_names()}

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
        """This class's config from its keys (`quant_method` may be left out; another method's is refused)."""
        method = data.get("quant_method", cls.quant_method)
        if method != cls.quant_method:
            raise ConfigError([FieldError("quant_method", method, "does not match this config class",
                                          json.dumps(cls.quant_method))], method=cls.quant_method)
        return cls(**{str(k): v for k, v in data.items()})

    def to_transformers(self) -> Any | None:
        """The equivalent `transformers` config object, or None where transformers has none."""
        return None

    @classmethod
    def recognises(cls, obj: dict[str, Any]) -> bool:
        """Whether a block without `quant_method` is one of this class's (old files omitted it)."""
        return False

    # ----- description ------------------------------------------------------------------
    @property
    def quantizer_key(self) -> str:
        """Key into the quantizer registry (one config class may map to several quantizers)."""
        return self.quant_method

    @property
    def label(self) -> str:
        """Short human name for tables and legends."""
        return self.quant_method

    def export_notes(self) -> list[str]:
        """What a reader of the exported JSON may not expect in it, and why it is there (none by default)."""
        return []

    def weights_only(self) -> "QuantConfig | None":
        """Where this config quantizes the activations too: the same config with them left in the model's dtype (its
        "weights only" twin, so a comparison shows each share of the loss); None where there is nothing to leave out."""
        return None

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
        head = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": cls.__name__,
                "description": cls.description, "type": "object", "properties": properties,
                "required": ["quant_method"], "x-rules": cls.rules()}
        if cls.SAVED_FORM is not None:
            # The flat keys (what forms edit) or the saved form (what `to_dict` writes), nothing else.
            saved = {"quant_method": properties["quant_method"], **cls.SAVED_FORM}
            return {**head, "x-saved-form": list(saved), "anyOf": [
                {"title": "form keys", "properties": {k: True for k in properties}, "additionalProperties": False},
                {"title": "saved form (to_dict)", "properties": saved, "required": list(saved),
                 "additionalProperties": False}]}
        return {
            **head,
            # Keys transformers writes besides the choices (mirrors such as `_load_in_4bit`, checkpoint
            # extras): accepted by exact name, kept out of `properties` so forms do not offer them.
            "patternProperties": {
                **{f"^{re.escape(k)}$": {"description": "transformers' mirror of another field; must agree with it"}
                   for k in cls.ACCEPTED_EXTRA_KEYS},
                **{f"^{re.escape(f.name)}$": f.json_schema() for f in cls.EXTRA_FIELDS},
            },
            "additionalProperties": False,
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
