"""Outliers, block histograms, figures and the run store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from quantlib import figures
from quantlib.codebooks import FP4_LEVELS, NF4_LEVELS
from quantlib.distributions import block_normalize, block_normalized_histogram
from quantlib.footprint import MemoryBreakdown
from quantlib.models import load_model
from quantlib.outliers import activation_outliers, weight_outlier_stats, weight_outlier_table
from quantlib.runs import Run, RunStoreError, list_runs, load_run, new_run_id, now_iso, save_run


def test_weight_outlier_stats_on_known_distributions() -> None:
    torch.manual_seed(0)
    normal = weight_outlier_stats(torch.randn(1_000_000))
    assert normal["kurtosis"] == pytest.approx(3.0, abs=0.05)
    assert normal["frac_beyond_6sigma"] < 1e-5
    spiky = torch.randn(100_000)
    spiky[:10] = 100.0
    stats = weight_outlier_stats(spiky)
    assert stats["kurtosis"] > 50 and stats["frac_beyond_6sigma"] == pytest.approx(1e-4)
    assert stats["max_over_sigma"] > 20


def test_activation_outliers_follow_the_threshold(tiny_llama_dir) -> None:
    loaded = load_model(str(tiny_llama_dir))
    model = loaded.model
    # Plant an outlier feature: scale one hidden dimension of the input norm so that q/k/v see it.
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 500.0
    ids = torch.randint(3, 60, (400,))
    scan = activation_outliers(model, ids, batch_tokens=128, max_batches=3, bos_token_id=1)
    assert scan.n_tokens == 3 * 128
    table = scan.table(threshold=6.0)
    q = table.set_index("layer").loc["model.layers.0.self_attn.q_proj"]
    assert q["outlier_dims"] >= 1 and q["max_abs_activation"] > 6.0
    # A higher threshold can only flag fewer dimensions; an enormous one flags none.
    assert (scan.table(20.0)["outlier_dims"] <= table["outlier_dims"]).all()
    assert scan.summary(1e9)["fp16_fraction"] == 0.0
    assert len(weight_outlier_table(model)) == len(table)


def test_block_histogram_is_normalized_and_carries_levels() -> None:
    torch.manual_seed(0)
    w = torch.randn(100, 70)  # 7000 elements: the last block is partial
    normalized = block_normalize(w, 64)
    assert normalized.abs().max() == pytest.approx(1.0)
    assert (normalized.abs() == 1.0).sum() >= 7000 // 64
    hist = block_normalized_histogram(w, 64, bins=64)
    assert sum(hist.counts) == 7000 and len(hist.edges) == 65
    assert hist.levels["NF4"] == [float(v) for v in NF4_LEVELS] and len(hist.levels["FP4"]) == 16
    fig = figures.histogram_figure(hist)
    names = [t.name for t in fig.data]
    assert any("NF4" in n for n in names) and any("FP4" in n for n in names)
    nf4_trace = next(t for t in fig.data if "NF4" in t.name)
    assert sorted({x for x in nf4_trace.x if x is not None}) == sorted(set(hist.levels["NF4"]))


def test_figures_are_built_from_tables() -> None:
    table = pd.DataFrame({"scheme": ["a", "b"], "memory_mib": [1.0, 2.0], "perplexity": [10.0, 9.0], "kl": [0.1, 0.0]})
    assert len(figures.tradeoff_figure(table).data) == 2
    assert list(figures.kl_figure(table).data[0].y) == [0.1, 0.0]
    mem = {"x": MemoryBreakdown({"codes": 2**20, "scales": 0, "dq_constants": 0, "code_tables": 0,
                                 "unquantized": 2**21}, 10, 20, "planned")}
    fig = figures.memory_figure(mem)
    assert sum(t.y[0] for t in fig.data) == pytest.approx(3.0)
    errors = pd.DataFrame({"scheme": ["a", "a", "b", "b"], "layer": ["l1", "l2", "l1", "l2"],
                           "rel_fro_error": [0.1, 0.2, 0.3, 0.4]})
    assert [t.name for t in figures.layer_error_figure(errors).data] == ["a", "b"]
    fig = figures.code_usage_figure([1] * 16, [float(v) for v in FP4_LEVELS], 4.0, "FP4")
    assert "4.000" in fig.layout.title.text


def _run(tmp_path) -> Run:
    return Run(run_id=new_run_id(), created=now_iso(), model={"source": "default"}, configs=[{"label": "NF4"}],
               settings={"backend": "cpu"}, environment={}, tables={"summary": pd.DataFrame({"a": [1.5, 2.5]})})


def test_runs_round_trip_and_list(tmp_path) -> None:
    run = _run(tmp_path)
    path = save_run(run, tmp_path)
    loaded = load_run(run.run_id, tmp_path)
    assert loaded.tables["summary"]["a"].tolist() == [1.5, 2.5]
    assert load_run(path).run_id == run.run_id
    (tmp_path / "broken.run.json").write_text("{not json")
    listing = list_runs(tmp_path)
    assert run.run_id in listing["run_id"].tolist()
    assert listing["status"].str.startswith("unreadable").any()
    with pytest.raises(RunStoreError, match="broken.run.json"):
        load_run(tmp_path / "broken.run.json")
    with pytest.raises(RunStoreError, match="no saved run"):
        load_run("nope", tmp_path)


def test_a_killed_write_leaves_no_half_written_run(tmp_path) -> None:
    """Kill a writer mid-way (SIGKILL): the store holds the old complete file or nothing, never half."""
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        import quantlib.runs as runs
        real_fdopen = os.fdopen
        class Slow:
            def __init__(self, h): self.h = h
            def __enter__(self): return self
            def __exit__(self, *a): return self.h.__exit__(*a)
            def write(self, text):
                self.h.write(text[: len(text) // 2]); self.h.flush()
                print("HALF", flush=True); time.sleep(60)
            def __getattr__(self, name): return getattr(self.h, name)
        os.fdopen = lambda *a, **k: Slow(real_fdopen(*a, **k))
        runs.atomic_write_text(runs.Path({str(tmp_path)!r}) / "x.run.json", '{{"run_id": "new"}}' * 1000)
    """)
    (tmp_path / "x.run.json").write_text('{"run_id": "old"}')
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HALF"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / "x.run.json").read_text()) == {"run_id": "old"}
    assert [p.name for p in tmp_path.glob("*.run.json")] == ["x.run.json"]


def test_activation_scan_ignores_forward_passes_of_other_threads(tiny_llama_dir) -> None:
    """A model cached for several app sessions: another thread's forward must not leak into the scan."""
    import threading

    model = load_model(str(tiny_llama_dir)).model
    with torch.no_grad():
        model.model.embed_tokens.weight[5] *= 1000  # the other session's token makes huge activations
    ids = torch.randint(6, 60, (128,))  # this scan never sees token 5
    alone = activation_outliers(model, ids, batch_tokens=128, max_batches=1)
    stop = threading.Event()

    def other_session() -> None:
        loud = torch.full((1, 32), 5, dtype=torch.long)
        with torch.inference_mode():
            while not stop.is_set():
                model(loud)

    thread = threading.Thread(target=other_session)
    thread.start()
    try:
        shared = activation_outliers(model, ids, batch_tokens=128, max_batches=1)
    finally:
        stop.set()
        thread.join()
    for name, absmax in alone.dim_absmax.items():
        assert torch.allclose(shared.dim_absmax[name], absmax), name


def test_tradeoff_chart_draws_the_paired_interval() -> None:
    """The issue's run: NF4 33.07 ± 2.97 against a baseline of 27.12 ± 2.55 overlap as perplexities, but the paired
    ln(PPL ratio) is 0.198 ± 0.022, nine SE from zero: the chart draws the paired quantity and its interval."""
    import math

    table = pd.DataFrame({"scheme": ["baseline float32", "NF4", "FP4"], "memory_mib": [513.0, 165.0, 166.0],
                          "perplexity": [27.12, 33.07, 36.0], "perplexity_se": [2.55, 2.97, 3.1],
                          "ln_ppl_ratio": [0.0, 0.198, 0.28], "ln_ppl_ratio_se": [0.0, 0.022, 0.03]})
    fig = figures.tradeoff_figure(table)
    base, nf4, fp4 = fig.data
    assert base.y[0] == 0.0 and base.error_y.array is None  # the baseline is the reference, no bar
    assert nf4.y[0] == pytest.approx(100 * (math.exp(0.198) - 1))
    lower = nf4.y[0] - nf4.error_y.arrayminus[0]
    assert lower == pytest.approx(100 * (math.exp(0.198 - 2 * 0.022) - 1)) and lower > 0  # clear of the baseline
    assert nf4.error_y.array[0] == pytest.approx(100 * (math.exp(0.198 + 2 * 0.022) - 1) - nf4.y[0])
    assert "paired" in fig.layout.yaxis.title.text and "2 SE" in fig.layout.yaxis.title.text
    assert nf4.textposition != fp4.textposition  # neighbours by memory: labels on opposite sides
    assert "33.07 ± 2.97" in nf4.hovertext[0] or "33.07 ± 3" in nf4.hovertext[0]


def test_memory_chart_names_what_stays_unquantized() -> None:
    """A MoE under bitsandbytes: the legend's unquantized part names the fused experts (largest first), and the
    plan itself says the config leaves most of the model unquantized."""
    from transformers import MixtralConfig

    from quantlib import parse_config
    from quantlib.memory import plan_memory

    cfg = MixtralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=2, num_local_experts=4, vocab_size=1000).to_dict()
    nf4 = plan_memory(cfg, parse_config({"quant_method": "bitsandbytes", "load_in_4bit": True}), "bfloat16")
    base = plan_memory(cfg, None, "bfloat16")
    assert nf4.mostly_unquantized().startswith("leaves ") and "fused expert tensors" in nf4.mostly_unquantized()
    assert base.mostly_unquantized() is None
    names = [t.name for t in figures.memory_figure({"NF4": nf4, "unquantized": base}).data]
    assert any(n.startswith("unquantized: fused expert tensors") for n in names), names
    gguf = plan_memory(cfg, parse_config({"quant_method": "gguf", "quant_type": "Q4_0"}), "bfloat16")
    assert gguf.mostly_unquantized() is None  # GGUF quantizes the experts


def test_layer_charts_have_block_ticks_colours_and_hover_names() -> None:
    names = [f"model.layers.{b}.{r}" for b in range(40) for r in ("self_attn.q_proj", "mlp.down_proj")]
    errors = pd.DataFrame({"scheme": ["NF4"] * 80 + ["FP4"] * 80, "layer": names * 2,
                           "rel_fro_error": [0.1] * 160})
    fig = figures.layer_error_figure(errors)
    axis = fig.layout.xaxis
    assert axis.tickvals[0] == "model.layers.0.self_attn.q_proj" and axis.ticktext[0] == "0"
    assert 1 < len(axis.ticktext) <= 16 and all(t.isdigit() for t in axis.ticktext)  # block numbers, not too many
    assert axis.tickvals[1] == f"model.layers.{axis.ticktext[1]}.self_attn.q_proj"
    colours = [t.line.color for t in fig.data]
    assert all(colours) and len(set(colours)) == 2  # set on the traces: the HTML report keeps them
    outliers = figures.outlier_figure(pd.DataFrame({"layer": names, "fp16_fraction": [0.01] * 80}), 6.0)
    assert outliers.layout.xaxis.ticktext[0] == "0" and "hover" in outliers.layout.xaxis.title.text


def test_memory_chart_switches_to_gib_for_big_models() -> None:
    small = {"x": MemoryBreakdown({"codes": 2**30, "scales": 0, "dq_constants": 0, "code_tables": 0,
                                   "unquantized": 2**30}, 10, 20, "planned")}
    big = {"x": MemoryBreakdown({"codes": 80 * 2**30, "scales": 0, "dq_constants": 0, "code_tables": 0,
                                 "unquantized": 90 * 2**30}, 10, 20, "planned")}
    assert figures.memory_figure(small).layout.yaxis.title.text == "MiB"
    fig = figures.memory_figure(big)
    assert fig.layout.yaxis.title.text == "GiB" and sum(t.y[0] for t in fig.data) == pytest.approx(170.0)
    figures.add_available_line(fig, 100 * 2**30, "available: 100 GiB")
    [line] = fig.layout.shapes
    assert line.y0 == pytest.approx(100.0)  # drawn in the axis' own unit
    [label] = fig.layout.annotations
    assert label.bgcolor and "right" in label.xanchor + str(label.x)


def test_skip_lists_are_in_model_order() -> None:
    from quantlib.methods.base.rules import natural_key

    names = ["model.layers.11.mlp", "model.layers.3.mlp", "model.layers.3.attn", "lm_head", "model.layers.20.mlp"]
    assert sorted(names, key=natural_key) == ["lm_head", "model.layers.3.attn", "model.layers.3.mlp",
                                               "model.layers.11.mlp", "model.layers.20.mlp"]


def test_mix_heatmap_is_categorical() -> None:
    """A choice among a few settings: one colour each, named in the colour bar; a kept layer is its own category,
    not 16 bits on a 4-16 scale."""
    layers = pd.DataFrame({"layer": [f"model.layers.{b}.mlp.{r}" for b in range(2) for r in ("up_proj", "down_proj")],
                           "block": [0, 0, 1, 1], "setting": ["NF4", "kept unquantized", "LLM.int8()", "NF4"],
                           "bits": [4.0, 16.0, 8.0, 4.0]})
    [heat] = figures.mix_depth_figure(layers).data
    assert list(heat.colorbar.ticktext) == ["NF4", "LLM.int8()", "kept unquantized"]
    assert list(heat.colorbar.tickvals) == [0, 1, 2] and heat.zmin == -0.5 and heat.zmax == 2.5
    assert [list(r) for r in heat.z] == [[0, 1], [2, 0]]  # rows: up_proj, down_proj; columns: blocks
    colours = [c for _, c in heat.colorscale]
    assert len(set(colours)) == 3 and all(colours[2 * i] == colours[2 * i + 1] for i in range(3))  # flat bands


def test_summary_shows_the_worst_layer_by_block_and_keeps_the_full_name_in_the_csv() -> None:
    from quantlib.reports import format_summary

    summary = pd.DataFrame({"scheme": ["baseline", "NF4"], "worst_layer": ["", "model.layers.17.mlp.down_proj"],
                            "kl": [0.0, 0.28], "kl_se": [0.0, 0.014]})
    shown = format_summary(summary)
    assert list(shown["worst_layer"]) == ["", "17: mlp.down_proj"]  # short enough for its column
    assert summary["worst_layer"].iloc[1] == "model.layers.17.mlp.down_proj"  # the table itself is untouched
    assert shown["kl"].iloc[1] == "0.28000 ± 0.01400"
