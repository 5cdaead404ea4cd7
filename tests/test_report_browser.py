"""The HTML report renders its figures in a real browser with every network request refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantlib.compare import CompareSettings, run_comparison
from quantlib.models import load_model
from quantlib.reports import run_figures, write_outputs
from tests.e2e_support import chromium_missing_reason, launch_chromium

pytestmark = pytest.mark.e2e
SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"


@pytest.mark.skipif(chromium_missing_reason() is not None, reason=str(chromium_missing_reason()))
def test_report_renders_every_figure_offline(tiny_llama_dir, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    base = load_model(str(tiny_llama_dir))
    settings = CompareSettings(source=str(tiny_llama_dir), max_tokens=300, window=64, device="cpu")
    result = run_comparison([{"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
                             {"quant_method": "gguf", "quant_type": "Q8_0"}], settings, base=base, save=False)
    paths = write_outputs(result.run, tmp_path / "out")
    expected = len(run_figures(result.run))
    assert expected == 4
    requested: list[str] = []

    def refuse_network(route) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            requested.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.route("**/*", refuse_network)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(paths["html"].as_uri())
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {expected}",
                                   timeout=30_000)
            plots = page.locator(".js-plotly-plot").count()
            table_text = page.locator("table.summary").inner_text()
            # The page is no wider than the window: a wide summary table scrolls inside its own box.
            page_width = page.evaluate("() => document.documentElement.scrollWidth")
            # Every scheme's line in the per-layer chart has its own colour (no template needed: it drew black).
            colours = page.evaluate("() => Array.from(document.querySelectorAll('.js-plotly-plot')).map("
                                    "p => (p.data || []).map(t => (t.line && t.line.color) || (t.marker && "
                                    "t.marker.color) || null))")
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert plots == expected
    assert page_width <= 1200, page_width
    assert all(c for figure in colours for c in figure), colours
    assert "NF4" in table_text and "GGUF Q8_0" in table_text and "baseline" in table_text
    assert not errors, errors
    assert requested == [], f"the report asked the network for {requested}"
