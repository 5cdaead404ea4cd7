"""transformers' fine-grained FP8 (`FineGrainedFP8Config`, quant_method "fp8", DeepSeek-V3's format): E4M3 weights in
blocks of `weight_block_size` (128 x 128) with an fp32 (or UE8M0) `weight_scale_inv` per block, activations quantized
to E4M3 per token and per group of the block's width, dynamically.

The weights are quantized by transformers' own code: its `Fp8Quantize` conversion op (`_quantize_one`, what
`from_pretrained` runs on a full-precision checkpoint: scale = 448 / block amax, `clamp(w * scale).to(fp8)`,
`weight_scale_inv = 1 / scale`). The activations as the per-token-group kernels quantize them (the DeepSeek and vLLM
recipe: scale = group amax / 448, `(x / scale).to(fp8)`), computed by compressed-tensors' dynamic group quantization;
transformers' Triton and DeepGEMM kernels load from the kernels hub on CUDA only, so they are not checked here.

transformers quantizes only weights whose two dims are multiples of the block (its `Fp8Quantize` passes the others
through, while the `FP8Linear` it builds expects FP8): such a layer is refused with the block sizes that would fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.errors import FieldError
from quantlib.formats import QuantizedTensor, check_float
from quantlib.methods.base import register
from quantlib.methods.base.families import LinearReplacingQuantizer
from quantlib.shapes import WeightShape

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 44


def _block_rule(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                 and v > 0 for v in value):
        return "must be two positive integers [rows, columns], or null (one scale per tensor)"
    return None


class FineGrainedFP8QuantConfig(QuantConfig):
    """FP8 E4M3 weights per block with dynamic per-token-group FP8 activations, keys as transformers' FineGrainedFP8Config."""

    quant_method = "fp8"
    description = ("Fine-grained FP8 (transformers' FineGrainedFP8Config, DeepSeek-V3's format): E4M3 weights per "
                   "128 x 128 block, activations E4M3 per token and group of 128.")
    FIELDS = (
        FieldSpec("activation_scheme", str, "dynamic", "Activation scales: computed per token group at run time "
                  "(dynamic); static ones come only with a pre-quantized checkpoint.", choices=("dynamic", "static"),
                  title="Activation scheme"),
        FieldSpec("weight_block_size", object, [128, 128], "Weights per scale: [rows, columns] (null: one scale for "
                  "the whole tensor).", validator=_block_rule, json_type=["array", "null"],
                  allowed="two positive integers, or null", title="Weight block"),
        FieldSpec("dequantize", bool, False, "Dequantize to 16 bits at load (transformers' fallback without a GPU).",
                  title="Dequantize at load"),
        FieldSpec("modules_to_not_convert", list, None, "Module names left unquantized (null: transformers' "
                  "defaults, the output head and tied weights).", nullable=True, title="Skip modules", patterns=True),
        FieldSpec("modules_to_convert", list, None, "Extra modules to convert, such as embedding tables (pre-quantized "
                  "checkpoints only).", nullable=True, title="Also convert"),
        FieldSpec("scale_fmt", str, "float", "Storage of weight_scale_inv: fp32 (float) or a power of two in one byte "
                  "(ue8m0, DeepSeek-V4).", choices=("float", "ue8m0"), title="Scale format"),
        FieldSpec("expert_dtype", str, "fp8", "MoE experts' weights: fp8, or fp4 (DeepSeek-V4's packed experts).",
                  choices=("fp8", "fp4"), title="Expert dtype"),
        FieldSpec("activations", bool, True, "Quantize each layer's input to E4M3 per token and group, as the FP8 "
                  "kernels do; off: the weights' share of the loss alone. Not part of the exported config.",
                  title="Activations as the kernels compute"),
    )

    def __init__(self, **values: Any):
        if isinstance(values.get("weight_block_size"), tuple):  # transformers' to_dict() writes a tuple
            values = {**values, "weight_block_size": list(values["weight_block_size"])}
        super().__init__(**values)

    @classmethod
    def check(cls, values: dict[str, Any], failed: set[str]) -> list[FieldError]:
        return []

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out["activations"]:
            del out["activations"]  # quantlib's evaluation setting, written only when it is not the default
        return out

    def weights_only(self) -> QuantConfig | None:
        return self.replace(activations=False) if self.activations else None

    def to_transformers(self) -> Any:
        from transformers import FineGrainedFP8Config

        return FineGrainedFP8Config.from_dict({k: v for k, v in self.to_dict().items() if k != "activations"})

    @property
    def label(self) -> str:
        block = "x".join(map(str, self.weight_block_size)) if self.weight_block_size else "per-tensor"
        return f"FP8 {block}" + (" ue8m0" if self.scale_fmt == "ue8m0" else "") + \
            ("" if self.activations else ", weights only")


@dataclass
class FP8BlockTensor(QuantizedTensor):
    """What transformers stores for an FP8 linear: E4M3 `weight` and `weight_scale_inv` per block (fp32 or UE8M0)."""

    weight: torch.Tensor
    weight_scale_inv: torch.Tensor
    block: tuple[int, int] | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    COMPONENT_OF: ClassVar[dict[str, str]] = {"weight": "codes", "weight_scale_inv": "scales"}

    @property
    def storage_bits(self) -> dict[str, int]:
        return {name: 8 * t.numel() * t.element_size() for name, t in
                (("weight", self.weight), ("weight_scale_inv", self.weight_scale_inv))}

    @property
    def n_codes(self) -> int:
        return 256

    def codes_unpacked(self) -> torch.Tensor:
        return self.weight.reshape(-1).view(torch.uint8).long()

    def dequantize(self) -> torch.Tensor:
        scale = self.weight_scale_inv.float()
        if self.block is None:
            return (self.weight.float() * scale).to(self.dtype)
        rows, cols = self.block
        full = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[: self.shape[0], : self.shape[1]]
        return (self.weight.float() * full).to(self.dtype)


class _ConfigHolder:
    """The `hf_quantizer` transformers' conversion op reads its settings from."""

    def __init__(self, config: QuantConfig):
        self.quantization_config = config.to_transformers()


def quantize_fp8_block(w: torch.Tensor, config: QuantConfig) -> FP8BlockTensor:
    """One (out, in) weight through transformers' own `Fp8Quantize` op."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    check_float(w, "quantize_fp8_block")
    block = tuple(config.weight_block_size) if config.weight_block_size else None
    if block is not None and (w.shape[0] % block[0] or w.shape[1] % block[1]):
        raise ValueError(f"a {tuple(w.shape)} weight is not a whole number of {block} blocks")
    out = Fp8Quantize(_ConfigHolder(config))._quantize_one("layer.weight", w)
    return FP8BlockTensor(out["layer.weight"], out["layer.weight_scale_inv"], block, tuple(w.shape), w.dtype)


def quantize_fp8_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """`x` (..., features) quantized to E4M3 per token and group of `group` features (scale = amax / 448)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    if x.shape[-1] % group:
        raise ValueError(f"{x.shape[-1]} input features are not a whole number of groups of {group}")
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="group", group_size=group, dynamic=True)
    scale, zero = compute_dynamic_scales_and_zp(value=x, args=args, module=None)
    return fake_quantize(x=x, scale=scale, zero_point=zero, args=args)


@register("fp8")
class FineGrainedFP8Quantizer(LinearReplacingQuantizer):
    """transformers' fine-grained FP8: its own weight quantization, activations per token group, simulated."""

    config_class = FineGrainedFP8QuantConfig
    requires = (("compressed_tensors", "compressed-tensors"),)
    library = "transformers"
    transformers_path = "transformers' FP8 path replaces"
    experts_policy = ("transformers' FP8 path quantizes nn.Linear modules and fused experts (FP8Experts), each expert "
                      "per block")

    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "FineGrainedFP8Config"

    @classmethod
    def code_bits(cls, config: QuantConfig) -> float:
        return 8.0

    @classmethod
    def error_bits(cls, config: QuantConfig) -> float:
        return 6.0  # E4M3: three mantissa bits

    @classmethod
    def config_problem(cls, config: QuantConfig) -> str | None:
        if config.activation_scheme == "static":
            return ("activation_scheme static reads its activation_scale from a pre-quantized checkpoint; quantlib "
                    "models the dynamic scheme")
        if config.modules_to_convert:
            return "modules_to_convert (FP8 embeddings of pre-quantized checkpoints) is not modelled"
        return None

    @classmethod
    def unquantized_reason(cls, config: QuantConfig, w: WeightShape) -> str | None:
        if w.kind == "experts":
            return None if config.expert_dtype == "fp8" else "fp4 experts (DeepSeek-V4's packing) are not modelled"
        return super().unquantized_reason(config, w)

    @classmethod
    def shape_problem(cls, config: QuantConfig, name: str, shape: tuple[int, ...]) -> str | None:
        block = config.weight_block_size
        if not block or (shape[-2] % block[0] == 0 and shape[-1] % block[1] == 0):
            return None
        return (f"{name}: a {shape[-2]} x {shape[-1]} weight is not a whole number of {block[0]} x {block[1]} blocks "
                "(transformers' Fp8Quantize leaves it unquantized while FP8Linear expects FP8); pick a "
                "weight_block_size dividing both")

    @classmethod
    def storage_bytes(cls, config: QuantConfig, out_features: int, in_features: int,
                      dtype: str = "float32") -> dict[str, float]:
        """E4M3 codes, one byte each; one scale per block (4 bytes fp32, 1 byte ue8m0), or per tensor."""
        block = config.weight_block_size
        blocks = 1 if not block else -(-out_features // block[0]) * -(-in_features // block[1])
        return {"codes": float(out_features * in_features),
                "scales": float(blocks * (1 if config.scale_fmt == "ue8m0" else 4)),
                "dq_constants": 0.0, "code_tables": 0.0}

    def quantize_tensor(self, weight: torch.Tensor) -> FP8BlockTensor:
        return quantize_fp8_block(weight, self.config)

    def layer_output(self, x: torch.Tensor, packed: FP8BlockTensor) -> torch.Tensor:
        if self.config.activations:
            x = self._quantize_input(x, packed)
        return x @ packed.dequantize().to(x.dtype).t()

    def quantize_model(self, **kwargs: Any) -> Any:
        quantized = super().quantize_model(**kwargs)
        if self.config.activations:
            from quantlib.methods._ct_formats import add_input_hooks

            add_input_hooks(quantized.model, quantized.packed_layers, self._quantize_input)
        return quantized

    def _quantize_input(self, x: torch.Tensor, packed: FP8BlockTensor) -> torch.Tensor:
        """The layer's input as the FP8 kernels quantize it: E4M3 per token and group of the block's width."""
        group = self.config.weight_block_size[1] if self.config.weight_block_size else x.shape[-1]
        return quantize_fp8_activations(x.unsqueeze(0) if x.dim() == 2 else x, group).reshape(x.shape)

    def kernel_paths(self, model: Any) -> list[str]:
        weights = "quantlib's simulation: F.linear on the weights transformers' Fp8Quantize gives, dequantized"
        if not self.config.activations:
            return [weights, "activations in the model's dtype (weights only)"]
        return [weights, "inputs quantized to E4M3 per token and group (scale = amax / 448), as the FP8 kernels do"]

    @classmethod
    def offload_problem(cls, config: QuantConfig, dtype: str) -> str | None:
        if config.activations:
            return ("its activations are quantized in the forward pass, which a checkpoint of dequantized weights does "
                    "not carry; set activations to false to evaluate the weights offloaded")
        return super().offload_problem(config, dtype)
