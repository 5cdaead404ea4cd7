"""bitsandbytes: the config, the 4-bit (NF4/FP4, double quant) and 8-bit (LLM.int8()) quantizers, and
their tensor formats with a pure-torch reference that reproduces bitsandbytes' CPU backend bit for bit.

Why a torch reference next to bitsandbytes: the app shows *what* a format does to a weight (codes,
scales, error, honest storage) and must work where a library kernel is missing or buggy. The
reference reproduces bitsandbytes' CPU backend bit for bit (same packed codes, same absmax, same
double-quantization state; the tests check it), so either backend can be shown and compared.

bitsandbytes' CUDA kernels round by other rules (csrc/kernels.cu; tests/test_cuda.py states each rule and
checks it on a GPU): NF4's decision tree has exactly our midpoints, so NF4 codes agree; FP4's thresholds are
decimal literals up to 14 ulp from the midpoints (a value between the two rounds the other way), and zero
takes the other sign bit;
double quantization's 8-bit codes come from a binary search and a mean summed in another order, so a block's
absmax code can be the neighbouring one. On the default model's weights (fp32) the CUDA kernels change 1 NF4
value in 106 million and 0.011% of FP4 values (0.03% from fp16, 0.07% from bf16 weights: their ratios hit the
thresholds exactly); with double quantization about 0.1% of absmax codes move one step and the offset differs
in its last bits, so most values move by a few ulp. The weights' squared error stays within 2e-6 (relative) of
the reference's. Numbers a model gives on CUDA come from the CUDA kernels themselves (benchmarks/RESULTS.md,
"On a GPU").

bitsandbytes 0.50.2's CPU backend gets two shapes wrong, on CPUs with AVX-512: its fused AVX512-BF16 kernel asserts
on layers whose out_features is not a multiple of 32 (or in_features of the blocksize), and its AVX-512 dequantize_4bit
reads the wrong absmax where in_features is not a multiple of the blocksize. `work_around_cpu_kernel_bugs` (one place,
tested) routes the first to bitsandbytes' other path and computes the second as bitsandbytes' scalar branch does; the
run's kernel paths say so.

Constant code tables shared by every tensor of a format (the 16 NF4/FP4 levels, the 256-entry
dynamic map) are not counted as a tensor's storage. (bitsandbytes' serialised state does repeat the
1 KiB dynamic map per tensor as `nested_quant_map`; we treat that as a serialisation overhead, not
as information.) The fp32 double-quantization offset is counted (32 bits per tensor).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, ClassVar, Iterator, Literal, Optional

import torch

from quantlib.codebooks import FP4_LEVELS, NF4_LEVELS, dynamic_map
from quantlib.configs import FieldSpec, QuantConfig, _copy, fmt_num
from quantlib.errors import Cancelled, FieldError
from quantlib.formats import QuantizedTensor, block_absmax, check_float
from quantlib.methods.base import (LayerWeight, MixChoice, MixSpace, QuantizedModel, Quantizer, default_skip_rules,
                                   natural_key, register, transformers_skip_rules)
from quantlib.shapes import ModelShapes, WeightShape

#: Place in the registry (the builder's method list, the CLI).
DISPLAY_ORDER = 0

QuantType4bit = Literal["nf4", "fp4"]
Backend = Literal["torch", "bitsandbytes"]


# bitsandbytes 0.50 accepts these for quantize_4bit/dequantize_4bit (32 was added in 0.46).
BLOCKSIZES_4BIT: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Blockwise 8-bit: the sizes bitsandbytes documents for quantize_blockwise.
BLOCKSIZES_8BIT: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
# Double quantization always re-quantizes the absmax vector in blocks of 256 (bitsandbytes).
DQ_BLOCKSIZE = 256
# bitsandbytes guards 1/absmax with this floor (a zero block would divide by zero).
_ABSMAX_FLOOR = 1e-38
_LUT_SIZE = 65536


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




# --------------------------------------------------------------------------------------------
# Tensor formats
# --------------------------------------------------------------------------------------------

@dataclass
class DoubleQuantState:
    """bitsandbytes' double quantization of a 4-bit tensor's per-block absmax.

    ``absmax - offset`` (offset = mean absmax, fp32) is quantized blockwise to 8 bits with the
    dynamic map in blocks of 256: ``codes`` (uint8, one per 4-bit block) and ``absmax`` (fp32, one
    per 256 4-bit blocks). Why subtract the mean: absmaxes are all positive and similar, so
    centring them uses the signed dynamic map's resolution around zero.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor
    blocksize: int = DQ_BLOCKSIZE

    def dequantize(self) -> torch.Tensor:
        """The fp32 per-block absmax the 4-bit dequantization uses (bitsandbytes' order of ops)."""
        absmax = _dequantize_blockwise_flat(self.codes, self.absmax, dynamic_map(), self.blocksize)
        absmax += self.offset
        return absmax


@dataclass
class Blockwise4bitTensor(QuantizedTensor):
    """NF4/FP4 blockwise 4-bit tensor in bitsandbytes' layout.

    ``packed``: uint8, shape ``((n + 1) // 2, 1)``, two codes per byte, the *first* element in
    the high nibble. ``absmax``: fp32 per block of ``blocksize`` consecutive elements of the
    flattened tensor (the last block may be partial), or ``None`` when double-quantized
    (then ``dq`` holds it). ``backend`` records who produced it and is the default way back.
    """

    packed: torch.Tensor
    absmax: Optional[torch.Tensor]
    dq: Optional[DoubleQuantState]
    quant_type: QuantType4bit
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    backend: Backend = "torch"
    COMPONENT_OF: ClassVar[dict[str, str]] = {"codes": "codes", "absmax": "scales", "dq_absmax": "dq_constants",
                                              "dq_offset": "dq_constants"}

    @property
    def storage_bits(self) -> dict[str, int]:
        bits = {"codes": 8 * self.packed.numel()}
        if self.dq is None:
            bits["absmax"] = 32 * self.absmax.numel()
        else:
            bits["absmax"] = 8 * self.dq.codes.numel()
            bits["dq_absmax"] = 32 * self.dq.absmax.numel()
            bits["dq_offset"] = 32 * self.dq.offset.numel()
        return bits

    @property
    def n_codes(self) -> int:
        return 16

    @property
    def levels(self) -> torch.Tensor:
        """The 16-entry code table of this tensor's format."""
        return _levels(self.quant_type)

    def block_absmax(self) -> torch.Tensor:
        """The fp32 per-block absmax actually used to dequantize (after undoing double quant)."""
        return self.absmax if self.dq is None else self.dq.dequantize()

    def codes_unpacked(self) -> torch.Tensor:
        return _unpack_nibbles(self.packed.reshape(-1), self.numel).long()

    def dequantize(self) -> torch.Tensor:
        return dequantize_4bit(self)


@dataclass
class Blockwise8bitTensor(QuantizedTensor):
    """Blockwise 8-bit tensor with the dynamic map (bitsandbytes ``quantize_blockwise``)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    COMPONENT_OF: ClassVar[dict[str, str]] = {"codes": "codes", "absmax": "scales"}

    @property
    def storage_bits(self) -> dict[str, int]:
        return {"codes": 8 * self.codes.numel(), "absmax": 32 * self.absmax.numel()}

    @property
    def n_codes(self) -> int:
        return 256

    def codes_unpacked(self) -> torch.Tensor:
        return self.codes.reshape(-1).long()

    def dequantize(self) -> torch.Tensor:
        return dequantize_blockwise_8bit(self)


@dataclass
class RowwiseInt8Tensor(QuantizedTensor):
    """LLM.int8() weight format: int8 codes with one fp32 absmax per row (bitsandbytes ``SCB``).

    Rows are all leading dimensions flattened; a row's scale is ``absmax / 127``.
    """

    codes: torch.Tensor
    row_absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    COMPONENT_OF: ClassVar[dict[str, str]] = {"codes": "codes", "row_absmax": "scales"}

    @property
    def storage_bits(self) -> dict[str, int]:
        return {"codes": 8 * self.codes.numel(), "row_absmax": 32 * self.row_absmax.numel()}

    @property
    def n_codes(self) -> int:
        return 256

    def codes_unpacked(self) -> torch.Tensor:
        """Offset binary: int8 code ``q`` becomes index ``q + 128``."""
        return self.codes.reshape(-1).long() + 128

    def dequantize(self) -> torch.Tensor:
        scale = (self.row_absmax / 127.0).unsqueeze(-1)
        return (self.codes.float() * scale).reshape(self.shape).to(self.dtype)




def _levels(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return NF4_LEVELS
    if quant_type == "fp4":
        return FP4_LEVELS
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


@lru_cache(maxsize=None)
def _bucket_table(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between value-sorted levels and the sorted-position -> code-index map.

    Nearest-level rounding is then one ``bucketize`` (binary search over 15 midpoints) instead of
    an argmin over 16 distances. A value exactly on a midpoint goes to the *lower* level
    (``bucketize`` with ``right=False``), as in bitsandbytes. The sort is stable so FP4's +0
    (code 0) sorts before its -0 (code 8): values in (0, 0.0026] then get code 8, a quirk
    bitsandbytes has too (harmless: both mean 0).
    """
    levels = _levels(quant_type)
    order = torch.sort(levels, stable=True).indices
    sorted_levels = levels[order]
    midpoints = (sorted_levels[:-1] + sorted_levels[1:]) / 2
    return midpoints, order.to(torch.uint8)


@lru_cache(maxsize=None)
def _pair_table(quant_type: str) -> torch.Tensor:
    """(256, 2) fp32: the two levels a packed byte stands for (high nibble first).

    Dequantizing with one gather per *byte* halves the number of gathers.
    """
    levels = _levels(quant_type)
    byte = torch.arange(256)
    return torch.stack([levels[byte >> 4], levels[byte & 0x0F]], dim=1).contiguous()


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 bytes -> uint8 codes, high nibble first, trimmed to ``n`` (drops the pad nibble)."""
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return codes[:n]


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (even length) -> bytes ``(first << 4) | second``, shape (n/2, 1) like bnb."""
    pairs = codes.view(-1, 2)
    packed = pairs[:, 0] << 4
    packed |= pairs[:, 1]
    return packed.unsqueeze(1)


def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each block to [-1, 1] exactly as bitsandbytes' reference quantizer does.

    Full blocks: ``x * (1 / max(absmax, 1e-38))`` (a reciprocal, then a multiply); the partial
    last block: ``x / max(absmax, 1e-38)`` (a true division), and its stored absmax is the
    *floored* one (1e-38 for an all-zero tail) while full blocks store the raw absmax. Matching
    these details is what makes the codes bit-identical. No clamp to [-1, 1] is needed: a value
    that rounds past +-1 lands in the outermost bucket anyway.
    """
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    pieces, absmaxes = [], []
    if full:
        blocks = flat[:full].view(-1, blocksize)
        absmax = block_absmax(blocks)
        inv = torch.reciprocal(absmax.clamp(min=_ABSMAX_FLOOR))
        pieces.append(torch.mul(blocks, inv.unsqueeze(1)).view(-1))
        absmaxes.append(absmax)
    if rem:
        tail = flat[full:]
        tail_absmax = tail.abs().max().clamp(min=_ABSMAX_FLOOR)
        pieces.append(tail / tail_absmax)
        absmaxes.append(tail_absmax.reshape(1))
    scaled = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    absmax = absmaxes[0] if len(absmaxes) == 1 else torch.cat(absmaxes)
    return scaled, absmax


def _flat_float(w: torch.Tensor) -> torch.Tensor:
    """Flattened fp32 view/copy of ``w`` (a view when it already is contiguous fp32)."""
    return w.reshape(-1).float()


# --------------------------------------------------------------------------------------------
# Blockwise 8-bit with the dynamic map (used for double quantization)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _nearest_code_lut(code_key: tuple[float, ...]) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer: a 65536-entry lookup table over [-1, 1].

    The CPU kernel does not search the code for the nearest value; it maps the scaled value to
    one of 65536 evenly spaced grid points and returns the code nearest to *that grid point*
    (first code whose upper midpoint is >= it). This differs from exact nearest rounding for
    values close to a midpoint, so we reproduce the table to get identical codes.
    """
    code = torch.tensor(code_key, dtype=torch.float32)
    midpoints = (code[:-1] + code[1:]) * 0.5
    grid = torch.arange(_LUT_SIZE, dtype=torch.float32)
    grid = (2.0 * grid) / float(_LUT_SIZE - 1) - 1.0
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


def _lut_index(scaled: torch.Tensor) -> torch.Tensor:
    """The kernel's grid index: ``uint16((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)`` in fp32."""
    idx = scaled.clamp(-1.0, 1.0).add_(1.0).mul_(0.5).mul_(float(_LUT_SIZE - 1)).add_(0.5)
    return idx.to(torch.int64)


def _quantize_blockwise_flat(
    flat: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit codes and fp32 absmax of a flat fp32 tensor, as bitsandbytes' CPU kernel.

    Per block: absmax = max |x| (stored as is, including 0), codes of an all-zero block are 0,
    otherwise ``lut[grid_index(x * (1 / absmax))]``.
    """
    n = flat.numel()
    pad = (-n) % blocksize
    padded = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    blocks = padded.view(-1, blocksize)
    absmax = block_absmax(blocks)
    inv = torch.where(absmax > 0, torch.reciprocal(absmax), torch.zeros_like(absmax))
    scaled = blocks * inv.unsqueeze(1)
    codes = _nearest_code_lut(tuple(code.tolist()))[_lut_index(scaled)]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax


def _dequantize_blockwise_flat(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """fp32 ``code[codes] * absmax[block]`` over a flat code vector (last block may be partial)."""
    n = codes.numel()
    values = code.index_select(0, codes.reshape(-1).int())
    pad = (-n) % blocksize
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values = values.view(-1, blocksize).mul_(absmax.unsqueeze(1))
    return values.reshape(-1)[:n]


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256) -> Blockwise8bitTensor:
    """Blockwise 8-bit quantization with the signed dynamic map, identical to bitsandbytes' CPU.

    Why: it is how bitsandbytes stores 8-bit optimizer states and double-quantized absmax, and a
    useful 8-bit weight format to compare (8 + 32/blocksize bits/param).
    """
    check_float(x, "quantize_blockwise_8bit")
    _check_blocksize(blocksize, BLOCKSIZES_8BIT)
    codes, absmax = _quantize_blockwise_flat(_flat_float(x), dynamic_map(), blocksize)
    return Blockwise8bitTensor(codes, absmax, blocksize, tuple(x.shape), x.dtype)


def dequantize_blockwise_8bit(q: Blockwise8bitTensor) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit` (fp32 math, then the original dtype)."""
    values = _dequantize_blockwise_flat(q.codes, q.absmax, dynamic_map(), q.blocksize)
    return values.reshape(q.shape).to(q.dtype)


def _check_blocksize(blocksize: int, allowed: tuple[int, ...]) -> None:
    if blocksize not in allowed:
        raise ValueError(f"blocksize must be one of {allowed}, got {blocksize}")


# --------------------------------------------------------------------------------------------
# NF4 / FP4
# --------------------------------------------------------------------------------------------


def _double_quantize(absmax: torch.Tensor) -> DoubleQuantState:
    """bitsandbytes' double quant: centre on the mean absmax, then 8-bit blockwise in 256s."""
    offset = absmax.mean()
    codes, dq_absmax = _quantize_blockwise_flat(absmax - offset, dynamic_map(), DQ_BLOCKSIZE)
    return DoubleQuantState(codes=codes, absmax=dq_absmax, offset=offset)


_CELLS = 1 << 16  # grid cells over [-1, 1] for the fast nearest-level lookup
_AMBIGUOUS = 255
_MAGIC = float(2**23)  # adding 2**23 to a float in [0, 2**17) leaves round(x) in its low bits
_CELL_MASK = 0x3FFFF  # 18 low bits; cells past _CELLS (only from inf/NaN) resolve exactly


@lru_cache(maxsize=None)
def _cell_table(quant_type: str) -> torch.Tensor:
    """uint8 code for each grid cell of [-1, 1], or 255 where a cell is near a midpoint.

    (Indices past the grid, reachable only from inf/NaN inputs, are 255 as well.)

    Why: ``bucketize`` (a binary search per element) dominated the reference quantizer. Instead
    we compute each value's grid cell with one fused multiply-add (folded into the per-block
    scale), read the code from this table, and resolve only values in the few cells within one
    cell of a midpoint exactly (about 0.05% of values). A cell is marked unambiguous only if the
    whole interval one cell wider on both sides holds no midpoint, so the rounding of the cell
    computation can never change a code: results equal ``bucketize`` bit for bit.
    """
    midpoints, order = _bucket_table(quant_type)
    cell = torch.arange(_CELLS + 1, dtype=torch.float64)
    lo = (cell - 1.5) * 2.0 / _CELLS - 1.0
    hi = (cell + 1.5) * 2.0 / _CELLS - 1.0
    mids = midpoints.double()
    first = torch.bucketize(lo, mids)
    last = torch.bucketize(hi, mids)
    table = torch.full((_CELL_MASK + 1,), _AMBIGUOUS, dtype=torch.uint8)
    table[: _CELLS + 1] = order[first.clamp(max=len(order) - 1)]
    table[: _CELLS + 1][first != last] = _AMBIGUOUS
    return table


def _nearest_codes_fast(
    blocks: torch.Tensor, inv: torch.Tensor, quant_type: str
) -> torch.Tensor:
    """Codes of ``blocks * inv`` (per row), equal to bucketize on the exactly scaled values."""
    midpoints, order = _bucket_table(quant_type)
    half = _CELLS / 2
    grid_scale = inv * half
    grid = torch.mul(blocks, grid_scale.unsqueeze(1)).add_(_MAGIC + half)
    cells = grid.view(torch.int32).bitwise_and_(_CELL_MASK).view(-1)
    codes = _cell_table(quant_type).index_select(0, cells)
    del grid, cells
    fix = torch.nonzero(codes == _AMBIGUOUS).view(-1)
    if fix.numel():
        rows = torch.div(fix, blocks.shape[1], rounding_mode="floor")
        exact = blocks.reshape(-1)[fix] * inv[rows]
        codes[fix] = order[torch.bucketize(exact, midpoints).long()]
    # Blocks the grid cannot handle, redone exactly as bnb does: NaN or inf inside (NaN or 0
    # inverse) and zero or tiny absmax (below ~3e-34 the grid scale overflows to inf).
    bad = torch.nonzero(~torch.isfinite(grid_scale) | (grid_scale == 0)).view(-1)
    if bad.numel():
        exact = blocks[bad] * inv[bad].unsqueeze(1)
        codes.view(blocks.shape)[bad] = order[torch.bucketize(exact, midpoints).long()]
    return codes


def _quantize_4bit_torch(w: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes and fp32 absmax, bit-identical to ``bitsandbytes.functional.quantize_4bit``.

    Full blocks use the table lookup of :func:`_nearest_codes_fast`; the (at most one) partial
    block goes through :func:`_scaled_blocks` and ``bucketize`` exactly like bitsandbytes.
    """
    midpoints, order = _bucket_table(quant_type)
    flat = _flat_float(w)
    n = flat.numel()
    full = n - n % blocksize
    parts, absmaxes = [], []
    if full:
        blocks = flat[:full].view(-1, blocksize)
        absmax = block_absmax(blocks)
        inv = torch.reciprocal(absmax.clamp(min=_ABSMAX_FLOOR))
        parts.append(_nearest_codes_fast(blocks, inv, quant_type))
        absmaxes.append(absmax)
    if full < n:
        scaled, tail_absmax = _scaled_blocks(flat[full:], blocksize)
        parts.append(order[torch.bucketize(scaled, midpoints).long()])
        absmaxes.append(tail_absmax)
    if n % 2:
        parts.append(order[torch.bucketize(torch.zeros(1), midpoints).long()])  # pad nibble = code of 0.0
    codes = parts[0] if len(parts) == 1 else torch.cat(parts)
    absmax = absmaxes[0] if len(absmaxes) == 1 else torch.cat(absmaxes)
    return _pack_nibbles(codes), absmax


def _quantize_4bit_bnb(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    """bitsandbytes' quantize_4bit on the FLATTENED tensor.

    Why flattened: blocks are defined over the flat tensor anyway, but bitsandbytes' CPU
    dequantize kernel on AVX-512 machines indexes absmax per row when given a 2-D shape whose
    last dim is not a multiple of the blocksize, giving wrong values. With a 1-D shape the flat
    (correct) indexing is always used; we reshape after dequantizing.
    """
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        w.reshape(-1).contiguous(),
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    if not double_quant:
        return packed, state.absmax, None
    dq = DoubleQuantState(codes=state.absmax, absmax=state.state2.absmax, offset=state.offset)
    return packed, None, dq


def quantize_4bit(
    w: torch.Tensor,
    quant_type: QuantType4bit = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    backend: Backend = "torch",
) -> Blockwise4bitTensor:
    """NF4/FP4 blockwise 4-bit quantization (QLoRA / bitsandbytes ``Linear4bit`` weights).

    Blocks are ``blocksize`` consecutive elements of the flattened tensor (any shape; the last
    block may be partial). Each element becomes the index of the level nearest to
    ``x / absmax(block)``. ``backend="torch"`` is the pure-torch reference, bit-identical to
    ``backend="bitsandbytes"`` on the CPU in packed codes, absmax and double-quant state (on CUDA the kernels
    round FP4 ties, zero's sign and double quant's codes by their own rules: see the module docstring).

    Storage at blocksize 64: 4 + 32/64 = 4.5 bits/param; with double quant
    4 + 8/64 + 32/(64*256) (+ 32 bits per tensor for the offset) ~= 4.127.
    """
    check_float(w, "quantize_4bit")
    _levels(quant_type)
    _check_blocksize(blocksize, BLOCKSIZES_4BIT)
    if backend == "torch":
        packed, absmax = _quantize_4bit_torch(w, quant_type, blocksize)
        dq = _double_quantize(absmax) if double_quant else None
        absmax = None if double_quant else absmax
    elif backend == "bitsandbytes":
        packed, absmax, dq = _quantize_4bit_bnb(w, quant_type, blocksize, double_quant)
    else:
        raise ValueError(f"backend must be 'torch' or 'bitsandbytes', got {backend!r}")
    return Blockwise4bitTensor(packed, absmax, dq, quant_type, blocksize, tuple(w.shape), w.dtype, backend)


def dequantize_4bit(q: Blockwise4bitTensor, backend: Optional[Backend] = None) -> torch.Tensor:
    """Values of a :class:`Blockwise4bitTensor` in its original shape and dtype.

    ``backend`` defaults to the one that quantized it; either works on either's output. Math is
    fp32 (level * absmax) and then cast, like bitsandbytes' kernels.
    """
    backend = backend or q.backend
    if backend == "bitsandbytes":
        return _dequantize_4bit_bnb(q)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'bitsandbytes', got {backend!r}")
    n = q.numel
    absmax = q.block_absmax()
    # index_select with int32 indices: about 4x faster than indexing with int64 bytes, the same values
    values = _pair_table(q.quant_type).index_select(0, q.packed.reshape(-1).int()).view(-1)
    pad = (-values.numel()) % q.blocksize
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values = values.view(-1, q.blocksize)[: absmax.numel()].mul_(absmax.unsqueeze(1))
    return values.view(-1)[:n].reshape(q.shape).to(q.dtype)


def _dequantize_4bit_bnb(q: Blockwise4bitTensor) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit with a rebuilt QuantState over the flat shape."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState

    state2 = None
    absmax, offset = q.absmax, None
    if q.dq is not None:
        absmax, offset = q.dq.codes, q.dq.offset
        state2 = QuantState(absmax=q.dq.absmax, code=dynamic_map(), blocksize=q.dq.blocksize, dtype=torch.float32)
    state = QuantState(
        absmax=absmax,
        shape=torch.Size([q.numel]),
        code=_levels(q.quant_type).clone(),
        blocksize=q.blocksize,
        quant_type=q.quant_type,
        dtype=q.dtype,
        offset=offset,
        state2=state2,
    )
    return bnbf.dequantize_4bit(q.packed, state).reshape(q.shape)


# --------------------------------------------------------------------------------------------
# LLM.int8()
# --------------------------------------------------------------------------------------------


def int8_vectorwise_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 (LLM.int8()): ``round(w * (127 / absmax_row))`` and fp32 absmax.

    Same arithmetic as ``bitsandbytes.functional.int8_vectorwise_quant`` (fp32 math, round half
    to even), so codes and scales are identical. Rows are all leading dims flattened. An all-zero
    row gets codes 0 (bitsandbytes would compute 0 * inf = NaN there).
    """
    check_float(w, "int8_vectorwise_quant")
    rows = w.reshape(-1, w.shape[-1]) if w.dim() > 0 else w.reshape(1, 1)
    absmax = block_absmax(rows.float())
    factor = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    codes = torch.round(rows.float() * factor.unsqueeze(1)).to(torch.int8)
    return codes.reshape(w.shape), absmax


def quantize_int8_weight(w: torch.Tensor) -> RowwiseInt8Tensor:
    """LLM.int8() weight storage: int8 codes + fp32 row absmax = 8 + 32/in_features bits/param."""
    codes, absmax = int8_vectorwise_quant(w)
    return RowwiseInt8Tensor(codes.reshape(-1, w.shape[-1] if w.dim() else 1), absmax, tuple(w.shape), w.dtype)


def outlier_columns(x: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """Feature dims (last-dim indices) where any |activation| >= ``threshold`` (LLM.int8()), judged on the
    activations cast to fp16, as bitsandbytes does."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.float16)
    return torch.nonzero((flat.abs() >= threshold).any(dim=0)).reshape(-1)


#: bitsandbytes' constants of its default int8 kernels: 1/127**2 (int8_mm_dequant) and 1/127 (dequant).
_MM_DEQUANT = 6.200124e-05
_VECTOR_DEQUANT = 7.874015718698502e-3


def _bnb_int_mm_is_exact() -> bool:
    """bitsandbytes 0.50's CPU backend accumulates int8 products exactly (torch._int_mm) only on AVX-512
    CPUs; elsewhere its default kernel multiplies in fp32 and truncates to int32 (`_int8_linear_matmul_impl`)."""
    from quantlib.methods._bnb_cpu import INT_MM_8BIT, int8_path

    return int8_path() == INT_MM_8BIT


@torch.no_grad()
def int8_decomposed_matmul(x: torch.Tensor, w: torch.Tensor, threshold: float = 6.0,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LLM.int8() ``x @ w.T (+ bias)`` exactly as bitsandbytes 0.50 computes it on CPU (`Linear8bitLt` ->
    `MatMul8bitLt` with its default kernels), vectorized, casts included. Tested bit for bit against
    `Linear8bitLt` (tests/test_quantize.py).

    - The weight is stored as `Int8Params` stores it: cast to fp16, row-wise int8 codes and fp32 SCB.
    - The activations are cast to fp16. With ``threshold > 0``, every element with |x| >= threshold is
      an outlier; its column is an outlier column. Outliers are zeroed before the row absmax, rows are
      quantized ``round(x16 * (127 / absmax))`` in fp32, and outlier columns are zeroed in the codes.
    - int8 products are accumulated exactly (torch._int_mm) on AVX-512 CPUs, else as bitsandbytes'
      default kernel does: an fp32 matmul truncated to int32 (not exact past 2**24).
    - Dequantization: ``acc * (absmax_x * SCB) * 6.200124e-05`` in fp32, plus bias, cast to x's dtype;
      then the outlier columns are added back with ``addmm(x[:, cols], (codes[:, cols] * SCB / 127).T)``
      in x's dtype (the weights of those columns are the int8 ones, dequantized: bitsandbytes keeps no
      fp16 copy).

    ``threshold=0`` (or inf) is plain row-wise int8 without decomposition.
    """
    check_float(x, "int8_decomposed_matmul")
    check_float(w, "int8_decomposed_matmul")
    if x.shape[-1] != w.shape[-1] or w.dim() != 2:
        raise ValueError(f"need x (..., {w.shape[-1] if w.dim() == 2 else 'in'}) and w (out, in); "
                         f"got x {tuple(x.shape)} and w {tuple(w.shape)}")
    codes_w, scb = int8_vectorwise_quant(w.to(torch.float16))
    return _int8_matmul(x, codes_w, scb, threshold, bias)


def _int8_matmul(x: torch.Tensor, codes_w: torch.Tensor, scb: torch.Tensor, threshold: float,
                 bias: Optional[torch.Tensor], codes_w_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`int8_decomposed_matmul` from the stored codes and SCB (what `Int8Params` holds); `codes_w_t`
    is the transposed weight codes (int8, or already in the accumulation's dtype), when precomputed."""
    a = x.reshape(-1, x.shape[-1])
    a16 = a.to(torch.float16)
    cols = None
    if threshold > 0.0:
        outliers = a16.abs() >= threshold
        cols = torch.argwhere(outliers.any(dim=0)).view(-1)
        if cols.numel():
            a16 = a16.masked_fill(outliers, 0)
    row_stats = a16.abs().amax(dim=1).float()
    codes_x = torch.round_(a16 * (127.0 / row_stats.unsqueeze(-1)))  # fp32, integral values in [-127, 127]
    if codes_w is None:  # only the transposed codes were kept
        codes_w = codes_w_t.t()
    int_mm = _bnb_int_mm_is_exact()
    if int_mm or not bool((row_stats > 0).all()):  # an all-zero row gives NaN: let the int8 cast decide it
        codes_x = codes_x.to(torch.int8)
    if a16.shape[0] > 1 and cols is not None and cols.numel():
        codes_x.index_fill_(1, cols, 0)
    if int_mm:
        acc = torch._int_mm(codes_x, codes_w.t() if codes_w_t is None else codes_w_t)
    else:
        # bitsandbytes' default kernel: an fp32 matmul truncated to int32. The truncation is done in fp32
        # (integral fp32 values are exact), which gives the same numbers without the int32 round trip.
        acc = torch.matmul(codes_x.float(), codes_w.float().t() if codes_w_t is None else codes_w_t.float()).trunc_()
    out = acc * (row_stats.unsqueeze(-1) * scb.reshape(1, -1)) * _MM_DEQUANT
    if bias is not None:
        out += bias.to(x.dtype)
    out = out.to(x.dtype)
    if cols is not None and cols.numel():
        sub_w = (codes_w[:, cols].to(torch.int8).contiguous() * scb.view(-1, 1) * _VECTOR_DEQUANT).to(x.dtype).t()
        out = out.addmm(a[:, cols].contiguous(), sub_w)
    return out.reshape(*x.shape[:-1], codes_w.shape[0])


# --------------------------------------------------------------------------------------------
# Exact simulation of the CPU kernels
# --------------------------------------------------------------------------------------------


def stored_4bit(layer: Any, dtype: torch.dtype = torch.float32) -> "Blockwise4bitTensor":
    """The tensors a `bnb.nn.Linear4bit` stores (packed codes, absmax or its double quantization), as the format
    `Bnb4BitQuantizer.quantize_tensor` gives: read, not quantized again. A layer that bitsandbytes repacked for its
    fused AVX512-BF16 kernel (absmax rounded to bf16, double quantization undone) is read from the copy
    `keep_stored_4bit` took before; without one it has no stored form left, and this raises."""
    qs = layer.weight.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        kept = getattr(layer, "_quantlib_stored", None)
        if kept is None:
            raise ValueError("bitsandbytes repacked this layer for its fused AVX512-BF16 kernel (absmax in bf16): "
                             "its stored tensors are gone")
        return dataclasses.replace(kept, dtype=dtype)
    dq = None
    absmax = qs.absmax.cpu()  # read to the CPU, where the reference formats compute (the layer may be on CUDA)
    if qs.nested:
        dq = DoubleQuantState(codes=qs.absmax.cpu(), absmax=qs.state2.absmax.cpu(), offset=qs.offset.cpu(),
                              blocksize=qs.state2.blocksize)
        absmax = None
    return Blockwise4bitTensor(layer.weight.data.reshape(-1, 1).cpu(), absmax, dq, qs.quant_type, qs.blocksize,
                               tuple(qs.shape), dtype, "torch")


#: The kernel path of a layer `work_around_cpu_kernel_bugs` computes itself.
WORKAROUND_4BIT = ("quantlib's reference dequantization + F.linear (bitsandbytes' scalar branch: its AVX-512 "
                   "dequantize_4bit is wrong for these layers' shape)")


def work_around_cpu_kernel_bugs(model: torch.nn.Module) -> list[str]:
    """WORKAROUND (bitsandbytes 0.50.2's CPU backend), in this one place; tested in tests/test_exact_simulation.py.

    1. On an AVX512-BF16 CPU, `Linear4bit.forward` repacks every layer for its fused kernel, and the repacking asserts
       that out_features is a multiple of 32 and in_features of the blocksize ("N must be divisible by block_n"): a
       layer of another shape (an MoE router with 8 or 60 outputs, an odd MLP width) crashes the first forward. Such
       a layer is put on bitsandbytes' other CPU path (its own per-layer flag `support_avx512bf16_for_cpu` cleared).
    2. That other path dequantizes with `dequantize_4bit`, whose AVX-512 branch is wrong where in_features is not a
       multiple of the blocksize (`_bnb_cpu.dequantize_problem`). Such a layer is computed by `ExactLinear4bit` on the
       dequantize path: quantlib's reference dequantization, which is bitsandbytes' own scalar branch bit for bit.

    Returns one line per layer worked around, for the run's notes."""
    import bitsandbytes as bnb

    from quantlib.methods._bnb_cpu import dequantize_problem, fused_shape_problem

    notes = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type != "cpu" \
                or getattr(module.weight, "quant_state", None) is None \
                or getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            continue
        blocksize = int(module.weight.quant_state.blocksize)
        if getattr(module, "support_avx512bf16_for_cpu", False) and \
                fused_shape_problem(module.out_features, module.in_features, blocksize):
            module.support_avx512bf16_for_cpu = False
            notes.append(f"{name}: {module.out_features} x {module.in_features}, a shape bitsandbytes' fused "
                         "AVX512-BF16 kernel asserts on, runs on its dequantize path")
        problem = dequantize_problem(module.in_features, blocksize)
        if problem:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ExactLinear4bit(module, workaround=True))
            notes.append(f"{name}: {problem}; quantlib computes it as bitsandbytes' scalar branch does")
    return notes


def keep_stored_4bit(model: torch.nn.Module) -> int:
    """Keep a reference to the stored tensors of every `Linear4bit` that bitsandbytes will repack on its first CPU
    forward (its fused AVX512-BF16 path), so weight errors and the exact simulation still read them afterwards.
    No copy: repacking assigns new tensors and leaves these alone. Returns how many layers."""
    import bitsandbytes as bnb

    kept = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False) \
                and module.weight.device.type == "cpu" and getattr(module.weight, "quant_state", None) is not None \
                and not getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            module._quantlib_stored = stored_4bit(module)
            kept += 1
    return kept


def stored_8bit(layer: Any, dtype: torch.dtype) -> "RowwiseInt8Tensor":
    """The int8 codes and per-row SCB a `bnb.nn.Linear8bitLt` (no fp16 weights) stores, as the format
    `Bnb8BitQuantizer.quantize_tensor` gives."""
    codes, scb = _int8_state(layer)
    codes = codes.contiguous().cpu()  # to the CPU, where the reference formats compute
    return RowwiseInt8Tensor(codes, scb.cpu(), tuple(codes.shape), dtype)


def stored_layers(model: torch.nn.Module) -> dict[str, Callable[[torch.dtype], QuantizedTensor]]:
    """Module name -> a reader of the stored tensors, for every bitsandbytes layer of `model` (library or exact
    simulation) whose stored form is the plain one (not repacked for a CPU kernel, no fp16 training weights)."""
    import bitsandbytes as bnb

    out: dict[str, Callable[[torch.dtype], QuantizedTensor]] = {}
    for name, m in model.named_modules():
        if isinstance(m, ExactLinear4bit) and m.packed is not None:
            out[name] = lambda dtype, m=m: dataclasses.replace(m.packed, dtype=dtype)
        elif isinstance(m, ExactLinear8bit):
            out[name] = m.packed
        elif isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight, "quant_state", None) is not None \
                and (not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                     or getattr(m, "_quantlib_stored", None) is not None):
            out[name] = lambda dtype, m=m: stored_4bit(m, dtype)
        elif isinstance(m, bnb.nn.Linear8bitLt) and not m.state.has_fp16_weights:
            codes, scb = _int8_state(m)
            if scb is not None and codes.dtype == torch.int8:
                out[name] = lambda dtype, m=m: stored_8bit(m, dtype)
    return out


class ExactLinear4bit(torch.nn.Module):
    """What `bnb.nn.Linear4bit` computes on a CPU, on either of bitsandbytes' kernel paths, at matmul speed.

    Without AVX512-BF16, bitsandbytes 0.50's default `gemm_4bit` dequantizes the whole weight to the input's dtype on
    every call (fp32 math, then cast) and runs `F.linear`; `Linear4bit.forward` first casts the input to its compute
    dtype (which becomes the input's dtype on the first fp32/bf16 call) and the output back. Here the weight is
    dequantized once, by quantlib's reference (bit-identical to bitsandbytes' `dequantize_4bit`, tested), kept in
    fp32 and cast to the compute dtype on first use; the forward is then one `F.linear`.

    With AVX512-BF16, bitsandbytes runs its fused bf16 kernel (inference: eval mode, no gradient), mirrored bit for
    bit by `quantlib.methods._bnb_cpu.fused_4bit_matmul`, which keeps the bf16 levels times the bf16 absmax in fp32
    and the codes.
    """

    def __init__(self, layer: Any, workaround: bool = False):
        super().__init__()
        from quantlib.methods import _bnb_cpu

        self.train(layer.training)  # Linear4bit's fused path depends on it: mirror the layer's mode
        qs = layer.weight.quant_state
        shape = tuple(int(d) for d in qs.shape)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.quant_type, self.blocksize = qs.quant_type, int(qs.blocksize)
        self.kernel_path = WORKAROUND_4BIT if workaround else _bnb_cpu.four_bit_path(layer)
        self.fused = self.kernel_path == _bnb_cpu.FUSED_4BIT
        self.repacked = bool(getattr(qs, "packing_format_for_cpu", False))  # from now on always the fused kernel
        try:  # the layer's stored tensors, for its weight error and code usage
            self.packed: Optional[Blockwise4bitTensor] = stored_4bit(layer)
        except ValueError:
            self.packed = None
        if self.fused:
            codes, absmax = _bnb_cpu.fused_codes_and_absmax(layer)
            levels = _bnb_cpu.bf16_levels(self.quant_type)
            weight = levels.index_select(0, codes.reshape(-1).int()).view(shape[0], -1, self.blocksize)
            self.register_buffer("codes", codes, persistent=False)
            self.register_buffer("absmax_bf16", absmax, persistent=False)
            self.register_buffer("fused_weight", (weight * absmax.float().unsqueeze(-1)).view(shape),
                                 persistent=False)
            self.weight_fp32 = None
        else:
            self.register_buffer("weight_fp32", dequantize_4bit(self.packed).reshape(shape), persistent=False)
        self.bias = layer.bias
        self.compute_dtype = layer.compute_dtype
        self.compute_type_is_set = layer.compute_type_is_set
        self._weight: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compute_type_is_set:  # Linear4bit.set_compute_type
            if x.dtype in (torch.float32, torch.bfloat16):
                self.compute_dtype = x.dtype
            self.compute_type_is_set = True
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = self.bias
        if bias is not None:
            if bias.dtype != x.dtype:
                bias.data = bias.data.to(x.dtype)
            bias = bias.to(self.compute_dtype) if self.compute_dtype is not None else bias
        if self.fused and (self.repacked or (not self.training and not x.requires_grad)):
            from quantlib.methods._bnb_cpu import fused_4bit_matmul

            self.repacked = True  # Linear4bit.forward repacks here, and matmul_4bit then always takes gemv_4bit
            out = fused_4bit_matmul(x, self.codes, self.absmax_bf16, self.quant_type, self.blocksize,
                                    weight=self.fused_weight).to(x.dtype)
            if bias is not None:
                out += bias
            return out.to(inp_dtype)
        if self._weight is None or self._weight.dtype != x.dtype:
            if self.weight_fp32 is None:  # the fused path's layer, trained before its first inference
                if self.packed is None:
                    raise ValueError("this layer's stored tensors are gone (repacked): it cannot be dequantized")
                self.weight_fp32 = dequantize_4bit(self.packed).float().reshape(self.out_features, -1)
            self._weight = self.weight_fp32 if x.dtype == torch.float32 else self.weight_fp32.to(x.dtype)
        return torch.nn.functional.linear(x, self._weight, bias).to(inp_dtype)


class ExactLinear8bit(torch.nn.Module):
    """What `bnb.nn.Linear8bitLt` (inference, no fp16 weights) computes on CPU: `_int8_matmul` from the
    very codes and SCB the layer holds, the transposed codes prepared once."""

    def __init__(self, layer: Any):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        codes, scb = _int8_state(layer)
        self.register_buffer("scb", scb, persistent=False)
        self.threshold = float(layer.state.threshold)
        # Only the transposed codes are kept, as int8 (the layer's own bytes): the fp32 accumulation casts one
        # layer's codes per call, which costs little next to the matmul and keeps the model 4x smaller.
        t = codes.t()
        self.register_buffer("codes_t", t if _bnb_int_mm_is_exact() else t.contiguous(), persistent=False)
        self.bias = layer.bias

    @property
    def codes(self) -> torch.Tensor:
        return self.codes_t.t().to(torch.int8)

    def packed(self, dtype: torch.dtype) -> "RowwiseInt8Tensor":
        """The layer's stored codes and SCB as the tensor format `Bnb8BitQuantizer.quantize_tensor` gives."""
        codes = self.codes.contiguous()
        return RowwiseInt8Tensor(codes, self.scb, tuple(codes.shape), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None and self.bias.dtype != x.dtype:
            self.bias.data = self.bias.data.to(x.dtype)
        with torch.no_grad():
            return _int8_matmul(x, None, self.scb, self.threshold, self.bias, self.codes_t)


def _int8_state(layer: Any) -> tuple[Any, Any]:
    """(codes, SCB) of a Linear8bitLt: on the weight until its first forward, on its state after."""
    state = layer.state
    if getattr(state, "CB", None) is not None and getattr(state, "SCB", None) is not None:
        return state.CB, state.SCB
    return layer.weight.data, getattr(layer.weight, "SCB", None)


def exact_simulation_problem(model: torch.nn.Module) -> str | None:
    """Why the bitsandbytes layers of `model` cannot be simulated exactly here, or None."""
    import bitsandbytes as bnb

    from quantlib.methods import _bnb_cpu

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if module.weight.device.type != "cpu":
                return f"{name} is on {module.weight.device}: the exact simulation mirrors bitsandbytes' CPU kernels"
            path = _bnb_cpu.four_bit_path(module)
            if path == _bnb_cpu.KERNELS_COMMUNITY_4BIT:
                return ("bitsandbytes runs the kernels-community gemm_4bit_forward kernel here (the `kernels` package "
                        "loaded it), which quantlib does not mirror")
            if path == _bnb_cpu.FUSED_4BIT:
                problem = _bnb_cpu.fused_shape_problem(module.out_features, module.in_features,
                                                       int(module.weight.quant_state.blocksize))
                if problem:
                    return f"{name}: {problem}"
        elif isinstance(module, bnb.nn.Linear8bitLt):
            if module.weight.device.type != "cpu":
                return f"{name} is on {module.weight.device}: the exact simulation mirrors bitsandbytes' CPU kernels"
            if module.state.has_fp16_weights or _int8_state(module)[1] is None:
                return f"{name} keeps fp16 weights (llm_int8_has_fp16_weight), a training setup not mirrored"
    return None


def kernel_paths(model: torch.nn.Module) -> list[str]:
    """The kernel paths bitsandbytes' layers (or their exact simulation) in `model` take, each once."""
    import bitsandbytes as bnb

    from quantlib.methods import _bnb_cpu

    paths: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, ExactLinear4bit):
            paths[module.kernel_path] = None
        elif isinstance(module, bnb.nn.Linear4bit):
            paths[_bnb_cpu.four_bit_path(module) if module.weight.device.type == "cpu" else
                  "bitsandbytes CUDA 4-bit kernels"] = None
        elif isinstance(module, (ExactLinear8bit, bnb.nn.Linear8bitLt)):
            on_cpu = isinstance(module, ExactLinear8bit) or module.weight.device.type == "cpu"
            paths[_bnb_cpu.int8_path() if on_cpu else "bitsandbytes CUDA LLM.int8() kernels"] = None
    return list(paths)


@torch.no_grad()
def to_exact_simulation(model: torch.nn.Module) -> int:
    """Replace every bitsandbytes layer of `model` in place by its exact simulation; returns how many."""
    import bitsandbytes as bnb

    problem = exact_simulation_problem(model)
    if problem:
        raise ValueError(f"cannot simulate bitsandbytes exactly: {problem}")
    swaps = [(name, module) for name, module in model.named_modules()
             if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    for name, module in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        exact = ExactLinear4bit(module) if isinstance(module, bnb.nn.Linear4bit) else ExactLinear8bit(module)
        setattr(parent, child, exact)
    return len(swaps)


# --------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------

class BnbQuantizer(Quantizer):
    """Shared part of the two bitsandbytes quantizers: the real library, real kernels.

    `quantize_model` goes through transformers' `from_pretrained(..., quantization_config=...)`, the
    path users will run: bitsandbytes quantizes while loading.
    """

    config_class = BitsAndBytesQuantConfig
    requires = (("bitsandbytes", "bitsandbytes"),)
    simulated = False
    library = "bitsandbytes"
    has_exact_simulation = True

    experts_policy = ("transformers 5.23 replaces only nn.Linear and Conv1D modules with bitsandbytes layers: fused "
                      "3-D expert tensors (Mixtral, Qwen-MoE, DeepSeek...) stay in 16/32 bits; per-expert "
                      "nn.Linear lists and routers that are nn.Linear modules are quantized, routers held as plain "
                      "parameters (Mixtral's MixtralTopKRouter) are not")

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
        return transformers_skip_rules(shapes, config.llm_int8_skip_modules, "llm_int8_skip_modules")

    @classmethod
    def matmul_treatment(cls, config: QuantConfig, w: WeightShape) -> str | None:
        if w.kind == "experts":
            return "fused expert tensors (transformers' bitsandbytes replaces only nn.Linear and Conv1D modules)"
        if w.kind == "linear" and not w.exact_linear:
            return f"{w.module_class}, a subclass of nn.Linear, which transformers' bitsandbytes replacement skips"
        return None

    @classmethod
    def transformers_class_name(cls) -> str | None:
        return "BitsAndBytesConfig"

    @classmethod
    def snippet(cls, config: QuantConfig, model_id: str) -> str | None:
        """transformers' idiom: `BitsAndBytesConfig(...)` with the non-default keyword arguments, dtypes
        as `torch.` attributes."""
        import json

        from quantlib.methods.base import _py

        diff = config.to_diff_dict()
        kwargs = [(n, f"torch.{diff[n]}" if n in DTYPE_KEYS and isinstance(diff[n], str) else _py(diff[n]))
                  for n in config.field_names() if n in diff]
        lines = ["import torch"] if any(src.startswith("torch.") for _, src in kwargs) else []
        lines += ["from transformers import (", "    AutoModelForCausalLM,", "    BitsAndBytesConfig,", ")", "",
                  "quantization_config = BitsAndBytesConfig("]
        lines += [f"    {name}={src}," for name, src in kwargs]
        lines += [")", f"model_id = {json.dumps(model_id)}", "model = AutoModelForCausalLM.from_pretrained(",
                  "    model_id,", "    quantization_config=quantization_config,", '    device_map="auto",', ")"]
        return "\n".join(lines)

    def quantize_model(self, *, base: Any = None, source: str = "default", dtype: torch.dtype = torch.float32,
                       trust_remote_code: bool = False, allow_pickle: bool = False, progress: Any = None,
                       cancel: Any = None, calibration: Any = None) -> QuantizedModel:
        """Load `source` through `from_pretrained` with the config (always from `source`, never from
        `base`: bitsandbytes quantizes while loading), with the baseline's loading choices."""
        from quantlib.footprint import measure_footprint
        from quantlib.models import load_model

        started = time.perf_counter()
        loaded = load_model(source, dtype=dtype, device=self.backend.device, trust_remote_code=trust_remote_code,
                            allow_pickle=allow_pickle, quantization_config=self.config.to_transformers(),
                            progress=progress)
        _own_unquantized_tensors(loaded.model)
        keep_stored_4bit(loaded.model)  # before a CPU forward repacks them for the fused kernel
        memory = measure_footprint(loaded.model)  # what bitsandbytes stores, before any workaround
        work_around_cpu_kernel_bugs(loaded.model)  # bitsandbytes' CPU kernels on shapes they get wrong
        loaded.model.eval()
        return QuantizedModel(loaded.model, loaded.tokenizer, self.config, self.backend, memory,
                              time.perf_counter() - started, loaded.description.to_dict())

    @classmethod
    def mix_spaces(cls, shapes: ModelShapes) -> list[MixSpace]:
        """A BitsAndBytesConfig quantizes every converted layer one way (one 4-bit type with or without double
        quant, or LLM.int8()); per layer it can only keep a module unquantized (`llm_int8_skip_modules`).
        One space per way; the exported skip list repeats transformers' defaults, which a list replaces."""
        defaults = [p for p, why in default_skip_rules(shapes) if not why.startswith("kept in fp32")]
        keep = MixChoice("keep", "kept unquantized", None, 16.0)
        ways = [("nf4+dq", "NF4 + double quant", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                  "bnb_4bit_use_double_quant": True}, 4.0),
                ("nf4", "NF4", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, 4.0),
                ("fp4+dq", "FP4 + double quant", {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                                                  "bnb_4bit_use_double_quant": True}, 4.0),
                ("fp4", "FP4", {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, 4.0),
                ("int8", "LLM.int8()", {"load_in_8bit": True}, 8.0)]
        spaces = []
        for key, label, values, bits in ways:
            uniform = BitsAndBytesQuantConfig(**values)

            def build(assignment: dict[str, str], values: dict[str, Any] = values) -> QuantConfig:
                kept = sorted((g for g, choice in assignment.items() if choice == "keep"), key=natural_key)
                return BitsAndBytesQuantConfig(**values, llm_int8_skip_modules=[*defaults, *kept] if kept else None)

            spaces.append(MixSpace(
                f"{label}, some modules unquantized", (MixChoice(key, label, uniform, bits), keep), "module",
                lambda module: module, build, uniform,
                "BitsAndBytesConfig with llm_int8_skip_modules (the kept modules plus transformers' defaults)",
                "one BitsAndBytesConfig cannot mix 4-bit and 8-bit layers or two 4-bit types: each is its own space"))
        return spaces

    @classmethod
    def offload_problem(cls, config: QuantConfig, dtype: str) -> str | None:
        """4-bit layers compute `x @ dequantize(W).T` in the compute dtype: a checkpoint of the dequantized weights
        (bit-identical to bitsandbytes' own dequantization) in that dtype gives the same numbers. LLM.int8()
        quantizes activations at run time, which no weight checkpoint does."""
        if config.load_in_8bit:
            return ("LLM.int8() quantizes the activations at run time (outlier columns in 16 bits): a checkpoint of "
                    "dequantized weights would not reproduce it, and bitsandbytes offloads only to a CUDA device")
        if config.bnb_4bit_compute_dtype != dtype:
            return (f"its layers compute in {config.bnb_4bit_compute_dtype} while the model is {dtype}; set "
                    "bnb_4bit_compute_dtype to the model's dtype to evaluate it offloaded")
        return None

    @classmethod
    def offload_kernel_note(cls, config: QuantConfig, dtype: str) -> str | None:
        from quantlib.methods import _bnb_cpu

        path = _bnb_cpu.four_bit_path()
        if config.load_in_8bit or path == _bnb_cpu.DEQUANT_4BIT:
            return None
        return (f"{config.label}: evaluated offloaded as {_bnb_cpu.DEQUANT_4BIT} ({dtype}), the path bitsandbytes "
                f"takes on CPUs without AVX512-BF16; on this CPU its own layers run the {path}, so a comparison in "
                "memory here differs slightly (bf16 rounding)")

    def layer_output(self, x: torch.Tensor, packed: QuantizedTensor) -> torch.Tensor:
        if isinstance(packed, RowwiseInt8Tensor) and not self.config.llm_int8_has_fp16_weight:
            codes = packed.codes.reshape(packed.shape[0], -1)
            return _int8_matmul(x, codes, packed.row_absmax, self.config.llm_int8_threshold, None)
        return super().layer_output(x, packed)

    def exact_simulation_problem(self, model: Any) -> str | None:
        return exact_simulation_problem(model)

    @torch.no_grad()
    def layer_weights(self, base_model: torch.nn.Module, quantized: Any = None,
                      cancel: Any = None) -> Iterator[LayerWeight]:
        """From the quantized model (bitsandbytes' layers or their exact simulation): the tensors its layers store,
        with no second quantization; where there is none, quantize each base weight (the default)."""
        model = getattr(quantized, "model", quantized)
        stored = stored_layers(model) if model is not None else {}
        refs = self.quantizable_layers(base_model)
        if not stored or any(ref.name not in stored for ref in refs):
            # a layer repacked for a CPU kernel, or a model without bitsandbytes layers: quantize again
            yield from super().layer_weights(base_model, None, cancel=cancel)
            return
        for ref in refs:
            if cancel is not None and cancel():
                raise Cancelled(f"layer errors cancelled at {ref.name}")
            w = ref.read()
            packed = stored[ref.name](w.dtype)
            yield LayerWeight(ref.name, w, packed.dequantize(), packed, packed.bits_per_param)

    def to_exact_simulation(self, model: Any) -> int:
        return to_exact_simulation(model)

    def kernel_paths(self, model: Any) -> list[str]:
        return kernel_paths(model)

    @classmethod
    def cpu_kernel_summary(cls) -> str | None:
        from quantlib.methods._bnb_cpu import paths_summary

        return paths_summary()

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


@register("bitsandbytes_4bit")
class Bnb4BitQuantizer(BnbQuantizer):
    """NF4/FP4 with optional double quantization (QLoRA), blocksize 64 as bitsandbytes uses."""

    blocksize: ClassVar[int] = 64
    #: A comparison's evaluation of this scheme on CPU against one plain fp32 pass (benchmarks/bench_compare.py,
    #: 2026-11-25: 1.19 with bitsandbytes 0.50.2's kernels, 1.27-1.36 with the exact simulation).
    cpu_eval_slowdown = 1.2

    def environment_notes(self, device: str) -> list[str]:
        from quantlib.methods import _bnb_cpu

        if device == "cpu" and _bnb_cpu.four_bit_path() == _bnb_cpu.FUSED_4BIT:
            return ["This CPU has AVX512-BF16: bitsandbytes runs its fused bf16 4-bit kernel (activations, code levels "
                    "and absmax rounded to bf16; about one plain pass). `--kernels exact` mirrors it bit for bit at "
                    "about 18 plain passes on the default model (benchmarks/RESULTS.md); the default keeps the kernel."]
        return []

    def code_levels(self) -> torch.Tensor | None:
        return _levels(self.config.bnb_4bit_quant_type)

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        return quantize_4bit(weight, quant_type=self.config.bnb_4bit_quant_type, blocksize=self.blocksize,
                            double_quant=self.config.bnb_4bit_use_double_quant, backend="bitsandbytes")

    def reference_quantize_tensor(self, weight: torch.Tensor) -> Any:
        """The pure-torch reference of the same scheme, cross-checked against bitsandbytes in tests."""
        return quantize_4bit(weight, quant_type=self.config.bnb_4bit_quant_type, blocksize=self.blocksize,
                            double_quant=self.config.bnb_4bit_use_double_quant, backend="torch")


@register("bitsandbytes_8bit")
class Bnb8BitQuantizer(BnbQuantizer):
    """LLM.int8(): row-wise int8 weights, fp16 matmul for activation outlier columns."""

    # On this project's AVX2 CPU the simulation's forward took 1.35-1.40 plain forwards against the kernels'
    # 1.65-1.86, keeping the same int8 codes (benchmarks/RESULTS.md, "LLM.int8() through its simulation").
    exact_simulation_by_default = True
    #: A comparison's evaluation of this scheme on CPU against one plain fp32 pass (benchmarks/bench_compare.py,
    #: 2026-11-26, the default path: 1.33-1.58 through the simulation; 1.54 on bitsandbytes 0.50.2's kernels).
    cpu_eval_slowdown = 1.5

    def environment_notes(self, device: str) -> list[str]:
        if device == "cpu":
            return ["LLM.int8() on CPU (activation quantization, outlier columns) makes its evaluation about 1.5x "
                    "a plain fp32 pass (by default through quantlib's exact simulation of bitsandbytes' kernels, "
                    "1.5x to 1.9x on the kernels themselves)."]
        return []

    def quantize_tensor(self, weight: torch.Tensor) -> Any:
        """What `Int8Params._quantize` stores: the weight cast to fp16 first, whatever the model's
        dtype (so fp32 and bf16 weights round through fp16), then row-wise int8 with fp32 SCB."""
        packed = quantize_int8_weight(weight.to(torch.float16))
        return dataclasses.replace(packed, dtype=weight.dtype)



@torch.no_grad()
def _own_unquantized_tensors(model: torch.nn.Module) -> None:
    """Copy the tensors bitsandbytes left unquantized out of the checkpoint's memory map.

    Loaded from safetensors, they are views into a mapping of the whole file; each loaded model
    would keep its own 0.5 GB mapping resident (measured on the default model) for 0.1 GB of
    embeddings and norms. Copying them lets the mapping go; sizes and values are unchanged.
    """
    from quantlib.runtime import release_memory

    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen or getattr(param, "quant_state", None) is not None or not param.is_floating_point():
            continue
        seen.add(id(param))
        param.data = param.data.clone()
    release_memory()
