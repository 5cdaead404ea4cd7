"""AWQ (Lin et al. 2023) through gptqmodel: the config transformers' AwqConfig writes, the quantizer
that calibrates here (with its gptqmodel workarounds), and the GEMM checkpoint layout."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Any, Iterator

import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.methods._gptqmodel import GptqmodelQuantizer, allow_fp32, as_out_in, pack_word_bits
from quantlib.methods._gptqmodel_config import (AWQ_BACKENDS, AWQ_EXTRA_FIELDS, AWQ_FORMATS, _gptq_family_fields,
                                                _GPTQFamilyConfig)
from quantlib.methods._gptqmodel import groups as group_count
from quantlib.methods.base import register
from quantlib.methods.base.families import TensorShapes

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 70


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
                  "MoE gates).", nullable=True, title="Skip modules", patterns=True),
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

    TRANSFORMERS_CLASS = "AwqConfig"
    TRANSFORMERS_MIRROR = "version"

    @property
    def label(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"AWQ int{self.bits} {group}" + ("" if self.zero_point else " sym")




@register("awq")
class AwqQuantizer(GptqmodelQuantizer):
    """AWQ through gptqmodel (which loads and produces AutoAWQ-format checkpoints)."""

    config_class = AwqQuantConfig
    method_name = "AWQ"
    #: benchmarks/bench_calibrated.py: 579 s for 1k tokens on the 135M default model (bf16 on a CPU without it).
    CPU_CALIBRATION_COST = (120.0, 0.45)
    weight_error_is_rounding = False
    calibration = ("AWQ searches per-channel scales on activations of calibration text (quantlib would feed "
                   "its built-in corpus) and needs gptqmodel to search, pack and run them.")

    @classmethod
    def mix_problem(cls) -> str:
        return ("awq: its per-channel scales come from a search over each block's activations, so a layer's error at "
                "a setting needs that search per setting (minutes per block here); not measured. GPTQ mixes per "
                "module through gptqmodel's dynamic")

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
        word = pack_word_bits(config)
        per_word = word // config.bits
        _, groups = group_count(config, in_features)
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
    def pack_problem(cls, config: QuantConfig, name: str, out_features: int, in_features: int) -> str | None:
        per_word = pack_word_bits(config) // config.bits
        if out_features % per_word:
            return (f"{name}: output width {out_features} is not a multiple of {per_word} "
                    f"(AWQ packs {per_word} {config.bits}-bit codes per word along the output)")
        return None



    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "AwqConfig"

    def gptqmodel_config(self, QuantizeConfig: Any) -> Any:
        """AutoAWQ's zero_point=True means asymmetric codes (gptqmodel: sym=False)."""
        c = self.config
        return QuantizeConfig(method="awq", format="gemm", sym=not c.zero_point, bits=c.bits, group_size=c.group_size,
                              desc_act=bool(c.desc_act), offload_to_disk=False)

    def gptqmodel_backends(self, BACKEND: Any) -> tuple[Any, Any, torch.dtype, torch.dtype]:
        """Calibrated in bf16, run in fp32 like the baseline.

        AWQ calibrates in bf16, its native dtype: gptqmodel 7.6.0's AWQ calibrated in fp32 folds scales
        into the norms that do not match those applied to q/k/v (layer 0's effective q_proj off by 138%,
        perplexity in the millions); in bf16 the same check gives 8%.
        """
        return BACKEND.AWQ_TORCH, BACKEND.AWQ_TORCH, torch.bfloat16, torch.float32

    def prepare_library(self) -> None:
        _install_awq_workarounds()

    def calibration_context(self, settings: Any) -> contextlib.AbstractContextManager:
        return _clip_search(settings.awq_clip_search)

    def calibration_notes(self, settings: Any) -> list[str]:
        return [] if settings.awq_clip_search else ["AWQ weight-clipping search off (CPU time); scale search on"]

    def dequantize_module(self, module: torch.nn.Module) -> torch.Tensor:
        """AwqTorchLinear has no dequantize method; its forward unpacks with gptqmodel's dequantize_gemm."""
        return as_out_in(module, awq_dequantize(module))


def awq_dequantize(module: Any) -> torch.Tensor:
    """(in, out) fp32 weight of an AWQ GEMM QuantLinear, through gptqmodel's own unpacking."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(qweight=module.qweight, qzeros=module.qzeros, scales=module.scales.float(),
                           bits=module.bits, group_size=module.group_size).float()


# ----------------------------------------------------------------------------------------
# Workarounds of gptqmodel 7.6.0, in one place, installed once (tests: test_gptq_awq.py)
# ----------------------------------------------------------------------------------------

#: This run's clip-search choice. gptqmodel 7.6.0 has no switch for AutoAWQ's `apply_clip`: its
#: `AWQProcessor.__init__` sets `self.apply_clip = True`. The processor is built inside
#: `model.quantize()` on the calling thread, so a wrapper installed once reads the choice from a
#: context variable: two app sessions calibrating at once (each on its own thread) never see each
#: other's choice, and nothing is patched and unpatched around a call.
_CLIP_SEARCH: contextvars.ContextVar[bool | None] = contextvars.ContextVar("quantlib_awq_clip_search", default=None)
_INSTALL_LOCK = threading.Lock()


@contextlib.contextmanager
def _clip_search(enabled: bool) -> Iterator[None]:
    token = _CLIP_SEARCH.set(bool(enabled))
    try:
        yield
    finally:
        _CLIP_SEARCH.reset(token)


def _apply_clip_choice(processor: Any) -> None:
    """Set this run's clip-search choice on a new AWQProcessor (outside a run: the library's default)."""
    choice = _CLIP_SEARCH.get()
    if choice is not None:
        processor.apply_clip = choice


def _install_awq_workarounds() -> None:
    """Idempotent: the clip-search switch, and an fp32 forward for gptqmodel's AWQ torch kernel."""
    from gptqmodel.looper import awq_processor
    from gptqmodel.nn_modules.qlinear import torch_awq

    with _INSTALL_LOCK:
        allow_fp32([torch_awq.AwqTorchLinear])
        proc = awq_processor.AWQProcessor
        if not getattr(proc, "_quantlib_clip_switch", False):
            original_init = proc.__init__

            def init(self: Any, *args: Any, **kwargs: Any) -> None:
                original_init(self, *args, **kwargs)
                _apply_clip_choice(self)

            proc.__init__ = init
            proc._quantlib_clip_switch = True
        # AwqTorchLinear computes fp32 inputs in fp16 (its GPU habit): SmolLM2's MLP activations
        # overflow fp16 (perplexity in the millions). Give fp32 inputs an fp32 path: same unpacking
        # (gptqmodel's dequantize_gemm), fp32 scales and matmul.
        linear = torch_awq.AwqTorchLinear
        if not getattr(linear, "_quantlib_fp32", False):
            original_forward = linear.forward

            def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
                if x.dtype != torch.float32 or self.adapter:
                    return original_forward(self, x)
                out = x.reshape(-1, x.shape[-1]) @ awq_dequantize(self).to(x.device)
                if self.bias is not None:
                    out = out + self.bias.float()
                return out.reshape(*x.shape[:-1], self.out_features)

            linear.forward = forward
            linear._quantlib_fp32 = True
