"""bitsandbytes' CPU kernels mirrored in torch: the LLM.int8() matmul as `Linear8bitLt` computes it, and the
exact simulation of its layers (`ExactLinear4bit`, `ExactLinear8bit`) that computes the same numbers, bit for
bit, at plain-matmul speed; reading the tensors its layers store.

bitsandbytes 0.50.2's CPU backend gets two shapes wrong, on CPUs with AVX-512: its fused AVX512-BF16 kernel asserts
on layers whose out_features is not a multiple of 32 (or in_features of the blocksize), and its AVX-512 dequantize_4bit
reads the wrong absmax where in_features is not a multiple of the blocksize. `work_around_cpu_kernel_bugs` (one place,
tested) routes the first to bitsandbytes' other path and computes the second as bitsandbytes' scalar branch does; the
run's kernel paths say so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from quantlib.formats import QuantizedTensor, check_float
from quantlib.methods.bitsandbytes.formats import (Blockwise4bitTensor, DoubleQuantState, RowwiseInt8Tensor,
                                                   dequantize_4bit, int8_vectorwise_quant)


# --------------------------------------------------------------------------------------------
# LLM.int8()
# --------------------------------------------------------------------------------------------


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
    from quantlib.methods.bitsandbytes._bnb_cpu import INT_MM_8BIT, int8_path

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
    absmax = qs.absmax  # read where the layer lives: the reference formats compute on its device
    if qs.nested:
        dq = DoubleQuantState(codes=qs.absmax, absmax=qs.state2.absmax, offset=qs.offset,
                              blocksize=qs.state2.blocksize)
        absmax = None
    return Blockwise4bitTensor(layer.weight.data.reshape(-1, 1), absmax, dq, qs.quant_type, qs.blocksize,
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

    from quantlib.methods.bitsandbytes._bnb_cpu import dequantize_problem, fused_shape_problem

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
    codes = codes.contiguous()  # where the layer lives: the reference formats compute on its device
    return RowwiseInt8Tensor(codes, scb, tuple(codes.shape), dtype)


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
    bit by `quantlib.methods.bitsandbytes._bnb_cpu.fused_4bit_matmul`, which keeps the bf16 levels times the bf16
    absmax in fp32 and the codes.
    """

    def __init__(self, layer: Any, workaround: bool = False):
        super().__init__()
        from quantlib.methods.bitsandbytes import _bnb_cpu

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
            from quantlib.methods.bitsandbytes._bnb_cpu import fused_4bit_matmul

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

    from quantlib.methods.bitsandbytes import _bnb_cpu

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

    from quantlib.methods.bitsandbytes import _bnb_cpu

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
