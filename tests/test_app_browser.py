"""A person's path through the web app, in a real headless Chromium (Debian's package) driven by Playwright.

The app runs as ``eagle app`` in a subprocess on loopback (expert-only, random-weight backbone). The test
uploads references, builds a bank, inspects a defective and a good image and reads the verdicts from the
page. Screenshots are saved under ``artifacts/browser/``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, timeout: float, proc: subprocess.Popen) -> None:
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


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    port = _free_port()
    data_dir = tmp_path_factory.mktemp("app-data")
    env = {
        **os.environ,
        "EAGLE_DATA_DIR": str(data_dir),
        "EAGLE_EXPERT__WEIGHTS": "random",
        "EAGLE_EXPERT__MIN_REFERENCES": "2",
        "EAGLE_MLLM__ENABLED": "false",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "2",
    }
    log = open(data_dir / "app.log", "w")  # noqa: SIM115 - closed in the teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "eagle", "app", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for(url, 120, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_build_a_bank_and_inspect_in_the_browser(app_url, synthetic_root):
    from playwright.sync_api import sync_playwright

    category = synthetic_root / "widget"
    references = sorted((category / "train" / "good").glob("*.png"))
    defective = sorted((category / "test" / "hole").glob("*.png"))[0]
    good = sorted((category / "test" / "good").glob("*.png"))[0]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(app_url)
        page.get_by_role("tab", name="References").click()
        page.locator("#ref-files input[type=file]").set_input_files([str(p) for p in references])
        page.locator("#bank-name textarea, #bank-name input").first.fill("widget")
        page.locator("#build-bank").click()
        page.wait_for_function(
            "() => { const f = document.querySelector('#bank-facts');"
            " return f && f.innerText.includes('references'); }",
            timeout=300_000,
        )
        facts = page.inner_text("#bank-facts")
        assert f"{len(references)} references" in facts
        page.screenshot(path=str(ARTIFACTS / "1-bank-built.png"), full_page=True)

        page.get_by_role("tab", name="Inspect").click()
        assert "Expert-only mode" in page.content()
        verdicts = {}
        for label, image in (("defective", defective), ("good", good)):
            page.locator("#query-image input[type=file]").set_input_files(str(image))
            page.wait_for_timeout(500)
            before = page.get_attribute("#eagle-verdict", "data-sha") if page.locator("#eagle-verdict").count() else ""
            page.locator("#inspect").click()
            page.wait_for_function(
                "(prev) => { const v = document.querySelector('#eagle-verdict');"
                " return v && v.getAttribute('data-sha') !== prev; }",
                arg=before,
                timeout=180_000,
            )
            verdicts[label] = page.get_attribute("#eagle-verdict", "data-verdict")
            page.screenshot(path=str(ARTIFACTS / f"2-inspect-{label}.png"), full_page=True)
        # Operator feedback on the last verdict: a feedback row in the audit log, linked by the run id.
        page.locator("#feedback-confirm").click()
        page.wait_for_function(
            "() => { const s = document.querySelector('#feedback-status');"
            " return s && s.innerText.includes('confirmed'); }",
            timeout=30_000,
        )
        run_id = page.get_attribute("#eagle-verdict", "data-run-id")
        browser.close()

    assert run_id and run_id.startswith("app-")

    assert verdicts["defective"] == "defect"
    assert verdicts["good"] == "no_defect"
