"""llama.cpp GGUF block types: the config, the quantizer and the raw-block tensor format, quantized with
the `gguf` package's numpy reference quantizers (simulated: the numbers show what the format loses,
not how fast llama.cpp runs it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from quantlib.configs import FieldSpec, QuantConfig
from quantlib.formats import QuantizedTensor, check_float
from quantlib.methods.base import Quantizer, register

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 20


#: Block types the `gguf` package can quantize in numpy (others it can only read).
GGUF_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "MXFP4", "BF16", "F16")


class GGUFQuantConfig(QuantConfig):
    """llama.cpp GGUF block quantization, done with the `gguf` package's reference quantizers.

    Simulated: weights are replaced by their quantize→dequantize result, so the numbers show what
    the format loses, not how fast llama.cpp runs it.
    """

    quant_method = "gguf"
    description = "llama.cpp GGUF block types (Q8_0, Q4_0, Q4_1, …) via the gguf package."
    FIELDS = (
        FieldSpec("quant_type", str, "Q8_0", "GGUF block type.", choices=GGUF_TYPES, title="Block type"),
        FieldSpec("modules_to_not_convert", list, None,
                  "Module names left unquantized (default: the output head, as transformers does).",
                  nullable=True, title="Skip modules"),
    )

    @property
    def label(self) -> str:
        return f"GGUF {self.quant_type}"




#: Bits of the integer code per weight in each GGUF type (the rest of a block is scales/mins).
GGUF_CODE_BITS = {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_0": 4, "Q4_1": 4, "MXFP4": 4, "BF16": 16, "F16": 16,
                  "F32": 32, "TQ2_0": 2,
                  # TQ1_0 packs 5 trits per byte in 48 bytes and 4 per byte in 4 more: 52 bytes per 256 weights.
                  "TQ1_0": 52 * 8 / 256}


def gguf_block_geometry(quant_type: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGUF type, from the gguf package's own table."""
    import gguf

    return tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant_type]])  # type: ignore[return-value]



@dataclass
class GGUFTensor(QuantizedTensor):
    """A GGML block-quantized tensor: the raw bytes exactly as a .gguf file stores them."""

    data: np.ndarray
    qtype: "object"  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def storage_bits(self) -> dict[str, int]:
        return {"blocks": 8 * int(self.data.nbytes)}

    def storage_by_component(self) -> dict[str, float]:
        """The packed bytes split into codes (code bits x weights: Q5's fifth bits included) and the
        per-block scales/mins that make up the rest of each block."""
        total = float(self.data.nbytes)
        codes = self.numel * GGUF_CODE_BITS[self.qtype.name] / 8
        return {"codes": codes, "scales": total - codes}

    @property
    def n_codes(self) -> int:
        return _GGUF_CODE_LAYOUT[self.qtype.name][0] if self.qtype.name in _GGUF_CODE_LAYOUT else 0

    def codes_unpacked(self) -> torch.Tensor:
        """Per-element quant indices for the simple block types (Q8_0, Q4_0, Q4_1, MXFP4).

        Q8_0 codes are offset by 128 (int8). The order within a block is element order.
        """
        name = self.qtype.name
        if name not in _GGUF_CODE_LAYOUT:
            raise NotImplementedError(f"codes_unpacked is not implemented for GGUF type {name}")
        _, header_bytes, kind = _GGUF_CODE_LAYOUT[name]
        from gguf import GGML_QUANT_SIZES

        _, block_bytes = GGML_QUANT_SIZES[self.qtype]
        blocks = self.data.reshape(-1, block_bytes)[:, header_bytes:]
        if kind == "int8":
            return torch.from_numpy(blocks.view(np.int8).astype(np.int64) + 128).reshape(-1)
        low = blocks & 0x0F
        high = blocks >> 4
        # ggml nibble layout: low nibbles are elements 0..15, high nibbles 16..31 of the block.
        return torch.from_numpy(np.concatenate([low, high], axis=1).astype(np.int64)).reshape(-1)

    def dequantize(self) -> torch.Tensor:
        from gguf import quants

        values = quants.dequantize(self.data, self.qtype)
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(self.shape).to(self.dtype)


# name -> (n_codes, header bytes per block before the codes, code kind)
_GGUF_CODE_LAYOUT: dict[str, tuple[int, int, str]] = {
    "Q8_0": (256, 2, "int8"),
    "Q4_0": (16, 2, "nibble"),
    "Q4_1": (16, 4, "nibble"),
    "MXFP4": (16, 1, "nibble"),
}


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------





def _probe_gguf_types() -> tuple[str, ...]:
    """Names of the GGML types the installed ``gguf`` package can quantize in numpy.

    Found by trying each on a small tensor: the package raises NotImplementedError for the rest
    (the k-quants and i-quants need llama.cpp's C code).
    """
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
    except ImportError:
        return ()
    sample = np.linspace(-1.0, 1.0, 2 * 256, dtype=np.float32).reshape(2, 256)
    names = []
    for qtype in GGMLQuantizationType:
        if qtype not in GGML_QUANT_SIZES:
            continue
        try:
            quants.dequantize(quants.quantize(sample, qtype), qtype)
        except (NotImplementedError, ValueError, TypeError, AssertionError):
            continue
        names.append(qtype.name)
    return tuple(names)


GGUF_QUANTIZABLE_TYPES: tuple[str, ...] = _probe_gguf_types()
"""GGML type names ``quantize_gguf`` accepts (with gguf 0.19: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, BF16, TQ1_0, TQ2_0, MXFP4)."""


def quantize_gguf(w: torch.Tensor, qtype: Union[str, "object"] = "Q8_0") -> GGUFTensor:
    """Quantize with the ``gguf`` package's numpy implementation of a GGML block type.

    Blocks run along the last dim (as llama.cpp stores rows), so it must be a multiple of the
    type's block size. Storage is the real byte count: block bytes * 8 / block elements per
    parameter (e.g. Q8_0: 34 * 8 / 32 = 8.5; Q4_0: 4.5).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    check_float(w, "quantize_gguf")
    name = qtype if isinstance(qtype, str) else qtype.name
    if name not in GGUF_QUANTIZABLE_TYPES:
        raise ValueError(f"GGUF type {name!r} cannot be quantized here; choose one of {GGUF_QUANTIZABLE_TYPES}")
    gtype = GGMLQuantizationType[name]
    block_elems, _ = GGML_QUANT_SIZES[gtype]
    last = w.shape[-1] if w.dim() else 1
    if last % block_elems:
        raise ValueError(
            f"GGUF {name} needs the last dimension to be a multiple of its block size {block_elems}; "
            f"got last dimension {last} (shape {tuple(w.shape)})"
        )
    array = w.detach().float().reshape(-1, last).numpy()
    data = quants.quantize(array, gtype)
    return GGUFTensor(data=data, qtype=gtype, shape=tuple(w.shape), dtype=w.dtype)


@register("gguf")
class GGUFQuantizer(Quantizer):
    """GGUF block types through the `gguf` package's numpy quantizers, simulated."""

    config_class = GGUFQuantConfig
    requires = (("gguf", "gguf"),)
    library = "gguf"

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        return quantize_gguf(weight, qtype=self.config.quant_type)

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

