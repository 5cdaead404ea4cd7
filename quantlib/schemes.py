"""The quantizer registry: one class per scheme, chosen from a validated config.

Modelled on transformers' `AUTO_QUANTIZER_MAPPING` / `HfQuantizer`: a config says *what*, a
quantizer knows *how* (which library, which device, which modules to leave alone) and checks the
environment before any weights are touched. `get_quantizer` is the factory; it returns a quantizer
whose `.backend` says which backend will produce the numbers and why.

The tensor math itself lives in `quantlib.quantize`; this module only dispatches to it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

import torch

from quantlib import quantize as qmath
from quantlib.configs import (
    AqlmQuantConfig,
    AwqQuantConfig,
    BitsAndBytesQuantConfig,
    GGUFQuantConfig,
    GPTQQuantConfig,
    QuantConfig,
    RTNQuantConfig,
    parse_config,
)
from quantlib.errors import BackendUnavailableError
from quantlib.shapes import ROLE_LABELS, ModelShapes, WeightShape


def should_convert_module(name: str, patterns: list[str]) -> bool:
    """transformers' matcher of `modules_to_not_convert` patterns (imported lazily: it is cheap)."""
    from transformers.quantizers.quantizers_utils import should_convert_module as _should

    return _should(name, patterns)

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
    #: False where the stored weight is not the base weight rounded (AWQ folds per-channel scales into
    #: it and into the preceding module), so a layer's weight error is more than its rounding error.
    weight_error_is_rounding: ClassVar[bool] = True

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
    def code_bits(cls, config: QuantConfig) -> float:
        """Bits of the code per weight, scales aside (4 for NF4, 5 for Q5_0): what error bounds scale with."""
        return float(config.bits)

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
    #: What the method does with mixture-of-experts weights, for the planner's notes.
    experts_policy: ClassVar[str] = ("experts quantized one matrix per expert (fused 3-D tensors included), as "
                                     "llama.cpp and gptqmodel store them; routers kept in full precision")

    @classmethod
    def skip_modules(cls, config: QuantConfig) -> list[str]:
        """Module patterns the config itself leaves in full precision."""
        return list(getattr(config, "modules_to_not_convert", None) or [])

    @classmethod
    def skip_rules(cls, config: QuantConfig, shapes: ModelShapes) -> list[tuple[str, str]]:
        """(module pattern, why) left unquantized: transformers' defaults (output head, tied weights,
        last module), the model's fp32 modules, then the config's own list."""
        return [*default_skip_rules(shapes),
                *((p, f"skipped by the config ({p!r})") for p in cls.skip_modules(config))]

    @classmethod
    def classify(cls, config: QuantConfig, shapes: ModelShapes) -> dict[str, str | None]:
        """Parameter name -> None where the method quantizes it, else why it stays unquantized."""
        rules = cls.skip_rules(config, shapes)
        out: dict[str, str | None] = {}
        for w in shapes.weights:
            out[w.name] = cls.treatment(config, w, rules)
        return out

    @classmethod
    def treatment(cls, config: QuantConfig, w: WeightShape, rules: list[tuple[str, str]]) -> str | None:
        if not w.is_matmul:
            return ROLE_LABELS[w.role]
        for pattern, why in rules:
            if not should_convert_module(w.module, [pattern]):
                return why
        return cls.matmul_treatment(config, w)

    @classmethod
    def matmul_treatment(cls, config: QuantConfig, w: WeightShape) -> str | None:
        """Why the method leaves a matmul weight (not skipped by the rules) unquantized, or None."""
        if w.role == "router":
            return "MoE routers / gates (kept in full precision, as llama.cpp and gptqmodel do)"
        return None


class BnbQuantizer(Quantizer):
    """Shared part of the two bitsandbytes quantizers: the real library, real kernels."""

    config_class = BitsAndBytesQuantConfig
    requires = (("bitsandbytes", "bitsandbytes"),)
    simulated = False
    library = "bitsandbytes"

    experts_policy = ("transformers 5.23 replaces only nn.Linear and Conv1D modules with bitsandbytes layers: fused "
                      "3-D expert tensors (Mixtral, Qwen-MoE, DeepSeek...) stay in 16/32 bits, per-expert "
                      "nn.Linear lists and linear routers are quantized")

    @classmethod
    def skip_modules(cls, config: QuantConfig) -> list[str]:
        return list(config.llm_int8_skip_modules or [])

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        if config.load_in_8bit:
            return 16.0 if config.llm_int8_has_fp16_weight else 8.0
        return 4.0

    @classmethod
    def skip_rules(cls, config: QuantConfig, shapes: ModelShapes) -> list[tuple[str, str]]:
        """transformers' `get_modules_to_not_convert`: its defaults (output head, tied weights, last
        module) apply only when `llm_int8_skip_modules` is None; a list replaces them."""
        own = config.llm_int8_skip_modules
        rules = [r for r in default_skip_rules(shapes) if own is None or r[1].startswith("kept in fp32")]
        return [*rules, *((p, f"skipped by llm_int8_skip_modules ({p!r})") for p in own or [])]

    @classmethod
    def matmul_treatment(cls, config: QuantConfig, w: WeightShape) -> str | None:
        if w.kind == "experts":
            return "fused expert tensors (transformers' bitsandbytes replaces only nn.Linear and Conv1D modules)"
        if w.kind == "linear" and not w.exact_linear:
            return f"{w.module_class}, a subclass of nn.Linear, which transformers' bitsandbytes replacement skips"
        return None

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
        """What `Int8Params._quantize` stores: the weight cast to fp16 first, whatever the model's
        dtype (so fp32 and bf16 weights round through fp16), then row-wise int8 with fp32 SCB."""
        packed = qmath.quantize_int8_weight(weight.to(torch.float16))
        return dataclasses.replace(packed, dtype=weight.dtype)


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
    def code_bits(cls, config: QuantConfig) -> float:
        return float(GGUF_CODE_BITS[config.quant_type])

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


# ----------------------------------------------------------------------------------------
# Calibration-based methods: real libraries only, never imitated here
# ----------------------------------------------------------------------------------------

#: Bits of each integer container gptqmodel can pack codes into (`pack_dtype`).
PACK_DTYPE_BITS = {"int8": 8, "int16": 16, "int32": 32, "int64": 64}
#: Group sizes worth suggesting for GPTQ/AWQ (what the gptqmodel kernels are built for).
CALIBRATED_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)

TensorShapes = dict[str, tuple[tuple[int, ...], int]]  # name -> (shape, bits per element)


class CalibratedQuantizer(Quantizer):
    """Base of GPTQ, AWQ and AQLM: calibrated on activations by their own library, never faked.

    Memory planning and shape checks work from the config alone (classmethods). Quantizing needs
    the library: `get_quantizer` raises `BackendUnavailableError` when it is missing, and
    `quantize_tensor` raises it always, because these methods quantize a whole model from its
    activations on calibration text, not one tensor at a time.
    """

    simulated = False
    method_name: ClassVar[str] = ""
    calibration: ClassVar[str] = ""
    #: True where quantlib can run the method end to end (`quantlib.calibration`): GPTQ and AWQ
    #: through gptqmodel. `quantize_model` then calibrates the whole model instead of tensors.
    calibrated: ClassVar[bool] = False

    def environment_notes(self, device: str) -> list[str]:
        if not self.calibrated:
            return []
        return [f"{self.method_name} calibrates with gptqmodel on the CPU (GPTQMODEL_CPU_WORKERS=2) and runs with its "
                "pure-torch kernel; calibration takes minutes, not seconds"]

    def validate_environment(self, device: str) -> BackendReport:
        try:
            return super().validate_environment(device)
        except BackendUnavailableError as exc:
            if "is not installed" not in exc.missing:
                raise
            raise BackendUnavailableError(
                f"{self.method_name} ({self.config.label})", exc.missing,
                f"{exc.fix}, into the environment that runs quantlib (its torch requirement must accept the "
                f"installed torch). {self.calibration}") from None

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        raise BackendUnavailableError(
            f"{self.method_name} ({self.config.label})",
            "it is calibration-based: it quantizes a whole model from its activations on calibration text, "
            f"which {self.library} does and quantlib does not imitate",
            f"Quantize the model with {self.library} and load the saved checkpoint; quantlib can plan its "
            "memory and check its shapes without it.")

    @classmethod
    def tensor_shapes(cls, config: QuantConfig, out_features: int, in_features: int) -> TensorShapes:
        """Every tensor a checkpoint stores for one linear weight: name -> (shape, bits per element)."""
        raise NotImplementedError

    @classmethod
    def tensor_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        return {name: math.prod(shape) * bits / 8
                for name, (shape, bits) in cls.tensor_shapes(config, out_features, in_features).items()}


def _groups(config: QuantConfig, in_features: int) -> tuple[int, int]:
    """(group size, number of groups) with -1 meaning one group spanning the input."""
    size = in_features if config.group_size == -1 else config.group_size
    return size, -(-in_features // size)


def _group_problem(config: QuantConfig, name: str, in_features: int) -> str | None:
    if config.group_size == -1 or in_features % config.group_size == 0:
        return None
    fits = [g for g in CALIBRATED_GROUP_SIZES if in_features % g == 0]
    return (f"{name}: input width {in_features} is not divisible by group_size {config.group_size}; "
            f"sizes that fit: {', '.join(map(str, fits)) if fits else 'none of ' + str(CALIBRATED_GROUP_SIZES)}"
            ", or -1 (one group per output channel)")


class GPTQQuantizer(CalibratedQuantizer):
    """GPTQ through gptqmodel (the backend transformers uses for GPTQConfig)."""

    config_class = GPTQQuantConfig
    requires = (("gptqmodel", "gptqmodel"),)
    library = "gptqmodel"
    method_name = "GPTQ"
    calibrated = True
    calibration = ("GPTQ calibrates on text (quantlib would feed its built-in corpus) and needs gptqmodel "
                   "for the Hessian-based rounding and int32 packing.")

    @classmethod
    def tensor_shapes(cls, config: QuantConfig, out_features: int, in_features: int) -> TensorShapes:
        """The buffers of gptqmodel's `BaseQuantLinear` (and AutoGPTQ's QuantLinear), GPTQ v1/v2 format.

        qweight: (in // W * bits, out) words of W bits (W = 32 for the default pack_dtype int32),
        the codes of `bits` bits packed along the input; qzeros: (groups, out // W * bits), one
        `bits`-bit zero point per group and output channel, stored even for sym=True; scales:
        (groups, out) fp16; g_idx: (in,) int32, the group of each input feature (written always,
        needed for desc_act). groups = ceil(in / group_size), or 1 for group_size -1. The bias
        (fp16, when the layer has one) is counted with the unquantized tensors.
        """
        word = PACK_DTYPE_BITS[getattr(config, "pack_dtype", None) or "int32"]
        bits = config.bits
        _, groups = _groups(config, in_features)
        return {
            "qweight": ((in_features // word * bits, out_features), word),
            "qzeros": ((groups, out_features // word * bits), word),
            "scales": ((groups, out_features), 16),
            "g_idx": ((in_features,), 32),
        }

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        """codes = qweight; scales = fp16 scales + packed qzeros + g_idx (per-group/feature metadata)."""
        t = cls.tensor_bytes(config, out_features, in_features)
        return {"codes": t["qweight"], "scales": t["scales"] + t["qzeros"] + t["g_idx"], "dq_constants": 0.0,
                "code_tables": 0.0}

    @classmethod
    def check_shape(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        out_features, in_features = shape[0], shape[-1]
        problem = _group_problem(config, name, in_features)
        if problem:
            return problem
        word = PACK_DTYPE_BITS[getattr(config, "pack_dtype", None) or "int32"]
        if in_features % word or out_features % word:
            return (f"{name}: shape {out_features}x{in_features} does not pack into {word}-bit words "
                    f"(GPTQ packs {config.bits}-bit codes along the input and zero points along the output; "
                    f"both widths must be multiples of {word})")
        return None

    @classmethod
    def skip_modules(cls, config: QuantConfig) -> list[str]:
        return list(getattr(config, "modules_to_not_convert", None) or [])


class AwqQuantizer(CalibratedQuantizer):
    """AWQ through gptqmodel (which loads and produces AutoAWQ-format checkpoints)."""

    config_class = AwqQuantConfig
    requires = (("gptqmodel", "gptqmodel"),)
    library = "gptqmodel"
    method_name = "AWQ"
    calibrated = True
    weight_error_is_rounding = False
    calibration = ("AWQ searches per-channel scales on activations of calibration text (quantlib would feed "
                   "its built-in corpus) and needs gptqmodel to search, pack and run them.")

    def environment_notes(self, device: str) -> list[str]:
        return [*super().environment_notes(device),
                "AWQ calibrates in bf16 (gptqmodel 7.6.0's AWQ breaks in fp32), which CPUs without bf16 instructions "
                "run several times slower than fp32; the checkpoint is then evaluated in fp32"]

    @classmethod
    def tensor_shapes(cls, config: QuantConfig, out_features: int, in_features: int) -> TensorShapes:
        """The buffers of AutoAWQ's WQLinear_GEMM / gptqmodel's AWQ QuantLinear (format gemm).

        qweight: (in, out // (W / bits)) W-bit words, codes packed along the output; qzeros:
        (groups, out // (W / bits)), `bits`-bit zero points packed the same way (stored even with
        zero_point=false); scales: (groups, out) fp16. No g_idx: AWQ never reorders the input.
        """
        word = PACK_DTYPE_BITS[getattr(config, "pack_dtype", None) or "int32"]
        per_word = word // config.bits
        _, groups = _groups(config, in_features)
        return {
            "qweight": ((in_features, out_features // per_word), word),
            "qzeros": ((groups, out_features // per_word), word),
            "scales": ((groups, out_features), 16),
        }

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        """codes = qweight; scales = fp16 scales + packed qzeros."""
        t = cls.tensor_bytes(config, out_features, in_features)
        return {"codes": t["qweight"], "scales": t["scales"] + t["qzeros"], "dq_constants": 0.0, "code_tables": 0.0}

    @classmethod
    def check_shape(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        out_features, in_features = shape[0], shape[-1]
        problem = _group_problem(config, name, in_features)
        if problem:
            return problem
        per_word = PACK_DTYPE_BITS[getattr(config, "pack_dtype", None) or "int32"] // config.bits
        if out_features % per_word:
            return (f"{name}: output width {out_features} is not a multiple of {per_word} "
                    f"(AWQ packs {per_word} {config.bits}-bit codes per word along the output)")
        return None


class AqlmQuantizer(CalibratedQuantizer):
    """AQLM through the aqlm package (its kernels; codebooks are learned for GPU-days)."""

    config_class = AqlmQuantConfig
    requires = (("aqlm", "aqlm"),)
    library = "aqlm"
    method_name = "AQLM"
    calibration = ("AQLM learns codebooks with beam search and fine-tuning on calibration text (GPU-days for "
                   "a 7B model); load a published AQLM checkpoint instead.")

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        """Codebook bits per weight: num_codebooks x nbits_per_codebook per group of in x out weights."""
        return config.num_codebooks * config.nbits_per_codebook / (config.in_group_size * config.out_group_size)

    @staticmethod
    def code_container_bits(nbits: int) -> int:
        """aqlm's `get_int_dtype`: codes of up to 8/16/32 bits are stored in int8/int16/int32."""
        return next(b for b in (8, 16, 32, 64) if nbits <= b)

    @classmethod
    def tensor_shapes(cls, config: QuantConfig, out_features: int, in_features: int) -> TensorShapes:
        """The parameters of aqlm's `QuantizedLinear`, as saved in AQLM checkpoints.

        codes: (out / out_group, in / in_group, num_codebooks), one code per group and codebook in
        the smallest int type holding nbits_per_codebook bits (int16 for 16, int8 for 8);
        codebooks: (num_codebooks, 2^nbits, out_group, in_group) fp16, per layer; scales:
        (out / out_group, 1, 1, 1) fp16, one per output group.
        """
        c = config
        return {
            "codes": ((out_features // c.out_group_size, in_features // c.in_group_size, c.num_codebooks),
                      cls.code_container_bits(c.nbits_per_codebook)),
            "codebooks": ((c.num_codebooks, 2 ** c.nbits_per_codebook, c.out_group_size, c.in_group_size), 16),
            "scales": ((out_features // c.out_group_size, 1, 1, 1), 16),
        }

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int) -> dict[str, float]:
        """codes; scales (fp16 per output group); code_tables = the layer's fp16 codebooks."""
        t = cls.tensor_bytes(config, out_features, in_features)
        return {"codes": t["codes"], "scales": t["scales"], "dq_constants": 0.0, "code_tables": t["codebooks"]}

    @classmethod
    def check_shape(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        out_features, in_features = shape[0], shape[-1]
        problems = []
        if in_features % config.in_group_size:
            problems.append(f"input width {in_features} is not divisible by in_group_size {config.in_group_size}")
        if out_features % config.out_group_size:
            problems.append(f"output width {out_features} is not divisible by out_group_size "
                            f"{config.out_group_size}")
        return f"{name}: " + "; ".join(problems) if problems else None

    @classmethod
    def skip_modules(cls, config: QuantConfig) -> list[str]:
        """`linear_weights_not_to_quantize` names parameters (lm_head.weight); modules are their parents."""
        names = config.linear_weights_not_to_quantize or []
        return [n[: -len(".weight")] if n.endswith(".weight") else n for n in names]


#: Bits of the integer code per weight in each GGUF type (the rest of a block is scales/mins).
GGUF_CODE_BITS = {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_0": 4, "Q4_1": 4, "MXFP4": 4, "BF16": 16, "F16": 16}


def gguf_block_geometry(quant_type: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGUF type, from the gguf package's own table."""
    import gguf

    return tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant_type]])  # type: ignore[return-value]


def default_skip_rules(shapes: ModelShapes) -> list[tuple[str, str]]:
    """transformers' default modules left unquantized for this model, each with why."""
    tied = {a.removesuffix(".weight") for pair in shapes.tied for a in pair}
    heads = {w.module for w in shapes.weights if w.role == "head"}
    rules = []
    for pattern in shapes.default_not_convert:
        if pattern in heads or pattern == "lm_head":
            why = "output head (transformers leaves it unquantized by default)"
        elif pattern in tied:
            why = "tied to the output head (transformers leaves tied weights unquantized)"
        else:
            why = "last module of the model (transformers leaves it unquantized by default)"
        rules.append((pattern, why))
    rules += [(p, "kept in fp32 by the model (_keep_in_fp32_modules)") for p in shapes.keep_in_fp32_modules]
    return rules


def fitting_group_sizes(width: int, candidates: tuple[int, ...] = (32, 64, 96, 128, 192, 256)) -> list[int]:
    """Common group sizes that divide `width`, for suggestions in error messages."""
    return [g for g in candidates if width % g == 0] or [d for d in range(1, width + 1) if width % d == 0][-3:]


#: quantizer key (see `QuantConfig.quantizer_key`) -> quantizer class. One entry per scheme.
QUANTIZER_MAPPING: dict[str, type[Quantizer]] = {
    "bitsandbytes_4bit": Bnb4BitQuantizer,
    "bitsandbytes_8bit": Bnb8BitQuantizer,
    "rtn": RTNQuantizer,
    "gguf": GGUFQuantizer,
    "gptq": GPTQQuantizer,
    "awq": AwqQuantizer,
    "aqlm": AqlmQuantizer,
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
