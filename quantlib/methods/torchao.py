"""torchao weight-only int8 / int4 through `torchao.quantization.quantize_`, as transformers' `TorchAoConfig`
uses it: the config, the quantizer and the tensor format.

int8 runs for real here: each linear weight goes through torchao's own `quantize_` with
`Int8WeightOnlyConfig` (per row, or per group of `group_size`), and what its `Int8Tensor` stores
(int8 `qdata`, fp32 `scale`, int8 `zero_point`) is counted tensor by tensor; the model computes with
`Int8Tensor.dequantize()` (simulated: torchao's per-row forward multiplies by the scale after the
matmul, which differs from this by float rounding, ~1e-6 in fp32).

int4 (`Int4WeightOnlyConfig`) is planned (its plain layout: packed uint4 `qdata`, `scale` and
`zero_point` per group in the model dtype) but refused on this CPU: torchao 0.18 implements every
int4 packing format with CUDA kernels (the `mslk` library); the CPU path is a prototype config that
transformers can neither serialise nor save.

The saved form is what `TorchAoConfig.to_dict()` writes (`quant_type: {"default": <torchao's
config_to_dict>}`), produced by transformers and torchao themselves, so it loads unchanged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.errors import _MISSING, BackendUnavailableError, FieldError
from quantlib.formats import QuantizedTensor, check_float
from quantlib.methods.base import register
from quantlib.methods.base.families import LinearReplacingQuantizer
from quantlib.methods.base.rules import group_size_problem
from quantlib.runtime import BackendReport
from quantlib.shapes import DTYPE_BYTES

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 40

# torchao (pulled in by gptqmodel, imported by transformers when present) logs a warning for each
# CUDA-only extension it cannot load on a CPU machine: noise on every model load. Errors still show.
logging.getLogger("torchao").setLevel(logging.ERROR)

QUANT_TYPES = ("Int8WeightOnlyConfig", "Int4WeightOnlyConfig")
#: Group sizes torchao's int4 kernels accept.
INT4_GROUP_SIZES = (32, 64, 128, 256)


def _ao_config(quant_type: str, group_size: int | None) -> Any:
    """The torchao config object of these settings."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, PerGroup, PerRow

    if quant_type == "Int8WeightOnlyConfig":
        return Int8WeightOnlyConfig(granularity=PerRow() if group_size is None else PerGroup(group_size))
    return Int4WeightOnlyConfig(group_size=group_size)


@lru_cache(maxsize=64)
def _saved_form(quant_type: str, group_size: int | None, skip: str, include_emb: bool, untie: bool) -> str:
    """`TorchAoConfig(...).to_dict()` as JSON text (transformers and torchao write it)."""
    from transformers import TorchAoConfig

    hf = TorchAoConfig(_ao_config(quant_type, group_size), modules_to_not_convert=json.loads(skip),
                       include_input_output_embeddings=include_emb, untie_embedding_weights=untie)
    return json.dumps(hf.to_dict(), default=lambda v: getattr(v, "value", str(v)))


class TorchAoQuantConfig(QuantConfig):
    """torchao weight-only int8 (per row or group) or int4 (per group), keys as transformers' TorchAoConfig."""

    quant_method = "torchao"
    description = ("torchao weight-only quantization (Int8WeightOnlyConfig per row or group; "
                   "Int4WeightOnlyConfig per group, CUDA only), as transformers' TorchAoConfig writes it.")
    SAVED_FORM = {"quant_type": {"type": "object", "description": "{\"default\": torchao's config_to_dict}"},
                  "modules_to_not_convert": {"type": ["array", "null"], "items": {"type": "string"}},
                  "include_input_output_embeddings": {"type": "boolean"},
                  "untie_embedding_weights": {"type": "boolean"}}
    FIELDS = (
        FieldSpec("ao_config", str, "Int8WeightOnlyConfig", "torchao config class (weight-only); exported as "
                  "TorchAoConfig's quant_type object.", choices=QUANT_TYPES, title="torchao config"),
        FieldSpec("group_size", int, None, "Weights per scale group along the input (int8: null for one scale per "
                  "row; int4: 32, 64, 128 or 256).", minimum=1, nullable=True, title="Group size"),
        FieldSpec("modules_to_not_convert", list, None, "Module names left unquantized (null: transformers' "
                  "defaults, the output head and tied weights; a list replaces them).", nullable=True,
                  title="Skip modules", patterns=True),
        FieldSpec("include_input_output_embeddings", bool, False, "Also quantize the input and output "
                  "embeddings (not modelled by the planner: refused).", title="Quantize embeddings"),
        FieldSpec("untie_embedding_weights", bool, False, "Untie input and output embeddings before quantizing.",
                  title="Untie embeddings"),
    )

    def __init__(self, **values: Any):
        object.__setattr__(self, "_values", self._validate(self._flatten(dict(values))))

    @classmethod
    def recognises(cls, obj: dict[str, Any]) -> bool:
        return False

    @classmethod
    def _flatten(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """The saved form's `quant_type: {"default": {...}}` as the flat keys (checked in `_absorb`)."""
        qt = raw.get("quant_type", _MISSING)
        if qt is not _MISSING:
            settings = _settings_of(qt)
            raw = {k: v for k, v in raw.items() if k != "quant_type"}
            raw["_saved_quant_type"] = qt
            if isinstance(settings, dict):
                raw.update(settings)
        if raw.get("ao_config") == "Int4WeightOnlyConfig" and raw.get("group_size") is None:
            raw["group_size"] = 128  # Int4WeightOnlyConfig's own default
        return raw

    @classmethod
    def _validate(cls, raw: dict[str, Any]) -> dict[str, Any]:
        saved = raw.pop("_saved_quant_type", _MISSING)
        values = super()._validate(raw)
        if saved is not _MISSING:
            problem = _settings_of(saved)
            if isinstance(problem, str):
                from quantlib.errors import ConfigError

                raise ConfigError([FieldError("quant_type", saved, problem,
                                              "TorchAoConfig's {\"default\": {\"_type\": ...}}")], method=cls.quant_method)
        return values

    @classmethod
    def check(cls, values: dict[str, Any], failed: set[str]) -> list[FieldError]:
        if {"ao_config", "group_size"} & failed:
            return []
        if values["ao_config"] == "Int4WeightOnlyConfig" and values["group_size"] not in INT4_GROUP_SIZES:
            return [FieldError("group_size", values["group_size"], "is not a group size torchao's int4 accepts",
                               ", ".join(map(str, INT4_GROUP_SIZES)))]
        return []

    @classmethod
    def rules(cls) -> list[str]:
        return [*super().rules(), "Int4WeightOnlyConfig needs group_size 32, 64, 128 or 256."]

    def to_dict(self) -> dict[str, Any]:
        """`TorchAoConfig.to_dict()`, written by transformers and torchao (JSON types)."""
        return json.loads(_saved_form(self.ao_config, self.group_size, json.dumps(self.modules_to_not_convert),
                                      self.include_input_output_embeddings, self.untie_embedding_weights))

    def to_transformers(self) -> Any:
        from transformers import TorchAoConfig

        return TorchAoConfig.from_dict(self.to_dict())

    @property
    def label(self) -> str:
        bits = "int8" if self.ao_config.startswith("Int8") else "int4"
        return f"torchao {bits} " + ("per-row" if self.group_size is None else f"g{self.group_size}")


def _settings_of(quant_type: Any) -> dict[str, Any] | str:
    """(quant_type, group_size) of a saved `{"default": {"_type", "_data", ...}}`, or why not modelled."""
    entry = quant_type.get("default") if isinstance(quant_type, dict) else None
    if not isinstance(entry, dict) or set(quant_type) != {"default"}:
        return "must be {\"default\": <torchao config>} (per-module configs are not modelled)"
    name = entry.get("_type")
    if name not in QUANT_TYPES:
        return f"torchao config {name!r} is not modelled; modelled: {', '.join(QUANT_TYPES)}"
    data = entry.get("_data", {})
    if name == "Int8WeightOnlyConfig":
        gran = (data.get("granularity") or {}).get("_type")
        group = (data.get("granularity") or {}).get("_data", {}).get("group_size") if gran == "PerGroup" else None
        if gran not in ("PerRow", "PerGroup"):
            return f"granularity {gran!r} is not modelled (PerRow or PerGroup)"
    else:
        group = data.get("group_size")
    try:
        expected = json.loads(_saved_form(name, group, "null", False, False))["quant_type"]["default"]
    except Exception as exc:  # noqa: BLE001 - torchao refuses the settings: say why
        return f"torchao refuses these settings ({exc})"
    different = sorted(k for k in set(data) | set(expected["_data"]) if data.get(k) != expected["_data"].get(k))
    if different or entry.get("_version") != expected.get("_version"):
        return (f"settings other than the group size differ from torchao's defaults ({', '.join(different) or '_version'}); "
                "not modelled")
    return {"ao_config": name, "group_size": group}


# --------------------------------------------------------------------------------------------
# The tensor format
# --------------------------------------------------------------------------------------------


@dataclass
class TorchAoInt8Tensor(QuantizedTensor):
    """What torchao's `Int8Tensor` stores: int8 qdata, fp32 scale and int8 zero point per row or group."""

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    group_size: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    COMPONENT_OF: ClassVar[dict[str, str]] = {"codes": "codes", "scale": "scales", "zero_point": "scales"}

    @property
    def storage_bits(self) -> dict[str, int]:
        bits = {"codes": 8 * self.qdata.numel() * self.qdata.element_size(),
                "scale": 8 * self.scale.numel() * self.scale.element_size()}
        if self.zero_point is not None:
            bits["zero_point"] = 8 * self.zero_point.numel() * self.zero_point.element_size()
        return bits

    @property
    def n_codes(self) -> int:
        return 256

    def codes_unpacked(self) -> torch.Tensor:
        return self.qdata.reshape(-1).long() + 128

    def dequantize(self) -> torch.Tensor:
        """`Int8Tensor.dequantize()`: qdata x scale, per row or group, in the original dtype."""
        units = self.scale.shape[-1]
        q = self.qdata.float().reshape(self.shape[0], units, -1)
        zero = 0 if self.zero_point is None else self.zero_point.float().reshape(self.shape[0], units, 1)
        return ((q - zero) * self.scale.float().reshape(self.shape[0], units, 1)).reshape(self.shape).to(self.dtype)


def quantize_torchao_int8(w: torch.Tensor, group_size: int | None = None) -> TorchAoInt8Tensor:
    """Quantize one (out, in) weight with torchao's `quantize_(Int8WeightOnlyConfig)` and keep its tensors."""
    from torchao.quantization import quantize_

    check_float(w, "quantize_torchao_int8")
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
    linear.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
    quantize_(linear, _ao_config("Int8WeightOnlyConfig", group_size))
    q = linear.weight
    zero = getattr(q, "zero_point", None)
    return TorchAoInt8Tensor(q.qdata, q.scale, zero, group_size, tuple(w.shape), w.dtype)


# --------------------------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------------------------


@register("torchao")
class TorchAoQuantizer(LinearReplacingQuantizer):
    """torchao weight-only int8 on CPU (its own quantize_), simulated with the weights it dequantizes."""

    config_class = TorchAoQuantConfig
    requires = (("torchao", "torchao"),)
    library = "torchao"
    transformers_path = "transformers' torchao path quantizes"
    experts_policy = ("transformers' torchao path quantizes nn.Linear modules (per-expert lists and linear "
                      "routers included); fused 3-D expert tensors stay in 16/32 bits")

    def validate_environment(self, device: str) -> BackendReport:
        report = super().validate_environment(device)
        if self.config.ao_config == "Int4WeightOnlyConfig" and report.device == "cpu":
            raise BackendUnavailableError(
                self.config.label, "torchao 0.18 implements Int4WeightOnlyConfig only with CUDA kernels (every "
                "int4 packing format needs the mslk library or CUDA); its CPU int4 is a prototype config that "
                "transformers can neither serialise nor save",
                "Run it on a CUDA machine (pip install torchao==0.18.0 mslk), or use the int8 config here; the "
                "Memory Planner plans int4 without running it.")
        return report

    @classmethod
    def config_problem(cls, config: QuantConfig) -> str | None:
        if config.include_input_output_embeddings:
            return ("include_input_output_embeddings quantizes the embeddings with torchao's embedding formats, "
                    "which quantlib does not model; set it to false")
        return None

    def quantize_tensor(self, weight: torch.Tensor) -> TorchAoInt8Tensor:
        return quantize_torchao_int8(weight, self.config.group_size)

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        return 8.0 if config.ao_config.startswith("Int8") else 4.0

    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "TorchAoConfig"

    @classmethod
    def shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        if config.group_size is None:
            return None
        sizes = INT4_GROUP_SIZES if config.ao_config.startswith("Int4") else (32, 64, 96, 128, 192, 256)
        return group_size_problem(name, shape[-1], config.group_size, sizes)

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int,
                      dtype: str = "float32") -> dict[str, float]:
        """int8: qdata 1 byte per weight, fp32 scale and int8 zero point per row or group. int4 (plain):
        two codes per byte, scale and zero point per group in the model dtype."""
        units = out_features * (1 if config.group_size is None else in_features // config.group_size)
        n = out_features * in_features
        if config.ao_config.startswith("Int8"):
            return {"codes": float(n), "scales": 5.0 * units, "dq_constants": 0.0, "code_tables": 0.0}
        return {"codes": n / 2, "scales": 2.0 * units * DTYPE_BYTES[dtype], "dq_constants": 0.0, "code_tables": 0.0}
