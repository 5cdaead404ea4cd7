"""Tensors a quantized model shares with its base model: a simulated copy shares everything it does not quantize,
and a model loaded from disk can point its unchanged tensors at the base's."""

from __future__ import annotations

import copy
from typing import Any

import torch

from quantlib.methods.base.records import MatrixRef


@torch.no_grad()
def share_identical_tensors(model: torch.nn.Module, reference: torch.nn.Module) -> int:
    """Point every parameter of `model` that equals the parameter of the same name in `reference` (same
    dtype, shape, device and values) at the reference's tensor; returns the bytes freed. A quantized model
    loaded from disk keeps its own copies of embeddings and norms; sharing them costs nothing as both
    models only read them."""
    ref_params = dict(reference.named_parameters(remove_duplicate=False))
    freed, seen = 0, set()
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            full = f"{module_name}.{name}" if module_name else name
            other = ref_params.get(full)
            if param is None or other is None or other is param or param.dtype != other.dtype \
                    or param.shape != other.shape or param.device != other.device or not torch.equal(param, other):
                continue
            module._parameters[name] = other
            if id(param) not in seen:
                seen.add(id(param))
                freed += param.numel() * param.element_size()
    return freed


def _copy_sharing_unquantized(model: torch.nn.Module, layers: list[MatrixRef]) -> torch.nn.Module:
    """A deep copy of `model` whose quantizable parameters are its own and whose other parameters and
    buffers (embeddings, norms, biases, rotary tables) are the original's tensors: simulation writes
    only the quantizable ones, so a simulated model costs its quantized matrices, not a whole copy."""
    quantized = {id(ref.param) for ref in layers}
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in quantized}
    return copy.deepcopy(model, memo)
