"""transformers' on-the-fly NVFP4 (`NVFP4Config`, quant_method "nvfp4"): E2M1 weights, an E4M3 scale per 16 and an
fp32 global scale per tensor, packed at load by the kernels hub's `nvfp4` kernel and run by its Blackwell GEMMs.

Planned here, not run. transformers refuses the method without a CUDA GPU of compute capability 10 or more
(Blackwell), and the packing is that kernel's CUDA code (vLLM's `scaled_fp4_quant`), which quantlib cannot run or
check on a CPU. For NVFP4's numbers on a CPU, compressed-tensors' NVFP4 scheme (preset `ct-nvfp4`, the checkpoint
format vLLM serves) computes the same format with compressed-tensors' own functions.

What each converted layer holds, planned to the byte (`NVFP4Quantize`, then `NVFP4Linear`'s buffers):
- `weight`: uint8, two E2M1 codes per byte (out x in/2);
- `weight_sf`: the E4M3 block scales swizzled for the W4A4 GEMM, int32 holding four scales each. Rows are padded
  to tiles of 128, and scale columns to multiples of 4: (round_up(out, 128), round_up(in/16, 4) / 4);
- `weight_sf_rowmajor`: the same scales again, row-major for the W4A16 decode GEMV (out x in/16, one byte each);
- `weight_global_scale`: one fp32.

Which layers: `replace_with_nvfp4_linear` converts an `nn.Linear` only if it has no bias and both its widths are
multiples of 16. transformers leaves any other layer in its dtype without a word; the planner says why.
transformers' default skips (the output head, tied weights) apply unless `modules_to_not_convert` replaces them.
"""

from __future__ import annotations

from typing import Any

import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.methods.base import register
from quantlib.methods.base.families import PlannedOnlyQuantizer
from quantlib.shapes import ModelShapes, WeightShape

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 47

#: Elements per E4M3 block scale, and the swizzled layout's tiles (rows, scale columns packed per int32).
SF_VEC, SF_ROW_TILE, SF_COL_TILE = 16, 128, 4


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class NVFP4QuantConfig(QuantConfig):
    """NVFP4 weights quantized at load for Blackwell GPUs, keys as transformers' NVFP4Config."""

    quant_method = "nvfp4"
    description = ("NVFP4 (transformers' NVFP4Config): E2M1 weights, an E4M3 scale per 16 and an fp32 global scale, "
                   "packed at load for Blackwell GPUs (planned here; compressed-tensors' NVFP4 runs on a CPU).")
    FIELDS = (
        FieldSpec("modules_to_not_convert", list, None, "Module names left unquantized (null: transformers' "
                  "defaults, the output head and tied weights).", nullable=True, title="Skip modules", patterns=True),
    )

    def to_transformers(self) -> Any:
        from transformers import NVFP4Config

        return NVFP4Config.from_dict(self.to_dict())

    @property
    def label(self) -> str:
        return "NVFP4 (transformers, Blackwell)"


@register("nvfp4")
class NVFP4Quantizer(PlannedOnlyQuantizer):
    """Planned from shapes; refused wherever the hub's NVFP4 kernel and a Blackwell GPU are not there to run it."""

    config_class = NVFP4QuantConfig
    requires = (("kernels", "kernels"),)
    library = "kernels (the hub's nvfp4 kernel)"
    transformers_path = "transformers' NVFP4 path replaces"
    experts_policy = "transformers' NVFP4 path converts bias-free nn.Linear modules only; fused experts stay as stored"

    def refusal(self, device: str) -> tuple[str, str]:
        major = torch.cuda.get_device_capability()[0] if device == "cuda" else 0
        where = "this CPU" if device != "cuda" else f"this GPU (compute capability {major}.x)"
        why = (f"transformers runs NVFP4 only on a Blackwell GPU (compute capability 10 or more), through the kernels "
               f"hub's nvfp4 kernel, not on {where}; quantlib does not imitate its CUDA packing" if major < 10 else
               "quantlib plans transformers' NVFP4 but has no path through the hub's nvfp4 kernel yet, so it is not "
               "run here")
        return why, ("Compare compressed-tensors' NVFP4 here (preset ct-nvfp4: the same format, computed by "
                     "compressed-tensors); the Memory Planner plans this config as it is.")

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        return 4.0

    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "NVFP4Config"

    @classmethod
    def classify(cls, config: QuantConfig, shapes: ModelShapes) -> dict[str, str | None]:
        out = super().classify(config, shapes)
        biased = {w.module for w in shapes.weights if w.name.endswith(".bias")}
        for w in shapes.weights:
            if out[w.name] is None and w.module in biased:
                out[w.name] = ("has a bias: transformers' NVFP4 converts bias-free nn.Linear layers only (it leaves "
                               "this one as is)")
        return out

    @classmethod
    def unquantized_reason(cls, config: QuantConfig, w: WeightShape) -> str | None:
        reason = super().unquantized_reason(config, w)
        if reason is not None or not w.is_matmul:
            return reason
        if w.in_features % SF_VEC or w.out_features % 16:
            return (f"{w.out_features} x {w.in_features} is not a multiple of 16 in both widths, which transformers' "
                    "NVFP4 needs (it leaves this layer as is)")
        return None

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int,
                      dtype: str = "float32") -> dict[str, float]:
        """Packed E2M1 codes; the block scales twice (swizzled int32 tiles for the GEMM, row-major bytes for the
        GEMV); the fp32 global scale."""
        scales = in_features // SF_VEC
        swizzled = _round_up(out_features, SF_ROW_TILE) * _round_up(scales, SF_COL_TILE)  # 4 bytes per 4 scales
        return {"codes": out_features * in_features / 2, "scales": float(swizzled + out_features * scales),
                "dq_constants": 4.0, "code_tables": 0.0}
