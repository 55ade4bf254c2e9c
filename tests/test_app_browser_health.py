"""The Line health panel in a real headless Chromium: a line that is ok, then drifts, seen through Refresh.

The app runs as ``eagle app`` (expert-only, random-weight backbone) over a data dir holding the synthetic bank
``widget`` (12 references; judged here from 10) and an audit log with the scores a stable line gives (the bank's
own). The operator opens the Line health tab and reads "OK" with its reason and both plots; the line's light ages
(rows three spreads higher arrive, as from the service) and Refresh shows "DRIFTING". Screenshots are saved under
``artifacts/browser/``.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from eagle.audit import AuditLog
from tests.browser_app import ARTIFACTS, browser_page, running_app
from tests.fixtures_pipeline import BANK

pytestmark = pytest.mark.browser

HEALTH_ENV = {"EAGLE_HEALTH__MIN_REFERENCES": "10", "EAGLE_HEALTH__MIN_INSPECTIONS": "20", "EAGLE_HEALTH__WINDOW": "40"}
ENV = {
    "EAGLE_EXPERT__WEIGHTS": "random",
    "EAGLE_EXPERT__MIN_REFERENCES": "2",
    "EAGLE_EXPERT__RECOMMENDED_REFERENCES": "2",
    **HEALTH_ENV,
}
STATE_IS_JS = "(state) => { const s = document.querySelector('#eagle-health'); return s && s.dataset.state === state; }"
PLOTS_SHOWN_JS = (
    "() => ['#health-histogram', '#health-timeline'].every((id) => { const p = document.querySelector(id);"
    " return p && p.offsetParent !== null && p.querySelector('img, svg, canvas'); })"
)


def _rows(start: int, bank_id: str, scores: np.ndarray) -> list[dict]:
    return [
        {
            "time": f"2026-12-07T02:{i // 60 % 60:02d}:{i % 60:02d}+00:00",
            "run_id": f"run{i}",
            "source": "app",
            "image_name": f"{i}.png",
            "image_sha256": f"{i:064x}",
            "bank": BANK,
            "bank_id": bank_id,
            "score": float(score),
            "status": "ok",
        }
        for i, score in enumerate(scores, start=start)
    ]


@pytest.fixture(scope="module")
def line(tmp_path_factory, built_pipeline):
    data_dir = tmp_path_factory.mktemp("health-app-data")
    shutil.copytree(built_pipeline.pipeline.banks.root / BANK, data_dir / "banks" / BANK, copy_function=os.link)
    bank = built_pipeline.pipeline.banks.load(BANK).bank
    train = np.asarray(bank.train_scores, dtype=np.float64)
    rng = np.random.default_rng(5)
    with AuditLog(data_dir / "audit.sqlite3") as audit:
        for row in _rows(0, bank.meta.bank_id, rng.choice(train, 30)):
            audit._insert(row)
    with running_app(data_dir, ENV) as url:
        yield url, data_dir, bank.meta.bank_id, train, rng


def test_the_line_health_panel_shows_ok_then_drifting_in_the_browser(line):
    url, data_dir, bank_id, train, rng = line
    with browser_page(url) as page:
        page.get_by_role("tab", name="Line health").click()
        page.wait_for_function(STATE_IS_JS, arg="ok", timeout=60_000)
        page.wait_for_function(PLOTS_SHOWN_JS, timeout=30_000)
        state = page.inner_text("#eagle-health")
        assert state.startswith("OK") and "in the last 30 inspections" in state, state
        assert "12 training scores, 30 recent inspections" in state
        assert "moving away from the bank's own" in page.inner_text("#drift-explained")
        page.wait_for_timeout(800)  # the outputs' fade-in after an update
        page.screenshot(path=str(ARTIFACTS / "health-1-ok.png"), full_page=True)

        with AuditLog(data_dir / "audit.sqlite3") as audit:  # the light ages: parts score three spreads higher
            for row in _rows(30, bank_id, rng.choice(train, 40) + 3 * train.std(ddof=1)):
                audit._insert(row)
        page.locator("#health-refresh").click()
        page.wait_for_function(STATE_IS_JS, arg="drifting", timeout=60_000)
        page.wait_for_function(PLOTS_SHOWN_JS, timeout=30_000)
        state = page.inner_text("#eagle-health")
        assert state.startswith("DRIFTING") and "median score moved +" in state, state
        assert "12 training scores, 40 recent inspections" in state
        page.wait_for_timeout(800)  # the outputs' fade-in after an update
        page.screenshot(path=str(ARTIFACTS / "health-2-drifting.png"), full_page=True)
