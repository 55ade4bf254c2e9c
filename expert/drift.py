"""Line health: have a line's recent expert scores drifted away from its bank's own score distribution?

A bank's DBT training scores (``train_scores``: each used reference scored against the others, leave-own-out)
are how good parts scored on the day the bank was built. Light ages, a camera is bumped, a new batch of material
arrives: the scores of good parts creep up (or down) long before operators start overruling verdicts.
:func:`assess_drift` compares the scores of recent inspections of good parts with the training scores by three
statistics, each of which also reads as a sentence:

* **median shift**, in units of the DBT spread: ``(median(recent) - median(train)) / std(train)``;
* **share above τ** against the rate the training scores themselves give (their share above τ, with its
  one-sided 95 % Clopper-Pearson upper bound as the expected ceiling, since a bank has only tens of references),
  and the one-sided binomial tail probability of seeing that many recent scores above τ at the ceiling rate;
* the two-sample **Kolmogorov-Smirnov** statistic ``D`` and its p-value (:func:`scipy.stats.ks_2samp`).

The state is the worst rule that fires (limits: :class:`DriftSettings`):

* ``not_enough_references``: fewer than ``min_references`` training scores: never ``ok``, however the line runs;
* ``not_enough_inspections``: fewer than ``min_inspections`` recent scores to judge;
* ``drifting``: ``|median shift| >= drift_sigma``, or the share above τ exceeds the ceiling by ``drift_excess`` with
  tail probability ``<= drift_p``;
* ``watch``: ``|median shift| >= watch_sigma``, or the share above τ exceeds the ceiling with tail probability
  ``<= watch_p``, or ``D >= watch_ks`` with KS p-value ``<= watch_p``;
* otherwise ``ok``.

The rules are effect sizes gated by significance, so that a stable line evaluated after every inspection does not
raise alarms by multiple testing; ``bench/bench_drift.py`` measures the false-alarm rate of the defaults on
simulated stable lines and the delay to detect a shift.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> train = rng.normal(1.0, 0.1, 50)
    >>> assess_drift(train, tau=1.3, recent=rng.normal(1.0, 0.1, 200)).state
    'ok'
    >>> report = assess_drift(train, tau=1.3, recent=rng.normal(1.3, 0.1, 200))
    >>> report.state, report.reason.split(";")[0]
    ('drifting', 'median score moved +3.1 σ in the last 200 inspections')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import stats

__all__ = ["DRIFT_STATES", "DriftReport", "DriftSettings", "DriftState", "assess_drift", "state_level"]

DriftState = Literal["ok", "watch", "drifting", "not_enough_references", "not_enough_inspections"]
DRIFT_STATES: tuple[DriftState, ...] = get_args(DriftState)
"""Every state :func:`assess_drift` can give, in this order."""

_LEVELS: dict[DriftState, int] = {
    "not_enough_references": -2,
    "not_enough_inspections": -1,
    "ok": 0,
    "watch": 1,
    "drifting": 2,
}
_CEILING_CONFIDENCE = 0.95


def state_level(state: DriftState) -> int:
    """A number per state for gauges and alert rules: ok 0, watch 1, drifting 2; not enough data -1 / -2."""
    return _LEVELS[state]


class DriftSettings(BaseModel):
    """Windows and limits of the drift check (``EAGLE_HEALTH__…``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    window: int = Field(200, ge=10, description="The most recent inspections of good parts compared (per bank id).")
    min_inspections: int = Field(50, ge=5, description="Fewer recent inspections than this: not judged yet.")
    min_references: int = Field(
        20, ge=2, description="A bank with fewer DBT training scores is never called ok ('not enough references')."
    )
    watch_sigma: float = Field(1.0, gt=0, description="|median shift| in DBT spreads that makes a line 'watch'.")
    drift_sigma: float = Field(2.0, gt=0, description="|median shift| in DBT spreads that makes a line 'drifting'.")
    watch_ks: float = Field(0.3, gt=0, le=1, description="Kolmogorov-Smirnov D (with p <= watch_p) for 'watch'.")
    drift_excess: float = Field(
        0.05, ge=0, le=1, description="Share above τ this far over the expected ceiling (with p <= drift_p): drifting."
    )
    watch_p: float = Field(1e-4, gt=0, lt=1, description="Significance a 'watch' rule needs (binomial and KS).")
    drift_p: float = Field(1e-6, gt=0, lt=1, description="Significance the share-above-τ 'drifting' rule needs.")

    @model_validator(mode="after")
    def _ordered(self) -> DriftSettings:
        if self.drift_sigma < self.watch_sigma:
            raise ValueError(f"drift_sigma ({self.drift_sigma}) must be >= watch_sigma ({self.watch_sigma})")
        if self.drift_p > self.watch_p:
            raise ValueError(f"drift_p ({self.drift_p}) must be <= watch_p ({self.watch_p})")
        if self.min_inspections > self.window:
            raise ValueError(f"min_inspections ({self.min_inspections}) must be <= window ({self.window})")
        return self


@dataclass(frozen=True)
class DriftReport:
    """The drift check's result for one bank version.

    Attributes:
        state: One of :data:`DRIFT_STATES`.
        reason: The state in words, e.g. "median score moved +2.3 σ in the last 200 inspections; 14 % above τ,
            expected ≤ 2 %".
        n_references: Training scores the comparison used.
        n_recent: Recent scores the comparison used (at most the window).
        tau: The bank's threshold.
        train_median: Median of the training scores.
        train_spread: Standard deviation of the training scores (the unit of ``median_shift``).
        expected_above_tau: Share of training scores above τ.
        expected_above_tau_max: Its one-sided 95 % upper bound (the ceiling recent scores are held to).
        recent_median: Median of the recent scores (``None`` when there are none).
        median_shift: ``(recent_median - train_median) / train_spread`` (``None`` without recent scores).
        above_tau: Share of recent scores above τ (``None`` without recent scores).
        above_tau_p: One-sided binomial tail probability of that many above τ at the ceiling rate.
        ks_statistic: Kolmogorov-Smirnov ``D`` between recent and training scores.
        ks_p: Its p-value.
    """

    state: DriftState
    reason: str
    n_references: int
    n_recent: int
    tau: float
    train_median: float | None
    train_spread: float | None
    expected_above_tau: float | None
    expected_above_tau_max: float | None
    recent_median: float | None = None
    median_shift: float | None = None
    above_tau: float | None = None
    above_tau_p: float | None = None
    ks_statistic: float | None = None
    ks_p: float | None = None

    @property
    def level(self) -> int:
        """:func:`state_level` of :attr:`state`."""
        return state_level(self.state)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the field names above, plus ``level``)."""
        return {**asdict(self), "level": self.level}


def _percent(value: float) -> str:
    return f"{100 * value:.0f} %" if value >= 0.01 or value == 0 else f"{100 * value:.1f} %"


def assess_drift(
    train_scores: np.ndarray,
    tau: float,
    recent: np.ndarray,
    settings: DriftSettings | None = None,
) -> DriftReport:
    """Compare recent scores of good parts with a bank's DBT training scores (rules in the module docstring).

    Args:
        train_scores: The bank's DBT training scores (``[U]``, leave-own-out).
        tau: The bank's threshold τ.
        recent: Scores of recent inspections of good parts, oldest first; only the last ``settings.window`` count.
        settings: Windows and limits (defaults: :class:`DriftSettings`).

    Returns:
        The :class:`DriftReport`.

    Raises:
        ValueError: a score is NaN or infinite.
    """
    limits = settings or DriftSettings()
    train = np.asarray(train_scores, dtype=np.float64).reshape(-1)
    scores = np.asarray(recent, dtype=np.float64).reshape(-1)[-limits.window :]
    if not (np.isfinite(train).all() and np.isfinite(scores).all() and np.isfinite(tau)):
        raise ValueError("drift check: scores and τ must be finite numbers")
    n_ref, n = len(train), len(scores)
    if n_ref < limits.min_references:
        return DriftReport(
            state="not_enough_references",
            reason=f"the bank has {n_ref} DBT training scores; drift is judged from {limits.min_references} on "
            "(build it from more good references)",
            n_references=n_ref,
            n_recent=n,
            tau=float(tau),
            train_median=float(np.median(train)) if n_ref else None,
            train_spread=None,
            expected_above_tau=None,
            expected_above_tau_max=None,
        )
    train_median = float(np.median(train))
    spread = float(np.std(train, ddof=1))
    spread = max(spread, 1e-9 * max(1.0, abs(train_median)))  # equal training scores: any move is a large shift
    k_ref = int(np.count_nonzero(train > tau))
    ceiling = float(stats.beta.ppf(_CEILING_CONFIDENCE, k_ref + 1, n_ref - k_ref)) if k_ref < n_ref else 1.0
    waiting = DriftReport(
        state="not_enough_inspections",
        reason=f"{n} recent inspections of good parts; drift is judged from {limits.min_inspections} on",
        n_references=n_ref,
        n_recent=n,
        tau=float(tau),
        train_median=train_median,
        train_spread=spread,
        expected_above_tau=k_ref / n_ref,
        expected_above_tau_max=ceiling,
    )
    if n < limits.min_inspections:
        return waiting
    recent_median = float(np.median(scores))
    shift = (recent_median - train_median) / spread
    k = int(np.count_nonzero(scores > tau))
    above = k / n
    above_p = float(stats.binom.sf(k - 1, n, ceiling)) if k > 0 else 1.0
    ks = stats.ks_2samp(scores, train)
    ks_d, ks_p = float(ks.statistic), float(ks.pvalue)

    state: DriftState = "ok"
    if abs(shift) >= limits.drift_sigma or (above >= ceiling + limits.drift_excess and above_p <= limits.drift_p):
        state = "drifting"
    elif (
        abs(shift) >= limits.watch_sigma
        or (above > ceiling and above_p <= limits.watch_p)
        or (ks_d >= limits.watch_ks and ks_p <= limits.watch_p)
    ):
        state = "watch"
    reason = (
        f"median score moved {shift:+.1f} σ in the last {n} inspections; {_percent(above)} above τ, "
        f"expected ≤ {_percent(ceiling)}; KS D = {ks_d:.2f}"
    )
    return replace(
        waiting,
        state=state,
        reason=reason,
        recent_median=recent_median,
        median_shift=shift,
        above_tau=above,
        above_tau_p=above_p,
        ks_statistic=ks_d,
        ks_p=ks_p,
    )
