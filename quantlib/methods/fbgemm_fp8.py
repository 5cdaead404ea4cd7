"""FBGEMM FP8 (transformers' `FbgemmFp8Config`): E4M3 weights with an fp32 scale per output row, activations quantized
per token at run time (their scale capped by `activation_scale_ub`), through fbgemm-gpu's CUDA kernels.

Planned here, not run: transformers refuses the method without a GPU, and fbgemm-gpu's `quantize_fp8_per_row` is a
CUDA kernel whose rounding quantlib cannot check on a CPU, so it is refused rather than imitated (on a GPU too:
quantlib has no path through those kernels yet). What its `FbgemmFp8Linear` holds is planned to the byte: `weight` (E4M3, one byte each), `weight_scale` (out x 1, fp32) and the
in-memory `input_scale_ub` (one fp32, a non-persistent buffer). For the same numbers on a CPU, compressed-tensors'
FP8_DYNAMIC computes per-row E4M3 weights and per-token E4M3 activations (without the cap).
"""

from __future__ import annotations

from typing import Any

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.methods.base import register
from quantlib.methods.base.families import PlannedOnlyQuantizer

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 46


class FbgemmFp8QuantConfig(QuantConfig):
    """FP8 E4M3 weights per row with dynamic per-token FP8 activations, keys as transformers' FbgemmFp8Config."""

    quant_method = "fbgemm_fp8"
    description = ("FBGEMM FP8 (transformers' FbgemmFp8Config): E4M3 weights, an fp32 scale per output row, "
                   "activations E4M3 per token; CUDA only (planned here).")
    FIELDS = (
        FieldSpec("activation_scale_ub", float, 1200.0, "Upper bound of an activation row's absolute maximum when its "
                  "FP8 scale is computed.", minimum=0.0, exclusive_minimum=True, title="Activation scale bound"),
        FieldSpec("modules_to_not_convert", list, None, "Module names left unquantized (null: transformers' "
                  "defaults, the output head and tied weights).", nullable=True, title="Skip modules", patterns=True),
    )

    def to_transformers(self) -> Any:
        from transformers import FbgemmFp8Config

        return FbgemmFp8Config.from_dict(self.to_dict())

    @property
    def label(self) -> str:
        return "FBGEMM FP8 per-row"


@register("fbgemm_fp8")
class FbgemmFp8Quantizer(PlannedOnlyQuantizer):
    """Planned from shapes; refused on every device (`PlannedOnlyQuantizer`), with the reason for that device."""

    config_class = FbgemmFp8QuantConfig
    requires = (("fbgemm_gpu", "fbgemm-gpu"),)
    library = "fbgemm_gpu"
    transformers_path = "transformers' FBGEMM FP8 path replaces"
    experts_policy = "transformers' FBGEMM FP8 path quantizes nn.Linear modules (and Llama-4's fused experts)"

    def refusal(self, device: str) -> tuple[str, str]:
        why = ("transformers runs FBGEMM FP8 only on a GPU (fbgemm-gpu's quantize_fp8_per_row and f8f8bf16_rowwise "
               "are CUDA kernels); quantlib does not imitate their rounding on a CPU" if device != "cuda" else
               "quantlib plans FBGEMM FP8 but has no path through fbgemm-gpu's kernels yet, so it is not run here")
        return why, ("Compare compressed-tensors' FP8_DYNAMIC here (per-row E4M3 weights, per-token E4M3 "
                     "activations); the Memory Planner plans FBGEMM FP8 as it is.")

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        return 8.0

    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "FbgemmFp8Config"

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int,
                      dtype: str = "float32") -> dict[str, float]:
        """`weight` one byte per element, `weight_scale` one fp32 per row, `input_scale_ub` one fp32 per layer."""
        return {"codes": float(out_features * in_features), "scales": 4.0 * out_features, "dq_constants": 4.0,
                "code_tables": 0.0}

