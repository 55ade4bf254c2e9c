"""Issue 14 §2 in a real browser: build a bank with an uploaded inspection-mask PNG, then a defect outside the mask
passes and one inside is flagged. Same Chromium/Playwright set-up as ``tests/test_app_browser.py`` (its helpers).

The app runs as ``eagle app`` in a subprocess (expert-only, random-weight backbone at 128 px input, so the
build takes seconds). The references are flat grey with noise; the defects are solid red squares painted on
the first reference, one at the far left (outside the mask: the right half) and one inside it.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.browser_app import ARTIFACTS, browser_page, build_bank, inspect, running_app
from tests.test_mask_service import INSIDE, OUTSIDE, SIZE, defective_part, normal_part

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("mask-images")
    references = []
    for i in range(6):
        path = root / f"good-{i}.png"
        Image.fromarray(normal_part(i)).save(path)
        references.append(path)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 :] = 255  # inspect the right half only
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(defective_part(OUTSIDE)).save(root / "defect-outside.png")
    Image.fromarray(defective_part(INSIDE)).save(root / "defect-inside.png")
    return {"references": references, "mask": root / "mask.png", "root": root}


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    env = {
        "EAGLE_EXPERT__WEIGHTS": "random",
        "EAGLE_EXPERT__RESIZE": "128",
        "EAGLE_EXPERT__CROP": "128",
        "EAGLE_EXPERT__MIN_REFERENCES": "2",
    }
    with running_app(tmp_path_factory.mktemp("app-mask-data"), env) as url:
        yield url


def _upload_mask(path):
    def step(page) -> None:
        page.get_by_text("Inspection mask (optional)").click()
        page.locator("#mask-file input[type=file]").set_input_files(str(path))
        page.wait_for_timeout(500)

    return step


def test_a_bank_with_an_uploaded_mask_ignores_a_defect_outside_it(app_url, files):
    root = files["root"]
    with browser_page(app_url) as page:
        facts = build_bank(
            page,
            files["references"],
            "masked",
            before_build=_upload_mask(files["mask"]),
            facts_contain="Inspection mask",
        )
        assert "6 references" in facts and "Inspection mask: 128 of 256 patches" in facts
        page.screenshot(path=str(ARTIFACTS / "mask-1-bank-built.png"), full_page=True)

        page.get_by_role("tab", name="Inspect").click()
        verdicts = {}
        for label in ("outside", "inside"):
            verdicts[label] = inspect(page, root / f"defect-{label}.png")
            page.screenshot(path=str(ARTIFACTS / f"mask-2-defect-{label}.png"), full_page=True)

    assert verdicts == {"outside": "no_defect", "inside": "defect"}
