"""What a model in memory occupies, tensor by tensor, by component.

`get_memory_footprint()` in transformers misses bitsandbytes' quant state (NF4 with and without
double quantization report the same size), so `measure_footprint` walks every module and counts
every tensor it holds (codes, absmax, nested absmax, offsets, code tables, SCB), each storage once.
`MemoryBreakdown` is the one shape of a memory figure: measured here, packed by a simulating quantizer, or
planned from `config.json` by `quantlib.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from quantlib.formats import MEMORY_COMPONENTS

COMPONENTS = (*MEMORY_COMPONENTS, "unquantized")
COMPONENT_LABELS = {
    "codes": "quantized codes",
    "scales": "scales / absmax",
    "dq_constants": "double-quant constants",
    "code_tables": "code tables / layer metadata",
    "unquantized": "unquantized (embeddings, norms, skipped layers, biases)",
}
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
