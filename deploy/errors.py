"""Service errors: one exception class per failure, each with an HTTP status and a stable machine code.

Every error the service sends has the same JSON shape, whatever raised it::

    {"error": {"code": "image_too_large", "message": "image 'a.png' has 120000000 pixels; the limit is 64000000",
               "request_id": "3f2a..."}}

Clients branch on ``code`` (stable), people read ``message`` (one line). A stack trace is never sent: an
unexpected exception becomes ``500 internal_error`` with a generic message while the traceback goes to the log.

Example:
    >>> err = BankNotFound("no bank named 'screws'")
    >>> (err.status, err.code)
    (404, 'bank_not_found')
    >>> error_body(err.code, str(err))
    {'error': {'code': 'bank_not_found', 'message': "no bank named 'screws'"}}
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: an error with an HTTP ``status``, a stable ``code`` and optional response ``headers``."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = dict(headers or {})


class Unauthorized(ServiceError):
    """Missing or wrong bearer token."""

    status, code = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="eagle"'})


class BankNotFound(ServiceError):
    """The named bank does not exist."""

    status, code = 404, "bank_not_found"


class JobNotFound(ServiceError):
    """No bank-build job with that id."""

    status, code = 404, "job_not_found"


class BankExists(ServiceError):
    """A bank with that name exists and overwriting was not asked for."""

    status, code = 409, "bank_exists"


class BankBusy(ServiceError):
    """The bank is being built by a running job."""

    status, code = 409, "bank_busy"


class BankUnusable(ServiceError):
    """The bank exists but cannot be used with the current settings (format or settings mismatch)."""

    status, code = 409, "bank_unusable"


class UploadTooLarge(ServiceError):
    """The request body exceeds the configured upload size."""

    status, code = 413, "upload_too_large"


class ArchiveTooLarge(ServiceError):
    """A zip archive unpacks to more bytes or entries than allowed (zip-bomb guard)."""

    status, code = 413, "archive_too_large"


class InvalidRequest(ServiceError):
    """A form field or parameter is missing or malformed."""

    status, code = 422, "invalid_request"


class InvalidImage(ServiceError):
    """The upload is not a decodable image (empty, truncated, not an image, too small)."""

    status, code = 422, "invalid_image"


class ImageTooLarge(ServiceError):
    """The image has more pixels than allowed (decompression-bomb guard), read from its header."""

    status, code = 422, "image_too_large"


class InvalidBankName(ServiceError):
    """The bank name breaks the naming rule (letters, digits, ``._-``; no path separators)."""

    status, code = 422, "invalid_bank_name"


class InvalidArchive(ServiceError):
    """The zip is unreadable, holds unsafe entry names, or holds no usable images."""

    status, code = 422, "invalid_archive"


class BuildFailed(ServiceError):
    """A bank could not be built from the given images (e.g. too few usable references for a threshold)."""

    status, code = 422, "build_failed"


class QueueFull(ServiceError):
    """The inspection queue is full; retry after ``retry_after`` seconds."""

    status, code = 429, "queue_full"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(int(retry_after))})
        self.retry_after = int(retry_after)


class NotReady(ServiceError):
    """The service cannot answer yet (no bank, model not loaded)."""

    status, code = 503, "not_ready"


class ShuttingDown(ServiceError):
    """The service is draining its queue before exiting and accepts no new work."""

    status, code = 503, "shutting_down"


HTTP_STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    411: "length_required",
    413: "upload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "queue_full",
    500: "internal_error",
    503: "unavailable",
}
"""Codes for errors raised by the HTTP framework itself (routing, body parsing, size limits)."""


def error_body(code: str, message: str, *, request_id: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response.

    Args:
        code: stable machine-readable code, e.g. ``"queue_full"``.
        message: one human-readable line.
        request_id: echoed so that a log line can be found; omitted when ``None``.
    """
    error: dict[str, Any] = {"code": code, "message": message}
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def domain_error(exc: BaseException) -> ServiceError | None:
    """Translate an exception raised by the pipeline into a :class:`ServiceError`, or ``None`` if unknown.

    Only the product's own error classes are mapped (an image that cannot be decoded, a bad bank name, a bank
    incompatible with the settings, a build that cannot derive a threshold); anything else is a bug and must
    surface as ``500 internal_error``. Modules are imported lazily so that this works before they are loaded
    and never pulls in the MLLM stack.
    """
    if isinstance(exc, ServiceError):
        return exc
    for module, name, target in _DOMAIN_ERRORS:
        cls = _load_class(module, name)
        if cls is not None and isinstance(exc, cls):
            return target(_one_line(exc))
    return None


_DOMAIN_ERRORS: tuple[tuple[str, str, type[ServiceError]], ...] = (
    ("eagle.images", "ImageError", InvalidImage),
    ("eagle.archives", "ArchiveTooLargeError", ArchiveTooLarge),  # before its base class ArchiveError
    ("eagle.archives", "ArchiveError", InvalidArchive),
    ("eagle.banks", "BankNameError", InvalidBankName),
    ("eagle.banks", "BankError", BankUnusable),
    ("expert.bank", "BankError", BankUnusable),
    ("expert.dbt", "DBTError", BuildFailed),
)


def _load_class(module: str, name: str) -> type | None:
    import importlib
    import sys

    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            return None
    cls = getattr(mod, name, None)
    return cls if isinstance(cls, type) else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
