"""Service errors: the service's own failures, on top of the one hierarchy of :mod:`eagle.errors`.

Every error the service sends has the same JSON shape, whatever raised it::

    {"error": {"code": "image_too_large", "message": "image 'a.png' has 120000000 pixels; the limit is 64000000",
               "request_id": "3f2a..."}}

Clients branch on ``code`` (stable), people read ``message`` (one line). The pipeline's errors (an undecodable
image, a bad bank name, an unusable bank, the MLLM unavailable, ...) are :class:`eagle.errors.EagleError` subclasses and
carry their own code and HTTP status (raise them under their own names, e.g. :class:`eagle.banks.BankNotFoundError`);
this module adds the failures only the service has (authentication, queueing, jobs, upload limits). A stack trace
is never sent: an unexpected exception becomes ``500 internal_error`` with a generic message while the traceback
goes to the log.

Example:
    >>> err = JobNotFound("no job 'abc'")
    >>> (err.http_status, err.code)
    (404, 'job_not_found')
    >>> error_body(err.code, str(err))
    {'error': {'code': 'job_not_found', 'message': "no job 'abc'"}}
"""

from __future__ import annotations

from typing import Any

from eagle.errors import EagleError

__all__ = [
    "BankBusy",
    "BankExists",
    "ImageTooLarge",
    "InvalidRequest",
    "JobNotFound",
    "NotReady",
    "QueueFull",
    "ServiceError",
    "ShuttingDown",
    "Unauthorized",
    "UploadTooLarge",
    "error_body",
]


class ServiceError(EagleError):
    """A failure of the service itself, with optional response ``headers`` (``Retry-After``, ...)."""

    def __init__(
        self,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        code: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message, code=code, http_status=http_status)
        self.headers = dict(headers or {})


class Unauthorized(ServiceError):
    """Missing or wrong bearer token."""

    code, http_status = "unauthorized", 401

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="eagle"'})


class JobNotFound(ServiceError):
    """No bank-build job with that id."""

    code, http_status = "job_not_found", 404


class BankExists(ServiceError):
    """A bank with that name exists and overwriting was not asked for."""

    code, http_status = "bank_exists", 409


class BankBusy(ServiceError):
    """The bank is being built by a running job."""

    code, http_status = "bank_busy", 409


class UploadTooLarge(ServiceError):
    """The request body exceeds the configured upload size."""

    code, http_status = "upload_too_large", 413


class InvalidRequest(ServiceError):
    """A form field or parameter is missing or malformed."""

    code, http_status = "invalid_request", 422


class ImageTooLarge(ServiceError):
    """The image has more pixels than allowed (decompression-bomb guard), read from its header."""

    code, http_status = "image_too_large", 422


class QueueFull(ServiceError):
    """The inspection queue is full; retry after ``retry_after`` seconds."""

    code, http_status = "queue_full", 429

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(int(retry_after))})
        self.retry_after = int(retry_after)


class NotReady(ServiceError):
    """The service cannot answer yet (no bank, model not loaded)."""

    code, http_status = "not_ready", 503


class ShuttingDown(ServiceError):
    """The service is draining its queue before exiting and accepts no new work."""

    code, http_status = "shutting_down", 503


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
