"""The recommender (issue 13): the optimizer against brute force, sizes against the planner, exports against
transformers' own classes, the measurement on a tiny model, the CLI, and (slow) the check on the default model:
a verified mix between uniform 4-bit and 8-bit beats the uniform points of its size and the line between them.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from quantlib import recommend as rc
from quantlib.registry import parse_config
from quantlib.memory import plan_memory
from quantlib.registry import quantizer_class
from quantlib.shapes import describe_model


# ------------------------------------------------------------------------------ the optimizer

def _brute_force(options, budget):
    best = None
    groups = list(options)
    for combo in itertools.product(*(options[g] for g in groups)):
        size = sum(o[0] for o in combo)
        if size <= budget:
            err = sum(o[1] for o in combo)
            if best is None or err < best:
                best = err
    return best


def test_solver_is_feasible_bounded_and_mostly_optimal_against_brute_force():
    rng = random.Random(0)
    exact, n = 0, 300
    for _ in range(n):
        options = {}
        for g in range(rng.randint(1, 6)):
            k = rng.randint(1, 4)
            options[f"g{g}"] = [(float(rng.randint(1, 40)), rng.random() ** 2, f"c{c}") for c in range(k)]
        lo = sum(min(o[0] for o in v) for v in options.values())
        hi = sum(max(o[0] for o in v) for v in options.values())
        budget = rng.uniform(lo - 5, hi + 5)
        solved = rc.solve(options, budget)
        optimum = _brute_force(options, budget)
        if optimum is None:
            assert solved is None
            continue
        assignment, total, error, bound = solved
        chosen = {g: next(o for o in options[g] if o[2] == c) for g, c in assignment.items()}
        assert total == pytest.approx(sum(o[0] for o in chosen.values())) and total <= budget + 1e-9
        assert error == pytest.approx(sum(o[1] for o in chosen.values()))
        assert bound <= optimum + 1e-9 <= error + 2e-9  # the LP bound is a lower bound; never below optimum
        exact += error <= optimum + 1e-9
    assert exact >= 0.85 * n, exact


def test_hull_drops_dominated_and_non_convex_options():
    options = [(10.0, 1.0, "a"), (20.0, 0.5, "b"), (30.0, 0.45, "c"), (25.0, 0.9, "dominated"), (40.0, 0.0, "d")]
    hull = rc._hull(options)
    assert [o[2] for o in hull] == ["a", "b", "d"]  # c lies above the segment b -> d


# ------------------------------------------------------------------------------ tiny model

@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from quantlib.models import load_model

    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    import os

    folder = tmp_path_factory.mktemp("qcache")
    old = os.environ.get("QUANTLIB_CACHE")
    os.environ["QUANTLIB_CACHE"] = str(folder)
    yield folder
    if old is None:
        del os.environ["QUANTLIB_CACHE"]
    else:
        os.environ["QUANTLIB_CACHE"] = old


@pytest.mark.parametrize("family", list(rc.families()))
def test_measure_recommend_plan_and_export_on_a_tiny_model(tiny, family, cache_dir):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    seen = []
    sens = rc.measure_sensitivity(tiny, family, calib_tokens=64, check_layers=3, check_tokens=64,
                                  progress=lambda f, m: seen.append(f))
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())  # base untouched
    assert seen and seen[-1] == 1.0 and sens.source == "measured"
    shapes = describe_model(tiny.model)
    layers = sens.rows["layer"].unique()
    assert len(layers) == 14  # 2 blocks x q, k, v, o, gate, up, down
    keep = sens.rows[sens.rows["choice"] == "keep"]
    assert (keep["error"] == 0).all()
    quantized = sens.rows[sens.rows["choice"] != "keep"]
    assert (quantized["error"] > 0).all() and (quantized["rel_error"] > 0).all()
    # fewer bits, more relative output error (mean over layers and group sizes)
    by_bits = quantized.groupby("bits")["rel_error"].mean()
    assert list(by_bits.sort_index(ascending=False)) == sorted(by_bits)
    assert len(sens.check["pairs"]) >= 3 and "spearman_fisher" in sens.check
    # a second measurement comes from the cache, identical
    again = rc.measure_sensitivity(tiny, family, calib_tokens=64, check_layers=3, check_tokens=64)
    assert again.source == "cache" and again.rows.equals(sens.rows)

    cfg = tiny.model.config.to_dict()
    lo, hi = rc.reachable_range(sens, rc.family_class(family).mix_spaces(shapes))
    repeated_defaults = 0
    for budget in (lo, (lo + hi) / 2, lo + 0.3 * (hi - lo), hi * 2):
        rec = rc.recommend(sens, cfg, budget_gib=budget / rc.GIB, shapes=shapes)
        assert rec.total_bytes <= budget + 1e-6
        planned = plan_memory(cfg, rec.config, "float32", shapes=shapes).total_bytes
        assert planned == pytest.approx(rec.total_bytes, abs=0.5)  # the predicted size is exact
        assert rec.lower_bound <= rec.predicted_error + 1e-12
        assert rec.predicted_error == pytest.approx(rec.layers["error"].sum())
        exported = json.loads(json.dumps(rec.export()))
        assert parse_config(exported).to_dict() == exported  # quantlib loads it unchanged
        # The counts agree: the skip list (and the label counting it) is the kept layers plus the defaults it
        # repeats, and the summary says so in numbers.
        skip = quantizer_class(rec.config).skip_modules(rec.config)
        n_kept = sum(1 for choice in rec.assignment.values() if choice == "keep")
        explained = [line for line in rc.summary_lines(rec) if line.startswith("the exported skip list")]
        if skip and len(skip) > n_kept:
            [line] = explained
            repeated_defaults += 1
            assert f"has {len(skip)} entries: the {n_kept} kept" in line
            assert f"transformers' {len(skip) - n_kept} default skip" in line
        else:
            assert explained == []
        name = quantizer_class(rec.config).transformers_class_name()
        if name is not None:
            import transformers

            hf = getattr(transformers, name).from_dict(json.loads(json.dumps(exported)))
            if rec.transformers_keeps:
                assert parse_config(hf.to_dict()).to_dict() == exported  # and so does transformers' own class
            else:  # transformers' class accepts the file but drops the per-layer part: the export says so
                assert "transformers" in rec.export_kind and "drops" in rec.export_kind
        else:  # no transformers class: the method's own tool gets a command naming every tensor's type
            assert rec.commands, family
            text = next(iter(rec.commands.values()))
            quantized = rec.layers[rec.layers["choice"] != "keep"]
            assert text.count("--tensor-type") == len(rec.layers)
            for row in quantized.itertuples():  # a key names the setting: GGUF's are the type, "+imatrix" with one
                assert f"={row.choice.removesuffix('+imatrix').lower()}'" in text
            assert ("--imatrix imatrix.gguf" in text) == bool(getattr(rec.config, "imatrix", False))
    if family == "bitsandbytes":  # its skip lists repeat transformers' defaults: seen and explained
        assert repeated_defaults > 0
    assert rc.recommend(sens, cfg, budget_gib=hi * 2 / rc.GIB, shapes=shapes).predicted_error == 0.0
    assert rc.recommend(sens, cfg, budget_gib=lo / rc.GIB, shapes=shapes).total_bytes == pytest.approx(lo)
    with pytest.raises(rc.RecommendError, match="below the smallest size.*reachable"):
        rc.recommend(sens, cfg, budget_gib=lo * 0.9 / rc.GIB, shapes=shapes)
    with pytest.raises(rc.RecommendError, match="bits: got -1"):
        rc.recommend(sens, cfg, bits=-1, shapes=shapes)
    with pytest.raises(rc.RecommendError, match="exactly one"):
        rc.recommend(sens, cfg, bits=4, budget_gib=1, shapes=shapes)


def test_a_mix_keeps_the_layers_it_says_and_the_defaults(tiny, cache_dir):
    """bitsandbytes: the exported skip list holds the kept modules plus transformers' default skips (a list
    replaces the defaults), and the planner then leaves exactly those unquantized."""
    family = next(iter(rc.families()))
    sens = rc.measure_sensitivity(tiny, family, calib_tokens=64, check_layers=0)
    shapes = describe_model(tiny.model)
    lo, hi = rc.reachable_range(sens, rc.family_class(family).mix_spaces(shapes))
    rec = rc.recommend(sens, tiny.model.config.to_dict(), budget_gib=(lo + 0.2 * (hi - lo)) / rc.GIB, shapes=shapes)
    kept = set(rec.layers[rec.layers["choice"] == "keep"]["layer"])
    assert kept  # the budget leaves room for some
    decisions = quantizer_class(rec.config).classify(rec.config, shapes)
    unquantized = {w.module for w in shapes.weights if w.is_matmul and decisions[w.name] is not None}
    assert kept <= unquantized
    assert "lm_head" in unquantized  # the default skip survived the list


def test_cancel_stops_the_measurement_and_caches_nothing(tiny, tmp_path, monkeypatch):
    from quantlib.errors import Cancelled

    monkeypatch.setenv("QUANTLIB_CACHE", str(tmp_path))
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 5  # a few layers in

    with pytest.raises(Cancelled):
        rc.measure_sensitivity(tiny, next(iter(rc.families())), calib_tokens=64, check_layers=0, cancel=cancel)
    assert not list(tmp_path.rglob("*.json"))


def test_unknown_family_and_bad_proxy_are_refused(tiny):
    with pytest.raises(rc.RecommendError, match="no per-layer mix.*allowed"):
        rc.measure_sensitivity(tiny, "rtn")
    with pytest.raises(rc.RecommendError, match="proxy: got 'mse'; allowed: fisher, relative"):
        rc.measure_sensitivity(tiny, next(iter(rc.families())), proxy="mse")


def test_judge_reads_the_line_and_the_smaller_points():
    import pandas as pd

    table = pd.DataFrame({"scheme": ["mix", "a4", "b8", "c4"], "memory_mib": [150.0, 100.0, 200.0, 110.0],
                          "kl": [0.10, 0.30, 0.02, 0.50], "kl_se": [0.01, 0.01, 0.001, 0.02]})
    v = rc.judge(table, "mix")
    assert v["neighbours"] == ["c4", "b8"] and v["smaller"] == ["a4", "c4"]
    assert v["line_kl"] == pytest.approx(0.50 + (150 - 110) / 90 * (0.02 - 0.50))
    assert v["below_line"] is True and v["beats_smaller"] is True
    worse = table.assign(kl=[0.4, 0.30, 0.02, 0.50])
    v2 = rc.judge(worse, "mix")
    assert v2["beats_smaller"] is False and v2["below_line"] is False  # 0.4 is above the line's 0.287


# ------------------------------------------------------------------------------ CLI and page

def test_cli_recommend_writes_the_export_and_refuses_an_infeasible_budget(tiny_llama_dir, tmp_path, cache_dir,
                                                                          capsys):
    from quantlib.cli import EXIT_INVALID, main

    out = tmp_path / "rec"
    assert main(["recommend", "--model", str(tiny_llama_dir), "--bits", "12", "--calib-tokens", "64",
                 "--out", str(out), "--quiet", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    exported = json.loads((out / "quantization_config.json").read_text())
    assert printed["config"] == exported and parse_config(exported).to_dict() == exported
    assert printed["bits_per_param"] <= 12 and printed["total_bytes"] <= printed["budget_bytes"]
    assert (out / "layers.csv").read_text().startswith("layer,group,block,role")
    assert main(["recommend", "--model", str(tiny_llama_dir), "--bits", "0.5", "--calib-tokens", "64",
                 "--quiet"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "below the smallest size" in err and "reachable" in err and "bits/param" in err
    assert main(["recommend", "--model", str(tiny_llama_dir), "--bits", "4", "--method", "rtn", "--quiet"]) == EXIT_INVALID
    assert "no per-layer mix" in capsys.readouterr().err


def test_recommend_page_measures_recommends_and_verifies_on_a_tiny_model(tiny_llama_dir, tmp_path, monkeypatch,
                                                                         cache_dir):
    from tests.apptest_support import page_on_folder

    monkeypatch.setenv("QUANTLIB_RUNS_DIR", str(tmp_path / "runs"))
    at = page_on_folder("5_Recommend.py", "recommend", tiny_llama_dir)
    at.number_input(key="recommend.calib").set_value(64).run()
    at.button(key="recommend.run").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.button(key="recommend.cancel_button_done").disabled  # the measurement is over: nothing to cancel
    text = " ".join(m.value for m in at.markdown)
    assert "recommended:" in text and "planned exactly" in text and "Spearman" in text
    exported = json.loads(at.code[0].value)
    assert parse_config(exported).to_dict() == exported
    assert len(at.get("plotly_chart")) == 1  # the layer-by-depth chart
    slider = at.slider(key="recommend.budget_gib")
    slider.set_value(slider.max).run()
    assert "0 kept" not in " ".join(m.value for m in at.markdown)
    # In bits per parameter, the floor above 4 bits is explained by what no setting quantizes.
    at.radio(key="recommend.unit").set_value("bits per parameter").run()
    bits = at.slider(key="recommend.bits")
    why = [c.value for c in at.caption if "lowest reachable average" in c.value]
    assert len(why) == 1 and f"{bits.min:.3f} bits and not 4" in why[0] and "float32" in why[0], why
    at.radio(key="recommend.unit").set_value("GiB").run()
    at.number_input(key="recommend.verify.tokens").set_value(256).run()
    at.button(key="recommend.verify.run").click().run()
    assert not at.exception, [e.message for e in at.exception]
    text = " ".join(m.value for m in at.markdown)
    assert "measured:" in text and "KL" in text
    assert len(at.get("plotly_chart")) == 2  # + the frontier
    assert list((tmp_path / "runs").glob("*.run.json"))  # the verification is a saved comparison run


# ------------------------------------------------------------------------------ the default model (slow)

@pytest.mark.slow
def test_the_verified_mix_beats_uniform_points_on_the_default_model(default_model, tmp_path, monkeypatch):
    """The issue's check: between uniform 4-bit and 8-bit, the measured mix has lower mean KL than every uniform
    setting of equal or smaller size and lies below the line joining its uniform neighbours; at the uniform
    NF4+DQ size plus 10% it beats uniform NF4+DQ."""
    from quantlib.compare import CompareSettings, run_comparison, unique_labels

    monkeypatch.setenv("QUANTLIB_RUNS_DIR", str(tmp_path / "runs"))
    family = next(iter(rc.families()))
    sens = rc.measure_sensitivity(default_model, family, check_layers=4)
    assert sens.check["spearman_fisher"] > 0.5, sens.check
    shapes = describe_model(default_model.model)
    cfg = default_model.model.config.to_dict()
    uniform = rc.uniform_configs(family, shapes)
    sizes = [(quantizer_class(c).code_bits(c), plan_memory(cfg, c, "float32", shapes=shapes).total_bytes)
             for c in uniform]
    four = min(size for bits, size in sizes if bits == 4)  # uniform NF4+DQ
    eight = min(size for bits, size in sizes if bits == 8)  # uniform INT8
    mid = rc.recommend(sens, cfg, budget_gib=(four + eight) / 2 / rc.GIB, shapes=shapes)
    plus10 = rc.recommend(sens, cfg, budget_gib=four * 1.10 / rc.GIB, shapes=shapes)
    configs = [mid.config, plus10.config, *uniform]
    labels = unique_labels(configs)
    result = run_comparison(configs, CompareSettings(max_tokens=1024, window=1024), base=default_model, save=False)
    table = result.table
    for label, rec in zip(labels[:2], (mid, plus10)):
        row = table[table["scheme"] == label].iloc[0]
        assert row["memory_mib"] * 2**20 == pytest.approx(rec.total_bytes, rel=1e-6)  # measured == planned
        verdict = rc.judge(table[table["scheme"].isin([label, *labels[2:]])], label)
        assert verdict["beats_smaller"] is True, verdict
    verdict = rc.judge(table[table["scheme"].isin([labels[0], *labels[2:]])], labels[0])
    assert verdict["below_line"] is True, verdict


def test_judge_takes_the_better_of_two_uniform_settings_of_the_same_size_and_the_figure_draws_the_frontier():
    import pandas as pd

    from quantlib.figures import mix_frontier_figure

    table = pd.DataFrame({"scheme": ["mix", "fp4", "nf4", "int8"], "memory_mib": [180.0, 165.0, 165.0, 210.0],
                          "kl": [0.15, 0.50, 0.28, 0.02], "kl_se": [0.01, 0.02, 0.01, 0.002]})
    v = rc.judge(table, "mix")
    assert v["neighbours"] == ["nf4", "int8"]
    assert v["line_kl"] == pytest.approx(0.28 + (180 - 165) / 45 * (0.02 - 0.28))
    fig = mix_frontier_figure(table, "mix", v)
    frontier = next(t for t in fig.data if t.name == "uniform frontier")
    assert list(frontier.x) == [165.0, 210.0] and list(frontier.y) == [0.28, 0.02]
    # the axes leave room for the labels beside the outermost points (the log axis's range is in decades)
    x_lo, x_hi = fig.layout.xaxis.range
    assert x_lo < 165.0 - 5 and x_hi > 210.0 + 5
    y_lo, y_hi = fig.layout.yaxis.range
    assert 10 ** y_lo < 0.02 * 0.8 and 10 ** y_hi > 0.50 * 1.2


def test_gpt2_conv1d_layers_with_biases_are_measured_once_and_planned_exactly(tiny_tokenizer, tmp_path, cache_dir):
    """Reach: GPT-2's Conv1D modules (stored in x out, with a bias) are measured once each, and the mix's
    predicted size equals the planner's; HQQ, which replaces only nn.Linear, is refused with a reason."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from quantlib.models import load_model

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tiny_tokenizer), n_positions=512,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    gpt2 = load_model(str(tmp_path))
    shapes = describe_model(gpt2.model)
    cfg = gpt2.model.config.to_dict()
    for family in ("bitsandbytes", "gguf"):
        sens = rc.measure_sensitivity(gpt2, family, calib_tokens=64, check_layers=0)
        assert sens.rows["layer"].nunique() == 8 and (sens.rows["choice"] == "keep").sum() == 8
        lo, hi = rc.reachable_range(sens, rc.family_class(family).mix_spaces(shapes))
        rec = rc.recommend(sens, cfg, budget_gib=(lo + 0.3 * (hi - lo)) / rc.GIB, shapes=shapes)
        assert plan_memory(cfg, rec.config, "float32", shapes=shapes).total_bytes == pytest.approx(rec.total_bytes)
    with pytest.raises(rc.RecommendError, match="no layer of this model is quantizable"):
        rc.measure_sensitivity(gpt2, "hqq", calib_tokens=64, check_layers=0)
