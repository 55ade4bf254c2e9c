"""A person's path through the web app, in a real headless Chromium (Debian's package) driven by Playwright.

The app runs as ``eagle app`` in a subprocess on loopback (expert-only, random-weight backbone). The test
uploads references, builds a bank, inspects a defective and a good image and reads the verdicts from the
page. Screenshots are saved under ``artifacts/browser/``.
"""

from __future__ import annotations

import pytest

from tests.browser_app import ARTIFACTS, browser_page, build_bank, inspect, running_app

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    env = {"EAGLE_EXPERT__WEIGHTS": "random", "EAGLE_EXPERT__MIN_REFERENCES": "2"}
    with running_app(tmp_path_factory.mktemp("app-data"), env) as url:
        yield url


def test_build_a_bank_and_inspect_in_the_browser(app_url, synthetic_root):
    category = synthetic_root / "widget"
    references = sorted((category / "train" / "good").glob("*.png"))
    defective = sorted((category / "test" / "hole").glob("*.png"))[0]
    good = sorted((category / "test" / "good").glob("*.png"))[0]

    with browser_page(app_url) as page:
        facts = build_bank(page, references, "widget")
        assert f"{len(references)} references" in facts
        page.screenshot(path=str(ARTIFACTS / "1-bank-built.png"), full_page=True)

        page.get_by_role("tab", name="Inspect").click()
        assert "Expert-only mode" in page.content()
        # Every message Gradio's status tracker announces (it once read the untranslated key `common.complete`).
        page.evaluate(
            "() => { window.announced = []; new MutationObserver(() => document.querySelectorAll('[role=status]')"
            ".forEach(e => window.announced.push(e.textContent))).observe(document.body, "
            "{subtree: true, childList: true, characterData: true}); }"
        )
        verdicts, reasons = {}, {}
        for label, image in (("defective", defective), ("good", good)):
            verdicts[label] = inspect(page, image)
            reasons[label] = page.inner_text("#eagle-verdict-why")
            page.screenshot(path=str(ARTIFACTS / f"2-inspect-{label}.png"), full_page=True)
        # The numbers in plain words: why the verdict, how to read it, the timings as a table with the total.
        assert reasons["good"].startswith("The expert is sure") and "below τ" in reasons["good"]
        assert "the verdict is the expert's" in reasons["defective"]
        assert "the score above which the expert calls a part defective" in page.inner_text("#how-to-read")
        timings = page.inner_text("#timings")
        assert "stage" in timings and "total" in timings and "{" not in timings
        # Gradio announces "Complete" shortly after the last event ends: later still on a loaded box (pytest -n 2)
        page.wait_for_function("() => window.announced.includes('Complete')", timeout=15000)
        announced = page.evaluate("() => window.announced")
        assert "Complete" in announced and not any("common." in text for text in announced), announced
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "2-inspect-phone.png"), full_page=True)
        assert page.evaluate("() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        page.set_viewport_size({"width": 1400, "height": 1800})
        # Operator feedback on the last verdict: a feedback row in the audit log, linked by the run id.
        page.locator("#feedback-confirm").click()
        page.wait_for_function(
            "() => { const s = document.querySelector('#feedback-status');"
            " return s && s.innerText.includes('confirmed'); }",
            timeout=30_000,
        )
        run_id = page.get_attribute("#eagle-verdict", "data-run-id")

    assert run_id and run_id.startswith("app-")

    assert verdicts["defective"] == "defect"
    assert verdicts["good"] == "no_defect"
