"""Shared test setup.

QUANTLIB_CACHE points at the repo's gitignored .cache/ so the default model's one-time GGUF
conversion (~25 s) happens once per machine, not once per test run. Fixtures here build a
tiny Llama (char-level tokenizer, 2 layers) in a temp folder so most model tests take
milliseconds; `default_model` loads the real SmolLM2 once per session (slow tests only).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("QUANTLIB_CACHE", str(REPO / ".cache" / "quantlib"))

TINY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-()\n"


def build_tiny_tokenizer():
    """Char-level fast tokenizer with <s>/</s>/<unk>: no network, builds in milliseconds."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in TINY_CHARS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama_config(vocab_size: int, **overrides):
    """A 2-layer Llama small enough to build and run instantly (GQA included)."""
    from transformers import LlamaConfig

    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """Folder with config.json + model.safetensors + tokenizer files of a random tiny Llama."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer)))
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def default_model():
    """The real default model, loaded once per session (converts on first use per machine)."""
    from quantlib.models import load_model

    return load_model("default")


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (see tests/e2e_support.py for the flags)."""
    from playwright.sync_api import expect, sync_playwright

    from tests.e2e_support import launch_chromium

    # Streamlit reruns take seconds on a loaded 2-core machine; expect()'s 5 s default flaked in CI.
    expect.set_options(timeout=60_000)
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser context per test, downloads allowed, generous timeouts for model runs."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(90_000)
    try:
        yield page
    finally:
        context.close()


def pytest_report_header(config):
    """First lines of every run: the CPU and the kernel paths it picks, so a failure on another CPU explains itself."""
    from quantlib.registry import cpu_kernel_summaries
    from quantlib.runtime import cpu_features, cpu_features_text

    return [cpu_features_text(cpu_features()), *cpu_kernel_summaries()]
