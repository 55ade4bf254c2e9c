"""'This is normal — teach the bank' in a real headless Chromium.

The app runs as ``eagle app`` in a subprocess (expert-only, the random-weight 32 × 32 expert of
``tests.service_helpers.REAL_EXPERT``). The operator builds a bank from six references, inspects a good part the bank
flags, clicks "This is normal — teach the bank", reads old τ → new τ, and inspects the part again: it passes.
Screenshots are saved under ``artifacts/browser/``.
"""

from __future__ import annotations

import re

import pytest

from eagle.bank_versions import VERSIONS_DIR
from tests.browser_app import ARTIFACTS, browser_page, build_bank, inspect, running_app
from tests.service_helpers import real_env
from tests.synthetic import make_mvtec_like
from tests.test_bank_versions import relit

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("teach-app-data")
    with running_app(data_dir, real_env(data_dir, OMP_NUM_THREADS="2")) as url:
        yield url, data_dir


def test_teach_a_flagged_good_part_in_the_browser(app, tmp_path):
    url, data_dir = app
    root = make_mvtec_like(tmp_path / "mvtec", n_train=6, n_test_good=3, n_test_bad_per_type=1)
    references = sorted((root / "widget" / "train" / "good").glob("*.png"))
    good = relit(sorted((root / "widget" / "test" / "good").glob("*.png"))[0], tmp_path / "new-lighting.png")

    with browser_page(url) as page:
        build_bank(page, references, "widget")
        page.get_by_role("tab", name="Inspect").click()
        assert inspect(page, good) == "defect"  # a good part under new lighting is flagged
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

        assert inspect(page, good) == "no_defect"  # the same part, against the new version
        page.screenshot(path=str(ARTIFACTS / "teach-3-passes.png"), full_page=True)

    versions = sorted(p.name for p in (data_dir / "banks" / VERSIONS_DIR / "widget").iterdir() if p.is_dir())
    assert versions == ["0001", "0002"]
