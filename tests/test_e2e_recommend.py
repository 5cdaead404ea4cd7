"""End to end: the Recommend page on the DEFAULT model in a real browser (issue 13).

Measures the default family's sensitivity (about a minute on a 2-core CPU), reads the recommendation at the
default budget (the uniform 4-bit size plus 10%), checks the export and the layer-by-depth chart, verifies the
mix on 256 tokens against every uniform setting, and saves full-page screenshots under
test-artifacts/screenshots/.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e_support import (SCREENSHOTS, assert_no_traceback, chromium_missing_reason, full_page_screenshot,
                               page_url, streamlit_server, wait_until_idle)

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(chromium_missing_reason() is not None, reason=chromium_missing_reason() or "")]

RUN_TIMEOUT_MS = 420_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with streamlit_server(env_extra={"QUANTLIB_RUNS_DIR": str(tmp_path_factory.mktemp("runs"))}) as url:
        yield url


def test_recommend_measures_exports_and_verifies_on_the_default_model(server, page):
    page.goto(page_url(server, "app_pages/5_Recommend.py"))
    wait_until_idle(page)
    assert_no_traceback(page)
    page.get_by_role("button", name="Measure sensitivity").click()
    page.get_by_role("heading", name="3 · Budget and recommendation").wait_for(timeout=RUN_TIMEOUT_MS)
    page.get_by_role("heading", name="4 · Verify").wait_for(timeout=RUN_TIMEOUT_MS)  # the whole section drawn
    page.get_by_test_id("stCode").filter(has_text='"quant_method"').first.wait_for(timeout=RUN_TIMEOUT_MS)
    page.locator(".js-plotly-plot").first.wait_for(timeout=RUN_TIMEOUT_MS)
    wait_until_idle(page, timeout_ms=RUN_TIMEOUT_MS)
    assert_no_traceback(page)
    assert page.get_by_test_id("stAlertContentError").count() == 0
    body = page.inner_text("body")
    assert re.search(r"recommended: NF4\+DQ, \d+ skipped", body), body[:3000]
    assert "planned exactly" in body and "Spearman rank correlation" in body
    exported = json.loads(page.get_by_test_id("stCode").filter(has_text='"quant_method"').first.inner_text())
    assert exported["quant_method"] == "bitsandbytes" and "lm_head" in exported["llm_int8_skip_modules"]
    assert page.locator(".js-plotly-plot").count() == 1  # the layer-by-depth chart
    full_page_screenshot(page, SCREENSHOTS / "recommend_after_measure.png")
    box = page.get_by_label("Evaluation tokens", exact=True)
    box.fill("256")
    box.press("Enter")
    wait_until_idle(page)
    page.get_by_role("button", name="Verify the recommendation").click()
    page.get_by_text(re.compile(r"measured: NF4\+DQ, \d+ skipped KL")).first.wait_for(timeout=RUN_TIMEOUT_MS)
    page.locator(".js-plotly-plot").nth(1).wait_for(timeout=RUN_TIMEOUT_MS)
    wait_until_idle(page, timeout_ms=RUN_TIMEOUT_MS)
    assert_no_traceback(page)
    assert page.locator(".js-plotly-plot").count() == 2  # + memory vs KL
    full_page_screenshot(page, SCREENSHOTS / "recommend_after_verify.png")
    body = page.inner_text("body")
    assert "KL than every uniform setting of equal or smaller size" in body
