"""Progress reporting: the ONE callback protocol of the project.

Library code (``expert/``, ``mllm/``, ``eagle/``) never draws a bar nor prints: it calls
``progress(stage, fraction)`` (stage name first, fraction of that stage done in [0, 1] second). Only the
front ends render it: the command line (:mod:`eagle.progress_bars`, tqdm bars that ``--no-progress``
turns off), the app (``gr.Progress``) and the service's job status.

Why here: ``common/`` is the bottom layer of the import contracts, so the expert (bank builds), the MLLM
(model loading) and everything above them use this one protocol.

Example:
    >>> seen = []
    >>> report(lambda stage, fraction: seen.append((stage, fraction)), "coreset", 1.7)
    >>> seen
    [('coreset', 1.0)]
    >>> report(None, "embed", 0.5)  # no callback: nothing happens
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["ProgressCallback", "report"]


class ProgressCallback(Protocol):
    """``progress(stage, fraction)``: ``fraction`` of ``stage`` is done, in [0, 1]; it returns nothing."""

    def __call__(self, stage: str, fraction: float, /) -> None:
        """Report that ``fraction`` of ``stage`` is done."""


def report(progress: ProgressCallback | None, stage: str, fraction: float) -> None:
    """Call ``progress(stage, fraction)`` with ``fraction`` clamped to [0, 1]; nothing when ``progress`` is None."""
    if progress is not None:
        progress(stage, float(min(1.0, max(0.0, fraction))))
