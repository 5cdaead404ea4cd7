"""Streamed checkpoint analysis (issue 14): tensor by tensor from safetensors, equal to the in-memory path to the
bit, problems reported, interrupted runs kept and resumed, and (slow) a ~1B-parameter fp16 checkpoint analyzed
under a memory budget smaller than the checkpoint, measured as the peak RSS of the analyzing process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantlib.layers import layer_errors
from quantlib.checkpoint import CheckpointError, analyze_checkpoint, checkpoint_files, iter_rows
from quantlib.registry import get_quantizer
from quantlib.presets import preset

REPO = Path(__file__).resolve().parents[1]
ERROR_COLUMNS = ["layer", "out_features", "in_features", "rel_fro_error", "bits_per_param", "code_entropy_bits"]


@pytest.fixture(scope="module")
def sharded_fp16(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random tiny Llama saved in fp16, in several shards with an index."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("sharded")
    model = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer))).to(torch.float16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
    tiny_tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.mark.parametrize("name", ["nf4-dq", "fp4", "int8", "rtn-int4-g64-asym", "gguf-q4_0", "hqq-int4-g64"])
@pytest.mark.parametrize("dtype", [None, "float32"])
def test_streamed_rows_equal_the_in_memory_path(sharded_fp16, name, dtype):
    from quantlib.models import load_model

    config = preset(name)
    streamed = analyze_checkpoint(sharded_fp16, config, dtype=dtype)
    assert streamed.complete and not streamed.problems
    loaded = load_model(str(sharded_fp16), dtype=torch.float16 if dtype is None else torch.float32)
    in_memory = layer_errors(loaded.model, get_quantizer(config, device="cpu"))
    assert len(set(checkpoint_files(sharded_fp16).values())) > 1  # really several shards
    left = streamed.layers[in_memory.columns.intersection(streamed.layers.columns)]
    assert list(left.columns) == list(in_memory.columns)
    assert left.equals(in_memory), (left.compare(in_memory) if left.shape == in_memory.shape else left.shape)
    assert (streamed.layers["dtype"] == ("float16" if dtype is None else "float32")).all()
    row = streamed.layers.iloc[0]
    assert row["packed_bytes"] == pytest.approx(sum(row["storage"].values()))
    assert sum(row["histogram"]["counts"]) == row["out_features"] * row["in_features"]
    assert row["weight_stats"]["kurtosis"] > 0


def test_absent_and_misshapen_layers_are_reported(sharded_fp16, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(sharded_fp16, folder)
    files = checkpoint_files(folder)
    gone, bent = "model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    for name in (gone, bent):
        path = files[name]
        tensors = load_file(str(path))
        if name == gone:
            tensors.pop(name)
        else:
            tensors[name] = tensors[name][:, :32].contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(gone)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    result = analyze_checkpoint(folder, preset("nf4"))
    problems = {p["layer"]: p["problem"] for p in result.problems}
    assert problems["model.layers.0.mlp.down_proj"] == "absent from the checkpoint"
    assert "stored shape (64, 32)" in problems["model.layers.1.self_attn.q_proj"]
    assert len(result.layers) == 12  # 14 quantized layers, two reported


def test_an_interrupted_run_keeps_its_layers_and_resumes(sharded_fp16, tmp_path):
    out = tmp_path / "out"
    full = analyze_checkpoint(sharded_fp16, preset("nf4"))
    calls = []
    partial = analyze_checkpoint(sharded_fp16, preset("nf4"), out=out,
                                 cancel=lambda: calls.append(1) or len(calls) > 5)
    assert not partial.complete and len(partial.layers) == 5
    kept = list(iter_rows(out / "layers.jsonl"))
    assert [r["layer"] for r in kept] == list(full.layers["layer"][:5])
    with open(out / "layers.jsonl", "a", encoding="utf-8") as handle:  # a crash in the middle of a line
        handle.write('{"layer": "model.layers.0.ml')
    resumed = analyze_checkpoint(sharded_fp16, preset("nf4"), out=out)
    assert resumed.complete and resumed.resumed == 5
    assert list(resumed.layers["layer"]) == list(full.layers["layer"])
    assert resumed.layers["rel_fro_error"].tolist() == full.layers["rel_fro_error"].tolist()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["layers"] == 14
    # another config does not resume from these rows
    other = analyze_checkpoint(sharded_fp16, preset("fp4"), out=out)
    assert other.resumed == 0


def test_calibrated_methods_and_folders_without_safetensors_are_refused(sharded_fp16, tmp_path):
    with pytest.raises(Exception, match="calibration-based|not installed"):
        analyze_checkpoint(sharded_fp16, preset("gptq-int4-g64"))
    (tmp_path / "config.json").write_text((sharded_fp16 / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        analyze_checkpoint(tmp_path, preset("nf4"))


def test_cli_inspect_all_layers_writes_rows(sharded_fp16, tmp_path, capsys):
    from quantlib.cli import main

    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(preset("nf4").to_dict()))
    out = tmp_path / "analysis"
    assert main(["inspect", "--model", str(sharded_fp16), "--config", str(config), "--all-layers", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "14 layers" in printed and "model.layers.1.mlp.down_proj" in printed
    assert len(list(iter_rows(out / "layers.jsonl"))) == 14
    assert (out / "layers.csv").read_text().startswith("layer,")


# ------------------------------------------------------------------------------ bigger than the budget

BUDGET_GB = 1.5


def write_synthetic_checkpoint(folder: Path, *, hidden: int, intermediate: int, layers: int, vocab: int,
                               shard_bytes: int = 600 * 2**20) -> int:
    """A Llama checkpoint of random fp16 weights, written shard by shard (never the whole model in memory);
    returns its parameter count."""
    from transformers import LlamaConfig

    from quantlib.checkpoint import ShardWriter

    heads = hidden // 64
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 8), vocab_size=vocab,
                      tie_word_embeddings=False, torch_dtype="float16")
    cfg.save_pretrained(folder)
    kv = cfg.num_key_value_heads * 64
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    generator = torch.Generator().manual_seed(0)
    writer = ShardWriter(folder, "model", shard_bytes)
    total = 0
    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)
        total += t.numel()
        writer.add(name, t)
    writer.close()
    return total


@pytest.mark.slow
def test_a_checkpoint_bigger_than_the_budget_streams_under_it(tmp_path):
    params = write_synthetic_checkpoint(tmp_path, hidden=2048, intermediate=5632, layers=22, vocab=32000)
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert params > 1.0e9 and on_disk > BUDGET_GB * 1e9  # bigger than the budget the test enforces
    script = (
        "import json, sys\n"
        "from quantlib.runtime import vm_hwm\n"
        "from quantlib.checkpoint import analyze_checkpoint\n"
        "from quantlib.presets import preset\n"
        f"r = analyze_checkpoint({str(tmp_path)!r}, preset('nf4'), out={str(tmp_path / 'out')!r})\n"
        "peak = vm_hwm()\n"
        "print(json.dumps({'peak': peak, 'layers': len(r.layers), 'problems': r.problems,"
        " 'gbps': r.gb_per_second, 'read': r.bytes_read}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["layers"] == 22 * 7 and not result["problems"]
    assert result["peak"] < BUDGET_GB * 1e9, result  # the whole process, torch included
    assert result["read"] > 1.9e9  # every quantized tensor was read (fp16: 2 bytes per weight)


def test_inspect_page_streams_every_layer(sharded_fp16, tmp_path, monkeypatch):
    from tests.apptest_support import page_on_folder

    monkeypatch.setenv("QUANTLIB_CACHE", str(tmp_path))
    at = page_on_folder("2_Quantize_and_Inspect.py", "inspect", sharded_fp16)
    at.button(key="inspect.stream.run").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any(h.value == "Every layer, streamed from the checkpoint" for h in at.header)
    assert any("14 layers, complete" in c.value for c in at.caption)
    assert len(at.dataframe[-1].value) == 14
    assert list((tmp_path / "checkpoint-analysis").rglob("layers.jsonl"))  # kept on disk as it went
