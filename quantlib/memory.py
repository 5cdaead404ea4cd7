"""Memory: what a quantized model really occupies, and what it will occupy, by component.

`get_memory_footprint()` in transformers misses bitsandbytes' quant state (NF4 with and without
double quantization report the same size), so `measure_footprint` walks every module and counts
every tensor it holds (codes, absmax, nested absmax, offsets, code tables, SCB), each storage once.
`plan_memory` predicts the same breakdown from `config.json` alone, with no weights loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from quantlib.architecture import Architecture, LinearShape, describe_architecture
from quantlib.configs import QuantConfig

COMPONENTS = ("codes", "scales", "dq_constants", "code_tables", "unquantized")
COMPONENT_LABELS = {
    "codes": "quantized codes",
    "scales": "scales / absmax",
    "dq_constants": "double-quant constants",
    "code_tables": "code tables",
    "unquantized": "unquantized (embeddings, norms, skipped layers, biases)",
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass
class MemoryBreakdown:
    """Bytes by component plus the parameter counts that give bits per parameter."""

    bytes_by_component: dict[str, float]
    quantized_params: int
    total_params: int
    source: str  # "measured" (tensors counted), "packed (simulated)" or "planned" (config.json only)
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes_by_component.values()))

    @property
    def quantized_bits_per_param(self) -> float:
        """Bits per parameter of the quantized linear weights alone (codes + their state)."""
        q = sum(v for k, v in self.bytes_by_component.items() if k != "unquantized")
        return 8 * q / self.quantized_params if self.quantized_params else float("nan")

    @property
    def model_bits_per_param(self) -> float:
        """Bits per parameter over the whole model, unquantized parts included."""
        return 8 * self.total_bytes / self.total_params if self.total_params else float("nan")

    def to_frame(self) -> pd.DataFrame:
        rows = [{"component": COMPONENT_LABELS[c], "key": c, "bytes": self.bytes_by_component.get(c, 0.0),
                 "MiB": self.bytes_by_component.get(c, 0.0) / 2**20} for c in COMPONENTS]
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"bytes_by_component": dict(self.bytes_by_component), "total_bytes": self.total_bytes,
                "quantized_params": self.quantized_params, "total_params": self.total_params,
                "quantized_bits_per_param": self.quantized_bits_per_param,
                "model_bits_per_param": self.model_bits_per_param, "source": self.source, "notes": list(self.notes)}


# ----------------------------------------------------------------------------------------
# measured
# ----------------------------------------------------------------------------------------

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Counter:
    """Adds each tensor storage once (tied embeddings and shared tables are not double-counted)."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()
        self.bytes = {c: 0.0 for c in COMPONENTS}

    def add(self, component: str, tensor: torch.Tensor | None) -> None:
        if tensor is None or not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            return
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.device.type != "meta" \
            else (id(tensor), 0)
        if key in self.seen:
            return
        self.seen.add(key)
        self.bytes[component] += _nbytes(tensor)


def _add_quant_state(counter: _Counter, state: Any) -> None:
    """bitsandbytes 4-bit QuantState: absmax, and for double quant its nested state and offset."""
    if getattr(state, "nested", False):
        counter.add("scales", state.absmax)  # uint8 codes of the absmax
        counter.add("dq_constants", state.state2.absmax)
        counter.add("dq_constants", state.offset)
        counter.add("code_tables", state.state2.code)
    else:
        counter.add("scales", state.absmax)
    counter.add("code_tables", state.code)


def _is_packed_linear(module: torch.nn.Module) -> bool:
    """gptqmodel's GPTQ/AWQ QuantLinear: packed `qweight` codes plus `scales`/`qzeros` (and GPTQ's `g_idx`)."""
    return isinstance(getattr(module, "qweight", None), torch.Tensor) and \
        isinstance(getattr(module, "scales", None), torch.Tensor)


def measure_footprint(model: torch.nn.Module) -> MemoryBreakdown:
    """Count every tensor a (possibly bitsandbytes- or GPTQ/AWQ-quantized) model holds, by component.

    gptqmodel's QuantLinear keeps its state in buffers: qweight counts as codes; scales, qzeros
    and g_idx as scales (the planner's split); its other buffers (kernel lookup tables) and the
    bias as unquantized.
    """
    counter = _Counter()
    quantized_params = 0
    for module in model.modules():
        if _is_packed_linear(module):
            counter.add("codes", module.qweight)
            for name in ("scales", "qzeros", "g_idx"):
                counter.add("scales", getattr(module, name, None))
            quantized_params += int(module.in_features) * int(module.out_features)
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        scb = getattr(weight, "SCB", None)
        if state is not None:  # bnb Linear4bit
            counter.add("codes", weight)
            _add_quant_state(counter, state)
            quantized_params += int(torch.Size(state.shape).numel())
        elif weight is not None and weight.dtype == torch.int8 and scb is not None:  # bnb Linear8bitLt
            counter.add("codes", weight)
            counter.add("scales", scb)
            quantized_params += weight.numel()
        for name, param in module.named_parameters(recurse=False):
            counter.add("unquantized", param)
        for name, buf in module.named_buffers(recurse=False):
            counter.add("unquantized", buf)
    total = _count_params(model)
    return MemoryBreakdown(counter.bytes, quantized_params, total, "measured")


def _count_params(model: torch.nn.Module) -> int:
    """Logical parameter count (unpacked), each tied tensor once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if _is_packed_linear(module):  # packed buffers, not parameters: count the logical weight
            total += int(module.in_features) * int(module.out_features)
        for _, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            state = getattr(p, "quant_state", None)
            total += int(torch.Size(state.shape).numel()) if state is not None else p.numel()
    return total


# ----------------------------------------------------------------------------------------
# planned (config.json only)
# ----------------------------------------------------------------------------------------


def plan_memory(model_config: dict[str, Any], config: QuantConfig | None, dtype: str = "float32") -> MemoryBreakdown:
    """Predict the footprint of a model under a config from `config.json` alone.

    `config=None` plans the unquantized model in `dtype`. Unquantized tensors (embeddings, norms,
    biases, skipped modules, an untied output head) are counted in `dtype`; transformers' default
    of leaving the output head unquantized is followed, as is the config's skip list.
    """
    from quantlib.schemes import QUANTIZER_MAPPING, is_skipped

    arch: Architecture = describe_architecture(model_config)
    unit = DTYPE_BYTES[dtype]
    parts = {c: 0.0 for c in COMPONENTS}
    parts["unquantized"] += unit * sum(arch.other.values()) + 4 * arch.fp32_buffers
    if arch.lm_head is not None:
        parts["unquantized"] += unit * arch.lm_head.numel
    skip = QUANTIZER_MAPPING[config.quantizer_key].skip_modules(config) if config is not None else []
    quantized = 0
    for layer in arch.linears:
        if layer.bias:
            parts["unquantized"] += unit * layer.out_features
        if config is None or is_skipped(layer.name, skip):
            parts["unquantized"] += unit * layer.numel
            continue
        for comp, nbytes in QUANTIZER_MAPPING[config.quantizer_key].storage_bytes(
                config, layer.out_features, layer.in_features).items():
            parts[comp] += nbytes
        quantized += layer.numel
    notes = [f"unquantized tensors counted in {dtype}"]
    return MemoryBreakdown(parts, quantized, arch.n_params, "planned", notes)



def plan_table(model_config: dict[str, Any], configs: list[QuantConfig | None], dtype: str = "float32",
               available_bytes: float | None = None) -> pd.DataFrame:
    """One row per config: predicted MiB by component, total, bits/param, and whether it fits."""
    rows = []
    for config in configs:
        plan = plan_memory(model_config, config, dtype)
        row = {"scheme": config.label if config is not None else f"unquantized {dtype}"}
        row.update({COMPONENT_LABELS[c]: plan.bytes_by_component[c] / 2**20 for c in COMPONENTS})
        row["total MiB"] = plan.total_bytes / 2**20
        row["bits/param (quantized layers)"] = plan.quantized_bits_per_param
        row["bits/param (whole model)"] = plan.model_bits_per_param
        if available_bytes is not None:
            row["fits"] = plan.total_bytes <= available_bytes
        rows.append(row)
    return pd.DataFrame(rows)


def linear_layers(model: torch.nn.Module) -> list[LinearShape]:
    """Shapes of the model's nn.Linear layers (for cross-checks against `describe_architecture`)."""
    return [LinearShape(n, m.out_features, m.in_features, m.bias is not None)
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
