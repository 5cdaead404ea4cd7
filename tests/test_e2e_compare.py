"""End to end: Compare Schemes and Quantize and Inspect on the DEFAULT model, in a real browser.

Starts `streamlit run app.py` headless (runs saved to a temporary QUANTLIB_RUNS_DIR), compares NF4
and FP4 on 512 tokens (window 256) to the finished table, checks both schemes have perplexities,
reopens the run from "Earlier runs", runs Quantize and Inspect with NF4 on 256 tokens, and saves
full-page screenshots of both pages under test-artifacts/screenshots/. About 2-3 minutes on a
2-core CPU.
"""

from __future__ import annotations

import re

import pytest

from tests.e2e_support import (SCREENSHOTS, assert_no_traceback, chromium_missing_reason, full_page_screenshot,
                               page_url, streamlit_server, wait_until_idle)

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(chromium_missing_reason() is not None, reason=chromium_missing_reason() or "")]

RUN_TIMEOUT_MS = 420_000


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def server(runs_folder):
    with streamlit_server(env_extra={"QUANTLIB_RUNS_DIR": str(runs_folder)}) as url:
        yield url


def assert_no_error(page) -> None:
    errors = page.get_by_test_id("stAlertContentError")
    assert errors.count() == 0, errors.first.inner_text()


def set_number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    wait_until_idle(page)


def wait_for_run(page, heading: str) -> None:
    page.get_by_role("heading", name=heading).first.wait_for(timeout=RUN_TIMEOUT_MS)
    wait_until_idle(page, timeout_ms=RUN_TIMEOUT_MS)


def table_text(page, index: int = 0) -> str:
    """Text of an st.table (static HTML; st.dataframe draws on a canvas)."""
    table = page.get_by_test_id("stTable").nth(index)
    table.wait_for()
    return table.inner_text()


def test_compare_nf4_fp4_on_default_model(server, page, runs_folder):
    page.goto(page_url(server, "app_pages/3_Compare_Schemes.py"))
    wait_until_idle(page)
    assert_no_traceback(page)
    selected = page.get_by_test_id("stMultiSelect").first.inner_text()
    assert "NF4" in selected and "FP4" in selected
    set_number(page, "Tokens", 512)
    set_number(page, "Window", 256)
    page.get_by_role("button", name="Run comparison").click()
    wait_for_run(page, "Results")
    full_page_screenshot(page, SCREENSHOTS / "compare_schemes_after_run.png")  # first: a failure leaves a picture
    assert_no_traceback(page)
    assert_no_error(page)

    table = table_text(page, 0)
    for scheme in ("baseline float32", "NF4", "FP4"):
        assert scheme in table, table
    # Read the perplexity column by its header (a bare number pattern also matched bits/param).
    # st.table's text: rows apart by blank-line runs, cells by tabs.
    rows = [[c.strip() for c in row.split("\t")] for row in re.split(r"\n{3,}", table.strip()) if row.strip()]
    header = next(r for r in rows if "perplexity" in r)
    col = header.index("perplexity")
    cells = {r[header.index("scheme")]: r[col] for r in rows if r is not header and len(r) == len(header)}
    assert set(cells) >= {"baseline float32", "NF4", "FP4"}, table
    # "value ± standard error": the uncertainty is shown with every perplexity.
    assert all(re.fullmatch(r"\d+\.\d{3} ± \d+\.\d{3}", c) for c in cells.values()), cells
    perplexities = {k: float(c.split(" ± ")[0]) for k, c in cells.items()}
    assert all(1 < v < 1000 for v in perplexities.values()), perplexities
    assert perplexities["NF4"] != perplexities["baseline float32"], perplexities
    assert page.locator(".js-plotly-plot").count() >= 4
    assert len(list(runs_folder.glob("*.run.json"))) == 1

    # The earlier-runs section lists it; reopening draws the same table.
    page.get_by_role("button", name="Open this run").click()
    wait_until_idle(page)
    page.get_by_role("heading", name=re.compile(r"^Run \d{8}-")).wait_for()
    assert "FP4" in table_text(page, 1)
    assert_no_traceback(page)
    full_page_screenshot(page, SCREENSHOTS / "compare_schemes_after_run.png")


def test_compare_streams_and_stop_keeps_a_partial_run(server, page, runs_folder):
    """Issue 11: the table fills in window by window while the run goes; "Stop and keep results" saves
    what was computed as a partial run, marked with its token count, and shows it."""
    before = set(runs_folder.glob("*.run.json"))
    page.goto(page_url(server, "app_pages/3_Compare_Schemes.py"))
    wait_until_idle(page)
    set_number(page, "Tokens", 8192)
    set_number(page, "Window", 256)
    page.get_by_role("button", name="Run comparison").click()
    running = page.get_by_text(re.compile(r"Running: [\d,]+/[\d,]+ tokens so far"))
    running.first.wait_for(timeout=RUN_TIMEOUT_MS)
    live = table_text(page, 0)
    assert "NF4" in live and "FP4" in live and " ± " in live, live
    full_page_screenshot(page, SCREENSHOTS / "compare_schemes_streaming.png")
    page.get_by_role("button", name="Stop and keep results").click()
    page.get_by_text(re.compile(r"Partial run: [\d,]+ of 8,192 tokens evaluated \(stopped by the user\)")) \
        .first.wait_for(timeout=RUN_TIMEOUT_MS)
    wait_until_idle(page)
    assert_no_traceback(page)
    assert_no_error(page)
    full_page_screenshot(page, SCREENSHOTS / "compare_schemes_partial.png")
    saved = set(runs_folder.glob("*.run.json")) - before
    assert len(saved) == 1
    import json

    run = json.loads(next(iter(saved)).read_text())
    assert run["status"] == "partial" and run["extra"]["partial"] is True
    assert 0 < run["settings"]["n_tokens"] < 8192 and run["settings"]["tokens_planned"] == 8192
    rows = run["tables"]["summary"]
    assert {r["scheme"] for r in rows} >= {"NF4", "FP4"}
    assert all(r["n_tokens"] == run["settings"]["n_tokens"] for r in rows)


def test_inspect_nf4_on_default_model(server, page):
    page.goto(page_url(server, "app_pages/2_Quantize_and_Inspect.py"))
    wait_until_idle(page)
    assert_no_traceback(page)
    page.get_by_test_id("stSelectbox").filter(has_text="Config").first.click()
    page.get_by_role("option", name="NF4", exact=True).click()
    wait_until_idle(page)
    set_number(page, "Evaluation tokens", 256)
    set_number(page, "Window", 256)
    page.get_by_role("button", name="Quantize and inspect").click()
    wait_for_run(page, "Per-layer weight error")
    page.locator(".js-plotly-plot").nth(4).wait_for()
    wait_until_idle(page)
    full_page_screenshot(page, SCREENSHOTS / "quantize_and_inspect_after_run.png")
    assert_no_traceback(page)
    assert_no_error(page)
    metrics = page.get_by_test_id("stMetric").all_inner_texts()
    assert any("Perplexity (NF4)" in m for m in metrics), metrics
    full_page_screenshot(page, SCREENSHOTS / "quantize_and_inspect_after_run.png")
