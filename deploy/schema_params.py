"""What the service's OpenAPI schema declares about its inputs, built from the constants its checks use.

The endpoints keep their own checks (``eagle.banks.validate_bank_name`` answers ``422 invalid_bank_name``, not a
generic validation error); this module only makes ``/openapi.json`` say the same rule, so that a client
generated from the schema (or a schema fuzzer) sends what the service accepts:

* bank names: :data:`eagle.banks.BANK_NAME_REGEX`, 1 to :data:`eagle.banks.BANK_NAME_MAX_LENGTH` characters;
* job ids: :data:`deploy.jobs.JOB_ID_PATTERN`;
* the ``Allow`` header of a ``405``: every method any route serves on that path (Starlette names only the
  first route that matched, e.g. ``GET`` for ``/v1/banks``, which also serves ``POST``);
* ``/metrics``: the Prometheus content type it answers, not plain ``text/plain``.

Example:
    >>> BANK_NAME_SCHEMA["maxLength"], BANK_NAME_SCHEMA["pattern"] == BANK_NAME_REGEX
    (64, True)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import Path
from fastapi.responses import PlainTextResponse
from starlette.routing import BaseRoute, Match

from deploy.jobs import JOB_ID_PATTERN
from deploy.metrics import CONTENT_TYPE
from eagle.banks import BANK_NAME_MAX_LENGTH, BANK_NAME_REGEX

BANK_NAME_SCHEMA: dict[str, Any] = {"pattern": BANK_NAME_REGEX, "minLength": 1, "maxLength": BANK_NAME_MAX_LENGTH}
"""JSON Schema of a bank name (path parameter or form field)."""

BANK_NAME_HELP = "Bank name: letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'."

JOB_ID_SCHEMA: dict[str, Any] = {"pattern": JOB_ID_PATTERN.pattern, "minLength": 32, "maxLength": 32}
"""JSON Schema of a bank-build job id (32 lower-case hex digits)."""

BankNamePath = Annotated[str, Path(description=BANK_NAME_HELP, json_schema_extra=BANK_NAME_SCHEMA)]
JobIdPath = Annotated[str, Path(description="Job id (POST /v1/banks answers it).", json_schema_extra=JOB_ID_SCHEMA)]


def bounded_path(description: str, max_length: int) -> Any:
    """A path parameter documented as a non-empty string of at most ``max_length`` characters (the endpoint checks)."""
    return Annotated[str, Path(description=description, json_schema_extra={"minLength": 1, "maxLength": max_length})]


class PrometheusText(PlainTextResponse):
    """``GET /metrics``: Prometheus text format 0.0.4, documented with the content type it is answered with."""

    media_type = CONTENT_TYPE


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
"""The methods a ``405``'s ``Allow`` header may name."""


def allowed_methods(routes: Iterable[BaseRoute], scope: dict[str, Any]) -> list[str]:
    """Every method some route serves on the request's path (the ``Allow`` header of a ``405``).

    Asked route by route with the method swapped in, so that included routers (which match as a whole) count.
    """
    routes = list(routes)
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in routes)
    ]


def close_form_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare ``additionalProperties: false`` on every multipart body of an OpenAPI ``schema`` (in place).

    The service ignores form fields it does not know, but each one counts towards the multipart limits
    (``deploy.limits.FORM_LIMITS``: a few fields, answered ``400`` past them), so the schema lists only the
    fields an endpoint takes.
    """
    components = schema.get("components", {}).get("schemas", {})
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {})
            ref = form.get("schema", {}).get("$ref", "")
            body = components.get(ref.rsplit("/", 1)[-1]) if ref.startswith("#/components/schemas/") else None
            if body is not None:
                body["additionalProperties"] = False
    return schema
