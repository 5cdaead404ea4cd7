"""Feeding calibration text through a model while hooks watch chosen layers' inputs: what llama-imatrix's importance
matrix (`_ggml_importance`) and llm-compressor's static input observers (`_ct_formats`) both measure from."""

from __future__ import annotations

from typing import Any, Callable

import torch

from quantlib.callbacks import CancelFn, ProgressFn


@torch.no_grad()
def observe_inputs(model: torch.nn.Module, tokenizer: Any, layer_names: list[str], n_tokens: int,
                   record: Callable[[str, torch.Tensor], None], *, what: str, text: str | None = None,
                   chunk: int = 512, bos: int | None = None, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None) -> int:
    """Run `n_tokens` of `text` (default: the built-in calibration text) through `model` in chunks of `chunk` tokens
    (each starting with `bos` when given), calling `record(name, input)` for every layer in `layer_names` on every
    forward; `what` names the measurement in progress lines and in the cancellation. Returns the number of chunks."""
    from quantlib.corpus import builtin_text
    from quantlib.errors import Cancelled
    from quantlib.evaluation import tokenize_for_eval

    ids = tokenize_for_eval(tokenizer, text if text is not None else builtin_text("calib"), n_tokens)
    modules = dict(model.named_modules())
    missing = [name for name in layer_names if name not in modules]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} in the model")
    handles = [modules[name].register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0].detach()))
               for name in layer_names]
    device = next(model.parameters()).device
    starts = list(range(0, int(ids.numel()), chunk))
    try:
        for i, start in enumerate(starts):
            if cancel is not None and cancel():
                raise Cancelled(f"{what} cancelled")
            piece = ids[start:start + chunk].clone()
            if bos is not None:
                piece[0] = int(bos)
            model(input_ids=piece.unsqueeze(0).to(device))
            if progress is not None:
                progress((i + 1) / len(starts), f"{what}: chunk {i + 1}/{len(starts)}")
    finally:
        for handle in handles:
            handle.remove()
    return len(starts)
