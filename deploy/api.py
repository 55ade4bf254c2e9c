"""The HTTP API of the edge service: a FastAPI application around one :class:`eagle.pipeline.Pipeline`.

Endpoints (all ``/v1`` endpoints, ``/metrics`` and the schema need ``Authorization: Bearer <token>`` when a token
is set):

=================================  ==================================================================
``POST /v1/inspect``               multipart ``image`` + ``bank`` (+ options) → the inspection record
``POST /v1/inspections/{run_id}/feedback``  JSON: an operator confirms or overrules a verdict (audit log)
``GET /v1/banks``                  the saved banks
``POST /v1/banks``                 multipart ``name`` + ``archive`` (zip of normal images), optional inspection
                                   mask ``mask`` (PNG) or ``mask_polygons`` (JSON) → 202 + job
``GET /v1/jobs``, ``/v1/jobs/{id}`` bank-build job status
``DELETE /v1/banks/{name}``        delete a bank
``GET /healthz``                   the process is alive
``GET /readyz``                    banks loaded and test-inspected, model loaded, what the setup needs present
                                   (``eagle doctor``'s checks, reported in ``capabilities``; 503 otherwise)
``GET /metrics``                   Prometheus text
``GET /openapi.json``, ``/docs``   the schema (token required when one is set)
=================================  ==================================================================

Every ``POST /v1/inspect`` that passed the token check leaves exactly one audit row: ``ok`` with the record, or
``error`` with the error code and message (never the image bytes; its sha256 when it was read). With
``EAGLE_KEEP_IMAGES__ENABLED=true`` a successfully inspected image is also kept under ``<data_dir>/kept-images``
(:mod:`eagle.kept_images`), which ``GET``/``POST /v1/banks/{name}/refresh`` propose and teach from.

Example:
    >>> from eagle.settings import Settings
    >>> from eagle.pipeline import Pipeline  # doctest: +SKIP
    >>> settings = Settings(mllm={"enabled": False})  # doctest: +SKIP
    >>> app = create_app(Pipeline(settings), settings)  # doctest: +SKIP
    >>> # uvicorn.run(app, host="127.0.0.1", port=8080)  -- or `eagle serve`
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, File, Form, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field, ValidationError
from pydantic.json_schema import SkipJsonSchema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.auth import BearerAuth
from deploy.errors import (
    HTTP_STATUS_CODES,
    BankBusy,
    InvalidRequest,
    JobNotFound,
    NotReady,
    QueueFull,
    ServiceError,
    UploadTooLarge,
    error_body,
)
from deploy.jobs import JOB_ID_PATTERN, BankBuildJobs, JobStatus
from deploy.limits import FORM_LIMITS, check_image_pixels, mib_to_bytes
from deploy.metrics import ServiceMetrics
from deploy.middleware import BodyLimit, FailureAudit, RequestGate
from deploy.schema_params import (
    BANK_NAME_HELP,
    BANK_NAME_SCHEMA,
    BankNamePath,
    JobIdPath,
    PrometheusText,
    allowed_methods,
    bounded_path,
    close_form_bodies,
)
from deploy.worker import InferenceWorker
from eagle.annotate import annotated_png_base64
from eagle.archives import ArchiveLimits
from eagle.audit import AuditLog, FeedbackKind, default_audit_path
from eagle.bank_records import BankSummary, BankVersion, TeachResult
from eagle.bank_refresh import RefreshCandidate, RefreshProposal
from eagle.banks import BANK_NAME_MAX_LENGTH, BankNotFoundError, validate_bank_name
from eagle.doctor import ReportCache, Status
from eagle.errors import EagleError, as_eagle_error, is_disk_full, one_line
from eagle.images import ImageError, image_sha256
from eagle.kept_images import keep_inspected_image
from eagle.line_health import LineHealth
from eagle.lines import DeclaredLine
from eagle.pipeline import InspectionPipeline
from eagle.records import CAASPolicy, InspectionResult, InspectOptions, OperatorVerdict, PromptSetting
from eagle.settings import Settings

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 255
Unsent = SkipJsonSchema[None]
"""An optional form field's ``None``: it means the field was not sent (a form cannot send a null), so the schema
lists only the field's own type."""
Alpha = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]
"""``POST /v1/inspect``'s ``alpha`` (the CAAS weight)."""
RunIdPath = bounded_path("The inspection's request_id (= its audit run_id).", MAX_NAME_LENGTH)
SMALL_BODY_BYTES = 64 * 1024
"""Body cap of endpoints that take no upload."""


class InspectResponse(BaseModel):
    """``POST /v1/inspect``: the record, and the annotated PNG when asked for."""

    request_id: str = Field(description="Also the audit log's run_id for this inspection.")
    result: InspectionResult
    annotated_png: str | None = Field(None, description="Base64 PNG: heatmap over the image, boxes in red.")


class FeedbackRequest(BaseModel):
    """``POST /v1/inspections/{run_id}/feedback``: an operator confirms or overrules the verdict of one inspection."""

    model_config = {"extra": "forbid"}

    verdict: FeedbackKind = Field(description="The operator's view of the verdict.")
    correct_verdict: OperatorVerdict | None = Field(
        None, description="The right verdict; for 'overruled' it defaults to the opposite of the verdict."
    )
    operator: str | None = Field(None, max_length=200, description="Who gave the feedback.")
    note: str | None = Field(None, max_length=1000, description="Free text.")


class FeedbackResponse(BaseModel):
    """The stored feedback row (the inspection's own audit row is never changed)."""

    id: int
    run_id: str
    time: str
    bank: str | None
    verdict: str | None = Field(description="The inspection's verdict, as audited.")
    feedback: FeedbackKind
    correct_verdict: OperatorVerdict | None
    operator: str | None
    note: str | None


class BankList(BaseModel):
    """``GET /v1/banks``."""

    banks: list[BankSummary] = Field(description="The saved banks, newest first.")
    declared: list[DeclaredLine] = Field(
        default_factory=list,
        description="Lines declared before their bank exists (state 'declared': no bank yet), newest first.",
    )


class DeclareLineRequest(BaseModel):
    """``POST /v1/lines``: declare a line before its bank exists."""

    model_config = {"extra": "forbid"}

    name: str = Field(
        max_length=BANK_NAME_MAX_LENGTH,
        description=f"The line's name (its bank's name later). {BANK_NAME_HELP}",
        json_schema_extra=BANK_NAME_SCHEMA,
    )
    note: str = Field("", max_length=200, description="One line for people (what the line makes).")


class DeclaredLines(BaseModel):
    """``GET /v1/lines``."""

    lines: list[DeclaredLine] = Field(description="Lines declared before their bank exists, newest first.")


class JobList(BaseModel):
    """``GET /v1/jobs``."""

    jobs: list[JobStatus]


class BankVersions(BaseModel):
    """``GET /v1/banks/{name}/versions``: kept versions, oldest first (``current`` marks the one in use)."""

    versions: list[BankVersion] = Field(description="The kept versions, oldest first.")


class RollbackRequest(BaseModel):
    """``POST /v1/banks/{name}/rollback``: the kept version to make current again."""

    version: int = Field(ge=1, description="A kept version number (GET /v1/banks/{name}/versions lists them).")


class RolledBack(BaseModel):
    """``POST /v1/banks/{name}/rollback``: the version now current and the bank as it now is."""

    version: int = Field(description="The version now current.")
    bank: BankSummary = Field(description="The bank as it now is.")


class RefreshRequest(BaseModel):
    """``POST /v1/banks/{name}/refresh``: the proposed images to teach (GET /v1/banks/{name}/refresh lists them)."""

    image_sha256: list[Annotated[str, Field(pattern="^[0-9a-f]{64}$")]] = Field(
        min_length=1,
        max_length=64,
        description="The sha256s (64 lower-case hex digits) of proposed candidates to teach; others are refused "
        "with 409 invalid_refresh.",
    )


class RefreshTaught(BaseModel):
    """``POST /v1/banks/{name}/refresh``: what was taught and what teaching changed."""

    taught: list[RefreshCandidate] = Field(description="The candidates taught, newest first.")
    result: TeachResult = Field(description="The teach: versions, τ and s_max before → after, each image's scores.")


MAX_TEACH_IMAGES = 64
"""Most images one ``POST /v1/banks/{name}/references`` may add."""


class Deleted(BaseModel):
    """``DELETE /v1/banks/{name}``."""

    deleted: str


class Health(BaseModel):
    """``GET /healthz``."""

    status: Literal["alive"] = "alive"


class Capability(BaseModel):
    """One capability of the installation (:class:`eagle.doctor.Check`; the same rows as ``eagle doctor --json``)."""

    name: str
    title: str
    status: Status
    needed: bool = Field(description="The configured setup needs it: when missing, ``/readyz`` answers 503.")
    detail: str
    fix: str


class Readiness(BaseModel):
    """``GET /readyz`` (200): every check true. ``capabilities`` reports everything; only needed ones gate."""

    ready: bool
    checks: dict[str, bool]
    capabilities: list[Capability] = Field(default_factory=list)


class ErrorDetail(BaseModel):
    """The ``error`` member of every error response."""

    code: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    """Every error response: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (401, "Missing or wrong bearer token."),
        (404, "Unknown bank, job or inspection run id."),
        (
            409,
            "Bank exists, is being built, or is unusable (invalid, other settings, or failed its test inspection); "
            "a refresh names images its proposal does not hold now (invalid_refresh).",
        ),
        (413, "Upload or archive too large."),
        (422, "Invalid field, image, bank name or archive."),
        (429, "Queue full; see Retry-After."),
        (503, "Not ready, shutting down, or the MLLM asked for cannot be loaded (mllm_unavailable)."),
    )
}

DISK_FULL_RESPONSES: dict[int | str, dict[str, Any]] = {
    507: {
        "model": ErrorResponse,
        "description": "disk_full: the data disk or quota is full; nothing was changed (free space and retry).",
    }
}
"""The error of every endpoint that writes to the data folder (uploads, banks, jobs, the audit log)."""

BODY_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Unparsable body: malformed JSON or multipart, or more form fields, files or bytes per "
        "field than the endpoint takes.",
    },
    **DISK_FULL_RESPONSES,
}
"""The extra errors of every endpoint that reads a request body (each of them also writes: 507 on a full disk)."""


@dataclass
class Service:
    """Everything the endpoints share; ``app.state.service``."""

    pipeline: InspectionPipeline
    settings: Settings
    worker: InferenceWorker
    jobs: BankBuildJobs
    audit: AuditLog
    metrics: ServiceMetrics
    owned: list[Any] = field(default_factory=list)
    warm: threading.Event = field(default_factory=threading.Event)

    @property
    def upload_limit(self) -> int:
        """Body cap of ``POST /v1/inspect`` in bytes."""
        return mib_to_bytes(self.settings.service.max_upload_mb)

    @property
    def archive_limit(self) -> int:
        """Body cap of ``POST /v1/banks`` in bytes."""
        return mib_to_bytes(self.settings.service.max_archive_mb)


def create_app(
    pipeline: InspectionPipeline,
    settings: Settings,
    *,
    audit: AuditLog | None = None,
    worker: InferenceWorker | None = None,
    jobs: BankBuildJobs | None = None,
    warm_up: bool = False,
) -> FastAPI:
    """Build the service's FastAPI application around a pipeline.

    The worker and job threads start with the application (lifespan) and, on shutdown, finish every accepted
    inspection and build (up to ``settings.service.shutdown_timeout_s``) before the audit log is closed.

    Args:
        pipeline: an :class:`eagle.pipeline.Pipeline`, or any :class:`~eagle.pipeline.InspectionPipeline`.
        settings: ``eagle.settings.Settings``.
        audit: the audit log; default ``settings.service.audit_path`` or ``<data_dir>/audit.sqlite3``.
        worker: the inference worker; default one with ``settings.service.queue_size`` waiting slots.
        jobs: the bank-build job manager; default one staging in ``<data_dir>/jobs``.
        warm_up: at start-up, load and test-inspect every saved bank and (when enabled) load the MLLM in the
            background; ``/readyz`` answers 503 until that is done, and while any bank is unusable. Without it
            the first request pays the loading.
    """
    svc_settings = settings.service
    owned: list[Any] = []
    if audit is None:
        audit = AuditLog(default_audit_path(settings))
        owned.append(audit)
    if worker is None:
        worker = InferenceWorker(svc_settings.queue_size, min_retry_after_s=svc_settings.retry_after_s)
    if jobs is None:
        jobs = BankBuildJobs(
            pipeline,
            Path(settings.data_dir) / "jobs",
            limits=ArchiveLimits.from_settings(settings),
            min_references=settings.expert.min_references,
            max_pending=svc_settings.max_pending_builds,
        )
    metrics = ServiceMetrics(
        queue_state=lambda: (worker.depth, worker.capacity, worker.busy),
        job_states=jobs.states,
        line_health=lambda: _loaded_banks_health(pipeline, audit),
    )
    service = Service(pipeline, settings, worker, jobs, audit, metrics, owned)
    auth = BearerAuth(svc_settings.token)
    if not auth.enabled:
        logger.warning("no service token set: the API is open to anyone who can reach %s", svc_settings.host)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        jobs.start()
        if warm_up:
            threading.Thread(target=_warm_up, args=(service,), name="eagle-warm-up", daemon=True).start()
        else:
            service.warm.set()
        try:
            yield
        finally:
            timeout = svc_settings.shutdown_timeout_s
            drained = await run_in_threadpool(worker.shutdown, timeout)
            built = await run_in_threadpool(jobs.shutdown, timeout)
            if not (drained and built):
                logger.error("shutdown timeout (%.0f s): some accepted work did not finish", timeout)
            for resource in owned:
                resource.close()

    app = FastAPI(
        title="EAGLE edge service",
        version="1",
        description="Tuning-free industrial visual inspection: PatchCore expert + DBT threshold (+ MLLM).",
        lifespan=lifespan,
        form_limits=FORM_LIMITS,
    )
    app.state.service = service
    _install_error_handlers(app)
    _close_form_bodies_in_schema(app)
    body_limits = {
        ("POST", "/v1/inspect"): BodyLimit(service.upload_limit, "EAGLE_SERVICE__MAX_UPLOAD_MB"),
        ("POST", "/v1/banks"): BodyLimit(service.archive_limit, "EAGLE_SERVICE__MAX_ARCHIVE_MB"),
        ("POST", "/v1/banks/{name}/references"): BodyLimit(service.upload_limit, "EAGLE_SERVICE__MAX_UPLOAD_MB"),
    }
    app.add_middleware(
        RequestGate,
        auth=auth,
        metrics=metrics,
        body_limits=body_limits,
        default_body_limit=BodyLimit(SMALL_BODY_BYTES, "no upload on this endpoint"),
        admission={("POST", "/v1/inspect"): lambda: _admit_inspection(service)},
        failure_audit={("POST", "/v1/inspect"): lambda event: _audit_failure(service, event)},
    )
    app.include_router(_health_router(service))
    app.include_router(_v1_router(service))
    return app


def _close_form_bodies_in_schema(app: FastAPI) -> None:
    """``/openapi.json`` lists only the form fields an endpoint takes (``deploy.schema_params.close_form_bodies``)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = close_form_bodies(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# -- errors --------------------------------------------------------------------------------------------------------
def _error_response(request: Request, err: EagleError) -> JSONResponse:
    service: Service = request.app.state.service
    service.metrics.errors.inc(code=err.code)
    request_id = getattr(request.state, "request_id", None)
    headers = getattr(err, "headers", None)
    if err.code == "disk_full":  # not the client's fault: the operator must free space
        logger.error("%s %s answered 507: %s (request %s)", request.method, request.url.path, one_line(err), request_id)
    return JSONResponse(error_body(err.code, one_line(err), request_id=request_id), err.http_status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EagleError)
    async def _eagle_error(request: Request, exc: EagleError) -> JSONResponse:
        return _error_response(request, exc)

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def _disk_full(request: Request, exc: Exception) -> JSONResponse:
        mapped = as_eagle_error(exc) if is_disk_full(exc) else None
        if mapped is None:
            raise exc  # a bug: the gate logs the traceback and answers 500 internal_error
        return _error_response(request, mapped)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(_is_text_instead_of_file(error) for error in errors):
            return _error_response(request, InvalidRequest(FILE_PART_HINT))
        return _error_response(request, InvalidRequest(_describe_validation(errors)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        full = as_eagle_error(exc) if is_disk_full(exc) else None  # e.g. an upload that could not be spooled to disk
        if full is not None:
            return _error_response(request, full)
        if exc.status_code == 413:
            err: ServiceError = UploadTooLarge(str(exc.detail))
        elif exc.status_code == 400 and str(exc.detail).startswith("Part exceeded maximum size"):
            err = InvalidRequest(_large_field_message(request))
        else:
            headers = dict(exc.headers or {})
            if exc.status_code == 405:  # every method served on the path, not only the first matching route's
                headers["Allow"] = ", ".join(allowed_methods(request.app.router.routes, request.scope))
            err = ServiceError(
                _http_message(request, exc),
                headers=headers,
                code=HTTP_STATUS_CODES.get(exc.status_code, "http_error"),
                http_status=exc.status_code,
            )
        return _error_response(request, err)


FILE_PART_HINT = (
    "the image (or archive) must be sent as a file part with a non-empty file name, e.g. "
    'Content-Disposition: form-data; name="image"; filename="part.png" (curl -F image=@part.png); '
    "a part without a file name is a text field"
)
"""Why a file arrived as a text field: clients such as httpx drop an empty file name, and the part becomes text."""


def _large_field_message(request: Request) -> str:
    """Why a text form field was refused as too large: the limit, and for a bank build the polygons mask's."""
    limit = f"a form field is larger than {FORM_LIMITS['max_part_size'] // 1024} KiB, the limit for text fields"
    if request.url.path.rstrip("/").endswith("/v1/banks"):
        limit += (
            " (mask_polygons included: a few thousand points at most; send a larger inspection mask as a PNG in the"
            " file part mask, white = inspected)"
        )
    return f"{limit}; {FILE_PART_HINT}"


def _is_text_instead_of_file(error: Any) -> bool:
    """A validation error saying that a file field (``image``, ``archive``) got text: its part had no file name."""
    loc = tuple(error.get("loc", ()))
    return bool(loc) and loc[-1] in ("image", "archive") and "UploadFile" in str(error.get("msg", ""))


def _http_message(request: Request, exc: StarletteHTTPException) -> str:
    if exc.status_code == 404:
        return f"no such endpoint: {request.method} {request.url.path}"
    if exc.status_code == 405:
        return f"method {request.method} not allowed on {request.url.path}"
    return " ".join(str(exc.detail).split()) or "bad request"


def _describe_validation(errors: Any) -> str:
    parts = []
    for error in list(errors)[:5]:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "form"))
        parts.append(f"{loc or 'request'}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


# -- routes ----------------------------------------------------------------------------------------------------------
def _health_router(service: Service) -> APIRouter:
    router = APIRouter(tags=["health"])
    capabilities = ReportCache(service.settings)  # eagle doctor's checks, recomputed at most every 30 s

    @router.get("/healthz", response_model=Health, summary="The process is alive")
    async def healthz() -> Health:
        return Health()

    @router.get(
        "/readyz",
        response_model=Readiness,
        summary="Banks and model loaded",
        responses={503: {"model": ErrorResponse, "description": "Not ready."}},
    )
    async def readyz(request: Request) -> Any:
        checks = dict(await run_in_threadpool(service.pipeline.ready))
        unusable = await run_in_threadpool(_unusable_banks, service)
        if unusable:
            checks["banks"] = False
        checks["worker"] = service.worker.alive and service.worker.accepting
        checks["warm_up"] = service.warm.is_set()
        if not service.pipeline.mllm_enabled:
            checks.pop("mllm", None)  # expert-only box: no model to wait for
        report = await run_in_threadpool(capabilities.get)
        missing = [check for check in report.checks if check.blocking]
        checks.update({check.name: not check.blocking for check in report.checks if check.needed})
        rows = [check.to_dict() for check in report.checks]
        failing = sorted(name for name, ok in checks.items() if not ok)
        if failing:
            not_loaded = [name for name in failing if name not in {check.name for check in missing}]
            message = "not ready: " + (", ".join(not_loaded) + " not loaded" if not_loaded else "")
            if missing:
                fixes = "; ".join(f"{check.title}: {check.detail} (fix: {check.fix})" for check in missing)
                message += ("; " if not_loaded else "") + "missing: " + fixes
            if unusable:
                first = next(iter(unusable.values()))
                more = f" (and {len(unusable) - 1} more unusable)" if len(unusable) > 1 else ""
                message += f"; unusable: {first}{more}"
            err = NotReady(message)
            service.metrics.errors.inc(code=err.code)
            body = error_body(err.code, str(err), request_id=request.state.request_id)
            extra = {"unusable_banks": sorted(unusable)} if unusable else {}
            return JSONResponse({**body, "checks": checks, **extra, "capabilities": rows}, 503)
        return Readiness(ready=True, checks=checks, capabilities=rows)

    @router.get(
        "/metrics",
        response_class=PrometheusText,
        summary="Prometheus metrics (text format 0.0.4)",
        responses={  # the error is JSON, not the route's text (a `model` would be documented as the route's type)
            401: {
                "description": ERROR_RESPONSES[401]["description"],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
            }
        },
        dependencies=[Security(HTTPBearer(auto_error=False))],
    )
    async def metrics() -> PrometheusText:
        text = await run_in_threadpool(service.metrics.render)
        return PrometheusText(text)

    return router


def _v1_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Security(HTTPBearer(auto_error=False))], responses=ERROR_RESPONSES)
    pipeline = service.pipeline
    settings = service.settings

    @router.post(
        "/inspect",
        response_model=InspectResponse,
        tags=["inspection"],
        summary="Inspect one image against a bank",
        responses=BODY_ERROR_RESPONSES,
    )
    async def inspect(
        request: Request,
        image: Annotated[
            UploadFile,
            File(description="The image (png, jpg, bmp, tif, webp); body capped by EAGLE_SERVICE__MAX_UPLOAD_MB."),
        ],
        bank: Annotated[
            str, Form(max_length=BANK_NAME_MAX_LENGTH, description=BANK_NAME_HELP, json_schema_extra=BANK_NAME_SCHEMA)
        ],
        prompt_setting: Annotated[PromptSetting | Unsent, Form()] = None,
        caas: Annotated[CAASPolicy | Unsent, Form()] = None,
        alpha: Annotated[Alpha | Unsent, Form()] = None,
        explain: Annotated[bool | Unsent, Form()] = None,
        use_mllm: Annotated[bool, Form(description="False: expert only for this request.")] = True,
        attention_map: Annotated[bool, Form()] = False,
        annotated: Annotated[bool, Form(description="Return the annotated image as base64 PNG.")] = False,
        image_name: Annotated[str | Unsent, Form(max_length=MAX_NAME_LENGTH)] = None,
    ) -> InspectResponse:
        request_id: str = request.state.request_id
        audit: dict[str, Any] = getattr(request.state, "audit", {})
        audit["bank"] = bank
        name = _clean_name(image_name or image.filename)
        audit["image_name"] = name
        validate_bank_name(bank)
        if not await run_in_threadpool(pipeline.banks.exists, bank) and not _is_declared(pipeline, bank):
            raise BankNotFoundError(f"no bank named {bank!r}")
        data = await image.read()
        audit["image_sha256"] = image_sha256(data)
        if not data:
            raise ImageError(f"image {name!r} is empty (0 bytes)" if name else "the image is empty (0 bytes)")
        check_image_pixels(data, max_pixels=settings.max_image_pixels, name=name)
        try:
            options = InspectOptions(
                prompt_setting=prompt_setting,
                caas=caas,
                alpha=alpha,
                explain=explain,
                use_mllm=use_mllm,
                attention_map=attention_map,
            )
        except ValidationError as err:
            raise InvalidRequest(_describe_validation(err.errors())) from None
        try:
            future = service.worker.submit(_inspect_task, service, data, bank, options, name, request_id, audit)
        except QueueFull:
            service.metrics.rejections.inc()
            raise
        try:
            result = await asyncio.shield(asyncio.wrap_future(future))
        except Exception as exc:
            mapped = as_eagle_error(exc)
            if mapped is None:
                raise
            raise mapped from None
        png = await run_in_threadpool(annotated_png_base64, result) if annotated else None
        return InspectResponse(request_id=request_id, result=result, annotated_png=png)

    @router.post(
        "/inspections/{run_id}/feedback",
        response_model=FeedbackResponse,
        status_code=201,
        tags=["inspection"],
        summary="Confirm or overrule the verdict of an inspection (recorded in the audit log)",
        responses=BODY_ERROR_RESPONSES,
    )
    async def inspection_feedback(run_id: RunIdPath, body: FeedbackRequest) -> FeedbackResponse:
        if not run_id or len(run_id) > MAX_NAME_LENGTH:
            raise InvalidRequest("invalid run id")
        row = await run_in_threadpool(
            lambda: service.audit.record_feedback(
                run_id,
                body.verdict,
                correct_verdict=body.correct_verdict,
                operator=body.operator,
                note=body.note,
                source="api",
            )
        )
        service.metrics.observe_feedback(row["bank"] or "", row["feedback"])
        await run_in_threadpool(_collect_confirmed, service, row)
        return FeedbackResponse(**{k: row[k] for k in FeedbackResponse.model_fields})

    @router.get("/banks", response_model=BankList, tags=["banks"], summary="List the saved banks")
    async def list_banks() -> BankList:
        summaries = await run_in_threadpool(pipeline.banks.list)
        return BankList(banks=summaries, declared=await run_in_threadpool(_declared_lines, pipeline))

    @router.post(
        "/lines",
        response_model=DeclaredLine,
        status_code=201,
        tags=["banks"],
        summary="Declare a line before its bank exists (inspections: the MLLM alone, 0-shot; or bank_empty)",
        responses=BODY_ERROR_RESPONSES,
    )
    async def declare_line(body: DeclareLineRequest) -> JSONResponse:
        validate_bank_name(body.name)
        line = await run_in_threadpool(_declare_line, pipeline, body.name, body.note)
        logger.info("line %r declared (no bank yet)", body.name)
        return JSONResponse(line.model_dump(mode="json"), status_code=201, headers={"Location": "/v1/lines"})

    @router.get(
        "/lines", response_model=DeclaredLines, tags=["banks"], summary="List the lines declared without a bank"
    )
    async def list_lines() -> DeclaredLines:
        return DeclaredLines(lines=await run_in_threadpool(_declared_lines, pipeline))

    @router.post(
        "/banks",
        response_model=JobStatus,
        status_code=202,
        tags=["banks"],
        summary="Build a bank from a zip of normal images (background job)",
        form_limits={**FORM_LIMITS, "max_files": 2},  # the archive and an optional inspection-mask PNG
        responses=BODY_ERROR_RESPONSES,
    )
    async def build_bank(
        request: Request,
        name: Annotated[
            str,
            Form(
                max_length=BANK_NAME_MAX_LENGTH,
                description=f"Name of the new bank. {BANK_NAME_HELP}",
                json_schema_extra=BANK_NAME_SCHEMA,
            ),
        ],
        archive: Annotated[
            UploadFile,
            File(description="Zip of normal (defect-free) images; capped by EAGLE_SERVICE__MAX_ARCHIVE_MB."),
        ],
        overwrite: Annotated[bool, Form(description="Rebuild an existing bank.")] = False,
        mask: Annotated[
            UploadFile | Unsent,
            File(description="Inspection mask: binary PNG in original-image pixels (white = inspected)."),
        ] = None,
        mask_polygons: Annotated[
            str | Unsent,
            Form(
                max_length=FORM_LIMITS["max_part_size"],
                description='Inspection mask as polygons JSON: {"width": W, "height": H, "polygons": '
                "[[[x, y], ...], ...]} in original-image pixels (without width/height: the first image's size).",
            ),
        ] = None,
    ) -> JSONResponse:
        validate_bank_name(name)
        mask_file = await _read_mask(service, mask, mask_polygons)
        job_id, staged = service.jobs.staging_path()
        try:
            await run_in_threadpool(_copy_upload, archive, staged)
            if mask_file is not None:
                (staged.parent / mask_file[0]).write_bytes(mask_file[1])
        except BaseException:
            service.jobs.discard(job_id)
            raise
        status = await run_in_threadpool(lambda: service.jobs.submit(job_id, name, overwrite=overwrite))
        return JSONResponse(
            status.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{status.id}"}
        )

    @router.get("/jobs", response_model=JobList, tags=["banks"], summary="List bank-build jobs")
    async def list_jobs() -> JobList:
        return JobList(jobs=service.jobs.list())

    @router.get("/jobs/{job_id}", response_model=JobStatus, tags=["banks"], summary="Status of a bank-build job")
    async def get_job(job_id: JobIdPath) -> JobStatus:
        status = service.jobs.get(job_id) if JOB_ID_PATTERN.fullmatch(job_id) else None
        if status is None:
            raise JobNotFound(f"no job with id {job_id[:64]!r}")
        return status

    @router.post(
        "/banks/{name}/references",
        response_model=TeachResult,
        tags=["banks"],
        summary="Teach a bank that these images are normal: rebuilt with them as a new version",
        form_limits={**FORM_LIMITS, "max_files": MAX_TEACH_IMAGES},
        responses=BODY_ERROR_RESPONSES,
    )
    async def add_references(
        name: BankNamePath,
        images: Annotated[
            list[UploadFile],
            File(
                description=f"1 to {MAX_TEACH_IMAGES} images of GOOD parts.",
                json_schema_extra={"minItems": 1, "maxItems": MAX_TEACH_IMAGES},
            ),
        ],
    ) -> TeachResult:
        validate_bank_name(name)
        if not images or len(images) > MAX_TEACH_IMAGES:
            raise InvalidRequest(f"send 1 to {MAX_TEACH_IMAGES} images, got {len(images)}")
        if service.jobs.active_for(name):
            raise BankBusy(f"bank {name!r} is being built; add references when the job has finished")
        if not await run_in_threadpool(pipeline.banks.exists, name):
            raise BankNotFoundError(f"no bank named {name!r}")
        datas = [await upload.read() for upload in images]
        names = [_clean_name(u.filename) or f"taught_{i:02d}.png" for i, u in enumerate(images)]
        try:
            result = await run_in_threadpool(lambda: pipeline.add_references(datas, name, names=names))
        except Exception as exc:
            mapped = as_eagle_error(exc)
            if mapped is None:
                raise
            raise mapped from None
        logger.info("bank %r taught %d image(s): version %s", name, len(datas), result.version)
        return result

    @router.get(
        "/banks/{name}/versions", response_model=BankVersions, tags=["banks"], summary="Kept versions of a bank"
    )
    async def bank_versions(name: BankNamePath) -> BankVersions:
        validate_bank_name(name)
        if not await run_in_threadpool(pipeline.banks.exists, name):
            raise BankNotFoundError(f"no bank named {name!r}")
        found = await run_in_threadpool(pipeline.banks.history, name)
        return BankVersions(versions=found)

    @router.get(
        "/banks/{name}/health",
        response_model=LineHealth,
        tags=["banks"],
        summary="Line health: have this bank's recent scores of good parts drifted from its own? (ok/watch/drifting)",
    )
    async def bank_health(name: BankNamePath) -> LineHealth:
        validate_bank_name(name)
        if not await run_in_threadpool(pipeline.banks.exists, name):
            raise BankNotFoundError(f"no bank named {name!r}")
        try:
            return await run_in_threadpool(pipeline.line_health, name, service.audit)
        except Exception as exc:
            mapped = as_eagle_error(exc)
            if mapped is None:
                raise
            raise mapped from None

    @router.get(
        "/banks/{name}/refresh",
        response_model=RefreshProposal,
        tags=["banks"],
        summary="Propose recent kept inspections of good parts to teach the bank (POST approves them)",
    )
    async def propose_refresh(
        name: BankNamePath, count: Annotated[int | None, Query(ge=1, le=64, description="Most candidates.")] = None
    ) -> RefreshProposal:
        validate_bank_name(name)
        if not await run_in_threadpool(pipeline.banks.exists, name):
            raise BankNotFoundError(f"no bank named {name!r}")
        return await run_in_threadpool(_refresh_proposal, service, name, count)

    @router.post(
        "/banks/{name}/refresh",
        response_model=RefreshTaught,
        tags=["banks"],
        summary="Teach the bank the approved candidates of its refresh proposal, as a new version",
        responses=BODY_ERROR_RESPONSES,
    )
    async def apply_refresh(name: BankNamePath, request: RefreshRequest) -> RefreshTaught:
        validate_bank_name(name)
        if service.jobs.active_for(name):
            raise BankBusy(f"bank {name!r} is being built; refresh it when the job has finished")
        if not await run_in_threadpool(pipeline.banks.exists, name):
            raise BankNotFoundError(f"no bank named {name!r}")
        try:
            taught, result = await run_in_threadpool(_refresh_apply, service, name, request.image_sha256)
        except Exception as exc:
            mapped = as_eagle_error(exc)
            if mapped is None:
                raise
            raise mapped from None
        logger.info("bank %r refreshed with %d image(s): version %s", name, len(taught), result.version)
        return RefreshTaught(taught=taught, result=result)

    @router.post(
        "/banks/{name}/rollback",
        response_model=RolledBack,
        tags=["banks"],
        summary="Make a kept version of a bank current again (nothing is copied or deleted)",
        responses=BODY_ERROR_RESPONSES,
    )
    async def rollback_bank(name: BankNamePath, request: RollbackRequest) -> RolledBack:
        validate_bank_name(name)
        if service.jobs.active_for(name):
            raise BankBusy(f"bank {name!r} is being built; roll it back when the job has finished")
        if not await run_in_threadpool(pipeline.banks.exists, name):
            raise BankNotFoundError(f"no bank named {name!r}")
        try:
            summary = await run_in_threadpool(pipeline.banks.rollback, name, request.version)
        except Exception as exc:
            mapped = as_eagle_error(exc)
            if mapped is None:
                raise
            raise mapped from None
        logger.info("bank %r rolled back to version %d", name, request.version)
        return RolledBack(version=request.version, bank=summary)

    @router.delete(
        "/banks/{name}", response_model=Deleted, tags=["banks"], summary="Delete a bank", responses=DISK_FULL_RESPONSES
    )
    async def delete_bank(name: BankNamePath) -> Deleted:
        validate_bank_name(name)
        if service.jobs.active_for(name):
            raise BankBusy(f"bank {name!r} is being built; delete it when the job has finished")
        if not await run_in_threadpool(pipeline.banks.exists, name) and not _is_declared(pipeline, name):
            raise BankNotFoundError(f"no bank named {name!r}")
        await run_in_threadpool(pipeline.banks.delete, name)
        logger.info("bank %r deleted", name)
        return Deleted(deleted=name)

    return router


def _refresh_proposal(service: Service, name: str, count: int | None) -> RefreshProposal:
    """The refresh proposal of bank ``name`` (:func:`eagle.bank_refresh.propose_for`)."""
    from eagle.bank_refresh import propose_for
    from eagle.kept_images import KeptImages

    kept = KeptImages.of(service.settings)
    return propose_for(service.pipeline, service.settings, name, service.audit, kept, count=count)


def _refresh_apply(service: Service, name: str, sha256s: list[str]) -> tuple[list[RefreshCandidate], TeachResult]:
    """Teach bank ``name`` the named candidates of its current proposal (others refused: ``invalid_refresh``)."""
    from eagle.bank_refresh import apply, propose_for, select
    from eagle.kept_images import KeptImages

    kept = KeptImages.of(service.settings)
    proposal = propose_for(service.pipeline, service.settings, name, service.audit, kept, count=64)
    chosen = select(proposal, sha256s)
    result = apply(service.pipeline, name, chosen, kept, data_dir=Path(service.settings.data_dir), approved_by="api")
    return chosen, result


def _is_declared(pipeline: InspectionPipeline, name: str) -> bool:
    """Whether ``name`` is a line declared without a bank."""
    return pipeline.banks.is_declared(name)


def _declare_line(pipeline: InspectionPipeline, name: str, note: str) -> DeclaredLine:
    """Declare line ``name`` in the pipeline's bank store (:meth:`eagle.lines.DeclaredLines.declare`)."""
    return pipeline.banks.declare(name, note=note)


def _declared_lines(pipeline: InspectionPipeline) -> list[DeclaredLine]:
    """The lines declared without a bank."""
    return pipeline.banks.declared()


def _collect_confirmed(service: Service, row: dict[str, Any]) -> None:
    """A part an operator confirmed good on a declared line: collected as a first reference, from the kept images.

    Only where inspected images are kept (``EAGLE_KEEP_IMAGES__ENABLED``); never fails the feedback itself.
    """
    from eagle.kept_images import KeptImages
    from eagle.lines import collect_confirmed

    lines = getattr(service.pipeline.banks, "lines", None)
    if lines is None or not service.settings.keep_images.enabled:
        return
    try:
        collected = collect_confirmed(lines, row, kept=KeptImages.of(service.settings))
    except Exception as exc:  # noqa: BLE001 - the feedback is recorded; only the collected copy is missing
        logger.warning("line %r: could not collect run %s: %s", row.get("bank"), row.get("run_id"), one_line(exc))
        return
    if collected is not None:
        line = collected[0]
        logger.info("line %r: %d of %d good parts collected", line.name, line.collected, line.min_references)


def _admit_inspection(service: Service) -> ServiceError | None:
    """Refuse an inspection before its upload is read when the queue is already full (counted as a rejection)."""
    refusal = service.worker.refusal()
    if refusal is not None:
        service.metrics.rejections.inc()
    return refusal


def _loaded_banks_health(pipeline: InspectionPipeline, audit: AuditLog) -> list[LineHealth]:
    """Line health of the banks loaded now (the ones the line uses; a scrape never loads a bank)."""
    found = []
    for name in pipeline.banks.loaded():
        try:
            found.append(pipeline.line_health(name, audit))
        except Exception as exc:  # noqa: BLE001 - one bank's failure must not hide the others
            logger.warning("line health of bank %r: %s", name, one_line(exc))
    return found


def _unusable_banks(service: Service) -> dict[str, str]:
    """Banks whose last load or test inspection failed (``eagle.banks.BankStore.unusable``), name → reason."""
    unusable = getattr(service.pipeline.banks, "unusable", None)
    return dict(unusable()) if callable(unusable) else {}


def _warm_up(service: Service) -> None:
    """Load and test-inspect every saved bank, and load the MLLM (when enabled), before ``/readyz`` says ready.

    ``BankStore.load`` runs one real inspection of a stored reference; a bank that fails it is logged in one
    line, answers ``409 bank_unusable`` to inspections and keeps ``/readyz`` at 503 until rebuilt or deleted.
    """
    pipeline = service.pipeline
    try:
        for summary in pipeline.banks.list():
            try:
                pipeline.banks.load(summary.name)
                logger.info("bank %r loaded and test-inspected", summary.name)
            except Exception as exc:  # noqa: BLE001 - one unusable bank must not keep the others down
                logger.error("bank %r is unusable: %s", summary.name, " ".join(str(exc).split()))
        if pipeline.mllm_enabled:
            try:
                pipeline.load_mllm()
                logger.info("MLLM loaded")
            except Exception as exc:  # noqa: BLE001 - readyz reports it; use_mllm=false inspections still run
                logger.error("MLLM not loaded: %s", " ".join(str(exc).split()))
    finally:
        service.warm.set()


def _inspect_task(
    service: Service,
    data: bytes,
    bank: str,
    options: InspectOptions,
    name: str | None,
    run_id: str,
    audit: dict[str, Any] | None = None,
) -> InspectionResult:
    """Run on the inference worker: inspect, then audit and count.

    Auditing here, not in the request handler, logs accepted work even if the client has gone away; a failure
    is audited here too (with the code the client gets) and marked in ``audit`` so the gate does not repeat it.
    """
    start = time.perf_counter()
    try:
        result = service.pipeline.inspect(data, bank, options, image_name=name)
    except Exception as exc:
        latency_ms = (time.perf_counter() - start) * 1000.0
        err = as_eagle_error(exc)
        code, message = (err.code, one_line(err)) if err is not None else ("internal_error", INTERNAL_ERROR_AUDIT)
        service.audit.record_failure(
            run_id=run_id,
            source="api",
            image_name=name,
            image_sha256=image_sha256(data),
            bank=bank,
            error_code=code,
            error_message=message,
            latency_ms=latency_ms,
        )
        if audit is not None:
            audit["audited"] = True
        raise
    latency_ms = (time.perf_counter() - start) * 1000.0
    service.audit.record(result, source="api", run_id=run_id, latency_ms=latency_ms)
    keep_inspected_image(service.settings, result.image_sha256, data)
    if audit is not None:
        audit["audited"] = True  # a later failure (the annotated PNG, a client gone) is not a second row
    service.metrics.observe_inspection(result.bank, result.verdict, result.timings_ms)
    return result


INTERNAL_ERROR_AUDIT = "internal error; the service log has the traceback under this run id"


def _audit_failure(service: Service, event: FailureAudit) -> None:
    """The gate's hook: one ``error`` row for an inspection request that failed before or around the worker."""
    context = event.context
    message = INTERNAL_ERROR_AUDIT if event.code == "internal_error" else event.message
    service.audit.record_failure(
        run_id=event.request_id,
        source="api",
        image_name=context.get("image_name"),
        image_sha256=context.get("image_sha256", ""),
        bank=context.get("bank"),
        error_code=event.code,
        error_message=message,
        latency_ms=event.latency_ms,
    )


MAX_MASK_BYTES = 16 * 1024 * 1024
"""Largest inspection mask (PNG file or polygons JSON) a bank build accepts."""


async def _read_mask(service: Service, mask: UploadFile | None, polygons: str | None) -> tuple[str, bytes] | None:
    """The staged mask file ``(name, bytes)`` of a bank build, checked now (422 ``invalid_mask``), or ``None``."""
    if mask is not None and polygons is not None:
        raise EagleError(
            "send either mask (PNG) or mask_polygons (JSON), not both", code="invalid_mask", http_status=422
        )
    if mask is not None:
        data = await mask.read(MAX_MASK_BYTES + 1)
        if len(data) > MAX_MASK_BYTES:
            raise EagleError(f"mask larger than {MAX_MASK_BYTES} bytes", code="invalid_mask", http_status=413)
        await run_in_threadpool(service.pipeline.check_mask, data)
        return "mask.png", data
    if polygons is not None:
        await run_in_threadpool(service.pipeline.check_mask, polygons)
        return "mask.json", polygons.encode("utf-8")
    return None


def _copy_upload(upload: UploadFile, dest: Path) -> None:
    upload.file.seek(0)
    with open(dest, "wb") as sink:
        shutil.copyfileobj(upload.file, sink, length=1024 * 1024)


def _clean_name(name: str | None) -> str | None:
    """The base name of a client-supplied file name, printable, at most 255 characters; ``None`` if empty."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable()).strip()
    return cleaned[-MAX_NAME_LENGTH:] or None
