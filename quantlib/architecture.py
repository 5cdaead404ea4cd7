"""The shapes of a model's weights, read from its `config.json` alone (no weights loaded).

The memory planner and the pre-flight checks (group size fits? enough RAM?) need every linear
layer's shape and the size of everything else before a single weight is read. Decoder-only
families that share the Llama layout (Llama, Mistral, Qwen2/3, Gemma, Phi-3 style MLPs) and GPT-2
are understood; anything else is refused with a message naming the missing keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quantlib.errors import QuantlibError


class ArchitectureError(QuantlibError, ValueError):
    """The config.json does not describe a model whose shapes we can derive."""


@dataclass(frozen=True)
class LinearShape:
    """One linear layer: its module name pattern, output and input features, and bias."""

    name: str
    out_features: int
    in_features: int
    bias: bool = False

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class Architecture:
    """Every weight of a model, grouped the way quantizers see them."""

    model_type: str
    linears: tuple[LinearShape, ...]  # quantizable linear layers, one entry per layer instance
    other: dict[str, int] = field(default_factory=dict)  # unquantized tensors: name -> numel
    lm_head: LinearShape | None = None  # None when tied to the input embedding
    tied_embeddings: bool = True
    fp32_buffers: int = 0  # elements of non-parameter buffers kept in fp32 (rotary inv_freq)

    @property
    def n_params(self) -> int:
        head = self.lm_head.numel if self.lm_head is not None else 0
        biases = sum(l.out_features for l in self.linears if l.bias)
        return sum(l.numel for l in self.linears) + biases + sum(self.other.values()) + head


def _need(cfg: dict[str, Any], *keys: str) -> list[int]:
    missing = [k for k in keys if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool)]
    if missing:
        raise ArchitectureError(f"config.json lacks integer field(s) {', '.join(missing)} "
                                f"(model_type {cfg.get('model_type', 'unknown')!r})")
    return [int(cfg[k]) for k in keys]


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config: multimodal configs nest it under `text_config`."""
    nested = cfg.get("text_config")
    if isinstance(nested, dict) and "hidden_size" not in cfg:
        return {**nested, "tie_word_embeddings": cfg.get("tie_word_embeddings", nested.get("tie_word_embeddings", True))}
    return cfg


def describe_architecture(cfg: dict[str, Any]) -> Architecture:
    """Shapes of all weights for a `config.json` dict (a nested `text_config` is used if present)."""
    if not isinstance(cfg, dict):
        raise ArchitectureError("config.json must be a JSON object")
    cfg = text_config(cfg)
    model_type = str(cfg.get("model_type", ""))
    if model_type == "gpt2" or ("n_embd" in cfg and "n_layer" in cfg):
        return _gpt2(cfg)
    return _llama_like(cfg, model_type or "llama")


def _llama_like(cfg: dict[str, Any], model_type: str) -> Architecture:
    hidden, inter, layers, heads, vocab = _need(cfg, "hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "vocab_size")
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    attn_bias = bool(cfg.get("attention_bias", model_type in ("qwen2",)))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    per_layer = [
        ("self_attn.q_proj", heads * head_dim, hidden, attn_bias),
        ("self_attn.k_proj", kv_heads * head_dim, hidden, attn_bias),
        ("self_attn.v_proj", kv_heads * head_dim, hidden, attn_bias),
        ("self_attn.o_proj", hidden, heads * head_dim, bool(cfg.get("attention_bias", False))),
        ("mlp.gate_proj", inter, hidden, mlp_bias),
        ("mlp.up_proj", inter, hidden, mlp_bias),
        ("mlp.down_proj", hidden, inter, mlp_bias),
    ]
    linears = tuple(
        LinearShape(f"model.layers.{i}.{name}", out, inp, bias)
        for i in range(layers) for name, out, inp, bias in per_layer
    )
    norms_per_layer = 2 * hidden + (2 * head_dim if model_type in ("qwen3", "olmo2", "gemma3") else 0)
    other = {"model.embed_tokens.weight": vocab * hidden, "norms": layers * norms_per_layer + hidden}
    tied = bool(cfg.get("tie_word_embeddings", False))
    head = None if tied else LinearShape("lm_head", vocab, hidden)
    # Rotary embeddings keep inv_freq and original_inv_freq (head_dim/2 each) as fp32 buffers.
    return Architecture(model_type, linears, other, head, tied, fp32_buffers=head_dim)


def _gpt2(cfg: dict[str, Any]) -> Architecture:
    hidden, layers, vocab = _need(cfg, "n_embd", "n_layer", "vocab_size")
    positions = int(cfg.get("n_positions") or 1024)
    inner = int(cfg.get("n_inner") or 4 * hidden)
    per_layer = [("attn.c_attn", 3 * hidden, hidden), ("attn.c_proj", hidden, hidden),
                 ("mlp.c_fc", inner, hidden), ("mlp.c_proj", hidden, inner)]
    linears = tuple(LinearShape(f"transformer.h.{i}.{n}", o, k, True) for i in range(layers) for n, o, k in per_layer)
    other = {"transformer.wte.weight": vocab * hidden, "transformer.wpe.weight": positions * hidden,
             "norms": layers * 4 * hidden + 2 * hidden}
    tied = bool(cfg.get("tie_word_embeddings", True))
    head = None if tied else LinearShape("lm_head", vocab, hidden)
    return Architecture("gpt2", linears, other, head, tied)
