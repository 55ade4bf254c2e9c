"""'This is normal — teach the bank' in a real headless Chromium (issue 14, part 1).

The app runs as ``eagle app`` in a subprocess (expert-only, the random-weight 32 × 32 expert of
``tests.service_helpers.REAL_EXPERT``). The operator builds a bank from six references, inspects a good part the bank
flags, clicks "This is normal — teach the bank", reads old τ → new τ, and inspects the part again: it passes.
Screenshots are saved under ``artifacts/browser/``.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from eagle.bank_versions import VERSIONS_DIR
from tests.service_helpers import real_env
from tests.synthetic import make_mvtec_like
from tests.test_app_browser import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS, _free_port, _wait_for
from tests.test_bank_versions import relit

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    port = _free_port()
    data_dir = tmp_path_factory.mktemp("teach-app-data")
    env = {**real_env(data_dir, OMP_NUM_THREADS="2"), "GRADIO_ANALYTICS_ENABLED": "False"}
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
        yield url, data_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _inspect(page, image) -> str:
    """Inspect ``image`` and return the verdict shown (waits for a new run id)."""
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


def test_teach_a_flagged_good_part_in_the_browser(app, tmp_path):
    from playwright.sync_api import sync_playwright

    url, data_dir = app
    root = make_mvtec_like(tmp_path / "mvtec", n_train=6, n_test_good=3, n_test_bad_per_type=1)
    references = sorted((root / "widget" / "train" / "good").glob("*.png"))
    good = relit(sorted((root / "widget" / "test" / "good").glob("*.png"))[0], tmp_path / "new-lighting.png")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(url)
        page.get_by_role("tab", name="References").click()
        page.locator("#ref-files input[type=file]").set_input_files([str(p) for p in references])
        page.locator("#bank-name textarea, #bank-name input").first.fill("widget")
        page.locator("#build-bank").click()
        page.wait_for_function(
            "() => { const f = document.querySelector('#bank-facts');"
            " return f && f.innerText.includes('references'); }",
            timeout=300_000,
        )
        page.get_by_role("tab", name="Inspect").click()
        assert _inspect(page, good) == "defect"  # a good part under new lighting is flagged
        page.screenshot(path=str(ARTIFACTS / "teach-1-flagged.png"), full_page=True)

        page.locator("#teach-bank").click()
        page.wait_for_function(
            "() => { const s = document.querySelector('#teach-status'); return s && s.innerText.includes('taught'); }",
            timeout=300_000,
        )
        status = page.inner_text("#teach-status")
        tau_before, tau_after = map(float, re.search(r"τ ([-+.\de]+) → ([-+.\de]+)", status).groups())
        page.screenshot(path=str(ARTIFACTS / "teach-2-taught.png"), full_page=True)
        assert "version 1 → 2" in status and "6 → 7 references" in status and tau_after > 0
        assert tau_before != tau_after and f"{good.name}: score" in status and "passes now" in status

        assert _inspect(page, good) == "no_defect"  # the same part, against the new version
        page.screenshot(path=str(ARTIFACTS / "teach-3-passes.png"), full_page=True)
        browser.close()

    versions = sorted(p.name for p in (data_dir / "banks" / VERSIONS_DIR / "widget").iterdir() if p.is_dir())
    assert versions == ["0001", "0002"]
