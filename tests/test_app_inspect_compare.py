"""Quantize and Inspect and Compare Schemes pages, driven headlessly with AppTest on the tiny Llama.

The tiny model (2 layers, hidden 64, char tokenizer) makes a full run take seconds; the default
model is exercised by the browser test (tests/test_e2e_compare.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[1]
INSPECT = str(REPO / "app_pages" / "2_Quantize_and_Inspect.py")
COMPARE = str(REPO / "app_pages" / "3_Compare_Schemes.py")
TIMEOUT = 120
FOLDER = "Local folder"


def start(path: str) -> AppTest:
    at = AppTest.from_file(path, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def use_folder(at: AppTest, ns: str, folder: Path | str) -> None:
    at.radio(key=f"{ns}.model.kind").set_value(FOLDER).run()
    at.text_input(key=f"{ns}.model.path.{FOLDER}").input(str(folder)).run()
    no_exception(at)


def charts(at: AppTest) -> list:
    return list(at.get("plotly_chart"))


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "runs"
    monkeypatch.setenv("QUANTLIB_RUNS_DIR", str(folder))
    return folder


# ------------------------------------------------------------------------------ Quantize and Inspect

def test_inspect_renders_with_default_model_description():
    at = start(INSPECT)
    assert not errors(at)
    text = " ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
    assert "Q4_1" in text and "SmolLM2" in text  # the default model's weights went through GGUF Q4_1
    assert "CPU" in text or "CUDA" in text
    assert at.checkbox(key="inspect.model.trust_remote_code").value is False
    assert at.checkbox(key="inspect.model.allow_pickle").value is False
    assert any("Estimated run time" in c.value for c in at.caption)


@pytest.mark.parametrize("config", ["RTN int4 g64", "NF4"])
def test_inspect_tiny_model(tiny_llama_dir, config):
    at = start(INSPECT)
    use_folder(at, "inspect", tiny_llama_dir)
    assert not errors(at)
    assert any("LlamaForCausalLM" in m.value for m in at.markdown)
    at.selectbox(key="inspect.config_name").set_value(config)
    at.number_input(key="inspect.tokens").set_value(256)
    at.number_input(key="inspect.window").set_value(128)
    at.run()
    assert any("Preflight" in s.value for s in at.success)
    assert at.button(key="inspect.cancel_button").disabled  # idle: nothing to cancel
    at.button(key="inspect.run").click().run(timeout=TIMEOUT)
    no_exception(at)
    assert not errors(at)
    # The run is over: Cancel is drawn disabled again beside the results (it said "Run cancelled" when clicked).
    assert at.button(key="inspect.cancel_button_done").disabled
    assert not [b for b in at.button if b.key == "inspect.cancel_button"]
    result = at.session_state["inspect.result"]
    layers = result["layers"]
    assert len(layers) == 14 and (layers["rel_fro_error"] > 0).all()
    assert "rel_fro_error" in at.dataframe[0].value.columns
    titles = [c.proto.spec for c in charts(at)]
    assert len(titles) >= 5  # layer errors, histogram, code usage, memory, outliers
    assert any("Block-normalized" in t or "block absmax" in t for t in titles)
    assert any("code usage" in t for t in titles)
    metrics = {m.label: m.value for m in at.metric}
    value, se = metrics["Perplexity (baseline)"].split(" ± ")  # every figure comes with its standard error
    assert float(value) > 1 and float(se) > 0
    assert " ± " in metrics["Top-1 agreement"] and " ± " in metrics["KL (nats/token)"]
    assert all(len(v) <= 18 for v in metrics.values()), metrics  # short enough not to be cut at 1000 px

    # The threshold slider recomputes the outlier table from the stored maxima (no rerun of the model).
    before = metrics["Share of matmul in 16-bit"]
    at.slider(key="inspect.threshold").set_value(0.5).run()
    no_exception(at)
    assert at.session_state["inspect.result"] is result  # nothing recomputed
    after = {m.label: m.value for m in at.metric}["Share of matmul in 16-bit"]
    assert float(after.rstrip("%")) >= float(before.rstrip("%"))

    # Another layer in the picker: its histogram is drawn, still no exception.
    at.selectbox(key="inspect.layer").set_value(layers["layer"].iloc[0]).run()
    no_exception(at)
    assert any(layers["layer"].iloc[0] in c.proto.spec for c in charts(at))


def test_inspect_missing_folder_shows_error(tmp_path):
    at = start(INSPECT)
    use_folder(at, "inspect", tmp_path / "does-not-exist")
    assert any("does not exist" in e for e in errors(at))
    assert "inspect.result" not in at.session_state
    no_exception(at)


def test_inspect_config_that_does_not_fit(tiny_llama_dir):
    at = start(INSPECT)
    use_folder(at, "inspect", tiny_llama_dir)
    # hidden 64 / intermediate 128 are not multiples of 96
    at.session_state["builder.config"] = {"quant_method": "rtn", "bits": 4, "granularity": "group", "group_size": 96}
    at.session_state["builder.label"] = "RTN int4 g96"
    at.run()
    at.selectbox(key="inspect.config_name").set_value("Config Builder: RTN int4 g96").run()
    no_exception(at)
    assert any("does not fit" in e for e in errors(at))
    assert at.button(key="inspect.run").disabled


# ------------------------------------------------------------------------------ Compare Schemes

def test_compare_renders():
    at = start(COMPARE)
    assert not errors(at)
    assert at.multiselect(key="compare.configs").value == ["NF4", "FP4"]
    assert any("Estimated run time" in c.value for c in at.caption)


def test_compare_needs_two_to_six_configs():
    at = start(COMPARE)
    at.multiselect(key="compare.configs").set_value(["NF4"]).run()
    assert any("at least 2" in w.value for w in at.warning)
    assert at.button(key="compare.run").disabled
    many = at.multiselect(key="compare.configs").options[:7]
    at.multiselect(key="compare.configs").set_value(many).run()
    assert any("at most 6" in w.value for w in at.warning)
    assert at.button(key="compare.run").disabled


def test_compare_tiny_model_and_earlier_runs(tiny_llama_dir, runs_dir):
    at = start(COMPARE)
    use_folder(at, "compare", tiny_llama_dir)
    at.multiselect(key="compare.configs").set_value(["NF4", "RTN int8 channel"])
    at.number_input(key="compare.tokens").set_value(256)
    at.number_input(key="compare.window").set_value(128)
    at.run()
    assert not at.button(key="compare.run").disabled
    at.button(key="compare.run").click().run(timeout=TIMEOUT)
    no_exception(at)
    assert not errors(at)
    assert at.button(key="compare.cancel_button_done").disabled and at.button(key="compare.keep_button_done").disabled
    table = at.table[0].value
    assert list(table["scheme"]) == ["baseline float32", "NF4", "RTN int8 channel"]
    assert all(" ± " in p and float(p.split(" ± ")[0]) > 1 for p in table["perplexity"]), table["perplexity"]
    verdicts = [m.value for m in [*at.success, *at.warning] if "Ranking by mean KL" in m.value]
    assert len(verdicts) == 1 and "NF4" in verdicts[0] and "RTN int8 channel" in verdicts[0], verdicts
    assert len(charts(at)) == 4  # trade-off, KL, per-layer error, memory
    assert len(at.get("download_button")) == 3
    saved = list(runs_dir.glob("*.run.json"))
    assert len(saved) == 1
    earlier = at.dataframe[0].value
    assert saved[0].name.startswith(earlier["run_id"].iloc[0])
    at.button(key="compare.earlier.open").click().run()
    no_exception(at)
    assert len(charts(at)) == 8  # the reopened run draws the same figures
    assert list(at.table[1].value["scheme"]) == list(table["scheme"])


def test_compare_bad_text_and_missing_folder(tmp_path):
    at = start(COMPARE)
    at.radio(key="compare.text_kind").set_value("Paste text").run()
    at.text_area(key="compare.paste").input("abc\x00def").run()
    no_exception(at)
    assert any("binary" in e for e in errors(at))
    assert at.button(key="compare.run").disabled
    use_folder(at, "compare", tmp_path / "nope")
    assert any("does not exist" in e for e in errors(at))
    assert at.button(key="compare.run").disabled


def test_compare_shows_each_config_s_weights_only_share_beside_it(tiny_llama_dir, runs_dir):
    """The checkbox adds the weights-only twin of every config that quantizes activations (here NVFP4's W4A4), right
    after it; a weights-only method (NF4) gets none."""
    at = start(COMPARE)
    use_folder(at, "compare", tiny_llama_dir)
    nvfp4 = next(o for o in at.multiselect(key="compare.configs").options if o.startswith("CT NVFP4"))
    at.multiselect(key="compare.configs").set_value(["NF4", nvfp4])
    at.checkbox(key="compare.weights_only_too").check()
    at.number_input(key="compare.tokens").set_value(256)
    at.number_input(key="compare.window").set_value(128)
    at.run()
    assert any("for 3 config(s)" in c.value for c in at.caption), [c.value for c in at.caption]
    at.button(key="compare.run").click().run(timeout=TIMEOUT)
    no_exception(at)
    assert not errors(at)
    assert list(at.table[0].value["scheme"]) == ["baseline float32", "NF4", "CT NVFP4", "CT NVFP4, weights only"]


def test_with_weights_only_pairs_every_config_that_quantizes_activations():
    from quantlib.compare import with_weights_only
    from quantlib.presets import preset

    labels = [c.label for c in with_weights_only([preset("ct-nvfp4"), preset("nf4"), preset("gguf-q4_0"),
                                                  preset("fp8-block32"),
                                                  {"quant_method": "compressed-tensors", "scheme": "NVFP4A16"}])]
    assert labels == ["CT NVFP4", "CT NVFP4, weights only", "NF4", "GGUF Q4_0", "GGUF Q4_0, weights only",
                      "FP8 32x32", "FP8 32x32, weights only", "CT NVFP4A16"]
