"""Which kernel bitsandbytes 0.50.2 runs on this CPU, asked the way bitsandbytes asks, and its fused AVX512-BF16
4-bit GEMM mirrored bit for bit in torch.

bitsandbytes' CPU backend has two kernel paths for each layer type, chosen by CPU features:

- **4-bit (NF4/FP4).** Where `bitsandbytes.functional.has_avx512bf16()` is true (its native library's own check),
  every `Linear4bit` in eval mode with an input that needs no gradient is repacked on its first forward
  (`_convert_weight_packed_for_cpu`) and from then on calls `gemv_4bit`, a fused bf16 GEMM
  (`csrc/cpu_ops.cpp`, `tinygemm_kernel_nn`; the kernels-community `gemm_4bit_forward` instead, when the
  `kernels` package is installed and loads it, which quantlib does not mirror). Elsewhere `gemm_4bit`
  dequantizes the whole weight to the input's dtype and calls `F.linear`.
- **LLM.int8().** Where torch reports the AVX512 capability, the int8 products are accumulated exactly
  (`torch._int_mm`); elsewhere an fp32 matmul is truncated to int32 (`quantlib.methods.bitsandbytes.exact`).

The fused 4-bit kernel, read in bitsandbytes 0.50's `csrc/cpu_ops.cpp` and checked bit for bit against the
library on an AMD EPYC with AVX512-BF16 (tests/test_exact_simulation.py):

- the activations are cast to bf16 (round to nearest even); the absmax of each block is cast to bf16 after
  double quantization is undone in fp32 (`absmax = dequantize_blockwise(...) + offset`);
- the 16 code levels are bf16 constants: the levels rounded to nearest even;
- for every output and every block of `blocksize` inputs, an fp32 accumulator starts at zero and takes the products
  two inputs at a time with `vdpbf16ps`: the odd input's product is added, rounded, then the even one's, rounded
  (bf16 products are exact in fp32; denormal inputs and results are flushed to zero);
- the block's sum is scaled into the output accumulator with one fused multiply-add, blocks in order;
- the output is rounded to bf16, cast back to the input's dtype, and the bias is added in that dtype.

A per-element loop of 64 roundings would be far slower than the kernel. `fused_4bit_matmul` gets the same bits at
matmul speed: it computes every output exactly in float64 with one matmul, bounds how far the kernel's roundings can
move it (at most (blocksize + blocks) fp32 roundings of partial sums, each within 2**-24 of its magnitude), and where
the whole interval rounds to one bf16 value that value is the kernel's. The few outputs near a bf16 rounding
boundary are recomputed with the kernel's exact sequence of fp32 roundings.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from quantlib.codebooks import FP4_LEVELS, NF4_LEVELS

#: The kernel paths, as run records name them.
FUSED_4BIT = "bitsandbytes fused AVX512-BF16 4-bit GEMM (bf16 activations, levels and absmax)"
DEQUANT_4BIT = "bitsandbytes dequantize_4bit + F.linear in the compute dtype"
KERNELS_COMMUNITY_4BIT = "kernels-community gemm_4bit_forward (bf16)"
INT_MM_8BIT = "bitsandbytes LLM.int8(): torch._int_mm int8 GEMM (AVX-512)"
FP32_8BIT = "bitsandbytes LLM.int8(): fp32 matmul truncated to int32 (no AVX-512)"

_U32 = 2.0 ** -24  # unit roundoff of fp32
_MIN_NORMAL = 2.0 ** -126
#: Floats gathered per chunk of outputs recomputed with the exact rounding sequence (two rows of `in_features` each).
_EXACT_CHUNK_FLOATS = 2**24


def has_avx512bf16() -> bool:
    """bitsandbytes' own check (its native library's `has_avx512bf16_cpu`), which picks its fused 4-bit path."""
    try:
        from bitsandbytes.functional import has_avx512bf16 as bnb_check
    except ImportError:
        return False
    return bool(bnb_check())


def kernels_community_loaded() -> bool:
    """Whether bitsandbytes' CPU backend loaded the kernels-community `gemm_4bit_forward` in place of its own."""
    try:
        from bitsandbytes.backends.cpu import ops
    except ImportError:
        return False
    return getattr(ops, "gemm_4bit_forward_kernel", None) is not None


def int8_path() -> str:
    """The LLM.int8() kernel path bitsandbytes takes on this CPU (its backend checks torch's capability)."""
    return INT_MM_8BIT if torch.backends.cpu.get_cpu_capability() == "AVX512" else FP32_8BIT


def four_bit_path(layer: Any = None) -> str:
    """The 4-bit kernel path bitsandbytes takes on this CPU (for `layer`, by its own flag, when given)."""
    fused = getattr(layer, "support_avx512bf16_for_cpu", None) if layer is not None else None
    if fused is None:
        fused = has_avx512bf16()
    if layer is not None and getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
        fused = True  # already repacked: matmul_4bit calls the fused kernel whatever the flags say
    if not fused:
        return DEQUANT_4BIT
    return KERNELS_COMMUNITY_4BIT if kernels_community_loaded() else FUSED_4BIT


def paths_summary() -> str:
    """Both kernel paths bitsandbytes takes on this CPU, in a few words (the app's backend line)."""
    four = {FUSED_4BIT: "fused AVX512-BF16 GEMM (bf16)", DEQUANT_4BIT: "dequantize + F.linear",
            KERNELS_COMMUNITY_4BIT: "kernels-community GEMM (bf16)"}[four_bit_path()]
    eight = "torch._int_mm" if int8_path() == INT_MM_8BIT else "fp32 matmul truncated to int32"
    return f"bitsandbytes here: 4-bit {four}, LLM.int8() {eight}"


def has_avx512f() -> bool:
    """bitsandbytes' own check (`has_avx512f_cpu` in its native library), which picks its AVX-512 dequantization."""
    try:
        from bitsandbytes.cextension import lib

        return bool(lib.has_avx512f_cpu())
    except (ImportError, AttributeError, OSError, RuntimeError):
        return False


def dequantize_problem(in_features: int, blocksize: int) -> Optional[str]:
    """Why bitsandbytes 0.50.2's CPU `dequantize_4bit` gives wrong weights for a layer on this CPU, or None.

    Its AVX-512 branch (`dequantizeBlockwise4bitCpu`, taken where `has_avx512f_cpu()` and in_features is a multiple of
    16) reads the absmax of row r, column c at `r * (in_features / blocksize) + c / blocksize`: blocks within rows. But
    `quantize_4bit` makes its blocks over the flattened weight. Where in_features is not a multiple of the blocksize the
    two disagree (in_features 48, blocksize 64: every row reads absmax[0]); the scalar branch, taken elsewhere, is
    right."""
    if in_features % blocksize and in_features % 16 == 0 and blocksize >= 16 and has_avx512f():
        return (f"in_features {in_features} is not a multiple of the blocksize {blocksize}: bitsandbytes 0.50.2's "
                "AVX-512 dequantize_4bit reads one absmax per row there while quantize_4bit made blocks over the "
                "flattened weight, so its weights are wrong")
    return None


def bf16_levels(quant_type: str) -> torch.Tensor:
    """The kernel's 16 bf16 code levels (round to nearest even), as fp32."""
    levels = NF4_LEVELS if quant_type == "nf4" else FP4_LEVELS
    return levels.to(torch.bfloat16).float()


def fused_codes_and_absmax(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out, in) uint8, absmax (out, in / blocksize) bf16) of a `Linear4bit`, as its fused kernel reads them:
    unpacked from the kernel's layout if bitsandbytes repacked the layer already, else from the stored state."""
    qs = layer.weight.quant_state
    n, k = int(qs.shape[0]), int(qs.shape[1])
    if getattr(qs, "packing_format_for_cpu", False):
        # _convert_weight_packed_for_cpu: (N/32, 32, K/2, 2) codes -> (N/32, K/2, 32, 2), rows of 64 codes stored as
        # 32 bytes, the first 32 codes in the low nibbles and the last 32 in the high ones.
        packed = layer.weight.data.contiguous().view(torch.uint8).reshape(-1, 32)
        rows = torch.cat([packed & 0xF, packed >> 4], dim=-1)
        codes = rows.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k).contiguous()
        return codes, qs.absmax.t().contiguous()
    flat = layer.weight.data.contiguous().view(torch.uint8).reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[: n * k].reshape(n, k)
    if qs.nested:
        from bitsandbytes.functional import dequantize_blockwise

        absmax = dequantize_blockwise(qs.absmax, qs.state2)
        absmax += qs.offset
        absmax = absmax.float()
    else:
        absmax = qs.absmax.float()
    return codes, absmax.reshape(n, k // qs.blocksize).to(torch.bfloat16)


def fused_shape_problem(out_features: int, in_features: int, blocksize: int) -> Optional[str]:
    """Why the fused kernel cannot take a layer of this shape (bitsandbytes asserts on it), or None."""
    if out_features % 32 or in_features % blocksize:
        return (f"bitsandbytes' fused kernel needs out_features divisible by 32 and in_features by the blocksize "
                f"{blocksize}; got {out_features} x {in_features}")
    return None


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 `a * b + c` with one rounding (an FMA), for fp32 `a`, `c` and a bf16-valued `b`: the product is exact in
    float64, the sum is rounded to odd in float64 (TwoSum, then one step to the odd neighbour), and rounding that to
    fp32 is then correctly rounded (53 >= 2 * 24 + 2 bits)."""
    p = a.double() * b.double()
    cd = c.double()
    s = p + cd
    bb = s - p
    err = (p - (s - bb)) + (cd - bb)
    inexact_even = (err != 0) & ((s.view(torch.int64) & 1) == 0)
    if bool(inexact_even.any()):
        toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
        s = torch.where(inexact_even, torch.nextafter(s, toward), s)
    return s.float()


def _flush(t: torch.Tensor) -> torch.Tensor:
    """Denormals to zero, as `vdpbf16ps` treats its inputs and results."""
    return t.masked_fill_(t.abs() < _MIN_NORMAL, 0.0)


def _exact_outputs(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, levels: torch.Tensor,
                   blocksize: int, flush: bool) -> torch.Tensor:
    """The kernel's fp32 accumulator for rows `x` (P, K) against weight rows `codes` (P, K), `scales` (P, G):
    the exact sequence of roundings, vectorised over the P outputs (`flush`: denormal sums are possible)."""
    p_count, k = x.shape
    groups = k // blocksize
    xs = x.view(p_count, groups, blocksize)
    ws = levels.index_select(0, codes.reshape(-1).int()).view(p_count, groups, blocksize)
    block = torch.zeros(p_count, groups)
    for j in range(0, blocksize, 2):  # vdpbf16ps: the odd input's product, rounded, then the even one's
        block.addcmul_(xs[:, :, j + 1], ws[:, :, j + 1])
        if flush:
            _flush(block)
        block.addcmul_(xs[:, :, j], ws[:, :, j])
        if flush:
            _flush(block)
    acc = torch.zeros(p_count)
    for g in range(groups):
        acc = _fma(block[:, g], scales[:, g], acc)
    return acc


def _denormal_sums_possible(x: torch.Tensor) -> bool:
    """Every product, and so every partial sum, is a multiple of the smallest product's last bit (an input's last bit
    times a level's, at least 2**-16): where that is a normal number no sum is denormal and no flush changes one."""
    nonzero = x.abs().masked_fill(x == 0, float("inf"))
    smallest = float(nonzero.min()) if x.numel() else float("inf")
    if smallest == float("inf"):
        return False
    return 2.0 ** (math.floor(math.log2(smallest)) - 7 - 16) < _MIN_NORMAL


def error_weights(n: int, k: int, blocksize: int) -> torch.Tensor:
    """How many of the kernel's roundings each input's product can reach, (1, K): the partial sums of its block from
    its own step on (`vdpbf16ps` takes input 2i+1 at step 2i and input 2i at step 2i+1), and the output accumulator's
    FMAs from its block on."""
    j = torch.arange(k)
    step = torch.where(j % 2 == 1, j % blocksize - 1, j % blocksize)
    groups = k // blocksize
    return ((blocksize - step) + (groups - j // blocksize)).float().unsqueeze(0)


@torch.no_grad()
def fused_4bit_matmul(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int,
                      weight: Optional[torch.Tensor] = None, reach: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bitsandbytes' fused AVX512-BF16 `gemv_4bit` on `x` (..., K): the bf16 output (..., N), bit for bit.

    `codes` (N, K) uint8 and `absmax` (N, K / blocksize) bf16 as `fused_codes_and_absmax` gives them. A caller that
    keeps them passes `weight`, the fp32 product of the bf16 levels and bf16 absmax (exact), and `reach`,
    `|weight| * error_weights(...)`."""
    n, k = codes.shape
    groups = k // blocksize
    lead = x.shape[:-1]
    xb = _flush(x.reshape(-1, k).to(torch.bfloat16).float())  # bf16 activations; DAZ
    levels = bf16_levels(quant_type)
    scales = absmax.float()
    if weight is None:
        weight = (levels[codes.long()].view(n, groups, blocksize) * scales.unsqueeze(-1)).view(n, k)
    if reach is None:
        reach = weight.abs() * error_weights(n, k, blocksize)
    exact = xb.double() @ weight.double().t()  # every output's exact value, within K * 2**-53 * sum|products|
    # Each rounding of the kernel is within 2**-24 of a partial sum, which is at most the sum of the |products| it
    # holds: the errors add up to 2**-24 * sum_j reach_j |x_j| (fp32 here, within 2 K 2**-24 of itself). Then float64's
    # own error, and the flushed denormals.
    bound = (xb.abs() @ reach.t()).double() * ((_U32 * 1.001 + k * 2.0 ** -52) * (1 + 2 * k * _U32))
    largest_scale = float(scales.abs().max()) if scales.numel() else 0.0
    bound += (k + groups) * (1.0 + largest_scale) * _MIN_NORMAL
    lo, hi = exact - bound, exact + bound
    lo32, hi32 = lo.float(), hi.float()
    lo32 = torch.where(lo32.double() > lo, torch.nextafter(lo32, torch.tensor(float("-inf"))), lo32)
    hi32 = torch.where(hi32.double() < hi, torch.nextafter(hi32, torch.tensor(float("inf"))), hi32)
    lo16, hi16 = lo32.to(torch.bfloat16), hi32.to(torch.bfloat16)
    out = hi16
    unsure = ~((lo16 == hi16) & torch.isfinite(lo16) & torch.isfinite(hi16))
    where = torch.nonzero(unsure)
    flush = bool(where.shape[0]) and _denormal_sums_possible(xb)
    chunk = max(256, _EXACT_CHUNK_FLOATS // (2 * k))
    for start in range(0, where.shape[0], chunk):
        rows, cols = where[start:start + chunk].unbind(1)
        acc = _exact_outputs(xb.index_select(0, rows), codes.index_select(0, cols), scales.index_select(0, cols),
                             levels, blocksize, flush)
        out[rows, cols] = acc.to(torch.bfloat16)
    return out.reshape(*lead, n)
