"""A finished run checked with a method's own tools (issue 27: llama.cpp's size and KL beside quantlib's, in the CLI,
the Compare page and the report). The engine is tested with a stand-in check; llama.cpp itself where it is built
(CI does not build it, and those tests say so when they skip)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from quantlib.compare import CompareSettings, run_comparison
from quantlib.presets import preset
from quantlib.reports import check_lines, render_html
from quantlib.runs import load_run
from quantlib.tool_checks import available_checks, evaluate, run_tool_check

REPO = Path(__file__).resolve().parents[1]
COMPARE = str(REPO / "app_pages" / "3_Compare_Schemes.py")
#: where scripts/llamacpp_golden.py builds llama.cpp outside the tests (conftest points QUANTLIB_CACHE elsewhere)
BUILT = Path.home() / ".cache" / "quantlib" / "llamacpp" / "build" / "bin"


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "runs"
    monkeypatch.setenv("QUANTLIB_RUNS_DIR", str(folder))
    return folder


@pytest.fixture
def tiny_run(tiny_llama_dir, runs_dir):
    settings = CompareSettings(source=str(tiny_llama_dir), max_tokens=128, window=64, device="cpu")
    return run_comparison([preset("gguf-q4_0"), preset("nf4")], settings, save=True).run


class StandIn:
    """A check as a method offers one, computing quantlib's own row through `evaluate` (what llama.cpp's does too)."""

    check_title = "a stand-in tool"

    def applies(self, config) -> bool:
        return True

    def unavailable(self, source="default"):
        return None

    def check(self, config, source, evaluate_fn, progress=None):
        seen = []
        row = evaluate_fn(config, source, 96, 64, 32, progress=lambda f, m: seen.append(f))
        assert seen and max(seen) > 0.5  # the comparison reported its progress through the check
        return {"kl": float(row["kl"]), "kl_se": float(row["kl_se"]), "source": source}

    @staticmethod
    def summary_lines(result):
        return [f"{result['source']}", f"  KL {result['kl']:.4f} ± {result['kl_se']:.4f} (the tool's own figure)"]


def test_a_gguf_run_offers_llama_cpp_and_says_why_it_cannot_run_here(tiny_run, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QUANTLIB_LLAMA_CPP", str(tmp_path / "no-tools"))
    checks = available_checks(tiny_run)
    assert [label for label, _, _ in checks] == ["GGUF Q4_0"]  # NF4 has no tool of its own to check with
    label, check, why = checks[0]
    assert "llama.cpp" in check.check_title
    # a model from a folder: llama.cpp needs a GGUF file, which the page cannot make
    assert "not a GGUF file" in why and "convert_hf_to_gguf.py" in why
    # the default model (a GGUF file) with the tools missing: where they were looked for, and how to point there
    why = check.unavailable("default")
    assert "llama-quantize is not in" in why and "QUANTLIB_LLAMA_CPP" in why
    assert check.unavailable("/models/x.gguf") == why


def test_a_check_s_figures_reach_the_saved_run_the_report_and_the_check_lines(tiny_run, runs_dir) -> None:
    stored = run_tool_check(tiny_run, "GGUF Q4_0", StandIn())
    assert stored["title"] == "a stand-in tool" and stored["result"]["kl"] > 0
    reopened = load_run(next(runs_dir.glob("*.run.json")))  # written again, under the same id
    assert reopened.run_id == tiny_run.run_id
    line = next(x for x in check_lines(reopened) if x.startswith("a stand-in tool, GGUF Q4_0:"))
    assert "the tool's own figure" in line
    assert "a stand-in tool, GGUF Q4_0" in render_html(reopened)


def test_a_check_of_a_scheme_the_run_does_not_hold_is_refused(tiny_run) -> None:
    from quantlib.errors import QuantlibError

    with pytest.raises(QuantlibError, match="no scheme 'Q9_9'.*GGUF Q4_0, NF4"):
        run_tool_check(tiny_run, "Q9_9", StandIn())


def test_quantlib_s_row_for_a_check_is_the_comparison_s(tiny_llama_dir) -> None:
    row = evaluate(preset("gguf-q4_0"), str(tiny_llama_dir), 96, 64, 32)
    settings = CompareSettings(source=str(tiny_llama_dir), max_tokens=96, window=64, stride=32, device="cpu")
    table = run_comparison([preset("gguf-q4_0")], settings, save=False).table.set_index("scheme")
    assert row["kl"] == table.loc["GGUF Q4_0", "kl"] and row["kl"] > 0


def test_the_compare_page_offers_the_check_and_explains_a_missing_tool(tiny_llama_dir, runs_dir, tmp_path,
                                                                      monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("QUANTLIB_LLAMA_CPP", str(tmp_path / "no-tools"))
    at = AppTest.from_file(COMPARE, default_timeout=180)
    at.run()
    at.radio(key="compare.model.kind").set_value("Local folder").run()
    at.text_input(key="compare.model.path.Local folder").input(str(tiny_llama_dir)).run()
    at.multiselect(key="compare.configs").set_value(["NF4", "GGUF Q4_0"])
    at.number_input(key="compare.tokens").set_value(128)
    at.number_input(key="compare.window").set_value(64)
    at.run()
    at.button(key="compare.run").click().run(timeout=180)
    assert not at.exception, [e.message for e in at.exception]
    captions = [c.value for c in at.caption]
    assert any(c.startswith("GGUF Q4_0: llama.cpp's own tools") and "not a GGUF file" in c for c in captions)
    assert not [b for b in at.button if b.key and b.key.startswith("compare.latest.tool.")]  # no button to fail


@pytest.mark.skipif(not (BUILT / "llama-perplexity").exists(),
                    reason=f"llama.cpp is not built here ({BUILT}); CI does not build it")
def test_llama_cpp_s_figures_join_a_default_model_run(runs_dir, monkeypatch) -> None:
    """The real check on the default model: llama.cpp's KL within 3 combined SE of quantlib's on the same 4,096 tokens,
    its file's tensor bytes equal to the plan."""
    monkeypatch.setenv("QUANTLIB_LLAMA_CPP", str(BUILT))
    config = {"quant_method": "gguf", "quant_type": "Q4_0", "llama_quantize_rules": True}
    run = run_comparison([config, preset("nf4")], CompareSettings(max_tokens=128, window=64, device="cpu"),
                         save=True).run
    label = run.configs[0]["label"]
    before = set(Path(tempfile.gettempdir()).glob("quantlib_llamacpp_*"))
    stored = run_tool_check(run, label, available_checks(run)[0][1])
    assert set(Path(tempfile.gettempdir()).glob("quantlib_llamacpp_*")) == before  # its GGUF files are gone
    result = stored["result"]
    q, ll = result["quantlib"], result["llama.cpp"]
    assert abs(q["kl"] - ll["kl"]) < 3 * (q["kl_se"] ** 2 + ll["kl_se"] ** 2) ** 0.5, result
    assert abs(q["memory_mib"] - result["llama.cpp_mib"]) < 0.01, result
    assert any(line.startswith("llama.cpp's own tools") and "KL" in line for line in check_lines(load_run(run.run_id)))
