"""Helpers for the browser tests: run `streamlit run app.py` on a free local port, drive Chromium.

Playwright drives Debian's /usr/bin/chromium (never `playwright install`): scripts/install.sh
--dev installs it with apt. The server always runs headless on 127.0.0.1 and is stopped (its whole
process group) when the context manager exits; its log is kept under test-artifacts/.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    """Poll /_stcore/health until it answers "ok"; fail early with the log if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode} before it was healthy:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200 and response.read().strip() == b"ok":
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"streamlit did not become healthy within {timeout:.0f}s:\n{_tail(log)}")


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def streamlit_server(script: str = "app.py", timeout: float = 90.0, env_extra: dict | None = None) -> Iterator[str]:
    """Start the app headless on a free port (with `env_extra` in its environment, e.g. QUANTLIB_RUNS_DIR);
    yield its base URL; always stop it afterwards."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = ARTIFACTS / f"streamlit-server-{port}.log"
    env = dict(os.environ)
    env.setdefault("QUANTLIB_CACHE", str(REPO / ".cache" / "quantlib"))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "streamlit", "run", script, "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, log, timeout)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server's process group (it was started in its own session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


def chromium_missing_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing: install Debian's chromium (bash scripts/install.sh --dev does)"
    return None


def launch_chromium(playwright):
    """Playwright's Chromium API on Debian's browser binary."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def page_url(base: str, page_file: str) -> str:
    """URL of an app_pages/ script as app.py's navigation routes it: app_pages/1_Config_Builder.py -> /Config_Builder."""
    stem = Path(page_file).stem
    name = stem.split("_", 1)[1] if stem.split("_", 1)[0].isdigit() and "_" in stem else stem
    return f"{base}/{name}"


def wait_until_idle(page, timeout_ms: int = 90_000) -> None:
    """Wait for the app to be rendered and no script run to be in progress."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout_ms)
    page.wait_for_selector('[data-testid="stMainBlockContainer"] h1', timeout=timeout_ms)
    # Streamlit marks its root with the script state ("running" / "notRunning").
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)
    page.wait_for_timeout(300)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)


def full_page_screenshot(page, path: Path, width: int = 1400) -> None:
    """Streamlit scrolls an inner container, so grow the viewport to its content before capturing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height = page.evaluate(
        "() => Math.max(document.body.scrollHeight, ...Array.from(document.querySelectorAll("
        "'[data-testid=\"stMain\"], [data-testid=\"stAppViewContainer\"], [data-testid=\"stMainBlockContainer\"]'"
        ")).map(e => e.scrollHeight))"
    )
    page.set_viewport_size({"width": width, "height": int(min(max(height + 80, 800), 12000))})
    page.wait_for_timeout(700)
    page.screenshot(path=str(path), full_page=True)


def assert_no_traceback(page) -> None:
    """No Streamlit exception box on the page (a traceback must never reach the browser)."""
    boxes = page.locator('[data-testid="stException"]')
    assert boxes.count() == 0, boxes.first.inner_text()
