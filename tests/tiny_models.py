"""Tiny models built from a config inside the tests: real transformers models, seconds to load."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

logging.getLogger("transformers").setLevel(logging.ERROR)


def tiny_llama_config(**overrides) -> LlamaConfig:
    """Widths chosen to be multiples of 64 so every block and group scheme fits."""
    params = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2)
    params.update(overrides)
    return LlamaConfig(**params)


def save_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny Llama saved as safetensors, with weights scaled like a trained model's."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.save_pretrained(folder, safe_serialization=True)
    return folder
