"""Figures of the Line health panel: the bank's DBT scores against the line's recent ones, and the scores over time."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and Spaces

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

TRAIN_COLOUR = "#4c9a2a"
RECENT_COLOUR = "#1f77b4"
TAU_COLOUR = "#d62728"


def health_histogram(train_scores: Sequence[float], recent_scores: Sequence[float], tau: float) -> Figure:
    """The bank's DBT training scores with the recent scores overlaid (both as shares, on the same bins) and τ.

    Example:
        >>> fig = health_histogram([1.0, 1.2, 0.9, 1.1], [1.4, 1.5], tau=1.3)
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['τ = 1.3']
    """
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    train = np.asarray(train_scores, dtype=np.float64)
    recent = np.asarray(recent_scores, dtype=np.float64)
    values = np.concatenate([train, recent, [tau]])
    bins = np.linspace(values.min(), values.max(), max(6, min(30, values.size // 3)) + 1)
    if bins[0] == bins[-1]:
        bins = np.array([bins[0] - 0.5, bins[0] + 0.5])
    for scores, colour, label in ((train, TRAIN_COLOUR, "bank's training scores"), (recent, RECENT_COLOUR, "recent")):
        if scores.size:
            ax.hist(
                scores,
                bins=bins,
                weights=np.full(scores.size, 1.0 / scores.size),
                color=colour,
                alpha=0.55,
                label=f"{label} (n={scores.size})",
            )
    ax.axvline(tau, color=TAU_COLOUR, linewidth=2, label=f"τ = {tau:.4g}")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("share of scores")
    ax.set_title("Recent scores against the bank's own (DBT)")
    ax.legend(loc="best", fontsize=8)
    return fig


def _times(times: Sequence[str]) -> list[dt.datetime] | None:
    """The ISO times as datetimes; ``None`` when any cannot be read (the plot then counts inspections)."""
    try:
        return [dt.datetime.fromisoformat(time) for time in times]
    except (TypeError, ValueError):
        return None


def recent_scores_plot(times: Sequence[str], scores: Sequence[float], tau: float) -> Figure:
    """The recent scores over time (oldest first), those above τ in red, with τ as a line.

    Example:
        >>> fig = recent_scores_plot(["2026-12-07T00:00:00Z", "2026-12-07T00:01:00Z"], [1.0, 1.4], tau=1.3)
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['score (n=2)', 'τ = 1.3']
    """
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    values = np.asarray(scores, dtype=np.float64)
    when = _times(times)
    x = when if when is not None else list(range(1, values.size + 1))
    ax.plot(x, values, color=RECENT_COLOUR, marker="o", markersize=3, linewidth=1, label=f"score (n={values.size})")
    ax.axhline(tau, color=TAU_COLOUR, linewidth=2, label=f"τ = {tau:.4g}")
    above = values > tau
    if above.any():
        ax.scatter(np.asarray(x, dtype=object)[above], values[above], color=TAU_COLOUR, s=14, zorder=3, label="above τ")
    ax.set_xlabel("time (UTC)" if when is not None else "inspection")
    ax.set_ylabel("anomaly score")
    ax.set_title("Recent scores over time")
    if when is not None:
        fig.autofmt_xdate()
    ax.legend(loc="upper left", fontsize=8)
    return fig
