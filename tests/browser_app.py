"""The browser tests' shared set-up: the app as ``eagle app`` on loopback, Debian's Chromium, and a person's steps.

Playwright drives Debian's Chromium (no browser download); each test module starts its own app with the
settings it needs (:func:`running_app`) and uses the steps below, so the tests read as what a person does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"app did not answer on {url} within {timeout}s")


@contextlib.contextmanager
def running_app(data_dir: Path, env: dict[str, str]) -> Iterator[str]:
    """``eagle app`` in a subprocess on a free loopback port with ``env`` added; yields its URL.

    Skips the test when Debian's Chromium is missing (``.ci/run`` installs it).
    """
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    port = free_port()
    full_env = {
        **os.environ,
        "EAGLE_DATA_DIR": str(data_dir),
        "EAGLE_MLLM__ENABLED": "false",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "2",
        **env,
    }
    with open(data_dir / "app.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "eagle", "app", "--host", "127.0.0.1", "--port", str(port)],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/"
        try:
            wait_for(url, 120, proc)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def browser_page(url: str) -> Iterator[object]:
    """A Chromium page on ``url`` (Playwright), closed afterwards; screenshots go to :data:`ARTIFACTS`."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(url)
            yield page
        finally:
            browser.close()


def upload_references(page, references: Sequence[Path]) -> None:
    """Upload the references and wait until the file list shows every one of them.

    An upload into a page that is still starting (its load event running, the app warming its ONNX cache on 2
    cores) is sometimes dropped without a sign; it is retried, so a build is never clicked on an empty upload.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(3):
        page.locator("#ref-files input[type=file]").set_input_files([str(p) for p in references])
        try:
            page.wait_for_function(  # every file listed with its server-side download link: the upload is done
                "(n) => document.querySelectorAll("
                "'#ref-files tr.file a[data-testid=download-link][href*=\"gradio_api/file=\"]').length === n",
                arg=len(references),
                timeout=60_000,
            )
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"the reference upload never listed its {len(references)} files")


def build_bank(
    page,
    references: Sequence[Path],
    name: str,
    *,
    before_build: Callable[[object], None] | None = None,
    facts_contain: str = "references",
) -> str:
    """References tab: upload, name, (optional extra steps), build; returns the bank facts once they show."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.get_by_role("tab", name="References").click()
    upload_references(page, references)
    page.locator("#bank-name textarea, #bank-name input").first.fill(name)
    if before_build is not None:
        before_build(page)
    page.locator("#build-bank").click()
    try:
        page.wait_for_function(
            "(text) => { const f = document.querySelector('#bank-facts'); return f && f.innerText.includes(text); }",
            arg=facts_contain,
            timeout=300_000,
        )
    except PlaywrightTimeout:
        page.screenshot(path=str(ARTIFACTS / f"build-{name}-timed-out.png"), full_page=True)
        toasts = page.locator(".toast-body").all_inner_texts()
        raise AssertionError(f"bank {name!r} never showed its facts; messages on the page: {toasts}") from None
    return page.inner_text("#bank-facts")


def inspect(page, image: Path) -> str:
    """Inspect tab (already open): upload ``image``, inspect, wait for the NEW verdict (its run id); return it."""
    page.locator("#query-image input[type=file]").set_input_files(str(image))
    page.wait_for_timeout(500)
    shown = page.locator("#eagle-verdict").count()
    previous = page.get_attribute("#eagle-verdict", "data-run-id") if shown else ""
    page.locator("#inspect").click()
    page.wait_for_function(
        "(prev) => { const v = document.querySelector('#eagle-verdict');"
        " return v && v.getAttribute('data-run-id') !== prev; }",
        arg=previous,
        timeout=180_000,
    )
    return page.get_attribute("#eagle-verdict", "data-verdict")
