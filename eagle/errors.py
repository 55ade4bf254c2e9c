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

import errno
import sqlite3
import sys
from typing import ClassVar, NamedTuple

__all__ = [
    "DiskFullError",
    "EagleError",
    "ErrorInfo",
    "as_eagle_error",
    "describe",
    "disk_full_error",
    "is_disk_full",
    "one_line",
]


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


class DiskFullError(EagleError, OSError):
    """The data disk (or the user's quota) is full: nothing was changed; free space and retry."""

    code, http_status = "disk_full", 507


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""``OSError`` numbers of a full disk (no space left) and of an exhausted quota."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk or the quota is full.

    Covers ``OSError`` with ``ENOSPC`` / ``EDQUOT`` and SQLite's "database or disk is full" (the audit log).

    Example:
        >>> import errno
        >>> is_disk_full(OSError(errno.ENOSPC, "No space left on device")), is_disk_full(OSError(errno.EACCES, "x"))
        (True, False)
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return True
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(current, sqlite3.OperationalError) and "disk is full" in str(current).lower():
            return True
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def disk_full_error(exc: BaseException) -> DiskFullError:
    """A full-disk failure as one :class:`DiskFullError` line: where it happened (a path, never file contents)."""
    if isinstance(exc, DiskFullError):
        return exc
    where = getattr(exc, "filename", None)
    place = f" while writing {str(where)!r}" if where else ""
    return DiskFullError(f"the disk is full{place}: nothing was changed; free space and retry")


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
    if isinstance(exc, EagleError) and not (exc.code == "internal_error" and is_disk_full(exc)):
        return exc
    if is_disk_full(exc):
        return disk_full_error(exc)
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
