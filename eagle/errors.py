"""One error hierarchy for every front end: a stable machine ``code`` and an HTTP status per failure.

The app, the HTTP API, the folder watcher and the command line all show the same one-line message for the same
failure; the API and the watcher's records also carry the ``code`` (stable, for clients to branch on). Errors of
the product's own packages derive from :class:`EagleError`. The expert and MLLM packages must not import
``eagle``, so their few user-facing errors are mapped here, in one table (:func:`as_eagle_error`).

Example:
    >>> from eagle.images import ImageError
    >>> err = ImageError("a.png: not an image")
    >>> (err.code, err.http_status, str(err))
    ('invalid_image', 422, 'a.png: not an image')
    >>> describe(KeyError("x")) is None          # not a known failure: a bug, shown as an internal error
    True
"""

from __future__ import annotations

import sys
from typing import ClassVar, NamedTuple

__all__ = ["EagleError", "ErrorInfo", "as_eagle_error", "describe", "one_line"]


class EagleError(Exception):
    """A failure people can act on: a stable ``code``, an HTTP status, and a one-line message.

    Subclasses set the class attributes; an instance may override them (a mapped foreign error).
    """

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str = "", *, code: str | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code  # type: ignore[misc]
        if http_status is not None:
            self.http_status = http_status  # type: ignore[misc]

    @property
    def status(self) -> int:
        """The HTTP status (the service's name for it)."""
        return self.http_status


class ErrorInfo(NamedTuple):
    """What a front end shows for an error: stable code, HTTP status, one-line message."""

    code: str
    http_status: int
    message: str


_FOREIGN: tuple[tuple[str, str, str, int], ...] = (
    # (module, class, code, HTTP status): errors of expert/ and mllm/, which cannot derive from EagleError.
    ("expert.bank", "BankError", "bank_unusable", 409),
    ("expert.dbt", "DBTError", "build_failed", 422),
    ("expert.weights", "BackboneWeightsError", "backbone_unavailable", 503),
    ("mllm.loading", "MLLMLoadError", "mllm_unavailable", 503),
)
"""The expert's and the MLLM's user-facing errors. A module that was never imported cannot have raised one."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (its class name when empty)."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def as_eagle_error(exc: BaseException) -> EagleError | None:
    """``exc`` as an :class:`EagleError` (itself, or a mapped copy of a known foreign error); ``None`` if unknown.

    ``None`` means a bug: front ends log the traceback and show a generic message (the API: ``500 internal_error``).
    """
    if isinstance(exc, EagleError):
        return exc
    for module_name, class_name, code, http_status in _FOREIGN:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and isinstance(exc, cls):
            return EagleError(one_line(exc), code=code, http_status=http_status)
    return None


def describe(exc: BaseException) -> ErrorInfo | None:
    """The code, HTTP status and one-line message of a known failure; ``None`` for anything else."""
    err = as_eagle_error(exc)
    return None if err is None else ErrorInfo(err.code, err.http_status, one_line(err))
