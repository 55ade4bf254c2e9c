"""One error family for every front end: a stable machine ``code``, an HTTP status and an exit code per failure.

The app, the HTTP API, the folder watcher and the command line all show the same one-line message for the same
failure; the API and the watcher's records also carry the ``code`` (stable, for clients to branch on), the API
answers with the HTTP status, and ``eagle`` (:func:`eagle.cli.main`) exits with the exit code. Errors of the
product's own packages (``eagle``, the service's, the command line's :class:`CommandError`) derive from
:class:`EagleError`. The expert and MLLM packages must not import ``eagle``: their errors derive from one base
each (:class:`expert.errors.ExpertError`, :class:`mllm.errors.MLLMError`) carrying a stable ``code``, mapped here
once, by that code (:data:`LIBRARY_HTTP_STATUS`, :func:`as_eagle_error`).

Example:
    >>> from eagle.images import ImageError
    >>> err = ImageError("a.png: not an image")
    >>> (err.code, err.http_status, err.exit_code, str(err))
    ('invalid_image', 422, 2, 'a.png: not an image')
    >>> from expert.bank_schema import BankError
    >>> mapped = as_eagle_error(BankError("bank.safetensors is damaged"))
    >>> (type(mapped).__name__, mapped.code, mapped.http_status)
    ('EagleError', 'bank_unusable', 409)
    >>> describe(KeyError("x")) is None          # not a known failure: a bug, shown as an internal error
    True
"""

from __future__ import annotations

import errno
import sqlite3
from typing import ClassVar, NamedTuple

from expert.errors import ExpertError
from mllm.errors import MLLMError

__all__ = [
    "EXIT_DISK_FULL",
    "EXIT_ERROR",
    "LIBRARY_HTTP_STATUS",
    "CommandError",
    "DiskFullError",
    "EagleError",
    "ErrorInfo",
    "as_eagle_error",
    "describe",
    "disk_full_error",
    "is_disk_full",
    "one_line",
]


EXIT_ERROR = 2
"""Exit code of a command stopped by a known failure: usage, configuration, a bad or unusable bank, ..."""

EXIT_DISK_FULL = 3
"""Exit code of a command stopped by a full disk or quota (:class:`DiskFullError`)."""


class EagleError(Exception):
    """A failure people can act on: a stable ``code``, an HTTP status, an exit code and a one-line message.

    Subclasses set the class attributes; an instance may override them (a mapped library error, a command's
    own exit code).
    """

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = EXIT_ERROR

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        http_status: int | None = None,
        exit_code: int | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code  # type: ignore[misc]
        if http_status is not None:
            self.http_status = http_status  # type: ignore[misc]
        if exit_code is not None:
            self.exit_code = exit_code  # type: ignore[misc]


class DiskFullError(EagleError, OSError):
    """The data disk (or the user's quota) is full: nothing was changed; free space and retry."""

    code, http_status, exit_code = "disk_full", 507, EXIT_DISK_FULL


class CommandError(EagleError):
    """A failure an ``eagle`` command reports as one line on stderr (no traceback), with its exit code.

    Example:
        >>> raise CommandError("bank not found: ./banks/widget", exit_code=2)
        Traceback (most recent call last):
        ...
        eagle.errors.CommandError: bank not found: ./banks/widget
    """

    code, http_status = "command_failed", 400

    def __init__(self, message: str, *, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message, exit_code=exit_code)


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


LIBRARY_HTTP_STATUS: dict[str, int] = {
    "bank_unusable": 409,  # expert.bank_schema.BankError
    "build_failed": 422,  # expert.dbt.DBTError (and ReferenceCountError, one of them)
    "backbone_unavailable": 503,  # expert.weights.BackboneWeightsError
    "invalid_settings": 422,  # expert.preprocess.NormalizationError: a backbone without statistics, no override
    "mllm_unavailable": 503,  # mllm.loading.MLLMLoadError (and CAASUnsupportedError, one of them)
}
"""The HTTP status of each user-facing ``code`` of :class:`~expert.errors.ExpertError` and
:class:`~mllm.errors.MLLMError`. A library error whose code is not listed is a bug (bad arguments, a failed
export, ...): front ends treat it as any unexpected exception."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (its class name when empty)."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def as_eagle_error(exc: BaseException) -> EagleError | None:
    """``exc`` as an :class:`EagleError` (itself, or a mapped copy of a known library error); ``None`` if unknown.

    ``None`` means a bug: front ends log the traceback and show a generic message (the API: ``500 internal_error``).
    """
    if isinstance(exc, EagleError) and not (exc.code == "internal_error" and is_disk_full(exc)):
        return exc
    if is_disk_full(exc):
        return disk_full_error(exc)
    if isinstance(exc, ExpertError | MLLMError):
        http_status = LIBRARY_HTTP_STATUS.get(exc.code)
        if http_status is not None:
            return EagleError(one_line(exc), code=exc.code, http_status=http_status)
    return None


def describe(exc: BaseException) -> ErrorInfo | None:
    """The code, HTTP status and one-line message of a known failure; ``None`` for anything else."""
    err = as_eagle_error(exc)
    return None if err is None else ErrorInfo(err.code, err.http_status, one_line(err))
