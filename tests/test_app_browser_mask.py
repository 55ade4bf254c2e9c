"""Inspection masks in a real browser: build a bank with an inspection mask (an uploaded PNG, or painted with the mouse
over a reference image in the editor), then a defect outside the mask passes and one inside is flagged. Same
Chromium/Playwright set-up as ``tests/test_app_browser.py`` (its helpers).

The app runs as ``eagle app`` in a subprocess (expert-only, random-weight backbone at 128 px input, so the
build takes seconds). The references are flat grey with noise; the defects are solid red squares painted on
the first reference, one at the far left (outside the mask: the right half) and one inside it.
"""

from __future__ import annotations

import re

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


def _build_masked_bank_and_inspect(app_url, files, name: str, mask_step, shots: str) -> tuple[str, dict[str, str]]:
    """Build bank ``name`` with ``mask_step`` before the build, then inspect both defects; (facts, verdicts)."""
    with browser_page(app_url) as page:
        facts = build_bank(page, files["references"], name, before_build=mask_step, facts_contain="Inspection mask")
        page.screenshot(path=str(ARTIFACTS / f"mask-{shots}-bank-built.png"), full_page=True)
        page.get_by_role("tab", name="Inspect").click()
        verdicts = {}
        for label in ("outside", "inside"):
            verdicts[label] = inspect(page, files["root"] / f"defect-{label}.png")
            page.screenshot(path=str(ARTIFACTS / f"mask-{shots}-defect-{label}.png"), full_page=True)
    return facts, verdicts


def test_a_bank_with_an_uploaded_mask_ignores_a_defect_outside_it(app_url, files):
    facts, verdicts = _build_masked_bank_and_inspect(app_url, files, "masked", _upload_mask(files["mask"]), "upload")
    assert "6 references" in facts and "Inspection mask: 128 of 256 patches" in facts
    assert verdicts == {"outside": "no_defect", "inside": "defect"}


def _settled_editor(page, zoom) -> tuple[float, dict]:
    """The editor's zoom (css px per image px) and canvas box once both stopped changing.

    After an image is loaded the editor fits it to the canvas in steps; strokes drawn before that end land at
    the wrong place or not at all.
    """
    seen: list[tuple[str, tuple]] = []
    for _ in range(60):
        box = page.locator("#mask-editor canvas").first.bounding_box()
        seen.append((zoom.inner_text(), tuple(sorted(box.items())) if box else ()))
        if len(seen) >= 4 and len(set(seen[-4:])) == 1 and box:
            return int(seen[-1][0].rstrip("%")) / 100, box
        page.wait_for_timeout(300)
    raise AssertionError(f"the mask editor never settled: {seen[-4:]}")


def _load_into_editor(page, reference) -> tuple[float, dict]:
    """Upload ``reference`` into the mask editor until it shows it; returns :func:`_settled_editor`'s answer.

    The editor starts with a blank 800-px canvas (shown below 100 %); our 96-px image is shown above 100 %, so
    the zoom tells whether the upload took (an upload into an editor still opening is sometimes dropped).
    """
    page.get_by_text("Inspection mask (optional)").click()
    editor = page.locator("#mask-editor")
    editor.wait_for(state="visible")
    zoom = editor.get_by_text(re.compile(r"^\d+%$")).first
    for _ in range(3):
        page.wait_for_timeout(500)
        editor.locator("input[type=file]").first.set_input_files(str(reference))
        zoom.wait_for(timeout=30_000)
        scale, box = _settled_editor(page, zoom)
        if scale > 1:
            return scale, box
    raise AssertionError(f"the mask editor did not take the image (zoom {scale:.0%})")


def _paint_right_part(reference):
    """Load a reference into the mask editor and paint, with the brush, over image columns ~40..96 (of 96)."""

    def step(page) -> None:
        scale, box = _load_into_editor(page, reference)
        page.locator("#mask-editor button[aria-label='Brush']").click()
        page.wait_for_timeout(300)
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2  # the image is centred

        def at(x: float, y: float) -> tuple[float, float]:  # image pixel -> page position
            return cx + (x - SIZE / 2) * scale, cy + (y - SIZE / 2) * scale

        for y in range(0, SIZE + 4, 8):  # brush 24 px wide: rows 8 px apart leave no gaps
            page.mouse.move(*at(62, y))
            page.mouse.down()
            page.mouse.move(*at(SIZE + 4, y), steps=8)
            page.mouse.up()
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "mask-painted-strokes.png"), full_page=True)

    return step


def test_a_mask_painted_in_the_editor_ignores_a_defect_outside_it(app_url, files):
    step = _paint_right_part(files["references"][0])
    facts, verdicts = _build_masked_bank_and_inspect(app_url, files, "painted", step, "painted")
    found = re.search(r"Inspection mask: (\d+) of 256 patches \(array:mask 96x96\)", facts)
    assert found is not None, facts
    assert 112 <= int(found.group(1)) <= 176  # the painted right part (about 9 of 16 patch columns)
    assert verdicts == {"outside": "no_defect", "inside": "defect"}
