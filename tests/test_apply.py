"""Quantizing real (tiny) models: the bitsandbytes path, simulated schemes, layer errors, comparison."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from quantlib import parse_config
from quantlib.layers import layer_detail, layer_errors
from quantlib.registry import quantize_model
from quantlib.methods.base.records import ShapeError
from quantlib.compare import CompareSettings, run_comparison
from quantlib.errors import Cancelled
from quantlib.models import load_model
from quantlib.methods.bitsandbytes import quantize_4bit
from quantlib.runs import list_runs, load_run
from quantlib.runtime import objects_frozen
from quantlib.registry import get_quantizer

NF4_DQ = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
          "bnb_4bit_use_double_quant": True}
RTN4 = {"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 64}


@pytest.fixture(scope="module")
def tiny_base(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def test_bitsandbytes_model_holds_exactly_the_reference_codes(tiny_llama_dir, tiny_base) -> None:
    """from_pretrained's NF4 weights equal our pure-torch reference on the same fp32 weights."""
    qm = quantize_model(NF4_DQ, source=str(tiny_llama_dir), device="cpu")
    assert not qm.simulated and qm.backend.device == "cpu" and "bitsandbytes" in qm.backend.library
    base_modules = dict(tiny_base.model.named_modules())
    checked = 0
    for name, module in qm.model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        ref = quantize_4bit(base_modules[name].weight.data, "nf4", 64, True, backend="torch")
        assert torch.equal(module.weight.data.flatten(), ref.packed.flatten()), name
        assert torch.equal(state.absmax, ref.dq.codes), name
        checked += 1
    assert checked == 14  # 7 linear layers x 2 blocks; the tied head stays unquantized


def test_simulated_scheme_replaces_weights_and_reports_packed_memory(tiny_base) -> None:
    qm = quantize_model(RTN4, base=tiny_base, device="cpu")
    assert qm.simulated and qm.memory.source == "packed (simulated)"
    before = tiny_base.model.model.layers[0].mlp.down_proj.weight
    after = qm.model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(before, after)  # the copy changed ...
    assert before.data_ptr() != after.data_ptr()  # ... and the baseline did not
    # int4 codes + fp16 scale per 64 weights = 4.25 bits.
    assert qm.memory.quantized_bits_per_param == pytest.approx(4.25)
    # The output head was left alone, as transformers does.
    assert torch.equal(qm.model.lm_head.weight, tiny_base.model.lm_head.weight)


def test_group_size_that_does_not_divide_is_refused_naming_layers(tiny_base) -> None:
    quantizer = get_quantizer({**RTN4, "group_size": 48}, device="cpu")
    with pytest.raises(ShapeError) as info:
        layer_errors(tiny_base.model, quantizer)
    assert "model.layers.0.self_attn.q_proj" in str(info.value) and "64" in str(info.value)


def test_layer_errors_rank_schemes_by_bits(tiny_base) -> None:
    frames = {bits: layer_errors(tiny_base.model, get_quantizer({**RTN4, "bits": bits}, device="cpu"))
              for bits in (2, 4, 8)}
    means = {bits: frame["rel_fro_error"].mean() for bits, frame in frames.items()}
    assert means[8] < means[4] < means[2]
    assert len(frames[4]) == 14
    assert set(frames[4].columns) >= {"layer", "mse", "rel_fro_error", "sqnr_db", "max_abs_error", "cosine",
                                      "bits_per_param", "code_entropy_bits"}


def test_layer_detail_has_histogram_and_code_usage(tiny_base) -> None:
    detail = layer_detail(tiny_base.model, get_quantizer(NF4_DQ, device="cpu"), "model.layers.1.mlp.up_proj")
    assert sum(detail["code_counts"]) == 128 * 64
    assert 0 < detail["code_entropy_bits"] <= 4
    assert sum(detail["histogram"].counts) == 128 * 64
    with pytest.raises(Exception, match="no layer named .model.nope. that"):
        layer_detail(tiny_base.model, get_quantizer(NF4_DQ, device="cpu"), "model.nope")


def test_comparison_table_and_saved_run(tiny_llama_dir, tiny_base, tmp_path) -> None:
    settings = CompareSettings(source=str(tiny_llama_dir), max_tokens=300, window=64, device="cpu")
    messages: list[str] = []
    result = run_comparison([NF4_DQ, RTN4], settings, base=tiny_base, runs_folder=tmp_path,
                            progress=lambda f, m: messages.append(m))
    table = result.table
    assert list(table["scheme"]) == ["baseline float32", "NF4+DQ", "RTN int4 g64"]
    assert table.loc[0, "kl"] == 0.0 and (table.loc[1:, "kl"] > 0).all()
    assert table["perplexity"].notna().all()
    assert table.loc[2, "backend"].endswith("(simulated)")
    assert messages
    saved = load_run(result.path)
    assert saved.tables["summary"]["scheme"].tolist() == table["scheme"].tolist()
    assert list_runs(tmp_path)["run_id"].tolist() == [result.run.run_id]


def test_cancelled_comparison_writes_nothing(tiny_llama_dir, tiny_base, tmp_path) -> None:
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        run_comparison([NF4_DQ], CompareSettings(source=str(tiny_llama_dir), max_tokens=300, window=64, device="cpu"),
                       base=tiny_base, runs_folder=tmp_path, cancel=cancel)
    assert list(tmp_path.iterdir()) == []
    assert gc.get_freeze_count() == 0  # the garbage collector's freeze is lifted on the way out


def test_objects_frozen_during_a_run_skips_old_objects_and_collects_new_cycles() -> None:
    class Node:
        pass

    old = Node()
    with objects_frozen():
        assert gc.get_freeze_count() > 0
        new = Node()
        new.me = new  # a reference cycle made inside
        ref = weakref.ref(new)
        del new
        gc.collect()
        assert ref() is None  # collected, though the objects from before were not scanned
        assert any(o is old for o in gc.get_objects()) is False  # frozen: not tracked by collections
    assert gc.get_freeze_count() == 0 and any(o is old for o in gc.get_objects())


@pytest.mark.parametrize("quant_type", ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "MXFP4", "BF16", "F16"])
def test_every_gguf_type_measures_and_plans(tiny_base, quant_type) -> None:
    """Each offered GGUF type quantizes a model, and its packed size equals the planner's formula."""
    from quantlib.memory import plan_memory

    config = {"quant_method": "gguf", "quant_type": quant_type}
    errors = layer_errors(tiny_base.model, get_quantizer(config, device="cpu"))
    assert (errors["rel_fro_error"] < 0.2).all()
    qm = quantize_model(config, base=tiny_base, device="cpu")
    planned = plan_memory(tiny_base.model.config.to_dict(), parse_config(config), "float32")
    assert qm.memory.total_bytes == pytest.approx(planned.total_bytes)


def test_configs_are_batched_to_fit_memory_and_labels_stay_unique(tiny_llama_dir, tiny_base, monkeypatch) -> None:
    import quantlib.compare as compare
    from quantlib.compare import plan_batches, unique_labels

    configs = [parse_config(c) for c in (NF4_DQ, RTN4, NF4_DQ)]
    assert unique_labels(configs) == ["NF4+DQ", "RTN int4 g64", "NF4+DQ #2"]
    model_config = tiny_base.model.config.to_dict()
    assert plan_batches(configs, model_config, 1e6, "float32", budget=1e12) == [[0, 1, 2]]
    assert plan_batches(configs, model_config, 1e6, "float32", budget=1.0) == [[0], [1], [2]]
    # A tight budget costs extra baseline passes but gives the same numbers.
    settings = CompareSettings(source=str(tiny_llama_dir), max_tokens=200, window=64, device="cpu")
    joint = run_comparison(configs, settings, base=tiny_base, save=False)
    monkeypatch.setattr(compare, "_resident_budget", lambda device: 1.0)
    split = run_comparison(configs, settings, base=tiny_base, save=False)
    assert split.run.settings["baseline_passes"] == 3 and joint.run.settings["baseline_passes"] == 1
    assert split.table["scheme"].tolist() == joint.table["scheme"].tolist()
    assert split.table["perplexity"].tolist() == pytest.approx(joint.table["perplexity"].tolist(), rel=1e-6)
    assert split.table["kl"].tolist() == pytest.approx(joint.table["kl"].tolist(), rel=1e-5, abs=1e-9)


def test_inspect_scheme_reuses_the_reference(tiny_llama_dir, tiny_base) -> None:
    from quantlib.inspection import inspect_scheme

    first, reference = inspect_scheme(tiny_base, RTN4, source=str(tiny_llama_dir), device="cpu", tokens=200, window=64,
                                      outlier_tokens=128)
    assert first.comparison.kl_mean > 0 and len(first.layers) == 14
    assert set(first.memory) == {"baseline (unquantized)", "RTN int4 g64"}
    assert first.outliers.n_tokens > 0 and first.backend["device"] == "cpu"
    second, same = inspect_scheme(tiny_base, NF4_DQ, source=str(tiny_llama_dir), device="cpu", reference=reference,
                                  outlier_tokens=128)
    assert same is reference and second.baseline.ppl == first.baseline.ppl
