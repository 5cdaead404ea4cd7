"""Outliers in weights and activations: why some layers quantize badly, and what LLM.int8() does.

Weight statistics (kurtosis, tail mass beyond k·σ, max/σ) flag layers whose few large weights
stretch every block's absmax. Activation outliers are what LLM.int8() decomposes: input feature
dimensions in which any activation reaches the threshold (6.0 in the paper) run in 16 bits. We
record, per linear layer, the largest |activation| of each input dimension over some calibration
tokens, so the fraction of 16-bit columns can be recomputed for any threshold without another
forward pass (the app's threshold slider).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch

from quantlib.errors import Cancelled


def linear_modules(model: torch.nn.Module, skip_head: bool = True) -> list[tuple[str, torch.nn.Module]]:
    """Linear layers in forward order (bitsandbytes' Linear4bit/8bitLt subclass nn.Linear)."""
    head = model.get_output_embeddings() if skip_head and hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def weight_outlier_stats(weight: torch.Tensor, k: float = 6.0) -> dict[str, float]:
    """Kurtosis (Pearson, normal = 3), fraction of weights beyond k·σ, and max|w|/σ."""
    w = weight.detach().float().flatten()
    mean = w.mean()
    centred = w - mean
    var = centred.pow(2).mean()
    std = var.sqrt().clamp_min(1e-30)
    kurtosis = (centred.pow(4).mean() / var.clamp_min(1e-60).pow(2)).item()
    return {
        "kurtosis": kurtosis,
        f"frac_beyond_{_k(k)}sigma": (centred.abs() > k * std).float().mean().item(),
        "max_over_sigma": (centred.abs().max() / std).item(),
        "std": std.item(),
        "absmax": w.abs().max().item(),
    }


def _k(k: float) -> str:
    return str(int(k)) if float(k).is_integer() else str(k)


def weight_outlier_table(model: torch.nn.Module, k: float = 6.0) -> pd.DataFrame:
    """`weight_outlier_stats` for every linear layer of an unquantized model."""
    rows = []
    for name, module in linear_modules(model):
        rows.append({"layer": name, "shape": tuple(module.weight.shape), **weight_outlier_stats(module.weight, k)})
    return pd.DataFrame(rows)


@dataclass
class ActivationOutliers:
    """Per layer, the max |activation| of each input dimension seen over the calibration tokens."""

    dim_absmax: dict[str, torch.Tensor]  # layer -> [in_features] float32
    n_tokens: int
    backend: str

    def table(self, threshold: float = 6.0) -> pd.DataFrame:
        """Per layer: how many input dims reach `threshold`, and the share of the matmul in 16 bits."""
        rows = []
        for name, absmax in self.dim_absmax.items():
            count = int((absmax >= threshold).sum())
            rows.append({"layer": name, "in_features": absmax.numel(), "outlier_dims": count,
                         "fp16_fraction": count / absmax.numel(), "max_abs_activation": float(absmax.max())})
        return pd.DataFrame(rows)

    def summary(self, threshold: float = 6.0) -> dict[str, float]:
        """Model-wide: layers with any outlier dim, and the weighted share of 16-bit columns."""
        table = self.table(threshold)
        dims = table["in_features"].sum()
        return {"threshold": threshold, "layers_with_outliers": int((table["outlier_dims"] > 0).sum()),
                "layers": len(table), "fp16_fraction": float(table["outlier_dims"].sum() / dims) if dims else 0.0}


@torch.inference_mode()
def activation_outliers(model: torch.nn.Module, input_ids: torch.Tensor, *, batch_tokens: int = 512,
                        max_batches: int = 4, bos_token_id: int | None = None,
                        progress: Callable[[float, str], None] | None = None,
                        cancel: Callable[[], bool] | None = None) -> ActivationOutliers:
    """Run a few calibration batches through the model with forward hooks on every linear input."""
    layers = linear_modules(model)
    maxima: dict[str, torch.Tensor] = {}

    owner = threading.get_ident()

    def make_hook(name: str):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            # A cached model may be shared by several app sessions (threads): record only the
            # forward passes this scan makes, never another session's activations.
            if threading.get_ident() != owner:
                return
            x = args[0].detach()
            cur = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float().cpu()
            maxima[name] = cur if name not in maxima else torch.maximum(maxima[name], cur)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers]
    device = next(model.parameters()).device
    ids = input_ids.flatten()
    body = batch_tokens - (1 if bos_token_id is not None else 0)
    chunks = [ids[i:i + body] for i in range(0, ids.numel(), body)][:max_batches]
    n_tokens = 0
    try:
        for i, chunk in enumerate(chunks):
            if cancel is not None and cancel():
                raise Cancelled("activation outlier scan cancelled")
            if bos_token_id is not None:
                chunk = torch.cat([torch.tensor([bos_token_id]), chunk])
            model(chunk.unsqueeze(0).to(device))
            n_tokens += chunk.numel()
            if progress:
                progress((i + 1) / len(chunks), f"activation outliers: batch {i + 1}/{len(chunks)}")
    finally:
        for h in handles:
            h.remove()
    backend = "cuda" if device.type == "cuda" else "cpu"
    return ActivationOutliers(maxima, n_tokens, backend)
