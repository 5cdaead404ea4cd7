"""Opening a page under Streamlit's AppTest on a model folder (the model picker's "Local folder")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PAGES = Path(__file__).resolve().parents[1] / "app_pages"


def page_on_folder(page: str, ns: str, folder: Any, timeout: float = 180) -> Any:
    """AppTest of `app_pages/<page>` with its model picker (namespace `ns`) set to the local `folder`; asserts that
    nothing raised on the way."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(PAGES / page), default_timeout=timeout)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    at.radio(key=f"{ns}.model.kind").set_value("Local folder").run()
    at.text_input(key=f"{ns}.model.path.Local folder").input(str(folder)).run()
    assert not at.exception, [e.message for e in at.exception]
    return at
