"""Growing a bank from confirmed good parts, in a real headless Chromium: the Line health tab's refresh.

The app runs as ``eagle app`` (expert-only, random-weight backbone) with ``EAGLE_KEEP_IMAGES__ENABLED=true``, so
every inspected picture is kept under ``<data_dir>/kept-images``. The operator builds bank ``widget`` from the 12
synthetic references, inspects three good parts and tells the app each one is good (confirm a ``no_defect``,
overrule a ``defect``: a random backbone may flag one). On the Line health tab *Propose refresh* shows the three
parts with the reason "an operator said no defect"; *Approve and teach* makes version 2 of the bank with 15
references, which the Banks tab, the bank's history and the refresh log all show. Screenshots are saved under
``artifacts/browser/``.
"""

from __future__ import annotations

import hashlib

import pytest

from eagle import bank_versions
from eagle.audit import AuditLog
from eagle.bank_refresh import read_refresh_log
from tests.browser_app import ARTIFACTS, browser_page, build_bank, inspect, running_app

pytestmark = pytest.mark.browser

ENV = {
    "EAGLE_EXPERT__WEIGHTS": "random",
    "EAGLE_EXPERT__MIN_REFERENCES": "2",
    "EAGLE_EXPERT__RECOMMENDED_REFERENCES": "2",
    "EAGLE_KEEP_IMAGES__ENABLED": "true",
}
TEXT_HAS_JS = "([id, text]) => { const e = document.querySelector(id); return e && e.innerText.includes(text); }"
GOOD_PARTS = 3


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("refresh-app-data")
    with running_app(data_dir, ENV) as url:
        yield url, data_dir


def _tell_the_app_it_is_good(page, verdict: str) -> None:
    """Confirm a ``no_defect`` verdict, overrule a ``defect`` one: either way the part's right verdict is good."""
    button, word = ("#feedback-confirm", "confirmed") if verdict == "no_defect" else ("#feedback-overrule", "overruled")
    page.locator(button).click()
    page.wait_for_function(TEXT_HAS_JS, arg=["#feedback-status", word], timeout=30_000)


ROWS_JS = (  # a Gradio Dataframe's body rows (a virtual table of div rows), each as its cells' texts
    "(id) => [...document.querySelectorAll(`${id} div[role=row]`)]"
    ".map((r) => [...r.querySelectorAll('[role=gridcell]')].map((c) => c.innerText.trim()))"
)


def _table_rows(page, table: str) -> list[list[str]]:
    return page.evaluate(ROWS_JS, table)


def test_propose_and_approve_a_refresh_in_the_line_health_tab(app, synthetic_root):
    url, data_dir = app
    category = synthetic_root / "widget"
    references = sorted((category / "train" / "good").glob("*.png"))
    good = sorted((category / "test" / "good").glob("*.png"))[:GOOD_PARTS]

    with browser_page(url) as page:
        facts = build_bank(page, references, "widget")
        assert f"{len(references)} references" in facts

        page.get_by_role("tab", name="Inspect").click()
        for image in good:
            _tell_the_app_it_is_good(page, inspect(page, image))

        page.get_by_role("tab", name="Line health").click()
        page.wait_for_function(  # opening the tab picks the bank and runs the drift check
            "() => { const s = document.querySelector('#eagle-health'); return s && s.dataset.state; }",
            timeout=60_000,
        )
        state_before = page.inner_text("#eagle-health")
        page.locator("#refresh-propose").click()
        page.wait_for_function(TEXT_HAS_JS, arg=["#refresh-status", f"{GOOD_PARTS} candidate(s)"], timeout=60_000)
        status = page.inner_text("#refresh-status")
        assert "bank 'widget'" in status and "Approve and teach" in status, status
        page.wait_for_function(
            "(n) => document.querySelectorAll('#refresh-gallery img').length >= n", arg=GOOD_PARTS, timeout=30_000
        )
        rows = _table_rows(page, "#refresh-table")  # time, image, score, τ, why; newest first
        assert [row[1] for row in rows] == [image.name for image in reversed(good)], rows
        assert all(row[4].startswith("an operator said no defect") for row in rows), rows
        assert len({row[3] for row in rows}) == 1 and all(float(row[2]) > 0 for row in rows), rows
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "refresh-1-proposed.png"), full_page=True)

        page.locator("#refresh-approve").click()
        page.wait_for_function(TEXT_HAS_JS, arg=["#refresh-status", "refreshed"], timeout=300_000)
        taught = page.inner_text("#refresh-status")
        total = len(references) + GOOD_PARTS
        assert "Bank 'widget' refreshed" in taught and "version 1 → 2" in taught, taught
        assert f"{len(references)} → {total} references" in taught, taught
        assert "eagle bank rollback widget 1" in taught, taught
        page.screenshot(path=str(ARTIFACTS / "refresh-2-taught.png"), full_page=True)

        # The drift check now judges the new version: a new bank id, no inspections of it yet.
        page.locator("#health-refresh").click()
        page.wait_for_function(
            "(before) => { const s = document.querySelector('#eagle-health'); return s && s.innerText !== before; }",
            arg=state_before,
            timeout=60_000,
        )
        assert f"{total} training scores, 0 recent inspections" in page.inner_text("#eagle-health")

        # Proposing again: the three parts were inspections of version 1, so nothing is proposed for version 2.
        page.locator("#refresh-propose").click()
        page.wait_for_function(TEXT_HAS_JS, arg=["#refresh-status", "No candidates"], timeout=60_000)

        page.get_by_role("tab", name="Banks").click()
        page.wait_for_function(f"() => ({ROWS_JS})('#banks-table').length > 0", timeout=60_000)
        (bank_row,) = _table_rows(page, "#banks-table")  # bank, references, coreset, τ method, τ, s_max, created
        assert bank_row[:2] == ["widget", str(total)], bank_row
        page.screenshot(path=str(ARTIFACTS / "refresh-3-banks.png"), full_page=True)

    # Behind the page: the kept pictures, the audit rows they came from, the bank's versions and the refresh log.
    kept = {hashlib.sha256(image.read_bytes()).hexdigest() for image in good}
    assert kept <= {path.stem for path in (data_dir / "kept-images").glob("*.img")}
    with AuditLog(data_dir / "audit.sqlite3") as audit:
        feedback = audit.latest_feedback()
        assert all(row["correct_verdict"] == "no_defect" for row in feedback.values())
        assert len(feedback) == GOOD_PARTS
    (entry,) = read_refresh_log(data_dir)
    assert entry["bank"] == "widget" and entry["approved_by"] == "app"
    assert (entry["version_before"], entry["version"]) == (1, 2)
    assert {image["image_sha256"] for image in entry["images"]} == kept
    assert {image["reason"] for image in entry["images"]} == {"operator_good"}
    history = bank_versions.history(data_dir / "banks", "widget")
    assert [(v.version, v.action, v.n_references, v.current) for v in history] == [
        (1, "build", len(references), False),
        (2, "teach", len(references) + GOOD_PARTS, True),
    ]
