"""Line health of one bank version: its recent audited scores of good parts against its own DBT scores.

The statistics and states are :func:`expert.drift.assess_drift`'s; this module feeds it a bank's training scores
and τ, and the audit log's recent scores of the same bank id (:meth:`eagle.audit.AuditLog.recent_scores`:
successful inspections from the service, the watched folder and the app that no operator marked defective;
``eagle score`` on the command line is not audited). A new bank version starts a new line history. The result,
:class:`LineHealth`, is what ``eagle bank health``, ``GET /v1/banks/{name}/health`` and the metrics show; it
carries the scores too, for plots (the DBT histogram with the recent scores overlaid, the scores over time with τ).

Example:
    >>> health = pipeline.line_health("screws", audit)  # doctest: +SKIP
    >>> health.state, health.reason  # doctest: +SKIP
    ('watch', 'median score moved +1.2 σ in the last 200 inspections; 9 % above τ, expected ≤ 6 %; KS D = 0.41')
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from eagle.audit import AuditLog
from expert.drift import DriftSettings, DriftState, assess_drift

__all__ = ["DriftState", "LineHealth", "ScoreAt", "describe_health", "line_health"]


class ScoreAt(BaseModel):
    """One audited inspection's expert score."""

    model_config = ConfigDict(frozen=True)

    time: str = Field(description="When it was inspected, ISO 8601 in UTC.")
    score: float = Field(description="The expert's image score.")


class LineHealth(BaseModel):
    """The drift check of one bank version, with the scores it compared (:mod:`expert.drift` defines each number)."""

    model_config = ConfigDict(frozen=True)

    bank: str = Field(description="The bank's name.")
    bank_id: str = Field(description="The bank version's id: each version has its own line history.")
    state: DriftState = Field(
        description="ok, watch or drifting; not_enough_references (a bank with too few DBT training scores, never "
        "ok) or not_enough_inspections (too few recent inspections to judge)."
    )
    level: int = Field(description="The state as a number for alerts: ok 0, watch 1, drifting 2, not enough data <0.")
    reason: str = Field(description="The state in words, e.g. 'median score moved +2.3 σ in the last 200 ...'.")
    n_references: int = Field(description="DBT training scores compared.")
    n_recent: int = Field(description="Recent inspections compared (at most the window).")
    tau: float = Field(description="The bank's threshold τ.")
    train_median: float | None = Field(description="Median of the training scores.")
    train_spread: float | None = Field(description="Standard deviation of the training scores: the unit of shifts.")
    expected_above_tau: float | None = Field(description="Share of training scores above τ.")
    expected_above_tau_max: float | None = Field(description="Its one-sided 95 % upper bound: the expected ceiling.")
    recent_median: float | None = Field(description="Median of the recent scores.")
    median_shift: float | None = Field(description="(recent median - training median) / training spread.")
    above_tau: float | None = Field(description="Share of recent scores above τ.")
    above_tau_p: float | None = Field(description="Binomial tail probability of that many above τ at the ceiling.")
    ks_statistic: float | None = Field(description="Kolmogorov-Smirnov D between recent and training scores.")
    ks_p: float | None = Field(description="The KS test's p-value.")
    train_scores: list[float] = Field(description="The bank's DBT training scores (for the histogram).")
    recent: list[ScoreAt] = Field(description="The recent inspections compared, oldest first (for the time plot).")


def line_health(
    name: str,
    bank_id: str,
    train_scores: Sequence[float] | np.ndarray,
    tau: float,
    audit: AuditLog,
    settings: DriftSettings,
) -> LineHealth:
    """The drift check of one bank version over its latest ``settings.window`` audited scores.

    Args:
        name: The bank's name.
        bank_id: The bank version's id (its line history in the audit log).
        train_scores: The version's DBT training scores.
        tau: Its threshold τ.
        audit: The audit log the front ends write.
        settings: Windows and limits.

    Returns:
        The :class:`LineHealth`.
    """
    recent = audit.recent_scores(bank_id, limit=settings.window)
    train = np.asarray(train_scores, dtype=np.float64)
    report = assess_drift(train, tau, np.asarray([score for _, score in recent], dtype=np.float64), settings)
    return LineHealth(
        bank=name,
        bank_id=bank_id,
        **report.to_dict(),
        train_scores=[float(s) for s in train],
        recent=[ScoreAt(time=time, score=score) for time, score in recent],
    )


def describe_health(health: LineHealth) -> str:
    """Two lines for a terminal: the bank, its state and why."""
    return f"{health.bank} (bank id {health.bank_id}): {health.state}\n  {health.reason}"
