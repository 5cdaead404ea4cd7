"""The numbers of compressed-tensors' schemes (the checkpoints vLLM serves): FP8 per channel, per tensor and in
128 x 128 blocks, NVFP4, MXFP4, MXFP8 and integer W4A16 / W8A16 / W8A8, computed by compressed-tensors itself.

Each weight goes the way llm-compressor takes it, with compressed-tensors' own functions:
- the observer: the min and max of every quantization unit (tensor, row, group of `group_size`, or 128 x 128 block
  padded with zeros as `maybe_pad_tensor_for_block_quant` pads it), in the weight's dtype (llm-compressor's
  memoryless min-max observer);
- NVFP4's fp32 global scale: `generate_gparam(min, max)` of the whole tensor, then the minimum over the matrices vLLM
  fuses (q/k/v and gate/up; llm-compressor's `update_fused_layer_weight_global_scales`), which the quantizer computes
  from the model;
- the scales and zero points: `calculate_qparams` (MX: the E8M0 exponent, rounded as compressed-tensors rounds it);
- what the checkpoint stores: the scheme's compressor (`float-quantized`, `pack-quantized`, `nvfp4-pack-quantized`,
  `mxfp4-pack-quantized`, `mxfp8-quantized`), and the way back its `decompress`.

Activations are quantized as compressed-tensors' forward pass quantizes them (`forward_quantize`): dynamic scales per
token or per group from `compute_dynamic_scales_and_zp`, or static ones measured on calibration text (FP8's
per-tensor `input_scale`, NVFP4's `input_global_scale`), then `fake_quantize`. The CUDA kernels vLLM runs (cutlass
FP8, the NVFP4 / MXFP4 GEMMs) compute the dynamic scales themselves: by the same formula for FP8 and NVFP4 (rounding a
reciprocal where compressed-tensors divides, which can move an element at a rounding tie), with their own E8M0 rounding
for the MX types (not checked here: no GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

import torch

from quantlib.formats import QuantizedTensor, check_float

#: Scheme name (compressed-tensors' preset) -> what it is, in a few words.
SCHEMES: dict[str, str] = {
    "FP8_DYNAMIC": "FP8 E4M3 weights per output channel, activations FP8 per token (dynamic)",
    "FP8_BLOCK": "FP8 E4M3 weights in 128 x 128 blocks, activations FP8 per group of 128 (dynamic)",
    "FP8": "FP8 E4M3 weights per tensor, activations FP8 per tensor (static, calibrated)",
    "NVFP4": "NVFP4: E2M1 weights and activations, an E4M3 scale per 16 and an fp32 global scale",
    "NVFP4A16": "NVFP4 weights (E2M1, E4M3 scale per 16, fp32 global scale), 16-bit activations",
    "MXFP4": "MXFP4: E2M1 weights and activations, an E8M0 scale per 32",
    "MXFP4A16": "MXFP4 weights (E2M1, E8M0 scale per 32), 16-bit activations",
    "MXFP8": "MXFP8: E4M3 weights and activations, an E8M0 scale per 32",
    "MXFP8A16": "MXFP8 weights (E4M3, E8M0 scale per 32), 16-bit activations",
    "W4A16": "int4 weights, symmetric, per group (128), 16-bit activations",
    "W8A16": "int8 weights, symmetric, per group (128), 16-bit activations",
    "W8A8": "int8 weights per output channel, activations int8 per token (dynamic)",
}
#: Schemes whose group size the config may change (compressed-tensors' integer group schemes).
GROUP_SCHEMES = ("W4A16", "W8A16")
#: vLLM's fused matrices, which share NVFP4's weight global scale (llm-compressor makes them share it).
FUSED_SUFFIXES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@lru_cache(maxsize=64)
def scheme_of(name: str, group_size: int | None = None) -> Any:
    """compressed-tensors' `QuantizationScheme` of preset `name` (targets Linear), with its `format` filled in as
    llm-compressor infers it, and `group_size` replacing the preset's for the integer group schemes."""
    import torch.nn as nn
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(name, ["Linear"])
    if group_size is not None:
        if name not in GROUP_SCHEMES:
            raise ValueError(f"{name}: the group size is part of the format; only {', '.join(GROUP_SCHEMES)} take one")
        scheme.weights = scheme.weights.model_copy(update={"group_size": int(group_size)})
    scheme.format = infer_module_format(nn.Linear, scheme).value
    return scheme


def weight_group(name: str, group_size: int | None = None) -> int | None:
    """Input features per weight scale (None: per channel, per tensor or per block)."""
    args = scheme_of(name, group_size).weights
    return args.group_size if args.strategy in ("group", "tensor_group") else None


def static_input(name: str) -> str | None:
    """The static input parameter a checkpoint of scheme `name` stores ("input_scale", "input_global_scale"), if any."""
    args = scheme_of(name).input_activations
    if args is None:
        return None
    if args.strategy == "tensor_group":
        return "input_global_scale"
    return None if args.dynamic else "input_scale"


def observe(w: torch.Tensor, args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-compressor's min-max observer of weight `w` (out, in): min and max of every quantization unit."""
    strategy = str(args.strategy.value if hasattr(args.strategy, "value") else args.strategy)
    if strategy == "tensor":
        return w.amin(), w.amax()
    if strategy == "channel":
        return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    if strategy in ("group", "tensor_group"):
        units = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
        return units.amin(-1), units.amax(-1)
    if strategy == "block":
        from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

        rows, cols = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(w, args.block_structure)
        blocks = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
        return blocks.amin((1, 3)), blocks.amax((1, 3))
    raise ValueError(f"weight strategy {strategy!r} is not modelled")


def global_scale_of(w: torch.Tensor) -> torch.Tensor:
    """NVFP4's fp32 weight global scale of `w` alone: compressed-tensors' `generate_gparam(min, max)`."""
    from compressed_tensors.quantization.utils import generate_gparam

    return generate_gparam(w.amin(), w.amax())


@dataclass
class CTTensor(QuantizedTensor):
    """One weight as a compressed-tensors checkpoint stores it: the compressor's state dict (`weight` or
    `weight_packed`, `weight_scale`, and per scheme `weight_global_scale`, `weight_shape`, `weight_zero_point`), plus
    the static input parameter the scheme stores (measured on calibration text; None until measured)."""

    stored: dict[str, torch.Tensor]
    scheme_name: str
    group_size: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    input_param: torch.Tensor | None = None
    _dequantized: torch.Tensor | None = field(default=None, repr=False)
    COMPONENT_OF: ClassVar[dict[str, str]] = {
        "weight": "codes", "weight_packed": "codes", "weight_scale": "scales", "weight_zero_point": "scales",
        "weight_global_scale": "dq_constants", "weight_shape": "dq_constants", "input_scale": "dq_constants",
        "input_global_scale": "dq_constants"}

    @property
    def scheme(self) -> Any:
        return scheme_of(self.scheme_name, self.group_size if self.scheme_name in GROUP_SCHEMES else None)

    @property
    def storage_bits(self) -> dict[str, int]:
        bits = {key: 8 * t.numel() * t.element_size() for key, t in self.stored.items()}
        name = static_input(self.scheme_name)
        if name is not None:  # one per matrix, whether or not measured yet: fp32 global scale, input_scale in the dtype
            bits[name] = 32 if name == "input_global_scale" else 8 * torch.tensor([], dtype=self.dtype).element_size()
        return bits

    @property
    def n_codes(self) -> int:
        return 2 ** self.scheme.weights.num_bits

    def codes_unpacked(self) -> torch.Tensor:
        """The element codes: FP8 bytes, FP4 nibbles, or the integer plus 2^(bits-1)."""
        if "weight" in self.stored:
            weight = self.stored["weight"].reshape(-1)
            return weight.long() + 128 if weight.dtype == torch.int8 else weight.view(torch.uint8).long()
        packed = self.stored["weight_packed"]
        if packed.dtype == torch.uint8:  # two E2M1 codes per byte, low nibble first
            return torch.stack([packed & 0xF, packed >> 4], -1).reshape(-1).long()
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        bits = self.scheme.weights.num_bits
        return unpack_from_int32(packed, bits, torch.Size(self.shape)).reshape(-1).long() + 2 ** (bits - 1)

    def dequantize(self) -> torch.Tensor:
        """compressed-tensors' `decompress` of the stored tensors, in the original dtype."""
        if self._dequantized is None:
            from compressed_tensors.compressors import BaseCompressor

            compressor = BaseCompressor.get_value_from_registry(self.scheme.format)
            self._dequantized = compressor.decompress(dict(self.stored), self.scheme)["weight"].to(self.dtype)
        return self._dequantized


@torch.no_grad()
def quantize_ct(w: torch.Tensor, scheme_name: str, group_size: int | None = None,
                global_scale: torch.Tensor | None = None, input_param: torch.Tensor | None = None) -> CTTensor:
    """Quantize one (out, in) weight with compressed-tensors' scheme `scheme_name` as llm-compressor does, and keep
    what its compressor stores. `global_scale`: NVFP4's (fused) weight global scale, default the tensor's own."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    check_float(w, "quantize_ct")
    if w.dim() != 2:
        raise ValueError(f"quantize_ct takes a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    scheme = scheme_of(scheme_name, group_size if scheme_name in GROUP_SCHEMES else None)
    args = scheme.weights
    group = weight_group(scheme_name, group_size if scheme_name in GROUP_SCHEMES else None)
    if group is not None and w.shape[-1] % group:
        raise ValueError(f"{scheme_name}: {w.shape[-1]} input features do not divide into groups of {group}")
    state: dict[str, torch.Tensor] = {"weight": w}
    if args.strategy == "tensor_group":
        gs = global_scale_of(w) if global_scale is None else global_scale.reshape(1).float()
        state["weight_global_scale"] = gs
    low, high = observe(w, args)
    scale, zero = calculate_qparams(low, high, args, global_scale=state.get("weight_global_scale"))
    state["weight_scale"] = scale
    state["weight_zero_point"] = zero
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    stored = {k: v for k, v in compressor.compress(state, scheme).items() if k not in ("input_scale",
                                                                                        "input_global_scale")}
    return CTTensor(stored, scheme_name, group, tuple(w.shape), w.dtype, input_param)


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_input(x: torch.Tensor, scheme_name: str, input_param: torch.Tensor | None = None) -> torch.Tensor:
    """`x` as compressed-tensors' `forward_quantize(module, x, "input", args)` hands it to the matmul: dynamic
    scales from `compute_dynamic_scales_and_zp` (NVFP4 with its static `input_global_scale`), or the static
    `input_scale`, then `fake_quantize`. Schemes without input quantization return `x`."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = scheme_of(scheme_name).input_activations
    if args is None:
        return x
    kind = static_input(scheme_name)
    if kind is not None and input_param is None:
        raise ValueError(f"{scheme_name}: its {kind} is measured on calibration text; none was measured")
    if x.numel() == 0:
        return x
    if x.dim() == 2:  # (tokens, features): compressed-tensors reads a token as dims 0 and 1 of (batch, seq, features)
        return quantize_input(x.unsqueeze(0), scheme_name, input_param).squeeze(0)
    global_scale = input_param if kind == "input_global_scale" else None
    if args.dynamic in (True, "local") or str(args.dynamic) == "DynamicType.LOCAL":
        scale, zero = compute_dynamic_scales_and_zp(value=x, args=args, module=None, global_scale=global_scale)
    else:
        scale, zero = input_param.to(x.dtype).reshape(1), torch.zeros(1, dtype=x.dtype, device=x.device)
    return fake_quantize(x=x, scale=scale, zero_point=zero, args=args, global_scale=global_scale)


def add_input_hooks(model: torch.nn.Module, packed_layers: dict[str, Any],
                    quantize: Any) -> list:
    """A forward pre-hook on every module in `packed_layers` (name -> its packed weight) that hands the module
    `quantize(input, packed)` instead of its input; returns the handles."""
    modules = dict(model.named_modules())
    return [modules[name].register_forward_pre_hook(
                lambda _m, args, packed=packed: (quantize(args[0], packed), *args[1:]))
            for name, packed in packed_layers.items() if name in modules]


def input_params_from_range(scheme_name: str, low: torch.Tensor, high: torch.Tensor,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The static input parameter of scheme `scheme_name` from the min and max of a layer's calibration inputs
    (llm-compressor's static min-max observer): FP8's `input_scale` (`calculate_qparams`), NVFP4's
    `input_global_scale` (`generate_gparam`), observed in the model's `dtype`."""
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    kind = static_input(scheme_name)
    low, high = low.to(dtype), high.to(dtype)
    if kind == "input_global_scale":
        return generate_gparam(low, high)
    if kind == "input_scale":
        scale, _ = calculate_qparams(low.reshape(1), high.reshape(1), scheme_of(scheme_name).input_activations)
        return scale.reshape(1)
    return None


@torch.no_grad()
def input_ranges(model: torch.nn.Module, tokenizer: Any, layer_names: list[str], n_tokens: int,
                 chunk: int = 512, progress: Any = None, cancel: Any = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Min and max of every input each layer in `layer_names` sees over `n_tokens` of the built-in calibration text
    (chunks of `chunk` tokens), for the static observers."""
    from quantlib.methods._calibration import observe_inputs

    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str, x: torch.Tensor) -> None:
        low, high = x.amin().float().cpu(), x.amax().float().cpu()
        if name in ranges:
            low, high = torch.minimum(ranges[name][0], low), torch.maximum(ranges[name][1], high)
        ranges[name] = (low, high)

    observe_inputs(model, tokenizer, layer_names, n_tokens, record, what="input scales", chunk=chunk,
                   progress=progress, cancel=cancel)
    return ranges


def planned_bytes(scheme_name: str, group_size: int | None, out_features: int, in_features: int,
                  dtype_bytes: int) -> dict[str, float]:
    """What compressed-tensors' compressor stores for one (out, in) weight, by memory component, from the shape."""
    scheme = scheme_of(scheme_name, group_size if scheme_name in GROUP_SCHEMES else None)
    args = scheme.weights
    n = out_features * in_features
    fmt = scheme.format
    if fmt == "pack-quantized":  # int codes packed 32 // bits per int32 along the input, plus weight_shape (2 int64)
        per_int = 32 // args.num_bits
        codes = 4.0 * out_features * math.ceil(in_features / per_int)
        constants = 16.0
    elif args.num_bits == 4:  # two E2M1 codes per byte
        codes, constants = out_features * math.ceil(in_features / 2), 0.0
    else:
        codes, constants = float(n), 0.0
    strategy = str(args.strategy.value if hasattr(args.strategy, "value") else args.strategy)
    if strategy == "tensor":
        units = 1
    elif strategy == "channel":
        units = out_features
    elif strategy == "block":
        rows, cols = args.block_structure
        units = math.ceil(out_features / rows) * math.ceil(in_features / cols)
    else:
        units = out_features * (in_features // args.group_size)
    scale_bytes = 1 if args.scale_dtype is not None else dtype_bytes  # E4M3 / E8M0, else the weight's dtype
    if strategy == "tensor_group":
        constants += 4.0  # the fp32 weight global scale
    if static_input(scheme_name) is not None:
        constants += 4.0 if static_input(scheme_name) == "input_global_scale" else dtype_bytes
    return {"codes": float(codes), "scales": float(units * scale_bytes), "dq_constants": constants,
            "code_tables": 0.0}
