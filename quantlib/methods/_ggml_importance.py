"""The importance matrix, as llama.cpp's `llama-imatrix` makes it: for every matrix a model multiplies, the mean
of the squared input activation of each input column over calibration text.

llama-imatrix runs the model over the text in chunks of `n_ctx` tokens (512 by default), the first token of each
chunk BOS, and sums `x_j^2` over every token a matrix sees (`in_sum2`) with a count; llama-quantize divides one by
the other and hands the per-column mean to the block quantizers as `quant_weights`. This does the same with the
model's own forward pass in PyTorch: the figures differ from llama.cpp's by the activations' rounding (llama.cpp
runs its own kernels), not by the recipe.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from quantlib.callbacks import CancelFn, ProgressFn
from quantlib.errors import Cancelled

#: Tokens per calibration chunk, llama-imatrix's default context.
CHUNK_TOKENS = 512


@torch.no_grad()
def importance_matrix(model: torch.nn.Module, tokenizer: Any, layer_names: list[str], n_tokens: int,
                      text: str | None = None, chunk: int = CHUNK_TOKENS, progress: ProgressFn | None = None,
                      cancel: CancelFn | None = None) -> dict[str, np.ndarray]:
    """Per layer in `layer_names` (modules whose input is the matrix's input): the mean of x_j^2 over `n_tokens`
    tokens of `text` (default: the built-in calibration text), float32 of length in_features."""
    from quantlib.corpus import builtin_text
    from quantlib.evaluation import tokenize_for_eval

    ids = tokenize_for_eval(tokenizer, text if text is not None else builtin_text("calib"), n_tokens)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    modules = dict(model.named_modules())
    missing = [name for name in layer_names if name not in modules]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} in the model")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(_module: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in layer_names]
    device = next(model.parameters()).device
    starts = list(range(0, int(ids.numel()), chunk))
    try:
        for i, start in enumerate(starts):
            if cancel is not None and cancel():
                raise Cancelled("importance matrix cancelled")
            piece = ids[start:start + chunk].clone()
            if bos is not None:
                piece[0] = int(bos)  # llama-imatrix: every chunk starts with BOS
            model(input_ids=piece.unsqueeze(0).to(device))
            if progress is not None:
                progress((i + 1) / len(starts), f"importance matrix: chunk {i + 1}/{len(starts)}")
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in layer_names if name in sums}
