"""Pure helpers of the Memory Planner: architecture numbers -> config.json, config choices, budgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app_support.presets import BUILDER_PREFIX, PRESETS, preset_config
from quantlib.configs import QuantConfig
from quantlib.registry import parse_config

#: SmolLM2-135M-Instruct's shapes, the starting values of the "architecture numbers" form.
SMOLLM2_ARCH = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                "tie_word_embeddings": True}
ARCH_FIELDS = {
    "hidden_size": "Hidden size",
    "intermediate_size": "Intermediate (MLP) size",
    "num_hidden_layers": "Layers",
    "num_attention_heads": "Attention heads",
    "num_key_value_heads": "KV heads",
    "vocab_size": "Vocabulary",
}
UNQUANTIZED = "unquantized"



def arch_config(numbers: dict[str, Any]) -> dict[str, Any]:
    """A Llama-style config.json dict from typed-in numbers; ValueError names what is inconsistent."""
    cfg = {"model_type": "llama", **{k: int(numbers[k]) for k in ARCH_FIELDS},
           "tie_word_embeddings": bool(numbers.get("tie_word_embeddings", True))}
    problems = [f"{label} must be at least 1" for k, label in ARCH_FIELDS.items() if cfg[k] < 1]
    if not problems:
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            problems.append(f"hidden size {cfg['hidden_size']} is not divisible by the "
                            f"{cfg['num_attention_heads']} attention heads")
        if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
            problems.append(f"{cfg['num_attention_heads']} attention heads cannot be shared evenly by "
                            f"{cfg['num_key_value_heads']} KV heads")
    if problems:
        raise ValueError("; ".join(problems) + ".")
    return cfg


@dataclass(frozen=True)
class Choice:
    name: str  # unique display name (table row, bar)
    config: QuantConfig | None  # None: the unquantized model


def config_choices(builder: dict[str, Any] | None, builder_label: str | None = None) -> dict[str, Choice]:
    """Every config the planner offers: the presets, then the Config Builder's current config."""
    out = {name: Choice(name, preset_config(name)) for name in PRESETS}
    if builder is not None:
        config = parse_config(builder)
        name = BUILDER_PREFIX + (builder_label or config.label)
        out[name] = Choice(name, config)
    return out


def shape_problem(config: QuantConfig, model_config: dict[str, Any], model_name: str) -> str | None:
    """Why a config cannot quantize a model (layers its group or block size does not fit), or None:
    the method's own `shape_problem` on every layer it quantizes (`quantlib.methods.preflight`)."""
    from quantlib.registry import preflight

    problems = preflight(config, model_config)
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more layers)" if len(problems) > 3 else ""
    return (f"{len(problems)} layer(s) of {model_name} do not fit this config, so quantizing it would fail: "
            + "; ".join(problems[:3]) + more + ".")


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def memory_sources() -> dict[str, tuple[float, str]]:
    """name -> (bytes available, explanation) for this machine's CPU RAM and, with CUDA, GPU memory."""
    import psutil

    vm = psutil.virtual_memory()
    out = {"CPU RAM (available)": (float(vm.available), f"{gib(vm.available)} available of {gib(vm.total)} "
                                                          "(psutil)")}
    from quantlib.runtime import cuda_available

    if cuda_available():
        import torch

        free, total = torch.cuda.mem_get_info()
        out["GPU memory (free)"] = (float(free), f"{gib(free)} free of {gib(total)} on "
                                                 f"{torch.cuda.get_device_name(0)}")
    return out
