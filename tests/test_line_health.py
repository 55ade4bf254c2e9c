"""Line health: the drift statistics against a direct recomputation, the states and their limits, a stable line
over 1,000+ inspections, a drifting one, and the audit log's recent scores of one bank version.

The simulated lines draw scores the way good parts score against a bank: a fixed positive, right-skewed
distribution (log-normal, σ = 0.15) for the bank's 50 training scores and for the line, τ = mean + 3 σ of the
training scores (the k-sigma rule). A drifting line multiplies the scores by ``1 + drift`` (light ageing that
raises every patch distance alike). Through the front ends (the API with inspections whose grey level drifts, the
metrics, ``eagle bank health`` on a real bank): ``tests/test_line_health_front_ends.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from eagle.audit import AuditLog
from eagle.line_health import line_health
from expert.drift import DRIFT_STATES, DriftSettings, assess_drift, state_level


def _line(seed: int, n: int, *, n_ref: int = 50, drift: float = 0.0) -> tuple[np.ndarray, float, np.ndarray]:
    rng = np.random.default_rng(seed)
    train = rng.lognormal(0.0, 0.15, n_ref)
    tau = float(train.mean() + 3 * train.std())
    return train, tau, rng.lognormal(0.0, 0.15, n) * (1.0 + drift)


# ---------------------------------------------------------------------------------------------- the statistics


def _binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed term by term."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def _clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """The p at which P(X <= k) = 1 - confidence, by bisection on the binomial CDF."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        cdf = 1 - _binom_sf(k + 1, n, mid)
        lo, hi = (mid, hi) if cdf > 1 - confidence else (lo, mid)
    return (lo + hi) / 2


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """sup |F_a - F_b| over every observed value (empirical distribution functions)."""
    points = np.concatenate([a, b])
    return max(abs(np.mean(a <= x) - np.mean(b <= x)) for x in points)


def test_the_statistics_equal_a_direct_recomputation():
    train, tau, recent = _line(3, 200, drift=0.12)
    report = assess_drift(train, tau, recent)
    train_median = sorted(train)[24] / 2 + sorted(train)[25] / 2  # 50 scores: the mean of the middle two
    spread = math.sqrt(sum((s - train.mean()) ** 2 for s in train) / 49)
    recent_sorted = sorted(recent)
    recent_median = (recent_sorted[99] + recent_sorted[100]) / 2
    assert report.train_median == pytest.approx(train_median, rel=1e-12)
    assert report.train_spread == pytest.approx(spread, rel=1e-12)
    assert report.median_shift == pytest.approx((recent_median - train_median) / spread, rel=1e-12)
    k_ref = sum(s > tau for s in train)
    assert report.expected_above_tau == k_ref / 50
    assert report.expected_above_tau_max == pytest.approx(_clopper_pearson_upper(k_ref, 50), abs=1e-9)
    k = sum(s > tau for s in recent)
    assert report.above_tau == k / 200 and k > 0
    assert report.above_tau_p == pytest.approx(_binom_sf(k, 200, report.expected_above_tau_max), rel=1e-9)
    assert report.ks_statistic == pytest.approx(_ks_statistic(recent, train), abs=1e-12)
    assert (report.n_references, report.n_recent, report.tau) == (50, 200, tau)


def test_only_the_last_window_counts():
    train, tau, recent = _line(4, 300)
    settings = DriftSettings(window=100, min_inspections=50)
    early_drift = np.concatenate([recent[:200] * 2.0, recent[200:]])  # the first 200 lie outside the window
    assert assess_drift(train, tau, early_drift, settings) == assess_drift(train, tau, recent[200:], settings)
    assert assess_drift(train, tau, early_drift, settings).n_recent == 100


# ---------------------------------------------------------------------------------------------- states


def test_too_few_references_is_never_ok():
    train, tau, recent = _line(5, 500, n_ref=19)
    report = assess_drift(train, tau, recent)
    assert report.state == "not_enough_references" and report.level == -2
    assert "19 DBT training scores" in report.reason and "from 20 on" in report.reason
    assert assess_drift(*_line(5, 500, n_ref=20)).state == "ok"  # the limit itself is enough


def test_too_few_inspections_are_not_judged():
    train, tau, recent = _line(6, 49)
    report = assess_drift(train, tau, recent * 3)  # even a large shift: 49 < 50 inspections
    assert report.state == "not_enough_inspections" and report.median_shift is None
    assert report.reason == "49 recent inspections of good parts; drift is judged from 50 on"
    assert assess_drift(train, tau, np.concatenate([recent, recent[:1]]) * 3).state == "drifting"


@pytest.mark.parametrize(
    ("drift", "state"),
    # the documented points (docs/edge.md, "Line health"): on this seeded line, +5 % stays ok, +10 % and +15 % are
    # watch (median +0.9 σ with KS D 0.44; +1.2 σ), +20 % and beyond are drifting (13 % → 22 % above τ)
    [(0.0, "ok"), (0.05, "ok"), (0.10, "watch"), (0.15, "watch"), (0.20, "drifting"), (0.40, "drifting")],
)
def test_a_line_drifting_step_by_step_moves_ok_watch_drifting(drift, state):
    rng = np.random.default_rng(7)
    train = rng.lognormal(0, 0.15, 50)
    tau = float(train.mean() + 3 * train.std())
    for step in (0.0, 0.05, 0.10, 0.15, 0.20, 0.30, 0.40):  # the same random stream as the explanation above
        recent = rng.lognormal(0, 0.15, 200) * (1 + step)
        if step == drift:
            break
    report = assess_drift(train, tau, recent)
    assert report.state == state, report.reason
    assert report.reason.startswith(f"median score moved {report.median_shift:+.1f} σ in the last 200 inspections")


def test_a_darkening_camera_is_drift_too():
    train, tau, recent = _line(8, 200, drift=-0.45)  # scores fall: defects could hide
    report = assess_drift(train, tau, recent)
    assert report.state == "drifting" and report.median_shift < -2


def test_a_stable_line_stays_ok_over_1200_inspections_judged_after_each():
    train, tau, stream = _line(9, 1200)
    states = {assess_drift(train, tau, stream[:i]).state for i in range(50, 1201)}
    assert states == {"ok"}


def test_settings_are_checked_and_states_have_levels():
    with pytest.raises(ValueError, match="drift_sigma"):
        DriftSettings(watch_sigma=3, drift_sigma=2)
    with pytest.raises(ValueError, match="min_inspections"):
        DriftSettings(window=40, min_inspections=50)
    assert [state_level(s) for s in DRIFT_STATES] == [0, 1, 2, -2, -1]
    with pytest.raises(ValueError, match="finite"):
        assess_drift(np.array([1.0, np.nan] * 20), 1.0, np.ones(60))


# ---------------------------------------------------------------------------------------------- the audit log


class _Result:
    """Just what :meth:`AuditLog.record` reads from an inspection result."""

    def __init__(self, bank_id: str, score: float, index: int) -> None:
        self.image_name, self.image_sha256, self.bank, self.bank_id = f"{index}.png", f"{index:064x}", "line", bank_id
        self.score, self.tau, self.s_max, self.expert_decision = score, 1.0, 2.0, "normal"
        self.low_confidence = self.caas_applied = False
        self.mllm_answer, self.verdict, self.model_id, self.timings_ms = None, "no_defect", None, {"total": 1.0}


def _record(log: AuditLog, run_id: str, bank_id: str, score: float, index: int) -> None:
    log.record(_Result(bank_id, score, index), source="api", run_id=run_id)


def test_recent_scores_are_one_versions_latest_without_the_parts_marked_defective(tmp_path: Path):
    log = AuditLog(tmp_path / "audit.sqlite3")
    for i in range(6):
        _record(log, f"r{i}", "aaaa", float(i), i)
    _record(log, "other", "bbbb", 99.0, 99)  # another version of the bank: another line history
    log.record_failure(
        run_id="bad",
        source="watch",
        image_name="x.png",
        image_sha256="11" * 32,
        bank="line",
        error_code="e",
        error_message="not an image",
    )
    log.record_feedback(run_id="r4", feedback="overruled", correct_verdict="defect", source="app")
    log.record_feedback(run_id="r2", feedback="overruled", correct_verdict="defect", source="app")
    log.record_feedback(run_id="r2", feedback="confirmed", source="app")  # changed their mind: the latest counts
    assert [score for _, score in log.recent_scores("aaaa", limit=10)] == [0.0, 1.0, 2.0, 3.0, 5.0]
    assert [score for _, score in log.recent_scores("aaaa", limit=3)] == [2.0, 3.0, 5.0]  # the latest, oldest first
    assert log.recent_scores("cccc", limit=10) == []


def test_line_health_reads_the_banks_scores_and_the_audit_log(tmp_path: Path):
    log = AuditLog(tmp_path / "audit.sqlite3")
    train, tau, stream = _line(10, 120, drift=0.4)
    for i, score in enumerate(stream):
        _record(log, f"r{i}", "abcd", float(score), i)
    health = line_health("line", "abcd", train.astype(np.float32), tau, log, DriftSettings(window=100))
    report = assess_drift(train.astype(np.float32), tau, stream[-100:], DriftSettings(window=100))
    assert health.model_dump(exclude={"bank", "bank_id", "train_scores", "recent"}) == report.to_dict()
    assert health.state == "drifting" and len(health.recent) == 100
    data = health.model_dump(mode="json")
    assert data["state"] == "drifting" and data["level"] == 2 and data["bank_id"] == "abcd"
    assert data["recent"][-1]["score"] == pytest.approx(stream[-1]) and len(data["train_scores"]) == 50
