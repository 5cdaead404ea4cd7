"""Offloaded evaluation (issue 14): every model through accelerate's device_map="auto" with a memory limit and the
rest on disk, schemes from a streamed checkpoint of their dequantized weights. On a tiny model small enough for
both paths, the offloaded figures equal the in-memory comparison's; methods whose numbers a weight checkpoint
cannot reproduce are refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch

from quantlib.offload import (OffloadError, OffloadSettings, compare_offloaded, offload_problems,
                              write_simulated_checkpoint)
from quantlib.presets import preset

TINY_LIMIT_GIB = 40_000 / 2**30  # 40 kB: almost every module of the tiny model goes to disk


def test_offloaded_comparison_equals_the_in_memory_one(tiny_llama_dir, tmp_path, monkeypatch):
    """An offloaded NF4 model computes `x @ dequantize(W).T` in the model's dtype: bitsandbytes' dequantize path.
    Where bitsandbytes takes its fused AVX512-BF16 kernel instead (its own check says so), the run says which path
    its figures are, and the in-memory comparison it must equal is the one on that same path (each Linear4bit asks
    `has_avx512bf16` when it is built; answering no puts it on the dequantize path on any CPU)."""
    import bitsandbytes.nn.modules

    from quantlib.compare import CompareSettings, run_comparison
    from quantlib.methods.bitsandbytes import _bnb_cpu

    monkeypatch.setenv("QUANTLIB_RUNS_DIR", str(tmp_path / "runs"))
    configs = [preset("nf4"), preset("rtn-int4-g64-asym")]
    estimates = []
    result = compare_offloaded(configs, source=str(tiny_llama_dir), settings=OffloadSettings(TINY_LIMIT_GIB),
                               max_tokens=128, window=64, on_estimate=lambda s, b: estimates.append((s, b)))
    assert estimates and estimates[0][0] > 0 and "decoder blocks timed" in estimates[0][1]
    assert result.table["offloaded"].all()
    assert any("on disk" in n and not n.split("; ")[-1].startswith("0 of") for n in result.notes), result.notes
    path_notes = [n for n in result.notes if n.startswith("NF4: evaluated offloaded as")]
    if _bnb_cpu.four_bit_path() == _bnb_cpu.DEQUANT_4BIT:
        assert path_notes == []
    else:
        assert len(path_notes) == 1 and f"its own layers run the {_bnb_cpu.four_bit_path()}" in path_notes[0]
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)
    memory = run_comparison(configs, CompareSettings(source=str(tiny_llama_dir), max_tokens=128, window=64,
                                                     baseline_cache=False), save=False)
    for label in ("NF4", "RTN int4 g64 asym"):
        off = result.table[result.table["scheme"] == label].iloc[0]
        mem = memory.table[memory.table["scheme"] == label].iloc[0]
        assert off["perplexity"] == pytest.approx(mem["perplexity"], rel=1e-6)
        assert off["kl"] == pytest.approx(mem["kl"], rel=1e-5, abs=1e-9)
        assert off["top1_agreement"] == mem["top1_agreement"]
    base_off = result.table.iloc[0]
    base_mem = memory.table[memory.table["scheme"].str.startswith("baseline")].iloc[0]
    assert base_off["perplexity"] == pytest.approx(base_mem["perplexity"], rel=1e-6)


def test_simulated_checkpoint_holds_the_dequantized_weights(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from quantlib.registry import get_quantizer

    out = tmp_path / "sim"
    written = write_simulated_checkpoint(str(tiny_llama_dir), preset("nf4"), out)
    assert written["layers"] == 14 and (out / "config.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in set(index["weight_map"].values()):
        tensors.update(load_file(str(out / shard)))
    original = {}
    for path in tiny_llama_dir.glob("*.safetensors"):
        original.update(load_file(str(path)))
    q = get_quantizer(preset("nf4"), device="cpu")
    name = "model.layers.1.mlp.down_proj"
    expected = q.quantize_layer(name, original[name + ".weight"]).dequantize()
    assert torch.equal(tensors[name + ".weight"], expected)
    assert torch.equal(tensors["model.norm.weight"], original["model.norm.weight"])  # untouched
    assert not list(tmp_path.glob(".sim.*"))  # no staging folder left behind


def test_methods_that_cannot_run_offloaded_are_refused_with_the_reason(tiny_llama_dir):
    problems = offload_problems([preset("int8"), preset("gptq-int4-g64"), preset("nf4"), preset("hqq-int4-g64")],
                                "float32")
    assert len(problems) == 2
    assert "activations at run time" in problems[0] and "calibration-based" in problems[1]
    with pytest.raises(OffloadError, match="cannot run offloaded: INT8"):
        compare_offloaded([preset("int8")], source=str(tiny_llama_dir), settings=OffloadSettings(1.0))
    with pytest.raises(OffloadError, match="max_memory_gib"):
        OffloadSettings(0).max_memory()


def test_cli_compare_offload(tiny_llama_dir, capsys):
    from quantlib.cli import main

    assert main(["compare", "--model", str(tiny_llama_dir), "--preset", "nf4", "--offload", "--max-memory-gib",
                 str(TINY_LIMIT_GIB), "--tokens", "64", "--window", "64", "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert "estimated evaluation time" in captured.err and "ran offloaded" in captured.err
    rows = json.loads(captured.out)
    assert [r["scheme"] for r in rows] == ["baseline float32", "NF4"] and all(r["offloaded"] for r in rows)


def test_compare_page_runs_offloaded(tiny_llama_dir, tmp_path, monkeypatch):
    from tests.apptest_support import page_on_folder

    monkeypatch.setenv("QUANTLIB_RUNS_DIR", str(tmp_path / "runs"))
    at = page_on_folder("3_Compare_Schemes.py", "compare", tiny_llama_dir)
    at.multiselect(key="compare.configs").set_value(["NF4", "RTN int8 channel"])
    at.number_input(key="compare.tokens").set_value(64)
    at.number_input(key="compare.window").set_value(64)
    at.checkbox(key="compare.offload.on").check().run()
    at.number_input(key="compare.offload.gib").set_value(0.01).run()
    assert not at.exception, [e.message for e in at.exception]
    at.button(key="compare.run").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any(h.value == "Results (offloaded)" for h in at.header)
    table = at.table[0].value
    assert list(table["scheme"]) == ["baseline float32", "NF4", "RTN int8 channel"]
    assert table["offloaded"].all()
    assert any("Estimated evaluation time" in i.value for i in at.info)
    # INT8 is refused with the reason before anything runs
    at.multiselect(key="compare.configs").set_value(["NF4", "INT8 (t=6)"]).run()
    assert any("activations at run time" in e.value for e in at.error)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_offload_note_follows_bitsandbytes_own_check(monkeypatch, bf16):
    """Both branches on any CPU: only where bitsandbytes would take its fused kernel do 4-bit rows say that the
    offloaded figures are its dequantize path's; LLM.int8() is refused offloaded anyway."""
    import bitsandbytes.functional as bnbf

    from quantlib.registry import quantizer_class

    monkeypatch.setattr(bnbf, "has_avx512bf16", lambda: bf16)
    nf4, int8 = preset("nf4"), preset("int8")
    note = quantizer_class(nf4).offload_kernel_note(nf4, "float32")
    if bf16:
        assert note.startswith("NF4: evaluated offloaded as bitsandbytes dequantize_4bit + F.linear")
        assert "fused AVX512-BF16" in note
    else:
        assert note is None
    assert quantizer_class(int8).offload_kernel_note(int8, "float32") is None
