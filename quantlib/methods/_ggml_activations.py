"""What llama.cpp's CPU matmul does to the activations: each weight type's dot product takes the input quantized to
its `vec_dot_type` (ggml-cpu.c's `type_traits_cpu`), one row at a time.

- Q8_0 (for Q4_0, Q5_0, Q8_0, IQ4_NL, MXFP4) and Q8_1 (Q4_1, Q5_1): blocks of 32, `d = amax / 127` stored in
  fp16, `q = round(x * (127 / amax))`, rounding half to even (`quantize_row_q8_0` / `q8_1` in
  ggml-cpu/arch/x86/quants.c, the AVX path: `_mm256_round_ps(..., _MM_ROUND_NEAREST)`).
- Q8_K (for Q2_K ... Q6_K, IQ4_XS and the lattice types IQ3_S ... IQ1_S): blocks of 256, `iscale = -127 / max`
  with max the value of largest magnitude, `q = min(127, nearest_int(iscale * x))`, `d = 1 / iscale` stored in float32 (`quantize_row_q8_K_ref`, which the
  x86 `quantize_row_q8_K` calls).
- F16 / BF16 weights: the input rounded to that type; F32: untouched.

The simulated model multiplies the dequantized weights by the dequantized activations in float32; llama.cpp sums
the integer products block by block and scales them. The two agree up to float32 rounding of the sums. One more
rounding is llama.cpp's own and is simulated: Q4_1 and Q5_1 add their blocks' min `m` times the activation block's
sum `s`, which Q8_1 stores in fp16 (`s = fp16(d * sum(q))`, with the unrounded d); the simulation adds
`m * (s - fp16(d) * sum(q))` to each output (`q8_1_sum_error`).
"""

from __future__ import annotations

import torch

#: Weight type -> the type llama.cpp's CPU matmul quantizes the activations to (ggml-cpu.c, vec_dot_type).
VEC_DOT_TYPE = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "MXFP4": "Q8_0",
                "Q4_1": "Q8_1", "Q5_1": "Q8_1",
                "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "IQ4_XS": "Q8_K",
                "IQ3_S": "Q8_K", "IQ3_XXS": "Q8_K", "IQ2_S": "Q8_K", "IQ2_XS": "Q8_K", "IQ2_XXS": "Q8_K",
                "IQ1_M": "Q8_K", "IQ1_S": "Q8_K",
                "F16": "F16", "BF16": "BF16", "F32": "F32"}


def quantize_activations(x: torch.Tensor, kind: str) -> torch.Tensor:
    """`x` (..., n) as llama.cpp's matmul sees it after quantizing it to `kind`, back in x's dtype."""
    if kind == "F32":
        return x
    if kind == "F16":
        return x.to(torch.float16).to(x.dtype)
    if kind == "BF16":
        return x.to(torch.bfloat16).to(x.dtype)
    block = 256 if kind == "Q8_K" else 32
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"{kind} activations need rows that are a multiple of {block} (got {n})")
    v = x.float().reshape(*x.shape[:-1], n // block, block)
    if kind in ("Q8_0", "Q8_1"):
        q, d = _q8_0_codes(v)
        out = q * d.to(torch.float16).float()
    elif kind == "Q8_K":
        index = v.abs().argmax(-1, keepdim=True)  # the first of equal magnitudes, as the strict `>` in C
        peak = v.gather(-1, index)
        nonzero = peak != 0
        safe = torch.where(nonzero, peak, torch.ones_like(peak))
        iscale = torch.where(nonzero, torch.div(torch.full_like(peak, -127.0), safe), torch.zeros_like(peak))
        q = torch.round(iscale * v).clamp(max=127)  # nearest_int: half to even
        safe_iscale = torch.where(nonzero, iscale, torch.ones_like(iscale))
        d = torch.where(nonzero, torch.div(torch.ones_like(iscale), safe_iscale), torch.zeros_like(peak))
        out = q * d
    else:
        raise ValueError(f"unknown activation type {kind!r}; known: Q8_0, Q8_1, Q8_K, F16, BF16, F32")
    return out.reshape(x.shape).to(x.dtype)


def _q8_0_codes(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0/Q8_1 codes and unrounded scales of blocks `v` (..., 32): q = round(x * 127/amax), d = amax/127 (..., 1)."""
    amax = v.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    # `127.0 / tensor` is computed as 127 * reciprocal(tensor) by PyTorch (two roundings); C divides once
    inv = torch.where(amax != 0, torch.div(torch.full_like(amax, 127.0), amax), torch.zeros_like(amax))
    return torch.round(v * inv), d  # half to even, as _mm256_round_ps(_MM_ROUND_NEAREST)


def q8_1_sum_error(x: torch.Tensor) -> torch.Tensor:
    """Per block of 32 of `x` (..., n): llama.cpp's fp16 block sum `s = fp16(d * sum(q))` minus the sum of the
    dequantized block `fp16(d) * sum(q)`, float32 (..., n // 32)."""
    q, d = _q8_0_codes(x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32))
    total, d = q.sum(-1), d.squeeze(-1)
    return (d * total).to(torch.float16).float() - d.to(torch.float16).float() * total


def block_mins(packed) -> torch.Tensor | None:
    """The fp16 min `m` of every block of a Q4_1 or Q5_1 tensor (out, n_blocks), float32; None for other types."""
    import numpy as np

    name = packed.qtype.name
    if name not in ("Q4_1", "Q5_1"):
        return None
    block_bytes = {"Q4_1": 20, "Q5_1": 24}[name]
    rows = packed.shape[0]
    raw = np.ascontiguousarray(packed.data).reshape(rows, -1, block_bytes)[:, :, 2:4]
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def add_activation_quantization(model: torch.nn.Module, packed_layers: dict) -> list:
    """Hooks on every module in `packed_layers` (module name -> its packed GGUF tensor) that quantize its input as
    llama.cpp's matmul for that weight type does (and, for Q4_1/Q5_1, add the min term's fp16 rounding of the block
    sums). Returns the hooks' handles."""
    modules = dict(model.named_modules())
    packed_by_weight = {id(getattr(modules.get(name), "weight", None)): packed for name, packed in packed_layers.items()
                        if modules.get(name) is not None}
    # a module whose weight is a quantized layer's (an output head tied to the quantized token embedding) multiplies
    # by it as llama.cpp's output matmul does
    tied = {name: packed_by_weight[id(module.weight)] for name, module in modules.items()
            if name not in packed_layers and isinstance(module, torch.nn.Linear)
            and id(module.weight) in packed_by_weight}
    handles = []
    for name, packed in {**packed_layers, **tied}.items():
        module = modules.get(name)
        kind = VEC_DOT_TYPE.get(packed.qtype.name)
        if module is None or kind is None or kind == "F32" or isinstance(module, torch.nn.Embedding):
            continue  # an embedding is a row lookup (llama.cpp's get_rows), no matmul
        mins = block_mins(packed) if kind == "Q8_1" else None
        state: dict = {}

        def pre_hook(_module, args, kind=kind, mins=mins, state=state):
            if mins is not None:
                state["error"] = q8_1_sum_error(args[0])
            return (quantize_activations(args[0], kind), *args[1:])

        handles.append(module.register_forward_pre_hook(pre_hook))
        if mins is not None:
            def post_hook(_module, _args, output, mins=mins, state=state):
                error = state.pop("error")
                return output + (error @ mins.to(error.device).T).to(output.dtype)

            handles.append(module.register_forward_hook(post_hook))
    return handles
