"""Issue 11: bitsandbytes' CPU kernels simulated exactly at plain-matmul speed, cross-checked in every run,
and comparisons that stream, settle and keep partial runs (tiny Llama, seconds)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from quantlib.layers import layer_errors
from quantlib.registry import quantize_model
from quantlib.compare import CompareSettings, run_comparison
from quantlib.registry import parse_config
from quantlib.registry import get_quantizer
from quantlib.methods.bitsandbytes import _bnb_cpu
from quantlib.methods.bitsandbytes._bnb_cpu import has_avx512bf16
from quantlib.methods.bitsandbytes import WORKAROUND_4BIT, ExactLinear4bit, ExactLinear8bit, kernel_paths
from quantlib.models import load_model
from quantlib.runtime import cpu_features

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
FP4_DQ = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
          "bnb_4bit_use_double_quant": True}
INT8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}
INT8_T1 = {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 1.0}
INT8_T0 = {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 0.0}


#: bitsandbytes' own check, which picks its fused AVX512-BF16 4-bit kernel on this CPU.
FUSED_HERE = has_avx512bf16()
NO_FUSED_REASON = ("this CPU has no AVX512-BF16 (bitsandbytes.functional.has_avx512bf16() is False), so bitsandbytes "
                   "cannot run its fused 4-bit kernel here; the path's logic is tested with the check monkeypatched")
#: The 4-bit kernel paths a test can run for real here: the dequantize path everywhere (a layer whose
#: `support_avx512bf16_for_cpu` is False takes it, whatever the CPU), the fused one where bitsandbytes has it.
PATHS = [pytest.param(False, id="dequantize-path"),
         pytest.param(True, id="fused-bf16-path", marks=pytest.mark.skipif(not FUSED_HERE, reason=NO_FUSED_REASON))]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QUANTLIB_RUNS_DIR", str(tmp_path / "runs"))


def on_path(model, fused: bool):
    """Put every Linear4bit of `model` on one kernel path, by bitsandbytes' own per-layer flag."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = fused
    return model


#: 4-bit configs on both paths; LLM.int8() has one path per CPU (torch's capability picks it, tested below).
CONFIGS = [pytest.param(config, *path.values, id=f"{name}-{path.id}", marks=path.marks)
           for name, config in (("nf4", NF4), ("fp4-dq", FP4_DQ)) for path in PATHS] + \
          [pytest.param(config, False, id=name) for name, config in (("int8", INT8), ("int8-t1", INT8_T1),
                                                                      ("int8-t0", INT8_T0))]


@pytest.mark.parametrize("config, fused", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_simulation_is_the_kernels_bit_for_bit(tiny_llama_dir, config, dtype, fused):
    qm = quantize_model(config, source=str(tiny_llama_dir), device="cpu", dtype=dtype)
    on_path(qm.model, fused)
    quantizer = get_quantizer(parse_config(config), device="cpu")
    torch.manual_seed(0)
    ids = torch.randint(3, 60, (2, 48))
    with torch.no_grad():
        kernels = qm.model(input_ids=ids).logits
    assert quantizer.exact_simulation_problem(qm.model) is None
    assert quantizer.to_exact_simulation(qm.model) == 14
    kinds = {type(m) for m in qm.model.modules()}
    assert (ExactLinear4bit if config.get("load_in_4bit") else ExactLinear8bit) in kinds
    expected_path = (_bnb_cpu.FUSED_4BIT if fused else _bnb_cpu.DEQUANT_4BIT) if config.get("load_in_4bit") \
        else _bnb_cpu.int8_path()
    assert kernel_paths(qm.model) == [expected_path]
    with torch.no_grad():
        exact = qm.model(input_ids=ids).logits
    assert exact.dtype == kernels.dtype
    assert torch.equal(exact, kernels), (exact.float() - kernels.float()).abs().max()
    for module in qm.model.modules():  # LLM.int8() keeps its int8 codes: no fp32 copy of the weights
        if isinstance(module, ExactLinear8bit):
            assert module.codes_t.dtype == torch.int8


@pytest.mark.parametrize("fused", PATHS)
def test_exact_4bit_weights_are_what_bitsandbytes_computes_with(tiny_llama_dir, fused):
    """Dequantize path: the weight each ExactLinear4bit keeps equals bitsandbytes' own dequantize_4bit of the layer it
    replaced, bit for bit, plain and double-quantized. Fused path: its codes and bf16 absmax equal what bitsandbytes'
    own repacking (`_convert_weight_packed_for_cpu`) made of the layer, read back by bitsandbytes' own inverse."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    for config in (NF4, FP4_DQ):
        qm = quantize_model(config, source=str(tiny_llama_dir), device="cpu")
        on_path(qm.model, fused)
        layers = {name: m for name, m in qm.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        if fused:
            theirs = {}
            for name, m in layers.items():
                packed, state = bnbf._convert_weight_packed_for_cpu(m.weight.data.clone(), copy.deepcopy(m.weight.quant_state))
                theirs[name] = (state.absmax.t(), bnbf._convert_weight_packed_for_cpu_inverse(packed, state)[0])
        else:
            theirs = {name: bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state) for name, m in layers.items()}
        get_quantizer(parse_config(config), device="cpu").to_exact_simulation(qm.model)
        ours = {name: m for name, m in qm.model.named_modules() if isinstance(m, ExactLinear4bit)}
        assert set(ours) == set(theirs) and len(ours) == 14
        for name, m in ours.items():
            if fused:
                absmax, packed_codes = theirs[name]
                assert m.weight_fp32 is None and torch.equal(m.absmax_bf16, absmax), name
                flat = packed_codes.reshape(-1)
                assert torch.equal(m.codes.reshape(-1), torch.stack([flat >> 4, flat & 0xF], 1).reshape(-1)), name
            else:
                assert torch.equal(m.weight_fp32, theirs[name].float()), name


@pytest.mark.parametrize("fused", PATHS)
def test_layer_errors_from_the_exact_model_equal_a_second_quantization(tiny_llama_dir, monkeypatch, fused):
    """Read from the library's layers or from their exact simulation, the layer errors equal those of quantizing
    every base weight again, and neither reading quantizes anything; on the fused path also after bitsandbytes
    repacked its layers for the kernel (the stored tensors were kept)."""
    import bitsandbytes.functional as bnbf

    base = load_model(str(tiny_llama_dir))
    for config in (NF4, FP4_DQ, INT8):
        quantizer = get_quantizer(parse_config(config), device="cpu")
        again = layer_errors(base.model, quantizer)
        qm = quantize_model(config, source=str(tiny_llama_dir), device="cpu")
        on_path(qm.model, fused)
        with torch.no_grad():
            qm.model(input_ids=torch.randint(3, 60, (1, 16)))  # the fused path repacks on this first forward
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
    """On this CPU's own kernel paths (bitsandbytes' check decides, as for a user): identical figures, and the run
    records the CPU's features and each scheme's kernel path."""
    base = load_model(str(tiny_llama_dir))
    settings = dict(source=str(tiny_llama_dir), max_tokens=512, window=128, device="cpu", baseline_cache=False)
    exact = run_comparison([NF4, INT8_T1], CompareSettings(kernels="exact", **settings), base=base, save=False)
    library = run_comparison([NF4, INT8_T1], CompareSettings(kernels="library", **settings), base=base, save=False)
    columns = ["perplexity", "perplexity_se", "kl", "kl_se", "top1_agreement", "ln_ppl_ratio", "dp_mean",
               "bits_per_param", "memory_mib", "mean_layer_rel_error"]
    assert exact.table[columns].equals(library.table[columns])
    assert list(exact.table["backend"])[1:] == ["cpu (exact simulation)"] * 2
    assert list(library.table["backend"])[1:] == ["cpu"] * 2
    four_bit = _bnb_cpu.FUSED_4BIT if FUSED_HERE else _bnb_cpu.DEQUANT_4BIT
    for result in (exact, library):
        assert [d["kernel_path"] for d in result.details.values()] == [[four_bit], [_bnb_cpu.int8_path()]]
        assert result.run.environment["cpu_features"] == cpu_features()
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
    for line, check in zip(lines, (d["crosscheck"] for d in exact.details.values())):  # and how long each took
        assert f"took {check['simulation_seconds'] / check['kernel_seconds']:.1f}x the kernels' time" in line
    # The default: LLM.int8() through its simulation (faster, the same int8 codes), 4-bit on the kernels.
    auto = run_comparison([NF4, INT8_T1], CompareSettings(**settings), base=base, save=False)
    assert auto.table[columns].equals(library.table[columns])
    assert list(auto.table["backend"])[1:] == ["cpu", "cpu (exact simulation)"]
    [nf4, int8] = auto.details.values()
    assert "crosscheck" not in nf4 and int8["crosscheck"]["identical"]


# ------------------------------------------------------------------ the CPU-feature dispatch, both branches anywhere


@pytest.mark.parametrize("bf16, community, expected", [
    (False, False, _bnb_cpu.DEQUANT_4BIT), (True, False, _bnb_cpu.FUSED_4BIT),
    (True, True, _bnb_cpu.KERNELS_COMMUNITY_4BIT), (False, True, _bnb_cpu.DEQUANT_4BIT)])
def test_the_4bit_path_is_what_bitsandbytes_would_choose(monkeypatch, bf16, community, expected):
    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.cpu import ops

    monkeypatch.setattr(bnbf, "has_avx512bf16", lambda: bf16)
    monkeypatch.setattr(ops, "gemm_4bit_forward_kernel", object() if community else None, raising=False)
    assert _bnb_cpu.has_avx512bf16() is bf16
    assert _bnb_cpu.four_bit_path() == expected


@pytest.mark.parametrize("capability, expected", [("AVX512", _bnb_cpu.INT_MM_8BIT), ("AVX2", _bnb_cpu.FP32_8BIT),
                                                  ("DEFAULT", _bnb_cpu.FP32_8BIT)])
def test_the_int8_path_is_what_bitsandbytes_would_choose(monkeypatch, capability, expected):
    from quantlib.methods.bitsandbytes.exact import _bnb_int_mm_is_exact

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert _bnb_cpu.int8_path() == expected
    assert _bnb_int_mm_is_exact() is (capability == "AVX512")


def test_a_path_not_mirrored_is_refused_with_its_reason_and_runs_on_the_kernels(tiny_llama_dir, monkeypatch):
    """Where bitsandbytes would run the kernels-community kernel: the simulation is refused with the reason, `exact`
    and `auto` run the library's kernels, the backend label and the recorded kernel path say so."""
    from bitsandbytes.backends.cpu import ops

    base = load_model(str(tiny_llama_dir))
    qm = quantize_model(NF4, source=str(tiny_llama_dir), device="cpu")
    on_path(qm.model, True)
    monkeypatch.setattr(ops, "gemm_4bit_forward_kernel", object(), raising=False)
    quantizer = get_quantizer(parse_config(NF4), device="cpu")
    problem = quantizer.exact_simulation_problem(qm.model)
    assert problem and "kernels-community" in problem and "does not mirror" in problem
    with pytest.raises(ValueError, match="cannot simulate bitsandbytes exactly: .*kernels-community"):
        quantizer.to_exact_simulation(qm.model)
    # The comparison's own models: every new Linear4bit asks bitsandbytes, whose check is patched to say yes (as on an
    # AVX512-BF16 CPU); no forward runs the (absent) kernel, since a refused simulation is never cross-checked and the
    # evaluation is stopped before it starts.
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(type(quantizer), "exact_simulation_problem", lambda self, model: problem)
    import quantlib.compare as compare

    seen = {}

    def stop_before_evaluation(*args, **kwargs):
        seen["models"] = args[1]
        raise RuntimeError("stop")

    monkeypatch.setattr(compare, "perplexity_and_kl", stop_before_evaluation)
    for kernels in ("exact", "auto"):
        with pytest.raises(RuntimeError, match="stop"):
            run_comparison([NF4], CompareSettings(source=str(tiny_llama_dir), max_tokens=128, window=64, device="cpu",
                                                  kernels=kernels, baseline_cache=False), base=base, save=False)
        [model] = seen["models"].values()
        assert not any(isinstance(m, ExactLinear4bit) for m in model.modules())
        assert kernel_paths(model) == [_bnb_cpu.KERNELS_COMMUNITY_4BIT]


def test_a_comparison_that_falls_back_says_why_and_labels_the_kernels(tiny_llama_dir, monkeypatch):
    """`--kernels exact` where the simulation is refused: the run's note gives the reason, the backend is the
    kernels' ("cpu", not "exact simulation") and the recorded path is the one bitsandbytes ran."""
    base = load_model(str(tiny_llama_dir))
    reason = "a refusal for this test"
    quantizer_class = type(get_quantizer(parse_config(NF4), device="cpu"))
    monkeypatch.setattr(quantizer_class, "exact_simulation_problem", lambda self, model: reason)
    result = run_comparison([NF4], CompareSettings(source=str(tiny_llama_dir), max_tokens=128, window=64, device="cpu",
                                                   kernels="exact", baseline_cache=False), base=base, save=False)
    assert list(result.table["backend"]) [1:] == ["cpu"]
    assert f"NF4 ran on its library's kernels: {reason}" in result.run.extra["notes"]
    [detail] = result.details.values()
    assert detail["evaluated_with"] == "the library's kernels" and "crosscheck" not in detail
    assert detail["kernel_path"] == [_bnb_cpu.FUSED_4BIT if FUSED_HERE else _bnb_cpu.DEQUANT_4BIT]


def test_the_fused_kernel_needs_its_shapes():
    assert _bnb_cpu.fused_shape_problem(64, 128, 64) is None
    assert "divisible by 32" in _bnb_cpu.fused_shape_problem(48, 128, 64)
    assert "blocksize 64" in _bnb_cpu.fused_shape_problem(64, 96, 64)


def _fused_cases():
    torch.manual_seed(3)
    n, k = 64, 256
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    absmax = (torch.rand(n, k // 64) + 0.01).to(torch.bfloat16)
    x = torch.randn(9, k)
    yield "random", x, codes, absmax, 64
    yield "blocksize 128", x, codes, absmax.view(n, -1, 2)[..., 0].contiguous(), 128
    wide = x.clone()
    wide[0, ::3] *= 1e-30  # products near the denormals
    wide[1, 1::2] *= 1e4  # large and small products in one block: roundings everywhere
    wide[2] = 0.0  # an all-zero row
    wide[3, :5] = torch.tensor([1e-39, -2e-39, 3e-40, 1e-45, 0.0])  # denormal inputs, flushed
    yield "edge values", wide, codes, absmax, 64
    yield "zero blocks", x, codes, absmax.masked_fill(torch.rand(absmax.shape) < 0.3, 0.0), 64


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_fused_mirror_equals_its_exact_rounding_sequence_everywhere(quant_type):
    """Any CPU: the matmul-speed mirror (exact float64 value, error bound, exact sequence near a bf16 boundary) equals
    the kernel's sequence of fp32 roundings computed for every output."""
    for name, x, codes, absmax, blocksize in _fused_cases():
        n, k = codes.shape
        fast = _bnb_cpu.fused_4bit_matmul(x, codes, absmax, quant_type, blocksize)
        rows, cols = torch.meshgrid(torch.arange(x.shape[0]), torch.arange(n), indexing="ij")
        xb = _bnb_cpu._flush(x.to(torch.bfloat16).float())
        every = _bnb_cpu._exact_outputs(xb[rows.reshape(-1)], codes[cols.reshape(-1)], absmax.float()[cols.reshape(-1)],
                                        _bnb_cpu.bf16_levels(quant_type), blocksize, True)
        assert torch.equal(fast.float(), every.to(torch.bfloat16).float().view(x.shape[0], n)), name


@pytest.mark.skipif(not FUSED_HERE, reason=NO_FUSED_REASON)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_fused_mirror_is_bitsandbytes_kernel_on_edge_values(quant_type):
    """This CPU has the kernel: the mirror gives its bits on the same cases, called as Linear4bit calls it."""
    import bitsandbytes.functional as bnbf

    for name, x, codes, absmax, blocksize in _fused_cases():
        n, k = codes.shape
        flat = codes.reshape(-1)
        state = bnbf.QuantState(absmax=absmax.float().reshape(-1), shape=torch.Size((n, k)), blocksize=blocksize,
                                code=bnbf.get_4bit_type(quant_type, device="cpu"), quant_type=quant_type,
                                dtype=torch.float32)
        packed, state = bnbf._convert_weight_packed_for_cpu(((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1), state)
        kernel = bnbf.gemv_4bit(x, packed, state=state)
        mirror = _bnb_cpu.fused_4bit_matmul(x, codes, absmax, quant_type, blocksize).to(x.dtype)
        assert torch.equal(mirror, kernel), (name, int((mirror != kernel).sum()))


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


def _odd_llama(tmp_path, tiny_tokenizer):
    """A tiny Llama whose MLP width (48) bitsandbytes' fused kernel cannot take: gate/up have 48 outputs (not a
    multiple of 32), down_proj 48 inputs (not a multiple of the blocksize 64)."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer), intermediate_size=48)).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("avx512f", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_layers_bitsandbytes_cpu_kernels_get_wrong_are_worked_around(tmp_path, tiny_tokenizer, monkeypatch, bf16,
                                                                     avx512f):
    """Both branches of both checks on any CPU (each Linear4bit asks bitsandbytes' AVX512-BF16 check when it is built;
    quantlib asks its AVX-512F one): a layer the fused kernel would assert on goes to the dequantize path, and a layer
    whose dequantization bitsandbytes' AVX-512 branch gets wrong is computed by quantlib's reference instead."""
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: bf16)
    monkeypatch.setattr(_bnb_cpu, "has_avx512f", lambda: avx512f)
    qm = quantize_model(NF4, source=_odd_llama(tmp_path, tiny_tokenizer), device="cpu")
    layers = {name: m for name, m in qm.model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, ExactLinear4bit))}
    assert len(layers) == 14
    for name, layer in layers.items():
        if name.endswith("down_proj") and avx512f:  # 48 inputs: not a multiple of the blocksize 64
            assert isinstance(layer, ExactLinear4bit) and layer.kernel_path == WORKAROUND_4BIT and not layer.training
        elif name.endswith(("gate_proj", "up_proj", "down_proj")):  # 48 outputs, or 48 inputs without AVX-512F
            assert isinstance(layer, bnb.nn.Linear4bit) and layer.support_avx512bf16_for_cpu is False
        else:
            assert isinstance(layer, bnb.nn.Linear4bit) and layer.support_avx512bf16_for_cpu is bf16
    assert (WORKAROUND_4BIT in kernel_paths(qm.model)) is avx512f


@pytest.mark.skipif(not (FUSED_HERE and _bnb_cpu.has_avx512f()),
                    reason="needs bitsandbytes' fused AVX512-BF16 kernel and its AVX-512 dequantize branch, the two it "
                           "gets wrong on this model; this CPU lacks one: the workaround's logic is tested above with "
                           "both checks monkeypatched")
def test_a_model_with_odd_widths_runs_right_and_its_simulation_is_bit_for_bit(tmp_path, tiny_tokenizer):
    """On this AVX512-BF16 CPU, bitsandbytes alone crashes on the first forward ("N must be divisible by block_n"), and
    its AVX-512 dequantize_4bit reads the wrong absmax for down_proj. Worked around, the model runs; the worked-around
    layer's weights are bitsandbytes' own dequantization of the same codes taken as one row (where its blocks are the
    flat blocks quantize_4bit made); the exact simulation mirrors every layer's own path."""
    import bitsandbytes.functional as bnbf

    qm = quantize_model(NF4, source=_odd_llama(tmp_path, tiny_tokenizer), device="cpu")
    quantizer = get_quantizer(parse_config(NF4), device="cpu")
    for module in qm.model.modules():
        if isinstance(module, ExactLinear4bit):
            qs = copy.deepcopy(module.packed)
            state = bnbf.QuantState(absmax=qs.absmax, shape=torch.Size((1, module.out_features * module.in_features)),
                                    blocksize=qs.blocksize, code=bnbf.get_4bit_type("nf4", device="cpu"),
                                    quant_type="nf4", dtype=torch.float32)
            one_row = bnbf.dequantize_4bit(qs.packed, state).reshape(module.out_features, module.in_features)
            assert torch.equal(module.weight_fp32, one_row)
    ids = torch.randint(3, 60, (2, 40))
    with torch.no_grad():
        kernels = qm.model(input_ids=ids).logits
    assert sorted(kernel_paths(qm.model)) == sorted([_bnb_cpu.FUSED_4BIT, _bnb_cpu.DEQUANT_4BIT, WORKAROUND_4BIT])
    assert quantizer.exact_simulation_problem(qm.model) is None
    quantizer.to_exact_simulation(qm.model)
    with torch.no_grad():
        assert torch.equal(qm.model(input_ids=ids).logits, kernels)
