"""Memory planned from `config.json` alone, with no weights loaded: what a quantized model will occupy, by
component (`plan_memory`), the same breakdown `quantlib.footprint.measure_footprint` counts on a loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from quantlib.configs import QuantConfig
from quantlib.footprint import COMPONENT_LABELS, COMPONENTS, MemoryBreakdown
from quantlib.shapes import DTYPE_BYTES, ForwardMemory, ModelShapes, model_shapes

#: Memory beside the weights, planned from one traced forward (`quantlib.shapes.forward_memory`).
RUNTIME_LABELS = {"kv_cache": "KV cache", "activations": "activations (one forward)"}
#: Bytes per element of the KV cache dtypes the planner offers.
KV_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8": 1}



# ----------------------------------------------------------------------------------------
# planned (config.json only)
# ----------------------------------------------------------------------------------------


@dataclass
class MemoryPlan(MemoryBreakdown):
    """A planned breakdown plus what it is made of: the weights left unquantized, grouped by why."""

    unquantized_detail: list[dict[str, Any]] = field(default_factory=list)  # reason, tensors, params, bytes
    experts_policy: str = ""

    def unquantized_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.unquantized_detail, columns=["why", "tensors", "params", "bytes"])

    def mostly_unquantized(self) -> str | None:
        """Where a config leaves most of the parameters unquantized: how much, and the largest reason, in words;
        None where it quantizes most of them (and for the unquantized model itself)."""
        if not self.total_params or self.quantized_params >= MOSTLY_QUANTIZED * self.total_params:
            return None
        top = max(self.unquantized_detail, key=lambda d: d["bytes"], default=None)
        if top is None or top["why"] == UNQUANTIZED_MODEL:
            return None
        share = 1 - self.quantized_params / self.total_params
        return (f"leaves {share:.0%} of the parameters unquantized; the largest part: {top['why']} "
                f"({top['params'] / 1e9:,.2f} B parameters, {top['bytes'] / 2**30:,.1f} GiB)")


#: A config that quantizes less than this share of the parameters is flagged wherever its plan is shown.
MOSTLY_QUANTIZED = 0.5
#: The reason every tensor of the unquantized model carries.
UNQUANTIZED_MODEL = "unquantized model"


def short_reason(why: str) -> str:
    """A reason without its parenthesised explanation ("fused expert tensors"), for legends."""
    return why.split(" (", 1)[0]


def plan_memory(model_config: dict[str, Any], config: QuantConfig | None, dtype: str = "float32", *,
                shapes: ModelShapes | None = None, trust_remote_code: bool = False) -> MemoryPlan:
    """Predict the footprint of a model under a config from `config.json` alone.

    Every parameter of the model transformers builds on the meta device is counted once: the
    matmul weights the method quantizes at its packed size (per expert for fused expert tensors
    where the method quantizes them), everything else in `dtype` (or fp32 where transformers keeps
    it so), buffers in their own dtype. `config=None` plans the unquantized model.
    """
    from quantlib.registry import quantizer_class

    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype: got {dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
    shapes = shapes if shapes is not None else model_shapes(model_config, trust_remote_code)
    quantizer_cls = quantizer_class(config) if config is not None else None
    problem = quantizer_cls.config_problem(config) if quantizer_cls is not None else None
    if problem is not None:
        from quantlib.errors import QuantlibError

        raise QuantlibError(f"{config.label}: cannot be planned: {problem}")
    decisions = quantizer_cls.classify(config, shapes) if quantizer_cls is not None else {}
    parts = {c: 0.0 for c in COMPONENTS}
    groups: dict[str, list[int]] = {}
    quantized = 0
    for w in shapes.weights:
        reason = decisions.get(w.name, UNQUANTIZED_MODEL) if config is not None else UNQUANTIZED_MODEL
        if reason is None:
            per_matrix = quantizer_cls.model_layer_storage_bytes(config, shapes, w, dtype)
            for comp, nbytes in per_matrix.items():
                parts[comp] += nbytes * w.n_matrices
            quantized += w.numel
            continue
        nbytes = w.bytes_in(dtype)
        parts["unquantized"] += nbytes
        g = groups.setdefault(reason, [0, 0, 0])
        g[0] += 1
        g[1] += w.numel
        g[2] += nbytes
    if shapes.buffers:
        nbytes = shapes.buffer_bytes()
        parts["unquantized"] += nbytes
        groups["buffers (rotary tables and the like, in their own dtype)"] = [len(shapes.buffers), 0, nbytes]
    detail = [{"why": why, "tensors": n, "params": p, "bytes": b}
              for why, (n, p, b) in sorted(groups.items(), key=lambda kv: -kv[1][2])]
    notes = [f"unquantized tensors counted in {dtype}"]
    if any(w.fp32_in for w in shapes.weights) and dtype in ("float16", "bfloat16"):
        notes.append("parameters transformers keeps in fp32 (_keep_in_fp32_modules) counted in fp32")
    policy = quantizer_cls.experts_policy if quantizer_cls is not None and shapes.n_experts else ""
    if policy:
        notes.append(f"{config.quant_method}: {policy}")
    if quantizer_cls is not None:
        notes += quantizer_cls.plan_notes(config, shapes)
    return MemoryPlan(parts, quantized, shapes.n_params, "planned", notes, detail, policy)


def plan_table(model_config: dict[str, Any], configs: list[QuantConfig | None], dtype: str = "float32",
               available_bytes: float | None = None, *, runtime: ForwardMemory | None = None,
               kv_dtype_bytes: float | None = None, trust_remote_code: bool = False) -> pd.DataFrame:
    """One row per config: predicted MiB by component, total, bits/param, and whether it fits.

    With `runtime` (a `quantlib.shapes.ForwardMemory`), the KV cache (priced at `kv_dtype_bytes`
    per element, default its traced dtype) and the activation peak of one forward are added as
    their own columns and counted in the total.
    """
    shapes = model_shapes(model_config, trust_remote_code)
    rows = []
    for config in configs:
        plan = plan_memory(model_config, config, dtype, shapes=shapes)
        row = {"scheme": config.label if config is not None else f"unquantized {dtype}"}
        row.update({COMPONENT_LABELS[c]: plan.bytes_by_component[c] / 2**20 for c in COMPONENTS})
        total = plan.total_bytes
        if runtime is not None:
            kv = runtime.kv_bytes_as(kv_dtype_bytes) if kv_dtype_bytes is not None else runtime.kv_bytes
            row[RUNTIME_LABELS["kv_cache"]] = (kv + runtime.state_bytes) / 2**20
            row[RUNTIME_LABELS["activations"]] = runtime.activation_peak_bytes / 2**20
            total += kv + runtime.state_bytes + runtime.activation_peak_bytes
        row["total MiB"] = total / 2**20
        row["bits/param (quantized layers)"] = plan.quantized_bits_per_param
        row["bits/param (whole model)"] = plan.model_bits_per_param
        if available_bytes is not None:
            row["fits"] = total <= available_bytes
        row["warning"] = plan.mostly_unquantized() or ""
        rows.append(row)
    return pd.DataFrame(rows)


def stored_quantization(model_config: dict[str, Any]) -> tuple[QuantConfig | None, str | None]:
    """What an already-quantized checkpoint stores, from its config.json's `quantization_config`.

    (config, None) when quantlib knows the method, so the checkpoint can be planned as stored;
    (None, why) when it names a method quantlib cannot plan; (None, None) for a plain checkpoint.
    """
    from quantlib.configs import ConfigError
    from quantlib.registry import parse_config

    stored = model_config.get("quantization_config") if isinstance(model_config, dict) else None
    if not stored:
        return None, None
    if not isinstance(stored, dict):
        return None, "quantization_config in config.json is not a JSON object"
    try:
        return parse_config(stored), None
    except ConfigError as exc:
        return None, (f"this checkpoint is stored quantized with quant_method {stored.get('quant_method')!r}, which "
                      f"quantlib cannot plan ({exc}); the figures below treat its weights as unquantized")
