"""What a quantized model's weights lose, layer by layer: errors, code usage and one layer's detail.

Every measurement reads the method's quantizer (`quantizer.layer_weights`: the stored tensors of the quantized
model where it has them), so nothing here knows which method it runs. `quantlib.registry.quantize_model` makes
the quantized model from a config.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from quantlib.errors import QuantlibError
from quantlib.metrics import code_histogram, error_metrics
from quantlib.methods.base import Quantizer
from quantlib.callbacks import CancelFn, ProgressFn



@torch.no_grad()
def simulate_quantization(model: torch.nn.Module, quantizer: Quantizer, progress: ProgressFn | None = None,
                          cancel: CancelFn | None = None) -> Any:
    """Replace each quantizable matrix in place by quantize→dequantize; return the packed size."""
    return quantizer.simulate(model, progress=progress, cancel=cancel)


def code_usage(packed: Any) -> tuple[torch.Tensor | None, float]:
    """Code histogram and its entropy; (None, nan) for formats whose codes are not unpacked
    (e.g. GGUF Q5 types interleave the fifth bit), that have no codes (F16/BF16), or no packed tensor."""
    if packed is None or not packed.n_codes:
        return None, float("nan")
    try:
        return code_histogram(packed.codes_unpacked(), packed.n_codes)
    except NotImplementedError:
        return None, float("nan")


@torch.no_grad()
def layer_errors(base_model: torch.nn.Module, quantizer: Quantizer, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, quantized: Any = None) -> pd.DataFrame:
    """Weight error of every layer the method quantizes, one layer at a time (`quantizer.layer_weights`).

    Methods that quantize tensor by tensor stream: peak memory is the model plus one layer's packed
    and dequantized copies. Calibrated methods read their layers from the quantized model: pass
    `quantized` (the `QuantizedModel` or its model).
    """
    total = quantizer.count_layers(base_model, quantized)
    rows = []
    for i, lw in enumerate(quantizer.layer_weights(base_model, quantized, cancel=cancel)):
        _, entropy = code_usage(lw.packed)
        rows.append({"layer": lw.name, "out_features": lw.original.shape[0], "in_features": lw.original.shape[1],
                     **error_metrics(lw.original, lw.dequantized), "bits_per_param": lw.bits_per_param,
                     "code_entropy_bits": entropy})
        if progress and (i % 8 == 0 or i == total - 1):
            progress((i + 1) / max(total, 1), f"{quantizer.config.label}: weight error {i + 1}/{total}")
    return pd.DataFrame(rows)


def layer_detail(base_model: torch.nn.Module, quantizer: Quantizer, layer: str) -> dict[str, Any]:
    """Everything the inspector shows for one layer: metrics, code usage, histogram data."""
    from quantlib.distributions import block_normalized_histogram
    from quantlib.outliers import weight_outlier_stats

    refs = {ref.name: ref for ref in quantizer.quantizable_layers(base_model)}
    if layer not in refs:
        names = list(refs)
        raise QuantlibError(f"no layer named {layer!r} that {quantizer.config.label} quantizes; e.g. "
                            f"{', '.join(names[:3])} ({len(names)} in all)")
    w = refs[layer].read()
    packed = quantizer.quantize_layer(layer, w)
    counts, entropy = code_usage(packed)
    return {
        "layer": layer,
        "shape": list(w.shape),
        "metrics": error_metrics(w, packed.dequantize()),
        "bits_per_param": packed.bits_per_param,
        "code_counts": counts.tolist() if counts is not None else None,
        "code_entropy_bits": entropy,
        "n_codes": packed.n_codes,
        "code_levels": None if (levels := quantizer.code_levels()) is None else [float(v) for v in levels],
        "weight_stats": weight_outlier_stats(w),
        "histogram": block_normalized_histogram(w),
    }
