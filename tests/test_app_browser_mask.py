"""Issue 14 §2 in a real browser: build a bank with an uploaded inspection-mask PNG, then a defect outside the mask
passes and one inside is flagged. Same Chromium/Playwright set-up as ``tests/test_app_browser.py`` (its helpers).

The app runs as ``eagle app`` in a subprocess (expert-only, random-weight backbone at 128 px input, so the
build takes seconds). The references are flat grey with noise; the defects are solid red squares painted on
the first reference, one at the far left (outside the mask: the right half) and one inside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_app_browser import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS, _free_port, _wait_for

pytestmark = pytest.mark.browser

SIZE = 96
OUTSIDE = (2, 40, 14, 56)  # x0, y0, x1, y1 at the far left: the backbone's receptive field does not reach the mask
INSIDE = (70, 36, 90, 60)


def _normal(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(128 + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _defect(box: tuple[int, int, int, int]) -> np.ndarray:
    image = _normal(0)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = (255, 0, 0)
    return image


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("mask-images")
    references = []
    for i in range(6):
        path = root / f"good-{i}.png"
        Image.fromarray(_normal(i)).save(path)
        references.append(path)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 :] = 255  # inspect the right half only
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(_defect(OUTSIDE)).save(root / "defect-outside.png")
    Image.fromarray(_defect(INSIDE)).save(root / "defect-inside.png")
    return {"references": references, "mask": root / "mask.png", "root": root}


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    port = _free_port()
    data_dir = tmp_path_factory.mktemp("app-mask-data")
    env = {
        **os.environ,
        "EAGLE_DATA_DIR": str(data_dir),
        "EAGLE_EXPERT__WEIGHTS": "random",
        "EAGLE_EXPERT__RESIZE": "128",
        "EAGLE_EXPERT__CROP": "128",
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


def _inspect(page, image: Path) -> str:
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
    return page.get_attribute("#eagle-verdict", "data-verdict")


def test_a_bank_with_an_uploaded_mask_ignores_a_defect_outside_it(app_url, files):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    root = files["root"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(app_url)
        page.get_by_role("tab", name="References").click()
        page.locator("#ref-files input[type=file]").set_input_files([str(p) for p in files["references"]])
        page.locator("#bank-name textarea, #bank-name input").first.fill("masked")
        page.get_by_text("Inspection mask (optional)").click()
        page.locator("#mask-file input[type=file]").set_input_files(str(files["mask"]))
        page.wait_for_timeout(500)
        page.locator("#build-bank").click()
        page.wait_for_function(
            "() => { const f = document.querySelector('#bank-facts');"
            " return f && f.innerText.includes('Inspection mask'); }",
            timeout=300_000,
        )
        facts = page.inner_text("#bank-facts")
        assert "6 references" in facts and "Inspection mask: 128 of 256 patches" in facts
        page.screenshot(path=str(ARTIFACTS / "mask-1-bank-built.png"), full_page=True)

        page.get_by_role("tab", name="Inspect").click()
        verdicts = {}
        for label in ("outside", "inside"):
            verdicts[label] = _inspect(page, root / f"defect-{label}.png")
            page.screenshot(path=str(ARTIFACTS / f"mask-2-defect-{label}.png"), full_page=True)
        browser.close()

    assert verdicts == {"outside": "no_defect", "inside": "defect"}
