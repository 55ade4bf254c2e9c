"""The request gate around every HTTP call: request id, bearer-token check, metrics, and last-resort errors.

It is a plain ASGI middleware (no ``BaseHTTPMiddleware``), so it sees every request before FastAPI reads a
byte of the body:

* a request id (``X-Request-ID`` response header, also in error bodies and logs);
* the body-size limit of the route (``Content-Length`` checked before reading, streamed bodies counted while
  reading), answered with a JSON ``413 upload_too_large``;
* admission control: a route may refuse at once (``POST /v1/inspect`` when the queue is full: 429 without
  reading, parsing or storing the upload, so a client storm costs the busy box as little as possible);
* the bearer token on protected paths (``/v1/...``, ``/metrics`` and the schema: ``/openapi.json``, ``/docs``,
  ``/redoc``), checked BEFORE the body is read, so an unauthenticated client cannot make the service parse a
  25 MiB upload;
* failure auditing: on an audited route (``POST /v1/inspect``) every error response except ``401`` calls the
  route's audit hook once with the error code and message (read from the JSON error body), whether the error
  came from the endpoint, the body limit, admission or a crash. The endpoint adds what it learnt (bank, image
  name, sha256) to ``scope["state"]["audit"]`` and sets ``audited`` there when it logged the failure itself;
* one count and one latency observation per request, labelled by the route template (``/v1/jobs/{job_id}``,
  never the raw path, to bound label cardinality);
* any exception that escaped the exception handlers becomes ``500 internal_error`` with a generic message,
  and its traceback is logged with the request id. A stack trace never reaches the client.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deploy.auth import BearerAuth
from deploy.errors import ServiceError, UploadTooLarge, error_body
from deploy.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

PROTECTED_PREFIXES: tuple[str, ...] = ("/v1/", "/metrics", "/openapi.json", "/docs", "/redoc")
ERROR_BODY_CAP = 64 * 1024
"""Most bytes of an error response kept to read its code and message for the audit hook."""


class FailureAudit(NamedTuple):
    """One error response on an audited route, as handed to the route's audit hook."""

    request_id: str
    status: int
    code: str
    message: str
    context: dict[str, Any]
    latency_ms: float


AuditHook = Callable[[FailureAudit], None]


class BodyLimit(NamedTuple):
    """A request-body cap in bytes and the setting that sets it (named in the error message)."""

    max_bytes: int
    setting: str

    def message(self) -> str:
        """One line for the 413 response."""
        return f"the request body exceeds {self.max_bytes / 1024 / 1024:.3g} MiB ({self.setting})"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes its cap.

    An ``HTTPException`` on purpose: FastAPI re-raises those from body parsing (anything else would become a
    400), and the service's HTTP exception handler turns it into the JSON ``413 upload_too_large``.
    """

    def __init__(self, limit: BodyLimit) -> None:
        super().__init__(status_code=413, detail=limit.message())


def route_value(table: dict[tuple[str, str], Any], method: str, path: str, default: Any) -> Any:
    """``table[(method, path)]``, where a key's path may name one segment as ``{param}`` (``/v1/banks/{name}/x``)."""
    found = table.get((method, path))
    if found is not None:
        return found
    parts = path.split("/")
    for (key_method, key_path), value in table.items():
        pattern = key_path.split("/")
        if key_method == method and "{" in key_path and len(pattern) == len(parts):
            pairs = zip(pattern, parts, strict=True)
            if all(p == q or (p.startswith("{") and p.endswith("}") and q) for p, q in pairs):
                return value
    return default


def is_protected(path: str) -> bool:
    """Whether ``path`` needs the bearer token (every ``/v1`` endpoint, ``/metrics`` and the schema pages)."""
    return path == "/v1" or any(path == p or path.startswith(p) for p in PROTECTED_PREFIXES)


async def send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """Send a complete JSON response on a raw ASGI ``send``."""
    payload = json.dumps(body).encode("utf-8")
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class RequestGate:
    """ASGI middleware; see the module docstring.

    Args:
        app: the wrapped application.
        auth: the token check (disabled when no token is configured).
        metrics: where requests and errors are counted.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        auth: BearerAuth,
        metrics: ServiceMetrics,
        body_limits: dict[tuple[str, str], BodyLimit],
        default_body_limit: BodyLimit,
        admission: dict[tuple[str, str], Callable[[], ServiceError | None]] | None = None,
        failure_audit: dict[tuple[str, str], AuditHook] | None = None,
    ) -> None:
        self.app = app
        self.auth = auth
        self.metrics = metrics
        self.body_limits = body_limits
        self.default_body_limit = default_body_limit
        self.admission = admission or {}
        self.failure_audit = failure_audit or {}

    def _limited_receive(self, scope: Scope, receive: Receive, limit: BodyLimit) -> Receive:
        received = 0

        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    raise BodyTooLarge(limit)
            return message

        return receive_with_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        start = time.perf_counter()
        status_holder = {"status": 500, "started": False}
        audit_hook = self.failure_audit.get((scope.get("method", ""), scope["path"]))
        audit_context: dict[str, Any] = {}
        if audit_hook is not None:
            state["audit"] = audit_context
        error_body_parts: list[bytes] = []

        async def audit_failure() -> None:
            """Call the route's audit hook once for an error response (before its last byte leaves)."""
            status = status_holder["status"]
            if audit_hook is None or status < 400 or status == 401 or audit_context.get("audited"):
                return
            audit_context["audited"] = True
            code, text = _error_code_and_message(b"".join(error_body_parts), status)
            elapsed_ms = (time.perf_counter() - start) * 1000.0
            event = FailureAudit(request_id, status, code, text, dict(audit_context), elapsed_ms)
            try:
                await run_in_threadpool(audit_hook, event)
            except Exception:  # noqa: BLE001 - auditing must never turn an answer into a crash
                logger.exception("could not audit the failed request %s", request_id)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("ascii")))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and audit_hook is not None and status_holder["status"] >= 400:
                if sum(map(len, error_body_parts)) < ERROR_BODY_CAP:
                    error_body_parts.append(bytes(message.get("body", b""))[:ERROR_BODY_CAP])
                if not message.get("more_body", False):
                    await audit_failure()  # the row exists before the client has the whole answer
            await send(message)

        route_label = "(unmatched)"
        limit = route_value(self.body_limits, scope.get("method", ""), scope["path"], self.default_body_limit)
        try:
            early: ServiceError | None = None
            if is_protected(scope["path"]):
                try:
                    self.auth(Request(scope))
                except ServiceError as err:
                    route_label, early = "(unauthorized)", err
            if early is None and _content_length(scope) > limit.max_bytes:
                route_label, early = "(too large)", UploadTooLarge(limit.message())
            admit = self.admission.get((scope.get("method", ""), scope["path"]))
            if early is None and admit is not None and (refusal := admit()) is not None:
                route_label, early = scope["path"], refusal
            if early is not None:
                self.metrics.errors.inc(code=early.code)
                body = error_body(early.code, str(early), request_id=request_id)
                await send_json(send_wrapper, early.http_status, body, early.headers)
                return
            await self.app(scope, self._limited_receive(scope, receive, limit), send_wrapper)
            route = scope.get("route")
            route_label = getattr(route, "path", None) or route_label
        except BodyTooLarge as exc:  # escaped the handlers (raised outside body parsing)
            if not status_holder["started"]:
                self.metrics.errors.inc(code="upload_too_large")
                await send_json(send_wrapper, 413, error_body("upload_too_large", exc.detail, request_id=request_id))
        except Exception:
            route = scope.get("route")
            route_label = getattr(route, "path", None) or route_label
            logger.exception("unhandled error in %s %s (request %s)", scope.get("method"), scope["path"], request_id)
            if not status_holder["started"]:
                self.metrics.errors.inc(code="internal_error")
                message = "internal error; the service log has the details"
                await send_json(send_wrapper, 500, error_body("internal_error", message, request_id=request_id))
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.observe_request(route_label, scope.get("method", ""), status_holder["status"], elapsed)
            await audit_failure()  # the answer never completed (client gone): audit it all the same


def _error_code_and_message(body: bytes, status: int) -> tuple[str, str]:
    """The ``code`` and ``message`` of a JSON error body (``http_<status>`` when it is not one)."""
    try:
        error = json.loads(body.decode("utf-8"))["error"]
        return str(error["code"]), " ".join(str(error["message"]).split())
    except (ValueError, KeyError, TypeError):
        return f"http_{status}", f"HTTP {status}"


def _content_length(scope: Scope) -> int:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
