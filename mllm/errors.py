"""The MLLM layer's one error base: every failure of ``mllm/`` carries a stable machine ``code``.

The MLLM layer knows nothing of HTTP or exit codes: the composition root (:func:`eagle.errors.as_eagle_error`)
maps :class:`MLLMError` by its ``code`` to what the front ends show. Each error class keeps its builtin base too
(``ValueError``, ``RuntimeError``), so callers that catch those still do.

Example:
    >>> from mllm.presets import PresetError
    >>> err = PresetError("unknown preset 'giant'")
    >>> isinstance(err, MLLMError), isinstance(err, ValueError), err.code
    (True, True, 'invalid_preset')
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["MLLMError"]


class MLLMError(Exception):
    """A failure of the MLLM layer, with a stable ``code`` (each subclass sets its own)."""

    code: ClassVar[str] = "mllm_error"
