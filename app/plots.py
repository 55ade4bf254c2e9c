"""Figures the app shows: the DBT picture and the score gauge."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and Spaces

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def dbt_histogram(train_scores: np.ndarray, tau: float, s_max: float, *, method: str = "") -> Figure:
    """Histogram of the leave-own-out training scores with τ and s_max marked.

    Example:
        >>> fig = dbt_histogram(np.array([1.0, 1.2, 0.9, 1.1]), tau=1.5, s_max=1.2)
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['τ = 1.5', 's_max = 1.2']
    """
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    scores = np.asarray(train_scores, dtype=np.float64)
    bins = max(5, min(40, scores.size // 2 or 5))
    ax.hist(scores, bins=bins, color="#4c9a2a", alpha=0.75, label=f"training scores (n={scores.size})")
    ax.axvline(tau, color="#d62728", linewidth=2, label=f"τ = {tau:.4g}")
    ax.axvline(s_max, color="#ff7f0e", linewidth=2, linestyle="--", label=f"s_max = {s_max:.4g}")
    if tau <= s_max:  # the low-confidence band where CAAS turns on (empty when tau > s_max)
        ax.axvspan(tau, s_max, color="#ff7f0e", alpha=0.12, label="expert unsure (CAAS)")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("reference images")
    ax.set_title(f"DBT threshold ({method})" if method else "DBT threshold")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def score_gauge(score: float, tau: float, s_max: float) -> Figure:
    """A one-line gauge: the image's score against τ and s_max (green normal, orange unsure, red anomalous).

    The axis is logarithmic when the score is far from τ, so τ and s_max stay readable next to a large score.

    Example:
        >>> score_gauge(3.7, 0.03, 0.028).axes[0].get_xscale()
        'log'
    """
    fig = Figure(figsize=(6, 1.3), layout="constrained")
    ax = fig.add_subplot()
    positive = [v for v in (score, tau, s_max) if v > 0]
    lo_value, hi_value = (min(positive), max(positive)) if positive else (1.0, 1.0)
    logarithmic = hi_value / lo_value > 20
    lo = lo_value / 2 if logarithmic else 0.0
    hi = hi_value * (2 if logarithmic else 1.25) or 1.0
    ax.axvspan(lo, tau, color="#4c9a2a", alpha=0.25)
    if tau <= s_max:
        ax.axvspan(tau, s_max, color="#ff7f0e", alpha=0.3)
    ax.axvspan(max(tau, s_max), hi, color="#d62728", alpha=0.2)
    ax.axvline(max(score, lo), color="black", linewidth=3)
    ax.text(max(score, lo), 0.5, f" score {score:.4g}", va="center", fontsize=9)
    if logarithmic:
        ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_yticks([])
    ax.set_xticks([tau], [f"τ {tau:.3g}"], fontsize=8)
    ax.set_xticks([], minor=True)
    ax.set_title(f"τ {tau:.4g}   s_max {s_max:.4g}", fontsize=8, loc="left")
    return fig
