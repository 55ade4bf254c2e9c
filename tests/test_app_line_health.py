"""The app's Line health panel: the state of a bank's line in words, the DBT histogram and the scores over time.

The real pipeline (random-weight expert) over the synthetic bank ``widget`` (12 references: too few for the default
limit of 20, judged here from 10), with audit rows in the app's own audit log: one inspection through the app's
Inspect handler, and rows written as the service writes them (the bank's own scores for a stable line, then the
same shifted by three spreads).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from app import handlers
from eagle.pipeline import Pipeline
from eagle.settings import Settings
from expert.drift import DRIFT_STATES
from tests.fixtures_pipeline import BANK, split_test_images
from tests.test_app_bank_lists import _event

JUDGED = {"min_references": 10, "min_inspections": 20, "window": 40}


def _pipeline(data_dir, **health) -> Pipeline:
    return Pipeline(
        Settings(
            data_dir=data_dir,
            expert={"weights": "random", "min_references": 2, "recommended_references": 2},
            mllm={"enabled": False},
            caas={"layer_start": 9, "layer_end": 15},
            health=health,
        )
    )


@pytest.fixture
def line(built_pipeline, tmp_path):
    """(pipeline with the default limits, pipeline judging from 10 references) over one data dir with ``widget``."""
    shutil.copytree(built_pipeline.pipeline.banks.root / BANK, tmp_path / "banks" / BANK, copy_function=os.link)
    return _pipeline(tmp_path), _pipeline(tmp_path, **JUDGED)


def _row(i: int, bank_id: str, score: float) -> dict:
    return {
        "time": f"2026-12-07T01:{i // 60 % 60:02d}:{i % 60:02d}+00:00",
        "run_id": f"run{i}",
        "source": "app",
        "image_name": f"{i}.png",
        "image_sha256": f"{i:064x}",
        "bank": BANK,
        "bank_id": bank_id,
        "score": score,
        "status": "ok",
    }


def _lines(fig) -> dict[str, np.ndarray]:
    """Each labelled line of the figure's axes: its x data for vertical lines (τ), else its y data."""
    out = {}
    for line in fig.axes[0].get_lines():
        x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata(), dtype=np.float64)
        out[line.get_label()] = x.astype(np.float64) if x.size == 2 and x[0] == x[1] else y
    return out


def _histogram_bars(fig) -> dict[str, float]:
    """The histogram's series (legend label → sum of its bar heights: 1 for shares)."""
    return {bars.patches[0].get_label(): sum(p.get_height() for p in bars.patches) for bars in fig.axes[0].containers}


def test_a_bank_with_too_few_references_says_so_with_the_apps_own_inspection(line, synthetic_root):
    default, _ = line
    good, _ = split_test_images(synthetic_root)
    [_] = handlers.inspect(default, str(good[0]), BANK, "full", "auto", 1.0, False, False, False, lambda *a, **k: None)

    state, histogram, timeline = handlers.line_health(default, BANK)
    assert 'data-state="not_enough_references"' in state and "NOT ENOUGH REFERENCES" in state
    assert "the bank has 12 DBT training scores; drift is judged from 20 on" in state
    assert "12 training scores, 1 recent inspection," in state
    bars = _histogram_bars(histogram)
    assert bars == {"bank's training scores (n=12)": pytest.approx(1.0), "recent (n=1)": pytest.approx(1.0)}
    tau = default.banks.summary(BANK).tau
    assert list(_lines(timeline)) == ["score (n=1)", f"τ = {tau:.4g}"]


def test_a_line_goes_from_waiting_to_ok_to_drifting(line):
    _, judged = line
    bank = judged.banks.load(BANK).bank
    train = np.asarray(bank.train_scores, dtype=np.float64)
    tau = bank.meta.threshold.tau
    audit = handlers.audit_log(judged)

    state, histogram, timeline = handlers.line_health(judged, BANK)  # nothing inspected yet
    assert 'data-state="not_enough_inspections"' in state
    assert "0 recent inspections of good parts; drift is judged from 20 on" in state
    assert timeline is None  # no empty plot
    assert _histogram_bars(histogram) == {"bank's training scores (n=12)": pytest.approx(1.0)}

    rng = np.random.default_rng(3)
    stable = rng.choice(train, 30)  # the scores a stable line gives: the bank's own
    for i, score in enumerate(stable):
        audit._insert(_row(i, bank.meta.bank_id, float(score)))
    state, histogram, timeline = handlers.line_health(judged, BANK)
    assert 'data-state="ok"' in state and ">OK<" in state, state
    assert "median score moved " in state and "in the last 30 inspections" in state
    lines = _lines(timeline)
    assert lines["score (n=30)"] == pytest.approx(stable) and lines[f"τ = {tau:.4g}"] == pytest.approx([tau, tau])

    drifted = rng.choice(train, 50) + 3 * train.std(ddof=1)  # the light aged: every part three spreads higher
    for i, score in enumerate(drifted, start=30):
        audit._insert(_row(i, bank.meta.bank_id, float(score)))
    state, histogram, timeline = handlers.line_health(judged, BANK)
    health = judged.line_health(BANK, audit)
    assert health.state == "drifting" and 'data-state="drifting"' in state and "DRIFTING" in state
    assert health.reason in state and "in the last 40 inspections" in health.reason
    assert f"12 training scores, 40 recent inspections, τ = {tau:.4g}" in state
    lines = _lines(timeline)
    assert lines["score (n=40)"] == pytest.approx(drifted[-40:])  # the window: the latest 40, oldest first
    assert lines[f"τ = {tau:.4g}"] == pytest.approx([tau, tau])
    assert _histogram_bars(histogram) == {
        "bank's training scores (n=12)": pytest.approx(1.0),
        "recent (n=40)": pytest.approx(1.0),
    }
    assert _lines(histogram)[f"τ = {tau:.4g}"] == pytest.approx([tau, tau])
    assert timeline.axes[0].get_xlabel() == "time (UTC)"


def test_a_bank_that_cannot_be_checked_shows_one_line(line, tmp_path):
    default, _ = line
    state, histogram, timeline = handlers.line_health(default, "nothing")
    assert 'data-state="error"' in state and "CANNOT CHECK" in state and "no bank named &#x27;nothing&#x27;" in state
    assert histogram is None and timeline is None and "Traceback" not in state

    broken = tmp_path / "banks" / "broken"
    shutil.copytree(tmp_path / "banks" / BANK, broken)  # a real copy: the shared bank's files stay whole
    (broken / "meta.json").write_text("{not json", encoding="utf-8")
    state, histogram, timeline = handlers.line_health(default, "broken")
    assert 'data-state="error"' in state and "broken" in state and histogram is None and timeline is None
    assert handlers.GENERIC_ERROR not in state and "\n" not in state

    state, *figures = handlers.line_health(default, None)
    assert "Pick a bank" in state and figures == [None, None]


def test_the_tab_refreshes_on_its_button_and_hides_empty_plots(line):
    from app.ui import build_ui

    _, judged = line
    demo = build_ui(judged)
    refresh = _event(demo, "click", target="health-refresh", updates="health-state")
    state, histogram, timeline = refresh.fn(BANK)
    assert 'data-state="not_enough_inspections"' in state
    assert histogram["visible"] is True and histogram["value"] is not None
    assert timeline == {"__type__": "update", "value": None, "visible": False}
    on_tab = _event(demo, "select", target="Line health", updates="health-bank")
    assert on_tab.fn(None)["value"] == BANK


def test_every_state_has_its_words_and_colour():
    assert tuple(handlers.HEALTH_STATE_TEXTS) == tuple(handlers.HEALTH_STATE_COLOURS) == DRIFT_STATES
