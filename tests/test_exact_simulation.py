"""Issue 11: bitsandbytes' CPU kernels simulated exactly at plain-matmul speed, cross-checked in every run,
and comparisons that stream, settle and keep partial runs (tiny Llama, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from quantlib.apply import layer_errors, quantize_model
from quantlib.compare import CompareSettings, run_comparison
from quantlib.configs import parse_config
from quantlib.methods import get_quantizer
from quantlib.methods.bitsandbytes import ExactLinear4bit, ExactLinear8bit
from quantlib.models import load_model

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
FP4_DQ = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
          "bnb_4bit_use_double_quant": True}
INT8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}
INT8_T1 = {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 1.0}
INT8_T0 = {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 0.0}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QUANTLIB_RUNS_DIR", str(tmp_path / "runs"))


@pytest.mark.parametrize("config", [NF4, FP4_DQ, INT8, INT8_T1, INT8_T0], ids=["nf4", "fp4-dq", "int8", "int8-t1",
                                                                               "int8-t0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_simulation_is_the_kernels_bit_for_bit(tiny_llama_dir, config, dtype):
    qm = quantize_model(config, source=str(tiny_llama_dir), device="cpu", dtype=dtype)
    quantizer = get_quantizer(parse_config(config), device="cpu")
    torch.manual_seed(0)
    ids = torch.randint(3, 60, (2, 48))
    with torch.no_grad():
        kernels = qm.model(input_ids=ids).logits
    assert quantizer.exact_simulation_problem(qm.model) is None
    assert quantizer.to_exact_simulation(qm.model) == 14
    kinds = {type(m) for m in qm.model.modules()}
    assert (ExactLinear4bit if config.get("load_in_4bit") else ExactLinear8bit) in kinds
    with torch.no_grad():
        exact = qm.model(input_ids=ids).logits
    assert exact.dtype == kernels.dtype
    assert torch.equal(exact, kernels), (exact.float() - kernels.float()).abs().max()
    for module in qm.model.modules():  # LLM.int8() keeps its int8 codes: no fp32 copy of the weights
        if isinstance(module, ExactLinear8bit):
            assert module.codes_t.dtype == torch.int8


def test_exact_4bit_weights_are_what_bitsandbytes_dequantizes(tiny_llama_dir):
    """The weight each ExactLinear4bit keeps (quantlib's reference) equals bitsandbytes' own dequantize_4bit
    of the layer it replaced, bit for bit, plain and double-quantized."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    for config in (NF4, FP4_DQ):
        qm = quantize_model(config, source=str(tiny_llama_dir), device="cpu")
        theirs = {name: bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
                  for name, m in qm.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        get_quantizer(parse_config(config), device="cpu").to_exact_simulation(qm.model)
        ours = {name: m.weight_fp32 for name, m in qm.model.named_modules() if isinstance(m, ExactLinear4bit)}
        assert set(ours) == set(theirs) and len(ours) == 14
        for name in ours:
            assert torch.equal(ours[name], theirs[name].float()), name


def test_layer_errors_from_the_exact_model_equal_a_second_quantization(tiny_llama_dir, monkeypatch):
    """Read from the library's layers or from their exact simulation, the layer errors equal those of quantizing
    every base weight again, and neither reading quantizes anything."""
    import bitsandbytes.functional as bnbf

    base = load_model(str(tiny_llama_dir))
    for config in (NF4, FP4_DQ, INT8):
        quantizer = get_quantizer(parse_config(config), device="cpu")
        again = layer_errors(base.model, quantizer)
        qm = quantize_model(config, source=str(tiny_llama_dir), device="cpu")
        with monkeypatch.context() as m:
            for name in ("quantize_4bit", "int8_vectorwise_quant"):
                m.setattr(bnbf, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("quantized again")))
            m.setattr(type(quantizer), "quantize_tensor", lambda *a, **k: (_ for _ in ()).throw(
                AssertionError("quantized again")))
            from_library = layer_errors(base.model, quantizer, quantized=qm)
            quantizer.to_exact_simulation(qm.model)
            from_exact = layer_errors(base.model, quantizer, quantized=qm)
        assert from_library.equals(again), config
        assert from_exact.equals(again), config


def test_exact_and_library_kernels_give_the_same_comparison(tiny_llama_dir):
    base = load_model(str(tiny_llama_dir))
    settings = dict(source=str(tiny_llama_dir), max_tokens=512, window=128, device="cpu", baseline_cache=False)
    exact = run_comparison([NF4, INT8_T1], CompareSettings(kernels="exact", **settings), base=base, save=False)
    library = run_comparison([NF4, INT8_T1], CompareSettings(kernels="library", **settings), base=base, save=False)
    columns = ["perplexity", "perplexity_se", "kl", "kl_se", "top1_agreement", "ln_ppl_ratio", "dp_mean",
               "bits_per_param", "memory_mib", "mean_layer_rel_error"]
    assert exact.table[columns].equals(library.table[columns])
    assert list(exact.table["backend"])[1:] == ["cpu (exact simulation)"] * 2
    assert list(library.table["backend"])[1:] == ["cpu"] * 2
    for label, detail in exact.details.items():
        check = detail["crosscheck"]
        assert check["identical"] and check["max_abs_logprob_diff"] == 0.0 and check["top1_agreement"] == 1.0
        assert check["tokens"] == 128 and check["layers_swapped"] == 14
        assert check["shared_bytes"] > 0  # embeddings and norms are the baseline's tensors, not copies
        assert "exact simulation" in detail["evaluated_with"]
    assert all("crosscheck" not in d for d in library.details.values())
    from quantlib.reports import crosscheck_text

    lines = crosscheck_text(exact.run)
    assert len(lines) == 2 and all("identical log-probs" in line for line in lines)
    # The default: LLM.int8() through its simulation (faster, the same int8 codes), 4-bit on the kernels.
    auto = run_comparison([NF4, INT8_T1], CompareSettings(**settings), base=base, save=False)
    assert auto.table[columns].equals(library.table[columns])
    assert list(auto.table["backend"])[1:] == ["cpu", "cpu (exact simulation)"]
    [nf4, int8] = auto.details.values()
    assert "crosscheck" not in nf4 and int8["crosscheck"]["identical"]


def test_until_settled_stops_with_the_same_ranking_and_saves_a_partial_run(tiny_llama_dir, tmp_path):
    from quantlib.runs import list_runs, load_run
    from quantlib.uncertainty import MIN_SETTLE_TOKENS

    base = load_model(str(tiny_llama_dir))
    configs = [NF4, FP4_DQ, INT8]
    settings = dict(source=str(tiny_llama_dir), max_tokens=4096, window=256, device="cpu")
    full = run_comparison(configs, CompareSettings(**settings), base=base, save=False)
    updates = []
    early = run_comparison(configs, CompareSettings(until_settled=True, **settings), base=base,
                           on_update=updates.append, runs_folder=tmp_path)
    assert full.run.extra["ranking_settled"] and not full.run.extra["partial"]
    n = early.run.settings["n_tokens"]
    assert early.run.extra["partial"] and early.run.extra["stop_reason"] == "settled"
    assert early.run.extra["ranking_settled"] and MIN_SETTLE_TOKENS <= n < 4096 and n % 256 == 0
    ranking = lambda r: list(r.run.tables["ranking"]["better"]) + list(r.run.tables["ranking"]["worse"][-1:])
    assert ranking(early) == ranking(full)
    # Updates came window by window, the last one the stopping point; no update is marked complete.
    assert [u.run.settings["n_tokens"] for u in updates] == list(range(256, n + 1, 256))
    assert all(u.run.extra["partial"] for u in updates) and updates[-1].run.extra["ranking_settled"]
    assert not any(u.run.extra["ranking_settled"] for u in updates if u.run.settings["n_tokens"] < MIN_SETTLE_TOKENS)
    # The saved run says it is partial, with its token count, in the store and in the report.
    stored = load_run(early.path)
    assert stored.status == "partial" and stored.settings["tokens_planned"] == 4096
    assert (stored.tables["summary"]["n_tokens"] == n).all()
    assert list_runs(tmp_path)["status"].iloc[0] == f"partial: {n:,} of 4,096 tokens (settled)"
    from quantlib.reports import partial_text, render_html

    assert f"{n:,} of 4,096 tokens" in partial_text(stored) and f"{n:,} of 4,096 tokens" in render_html(stored)
    # The same prefix evaluated as a whole run gives the same figures.
    prefix = run_comparison(configs, CompareSettings(**{**settings, "max_tokens": n}), base=base, save=False)
    assert early.table["kl"].tolist() == pytest.approx(prefix.table["kl"].tolist(), rel=1e-9)


def test_cancel_keeps_a_partial_run_only_when_asked(tiny_llama_dir, tmp_path):
    from quantlib.errors import Cancelled

    base = load_model(str(tiny_llama_dir))
    settings = CompareSettings(source=str(tiny_llama_dir), max_tokens=1024, window=128, device="cpu")
    seen = []
    stop = lambda: len(seen) >= 3  # noqa: E731 - cancel after the third streamed window
    result = run_comparison([NF4, INT8], settings, base=base, on_update=seen.append, cancel=stop,
                            keep_partial=True, runs_folder=tmp_path)
    assert result.run.extra["stop_reason"] == "cancelled" and result.run.settings["n_tokens"] == 3 * 128
    assert result.path and json.loads(open(result.path).read())["status"] == "partial"
    seen.clear()
    with pytest.raises(Cancelled):
        run_comparison([NF4, INT8], settings, base=base, on_update=seen.append, cancel=stop,
                       runs_folder=tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_cli_until_settled_prints_running_figures(tiny_llama_dir, tmp_path, capsys):
    from quantlib.cli import main

    nf4 = tmp_path / "nf4.json"
    nf4.write_text(json.dumps(NF4))
    int8 = tmp_path / "int8.json"
    int8.write_text(json.dumps(INT8))
    code = main(["compare", "--model", str(tiny_llama_dir), "--config", str(nf4), "--config", str(int8),
                 "--tokens", "4096", "--window", "256", "--until-settled", "--kernels", "exact", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    running = [line for line in err.splitlines() if line.startswith("[running]")]
    assert running and "tokens" in running[0] and "KL" in running[0] and " ± " in running[0]
    assert "Partial run:" in err and "stopped when the ranking settled" in err
    assert "identical log-probs" in err  # the cross-check, said on stderr
    rows = json.loads(out)
    assert {r["scheme"] for r in rows} == {"baseline float32", "NF4", "INT8 (t=6)"}
    assert len({r["n_tokens"] for r in rows}) == 1 and rows[0]["n_tokens"] < 4096


def test_a_comparison_quantizes_each_simulated_layer_once(tiny_llama_dir, monkeypatch):
    """Simulated methods keep the packed tensors `simulate` made, and the layer errors read them: every layer is
    quantized once per scheme, with the same errors as quantizing again."""
    from quantlib.methods.gguf import GGUFQuantizer
    from quantlib.methods.rtn import RTNQuantizer

    base = load_model(str(tiny_llama_dir))
    configs = [{"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 32},
               {"quant_method": "gguf", "quant_type": "Q4_0"}]
    again = {c["quant_method"]: layer_errors(base.model, get_quantizer(parse_config(c), device="cpu")) for c in configs}
    calls = []
    for cls in (RTNQuantizer, GGUFQuantizer):
        original = cls.quantize_layer

        def counted(self, name, weight, original=original):
            calls.append((type(self).__name__, name))
            return original(self, name, weight)

        monkeypatch.setattr(cls, "quantize_layer", counted)
    result = run_comparison(configs, CompareSettings(source=str(tiny_llama_dir), max_tokens=256, window=128,
                                                     device="cpu", baseline_cache=False), base=base, save=False)
    assert len(calls) == len(set(calls)) == 2 * 14  # 2 schemes x 14 layers, each once
    for config, label in zip(configs, [parse_config(c).label for c in configs]):
        errors = result.layers[result.layers["scheme"] == label].drop(columns="scheme").reset_index(drop=True)
        assert errors.equals(again[config["quant_method"]]), label
