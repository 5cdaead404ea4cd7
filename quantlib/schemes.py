"""The quantizer registry: one class per scheme, chosen from a validated config.

Modelled on transformers' `AUTO_QUANTIZER_MAPPING` / `HfQuantizer`: a config says *what*, a
quantizer knows *how* (which library, which device, which modules to leave alone) and checks the
environment before any weights are touched. `get_quantizer` is the factory; it returns a quantizer
whose `.backend` says which backend will produce the numbers and why.

The tensor math itself lives in `quantlib.quantize`; this module only dispatches to it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

import torch

from quantlib import quantize as qmath
from quantlib.configs import (
    BitsAndBytesQuantConfig,
    GGUFQuantConfig,
    QuantConfig,
    RTNQuantConfig,
    parse_config,
)
from quantlib.errors import BackendUnavailableError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class BackendReport:
    """Which backend a scheme will run on, and why: shown next to every number it produces."""

    method: str
    scheme: str
    device: str  # "cpu" or "cuda"
    device_name: str  # e.g. "CPU (2 cores)" or "NVIDIA H100 80GB HBM3"
    library: str  # e.g. "bitsandbytes 0.50.2" or "torch 2.13.0 (simulated)"
    simulated: bool  # True when weights are replaced by quantize->dequantize results
    reason: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data

    @property
    def short(self) -> str:
        """One-word backend label for table columns."""
        return self.device.upper() + (" (sim)" if self.simulated else "")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device_name(device: str) -> str:
    """Human name of a device, for reports."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    import os

    return f"CPU ({os.cpu_count()} cores)"


def resolve_device(device: str) -> tuple[str, str]:
    """Turn 'auto'/'cpu'/'cuda' into a concrete device and the reason it was chosen."""
    if device not in DEVICES:
        raise ValueError(f"device: got {device!r}; allowed: {', '.join(DEVICES)}")
    if device == "auto":
        if cuda_available():
            return "cuda", "CUDA is available, so the GPU runs it (device=auto)"
        return "cpu", "no CUDA device found, so the CPU runs it (device=auto)"
    if device == "cuda" and not cuda_available():
        raise BackendUnavailableError("device cuda", "no CUDA device is visible to torch",
                                      "Use --device cpu (or auto), or run on a machine with an NVIDIA GPU.")
    return device, f"device={device} was asked for"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class Quantizer:
    """Base of all quantizers (the `HfQuantizer` of this project).

    Subclasses set `config_class`, `requires` (importable modules and pip names), `simulated`, and
    implement `quantize_tensor`. `validate_environment` runs in the constructor, so a quantizer
    that exists can run.
    """

    config_class: ClassVar[type[QuantConfig]]
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()  # (module, pip requirement)
    simulated: ClassVar[bool] = True
    library: ClassVar[str] = "torch"

    def __init__(self, config: QuantConfig, device: str = "auto"):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, not {type(config).__name__}")
        self.config = config
        self.backend = self.validate_environment(device)

    # ----- environment ------------------------------------------------------------------
    def validate_environment(self, device: str) -> BackendReport:
        """Check libraries and hardware; raise `BackendUnavailableError` saying what is missing."""
        for module, pip_name in self.requires:
            if importlib.util.find_spec(module) is None:
                raise BackendUnavailableError(self.config.label, f"the Python package {pip_name!r} is not installed",
                                              f"Install it with: pip install {pip_name}")
        concrete, reason = resolve_device(device)
        notes = tuple(self.environment_notes(concrete))
        lib = f"{self.library} {_version(self.library)}"
        return BackendReport(
            method=self.config.quant_method,
            scheme=self.config.label,
            device=concrete,
            device_name=device_name(concrete),
            library=lib + (" (simulated: weights replaced by quantize→dequantize)" if self.simulated else ""),
            simulated=self.simulated,
            reason=reason,
            notes=notes,
        )

    def environment_notes(self, device: str) -> list[str]:
        """Caveats about running this scheme on `device` (slow paths, missing kernels)."""
        return []

    # ----- tensors ----------------------------------------------------------------------
    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        """Quantize one weight matrix; returns a `quantlib.quantize` packed result."""
        raise NotImplementedError

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """quantize→dequantize, in the weight's dtype: what the model computes with."""
        return self.quantize_tensor(weight).dequantize()

    @classmethod
    def check_shape(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        """Why a weight of this shape cannot be quantized by this scheme, or None if it can.

        A classmethod, like `storage_bytes`: shape rules need the config, not the hardware, so
        they can run on a `config.json` before anything is loaded.
        """
        return None

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        """Analytic bytes of one quantized linear weight, by component, from its shape alone.

        Components: `codes`, `scales`, `dq_constants` (second-level quantization state) and
        `code_tables` (per-layer lookup tables). The planner sums these; tests check them against
        what the real packed tensors occupy.
        """
        raise NotImplementedError

    # ----- modules ----------------------------------------------------------------------
    @classmethod
    def skip_modules(cls, config: QuantConfig) -> list[str]:
        """Names of modules left in full precision besides the output head (always left alone)."""
        return list(getattr(config, "modules_to_not_convert", None) or [])

    def modules_to_not_convert(self) -> list[str]:
        return self.skip_modules(self.config)


class BnbQuantizer(Quantizer):
    """Shared part of the two bitsandbytes quantizers: the real library, real kernels."""

    config_class = BitsAndBytesQuantConfig
    requires = (("bitsandbytes", "bitsandbytes"),)
    simulated = False
    library = "bitsandbytes"

    @classmethod
    def skip_modules(cls, config: QuantConfig) -> list[str]:
        return list(config.llm_int8_skip_modules or [])

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        n = out_features * in_features
        if config.load_in_8bit:
            if config.llm_int8_has_fp16_weight:
                return {"codes": 2.0 * n, "scales": 0.0, "dq_constants": 0.0, "code_tables": 0.0}
            # int8 codes plus one fp32 scale (SCB) per output row.
            return {"codes": float(n), "scales": 4.0 * out_features, "dq_constants": 0.0, "code_tables": 0.0}
        blocks = -(-n // Bnb4BitQuantizer.blocksize)
        codes = float(-(-n // 2))  # two 4-bit codes per byte
        if config.bnb_4bit_use_double_quant:
            # absmax in uint8; per 256 absmax blocks one fp32 absmax; one fp32 offset; both code tables.
            return {"codes": codes, "scales": float(blocks), "dq_constants": 4.0 * -(-blocks // 256) + 4.0,
                    "code_tables": 4.0 * (16 + 256)}
        return {"codes": codes, "scales": 4.0 * blocks, "dq_constants": 0.0, "code_tables": 4.0 * 16}


class Bnb4BitQuantizer(BnbQuantizer):
    """NF4/FP4 with optional double quantization (QLoRA), blocksize 64 as bitsandbytes uses."""

    blocksize: ClassVar[int] = 64

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        return qmath.quantize_4bit(weight, quant_type=self.config.bnb_4bit_quant_type, blocksize=self.blocksize,
                                   double_quant=self.config.bnb_4bit_use_double_quant, backend="bitsandbytes")

    def reference_quantize_tensor(self, weight: torch.Tensor) -> Any:
        """The pure-torch reference of the same scheme, cross-checked against bitsandbytes in tests."""
        return qmath.quantize_4bit(weight, quant_type=self.config.bnb_4bit_quant_type, blocksize=self.blocksize,
                                   double_quant=self.config.bnb_4bit_use_double_quant, backend="torch")


class Bnb8BitQuantizer(BnbQuantizer):
    """LLM.int8(): row-wise int8 weights, fp16 matmul for activation outlier columns."""

    def environment_notes(self, device: str) -> list[str]:
        if device == "cpu":
            return ["bitsandbytes' INT8 matmul on CPU is several times slower than fp32; "
                    "its perplexity pass takes longest."]
        return []

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        return qmath.quantize_int8_weight(weight)


class RTNQuantizer(Quantizer):
    """Round-to-nearest integers, simulated in torch."""

    config_class = RTNQuantConfig

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        c = self.config
        return qmath.quantize_rtn(weight, bits=c.bits, granularity=c.granularity, group_size=c.group_size,
                                  symmetric=c.symmetric)

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        n = out_features * in_features
        groups = {"tensor": 1, "channel": out_features,
                  "group": out_features * max(1, in_features // config.group_size)}[config.granularity]
        # fp16 scale per group, as GPTQ/AWQ checkpoints store them; asymmetric adds a `bits`-bit zero point.
        scales = 2.0 * groups + (0.0 if config.symmetric else groups * config.bits / 8)
        return {"codes": n * config.bits / 8, "scales": scales, "dq_constants": 0.0, "code_tables": 0.0}

    @classmethod
    def check_shape(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        c = config
        if c.granularity == "group" and shape[-1] % c.group_size:
            return (f"{name}: input width {shape[-1]} is not divisible by group_size {c.group_size}; "
                    f"sizes that fit: {', '.join(map(str, fitting_group_sizes(shape[-1])))}")
        return None


class GGUFQuantizer(Quantizer):
    """GGUF block types through the `gguf` package's numpy quantizers, simulated."""

    config_class = GGUFQuantConfig
    requires = (("gguf", "gguf"),)
    library = "gguf"

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        return qmath.quantize_gguf(weight, qtype=self.config.quant_type)

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        block, type_bytes = gguf_block_geometry(config.quant_type)
        total = out_features * in_features / block * type_bytes
        # A GGUF block interleaves scale(s) and codes; split it by the codes' share for the chart.
        code_bits = GGUF_CODE_BITS[config.quant_type]
        codes = out_features * in_features * code_bits / 8
        return {"codes": codes, "scales": total - codes, "dq_constants": 0.0, "code_tables": 0.0}

    @classmethod
    def check_shape(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        block, _ = gguf_block_geometry(config.quant_type)
        if shape[-1] % block:
            return f"{name}: input width {shape[-1]} is not a multiple of the {config.quant_type} block ({block})"
        return None


#: Bits of the integer code per weight in each GGUF type (the rest of a block is scales/mins).
GGUF_CODE_BITS = {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_0": 4, "Q4_1": 4, "MXFP4": 4, "BF16": 16, "F16": 16}


def gguf_block_geometry(quant_type: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGUF type, from the gguf package's own table."""
    import gguf

    return tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant_type]])  # type: ignore[return-value]


def is_skipped(name: str, patterns: list[str]) -> bool:
    """transformers' rule: a pattern skips a module whose dotted name contains it as a whole part."""
    return any(re.search(rf"(^|\.){re.escape(p)}($|\.)", name) for p in patterns)


def fitting_group_sizes(width: int, candidates: tuple[int, ...] = (32, 64, 96, 128, 192, 256)) -> list[int]:
    """Common group sizes that divide `width`, for suggestions in error messages."""
    return [g for g in candidates if width % g == 0] or [d for d in range(1, width + 1) if width % d == 0][-3:]


#: quantizer key (see `QuantConfig.quantizer_key`) -> quantizer class. One entry per scheme.
QUANTIZER_MAPPING: dict[str, type[Quantizer]] = {
    "bitsandbytes_4bit": Bnb4BitQuantizer,
    "bitsandbytes_8bit": Bnb8BitQuantizer,
    "rtn": RTNQuantizer,
    "gguf": GGUFQuantizer,
}


def get_quantizer(config: QuantConfig | dict | str, device: str = "auto") -> Quantizer:
    """Factory: validate the config, pick the quantizer, check libraries and hardware.

    Raises `ConfigError` for a bad config and `BackendUnavailableError` when the scheme cannot run
    here, both before any weights are touched. The returned quantizer's `.backend` says which
    backend was chosen and why.
    """
    config = parse_config(config)
    cls = QUANTIZER_MAPPING.get(config.quantizer_key)
    if cls is None:  # a config class registered without a quantizer
        raise BackendUnavailableError(config.quant_method, "no quantizer is registered for it",
                                      "Register one in quantlib.schemes.QUANTIZER_MAPPING.")
    return cls(config, device=device)


ProgressFn = Callable[[float, str], None]
