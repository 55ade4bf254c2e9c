"""Property-based API test: requests generated from ``/openapi.json`` against the service, in-process (ASGI).

Schemathesis draws valid (positive) and invalid (negative) requests for every operation, sends them with the
token to the app built around the fake pipeline, and fails on any 5xx, a status code or content type the schema
does not document, a response that does not match its schema, a schema-valid request rejected, or a ``405`` /
``OPTIONS`` whose ``Allow`` header disagrees with the methods served.

What a schema cannot say is filled in before the call, for valid requests only: a file part holds a decodable
image (``image``, ``images``, ``mask``) or a zip of images (``archive``), and ``mask_polygons`` (JSON text with
a meaning) is left out. A longer run: ``bench/bench_api_fuzz.py`` (bench/README.md).
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi import checks as openapi_checks

from deploy.api import create_app
from tests.fake_pipeline import FakePipeline
from tests.service_helpers import TOKEN, png_bytes, zip_bytes
from tests.test_service_api import make_settings

AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES_PER_OPERATION = 12

CHECKS = [
    not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.positive_data_acceptance,
    openapi_checks.unsupported_method,
    openapi_checks.allow_header_conformance,
]
"""The properties; ``negative_data_rejection`` is left out: the service ignores unknown form fields on purpose."""

IMAGE = png_bytes(32, 24, seed=3)
ARCHIVE = zip_bytes({"a.png": png_bytes(seed=1), "b.png": png_bytes(seed=2)})


@pytest.fixture(scope="module")
def service_app(tmp_path_factory):
    """The app around a fake pipeline with one bank (``widget``)."""
    app = create_app(FakePipeline(banks=["widget"]), make_settings(tmp_path_factory.mktemp("schema")))
    yield app
    asgi.shutdown_lifespans()  # stops the worker and job threads the first ASGI request started


def with_meaningful_files(case: schemathesis.Case) -> None:
    """Give a valid request's file parts content the schema cannot describe (see the module docstring)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return
    body = case.body
    for name in ("image", "mask"):
        if name in body:
            body[name] = IMAGE
    if "images" in body:
        body["images"] = [IMAGE for _ in body["images"]] or [IMAGE]
    if "archive" in body:
        body["archive"] = ARCHIVE
    body.pop("mask_polygons", None)


def _runner(operation, mode, max_examples: int, failures: dict[str, str]):
    """A Hypothesis test sending ``max_examples`` cases of one operation and mode; failures land in ``failures``."""

    @hyp_settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        with_meaningful_files(case)
        try:
            case.call_and_validate(headers=AUTH, checks=CHECKS)
        except BaseException as err:  # noqa: BLE001 - schemathesis raises a FailureGroup (a BaseExceptionGroup)
            titles = [line for line in str(err).splitlines() if line.startswith("- ")]
            key = f"{operation.label} ({mode.value}): {' | '.join(titles) or type(err).__name__}"
            failures.setdefault(key, str(err)[:2000])

    return run


def fuzz(app, max_examples: int) -> list[str]:
    """Run every operation of ``/openapi.json`` in both generation modes; one entry per distinct failure."""
    api = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
    failures: dict[str, str] = {}
    for result in api.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                _runner(operation, mode, max_examples, failures)()
            except Unsatisfiable:
                pass  # nothing to negate (an operation without parameters, e.g. GET /healthz)
    return [f"{key}\n{detail}" for key, detail in sorted(failures.items())]


def test_the_service_answers_as_its_schema_says(service_app):
    failures = fuzz(service_app, EXAMPLES_PER_OPERATION)
    assert not failures, "\n\n".join(failures)


def test_a_405_allows_exactly_the_methods_the_schema_lists(service_app):
    """``OPTIONS`` on every path: ``Allow`` names every documented method (``HEAD`` comes with ``GET``)."""
    client = TestClient(service_app, headers=AUTH)  # no lifespan: routing alone answers
    paths = client.get("/openapi.json").json()["paths"]
    samples = {"{name}": "widget", "{job_id}": "0" * 32, "{run_id}": "r1"}
    for template, operations in paths.items():
        path = template
        for placeholder, value in samples.items():
            path = path.replace(placeholder, value)
        response = client.options(path)
        assert response.status_code == 405, (path, response.status_code)
        allowed = {m.strip() for m in response.headers["allow"].split(",")}
        assert allowed - {"HEAD"} == {m.upper() for m in operations}, (path, allowed)
        assert response.json()["error"]["code"]
