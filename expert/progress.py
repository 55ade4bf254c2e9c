"""Progress reporting: the ONE callback protocol of the project, and the stages of a bank build.

Library code (``expert/``, ``mllm/``, ``eagle/``) never draws a bar nor prints: it calls
``progress(stage, fraction)`` (stage name first, fraction of that stage done in [0, 1] second). Only the
front ends render it: the command line (:mod:`eagle.progress_bars`, tqdm bars that ``--no-progress``
turns off), the app (``gr.Progress``) and the service's job status.

Why here: ``expert/`` is the lowest package (it imports nothing else of the project), so ``eagle/`` and
``deploy/`` import this module. ``mllm/`` may not import ``expert/`` (import contracts); its model
loader (:func:`mllm.loading.load_mllm`) declares a structurally identical local Protocol with the same
``(stage, fraction)`` order, so any callback written against this one is accepted there too.

Example:
    >>> seen = []
    >>> report(lambda stage, fraction: seen.append((stage, fraction)), "coreset", 1.7)
    >>> seen
    [('coreset', 1.0)]
    >>> report(None, "embed", 0.5)  # no callback: nothing happens
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["BUILD_STAGES", "ProgressCallback", "report"]


class ProgressCallback(Protocol):
    """``progress(stage, fraction)``: ``fraction`` of ``stage`` is done, in [0, 1]; it returns nothing."""

    def __call__(self, stage: str, fraction: float, /) -> None:
        """Report that ``fraction`` of ``stage`` is done."""


BUILD_STAGES: tuple[str, ...] = ("embed", "coreset", "dbt", "save")
"""The stages of :func:`expert.build.build_bank`, in order (the pipeline adds ``read`` before them)."""


def report(progress: ProgressCallback | None, stage: str, fraction: float) -> None:
    """Call ``progress(stage, fraction)`` with ``fraction`` clamped to [0, 1]; nothing when ``progress`` is None."""
    if progress is not None:
        progress(stage, float(min(1.0, max(0.0, fraction))))
