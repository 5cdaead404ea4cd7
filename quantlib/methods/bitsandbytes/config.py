"""bitsandbytes' config: `BitsAndBytesQuantConfig`, the keys of transformers' `BitsAndBytesConfig`, and the
choices its dtype and 4-bit type keys take."""

from __future__ import annotations

import json
from typing import Any

from quantlib.configs import FieldSpec, QuantConfig, _copy, fmt_num
from quantlib.errors import FieldError

BNB_COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
BNB_STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32", "float64")
BNB_QUANT_TYPES = ("nf4", "fp4")
#: bitsandbytes keys whose values are torch dtypes in transformers' idiom.
DTYPE_KEYS = ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")


class BitsAndBytesQuantConfig(QuantConfig):
    """bitsandbytes 4-bit (NF4/FP4, optional double quantization) or 8-bit LLM.int8().

    The keys are exactly those of `transformers.BitsAndBytesConfig`; `to_dict()` equals what that
    class's `to_dict()` gives for the same settings, including its private `_load_in_4bit` and
    `_load_in_8bit` mirrors, so a saved model's `quantization_config` block imports unchanged.
    """

    quant_method = "bitsandbytes"
    description = "bitsandbytes: 4-bit NF4/FP4 (QLoRA) or 8-bit LLM.int8() with outlier decomposition."
    ACCEPTED_EXTRA_KEYS = ("_load_in_4bit", "_load_in_8bit")
    FORM_CHOICE = {
        "key": "bits", "label": "Bits",
        "help": "4-bit (NF4/FP4, QLoRA) or 8-bit (LLM.int8()). Exported as load_in_4bit / load_in_8bit.",
        "options": {4: {"load_in_4bit": True, "load_in_8bit": False},
                    8: {"load_in_4bit": False, "load_in_8bit": True}},
    }
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
                  nullable=True, title="Skip modules", patterns=True),
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

    def export_notes(self) -> list[str]:
        return ["`_load_in_4bit` and `_load_in_8bit` are transformers' own keys: `BitsAndBytesConfig.to_dict()` "
                "writes them beside `load_in_4bit`/`load_in_8bit`, and a model saved with this config carries them "
                "in its config.json. The file is what transformers itself writes; it loads with or without them."]

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

    @classmethod
    def recognises(cls, obj: dict[str, Any]) -> bool:
        return "load_in_4bit" in obj or "load_in_8bit" in obj

    def to_transformers(self) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig.from_dict(self.to_dict())

    @property
    def quantizer_key(self) -> str:
        return "bitsandbytes_4bit" if self.load_in_4bit else "bitsandbytes_8bit"

    @property
    def label(self) -> str:
        if self.load_in_8bit:
            name = f"INT8 (t={fmt_num(self.llm_int8_threshold)})"
        else:
            name = self.bnb_4bit_quant_type.upper()
            name = f"{name}+DQ" if self.bnb_4bit_use_double_quant else name
        skip = self.llm_int8_skip_modules
        return f"{name}, {len(skip)} skipped" if skip and skip != ["lm_head"] else name
