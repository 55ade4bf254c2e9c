"""A new user on an offline machine with nothing cached: the page says what is missing before any upload.

The app runs as ``eagle app`` (expert-only, the default hub weights) with an empty Hugging Face cache and
``HF_HUB_OFFLINE=1``. Before touching anything the header says bank building is unavailable and the details panel
gives the exact fix; Build bank is disabled with the reason beside it; the model's options are hidden with the
reason (expert-only); the plain-word explanations are on the page; and on a phone-sized viewport nothing is cut
off. Screenshots go to ``artifacts/browser/``.
"""

from __future__ import annotations

import pytest

from tests.browser_app import ARTIFACTS, browser_page, running_app

pytestmark = pytest.mark.browser

PHONE = {"width": 390, "height": 844}

# Elements that stick out to the right of the viewport (or its left edge), outside any scrolling container.
CUT_OFF_JS = """() => {
  const width = document.documentElement.clientWidth, out = [];
  const scrolls = (e) => { for (let p = e.parentElement; p; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX; if (o === 'auto' || o === 'scroll' || o === 'hidden') return true; }
    return false; };
  for (const e of document.querySelectorAll('body *')) {
    const r = e.getBoundingClientRect(), s = getComputedStyle(e);
    if (!r.width || !r.height || s.visibility === 'hidden' || s.display === 'none' || scrolls(e)) continue;
    if (r.right > width + 1 || r.left < -1) out.push(`${e.tagName}#${e.id}.${e.className}: ${r.left}..${r.right}`);
  }
  return {scrollWidth: document.documentElement.scrollWidth, width, out: out.slice(0, 10)};
}"""


@pytest.fixture(scope="module")
def offline_app(tmp_path_factory):
    data = tmp_path_factory.mktemp("first-contact")
    hf_home = tmp_path_factory.mktemp("empty-hf-home")
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "EAGLE_EXPERT__WEIGHTS": "hub"}
    with running_app(data, env) as url:
        yield url, data


def test_offline_with_an_empty_cache_the_page_says_what_is_missing_before_any_upload(offline_app):
    url, data = offline_app
    with browser_page(url) as page:
        status = page.locator("#capability-status")
        status.wait_for(timeout=60_000)
        assert "Bank building is unavailable" in status.inner_text()
        assert "Expert-only mode" in status.inner_text()
        details = page.locator("#capability-details")
        details.wait_for(state="visible", timeout=30_000)  # rendered just after the status on a loaded box
        text = details.inner_text()
        assert "hf download timm/wide_resnet50_2.tv_in1k" in text and "EAGLE_EXPERT__WEIGHTS=random" in text
        assert "offline mode" in text
        # Inspect tab (the first one): the model's options are hidden, and the reason says why.
        assert "expert-only mode" in page.inner_text("#mllm-options-reason")
        assert not page.get_by_text("Prompt setting", exact=True).is_visible()
        assert not page.get_by_text("Ask the MLLM", exact=True).is_visible()
        assert page.locator("#how-to-read").is_visible()
        assert "the score above which the expert calls a part defective" in page.inner_text("#how-to-read")
        assert page.locator("#teach-bank").is_disabled()
        page.screenshot(path=str(ARTIFACTS / "first-contact-1-inspect.png"), full_page=True)

        page.get_by_role("tab", name="References").click()
        reason = page.locator("#build-unavailable")
        reason.wait_for(timeout=30_000)
        assert "Build bank is unavailable" in reason.inner_text()
        assert "EAGLE_EXPERT__WEIGHTS=random" in reason.inner_text()
        assert page.locator("#build-bank").is_disabled()
        assert "unavailable" in page.inner_text("#build-bank")
        assert page.locator("#ref-files input[type=file]").count() == 0  # nothing to upload into
        assert "the score above which the expert calls a part defective" in page.inner_text("#dbt-explained")
        page.screenshot(path=str(ARTIFACTS / "first-contact-2-references.png"), full_page=True)

        page.set_viewport_size(PHONE)
        for tab in ("Inspect", "References"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(500)
            layout = page.evaluate(CUT_OFF_JS)
            page.screenshot(path=str(ARTIFACTS / f"first-contact-phone-{tab.lower()}.png"), full_page=True)
            assert layout["scrollWidth"] <= layout["width"] and not layout["out"], layout

    log = (data / "app.log").read_text()
    assert "ONNX warm-up skipped at start-up" in log  # no minute spent waiting on an unreachable hub
