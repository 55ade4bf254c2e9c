"""Progress for the command line: tqdm bars drawn from :class:`common.progress.ProgressCallback` reports.

Library code only reports ``progress(stage, fraction)``; front ends decide how (and whether) to show it.
This module is the command line's renderer (``eagle build-bank``, ``eagle eval``) and the only place that
imports tqdm; ``--no-progress`` builds a disabled bar, which draws nothing. The app renders the same reports
with ``gr.Progress`` and the service stores them in its job status.

Example:
    >>> with StageBar(("embed", "save"), desc="bank", enabled=False) as bar:
    ...     bar("embed", 0.5)
    ...     bar("save", 1.0)
    >>> bar.percent
    100.0
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from tqdm.auto import tqdm

from common.progress import ProgressCallback

__all__ = ["StageBar", "count_bar", "fan_out"]


class StageBar:
    """One bar over a sequence of stages: each stage is an equal share of 100 %; the current stage is the postfix.

    It is a :class:`~common.progress.ProgressCallback`. A stage not in ``stages`` counts as the last one.

    Args:
        stages: the stages in the order they run (e.g. :data:`eagle.bank_service.BUILD_STAGES`).
        desc: the bar's label.
        enabled: False draws nothing (``--no-progress``); the reports are still accepted.
        leave: keep the finished bar on screen.
    """

    def __init__(self, stages: Sequence[str], *, desc: str, enabled: bool = True, leave: bool = False) -> None:
        self.stages = tuple(stages)
        self.percent = 0.0
        self._bar = tqdm(total=100, desc=desc, unit="%", leave=leave, disable=not enabled)

    def __call__(self, stage: str, fraction: float) -> None:
        """Move the bar to ``fraction`` of ``stage``."""
        last = len(self.stages) - 1
        index = self.stages.index(stage) if stage in self.stages else last
        self.percent = round(100 * (index + max(0.0, min(1.0, fraction))) / len(self.stages), 1)
        self._bar.n = self.percent
        self._bar.set_postfix_str(stage, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        """Close the bar (idempotent)."""
        self._bar.close()

    def __enter__(self) -> StageBar:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def count_bar(total: int, *, desc: str, initial: int = 0, unit: str = "img", enabled: bool = True) -> tqdm:
    """A counting bar (``bar.update(n)``, ``bar.close()``) for the command line's loops; draws nothing if disabled."""
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=not enabled)


def fan_out(*callbacks: ProgressCallback | None) -> ProgressCallback | None:
    """One callback that reports to every non-None callback given (None when there is none)."""
    targets = [callback for callback in callbacks if callback is not None]
    if not targets:
        return None

    def report(stage: str, fraction: float) -> None:
        for callback in targets:
            callback(stage, fraction)

    return report
