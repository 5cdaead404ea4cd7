"""End to end: the real app in a real browser (Debian chromium driven by Playwright).

Starts `streamlit run app.py` headless on a free port, builds an NF4 config in the Config Builder,
downloads it and loads it with transformers, follows the share link, and takes a full-page
screenshot of every page under test-artifacts/screenshots/ (gitignored) for a human to look at.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlparse

import pytest

from tests.e2e_support import (ARTIFACTS, SCREENSHOTS, assert_no_traceback, chromium_missing_reason,
                               full_page_screenshot, page_url, streamlit_server, wait_until_idle)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(chromium_missing_reason() is not None, reason=chromium_missing_reason() or "")]

PAGES = ["app.py", "app_pages/1_Config_Builder.py", "app_pages/2_Quantize_and_Inspect.py", "app_pages/3_Compare_Schemes.py",
         "app_pages/4_Memory_Planner.py"]


def choose_option(page, select_label: str, option: str, tries: int = 3) -> None:
    """Open a selectbox (Streamlit 1.67's combobox) by its label and pick `option`; the list is opened again if a
    rerun closed it before the option could be clicked."""
    combobox = page.get_by_test_id("stSelectbox").filter(has_text=select_label).get_by_role("combobox")
    for attempt in range(tries):
        combobox.click()
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=10_000)
            return
        except Exception:  # noqa: BLE001 - closed by a rerun: open it again
            if attempt == tries - 1:
                raise
            wait_until_idle(page)


@pytest.fixture(scope="module")
def server():
    with streamlit_server() as url:
        yield url


def test_build_nf4_download_and_share(server, page, tmp_path):
    from playwright.sync_api import expect
    from transformers import BitsAndBytesConfig

    page.goto(page_url(server, "app_pages/1_Config_Builder.py"))
    wait_until_idle(page)
    assert_no_traceback(page)
    json_block = page.get_by_test_id("stCode").first

    page.get_by_test_id("stRadio").get_by_text("4-bit", exact=True).click()
    wait_until_idle(page)  # the rerun the radio started: a list opened during it closes again
    choose_option(page, "4-bit type", "nf4")
    expect(json_block).to_contain_text('"bnb_4bit_quant_type": "nf4"')
    page.get_by_test_id("stCheckbox").filter(has_text="Double quantization").locator("label").click()
    expect(json_block).to_contain_text('"bnb_4bit_use_double_quant": true')
    wait_until_idle(page)
    assert_no_traceback(page)

    with page.expect_download() as info:
        page.get_by_test_id("stDownloadButton").get_by_role("button").click()
    download = info.value
    assert download.suggested_filename == "quantization_config.json"
    target = tmp_path / download.suggested_filename
    download.save_as(target)
    (ARTIFACTS / "downloads").mkdir(parents=True, exist_ok=True)
    download.save_as(ARTIFACTS / "downloads" / download.suggested_filename)
    config = BitsAndBytesConfig.from_dict(json.loads(target.read_text()))
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True

    # The address bar now encodes the config; opening it in a fresh page reproduces it.
    query = parse_qs(urlparse(page.url).query)
    assert query.get("method") == ["bitsandbytes"] and query.get("cfg"), page.url
    shared = page.context.new_page()
    shared.goto(page.url)
    wait_until_idle(shared)
    expect(shared.get_by_test_id("stCode").first).to_contain_text('"bnb_4bit_use_double_quant": true')
    expect(shared.get_by_test_id("stCode").first).to_contain_text('"bnb_4bit_quant_type": "nf4"')
    full_page_screenshot(shared, SCREENSHOTS / "config_builder_nf4_dq.png")
    shared.close()


def test_invalid_paste_shows_error_not_traceback(server, page):
    from playwright.sync_api import expect

    page.goto(page_url(server, "app_pages/1_Config_Builder.py"))
    wait_until_idle(page)
    page.get_by_text("Load an existing config").click()
    page.get_by_test_id("stTextArea").locator("textarea").fill('{"quant_method": "rtn", "bits": 1}')
    page.get_by_test_id("stTextArea").locator("textarea").press("Control+Enter")
    page.get_by_role("button", name="Load pasted JSON").click()
    expect(page.get_by_test_id("stAlertContentError").first).to_contain_text("bits")
    wait_until_idle(page)
    assert_no_traceback(page)
    full_page_screenshot(page, SCREENSHOTS / "config_builder_load_error.png")


@pytest.mark.parametrize("page_file", PAGES)
def test_every_page_renders(server, page, page_file):
    from tests.e2e_support import REPO

    if not (REPO / page_file).is_file():
        pytest.skip(f"{page_file} does not exist yet")
    page.goto(server if page_file == "app.py" else page_url(server, page_file))
    wait_until_idle(page)
    if page_file.endswith("Memory_Planner.py"):
        page.get_by_test_id("stDataFrame").first.wait_for(timeout=90_000)
        page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
        wait_until_idle(page)
    name = "home" if page_file == "app.py" else page_file.split("/")[-1].removesuffix(".py")
    full_page_screenshot(page, SCREENSHOTS / f"{name}.png")  # first, so a failure leaves a picture
    assert_no_traceback(page)
    assert page.get_by_test_id("stAlertContentError").count() == 0, page.get_by_test_id(
        "stAlertContentError").first.inner_text()


@pytest.mark.parametrize("first", ["", "Compare_Schemes"])
def test_one_page_list_names_the_sidebar_and_the_home_page(server, page, first):
    """The sidebar lists exactly `PAGES` after a page called "Home" (it said "app" before), in order, whether the
    first page opened is the home page or a deep link on a fresh session."""
    from app_support.home import HOME_LABEL, PAGES

    page.goto(f"{server}/{first}")
    wait_until_idle(page)
    nav = page.get_by_test_id("stSidebarNav")
    nav.wait_for(timeout=60_000)
    names = [t.strip() for t in nav.get_by_test_id("stSidebarNavLink").all_inner_texts()]
    assert [n.splitlines()[-1].strip() for n in names] == [HOME_LABEL, *(p.label for p in PAGES)]
    assert_no_traceback(page)


def test_config_builder_selects_show_their_whole_value_at_1000_px(server, page):
    """At 1000 px the Preset and Method selects sat side by side and were cut to "(custom" and "bitsandb"; every
    select of the builder now shows its whole value."""
    page.set_viewport_size({"width": 1000, "height": 900})
    page.goto(page_url(server, "app_pages/1_Config_Builder.py"))
    wait_until_idle(page)
    clipped = page.evaluate("""() => Array.from(document.querySelectorAll('[data-testid="stSelectbox"] input'))
        .filter(input => input.value && input.scrollWidth > input.clientWidth + 1).map(input => input.value)""")
    assert clipped == [], clipped
    full_page_screenshot(page, SCREENSHOTS / "config_builder_1000.png", width=1000)
