"""The stages of a bank build, in the order the expert reports them.

Progress itself goes through the project's one callback protocol, :class:`common.progress.ProgressCallback`
(``progress(stage, fraction)``); these are the ``stage`` names :func:`expert.build.build_bank` reports.

Example:
    >>> BUILD_STAGES
    ('embed', 'coreset', 'dbt', 'save')
"""

from __future__ import annotations

__all__ = ["BUILD_STAGES"]

BUILD_STAGES: tuple[str, ...] = ("embed", "coreset", "dbt", "save")
"""The stages of :func:`expert.build.build_bank`, in order (the pipeline adds ``read`` before them)."""
