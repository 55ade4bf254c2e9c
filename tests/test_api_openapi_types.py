"""Every result the service returns is typed in its ``/openapi.json``, down to the last field.

The walk starts at each operation's 2xx response schema and follows ``$ref`` into ``components``: an object schema
needs ``properties`` or a typed ``additionalProperties`` (an untyped dict documents nothing), an array needs its
``items``, and a schema that says nothing (``{}``, pydantic's ``Any``) fails too. A few concrete fields are checked
by name, and the fake pipeline's answers carry exactly the fields their schema lists.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from deploy.api import create_app
from tests.fake_pipeline import FakePipeline
from tests.service_helpers import TOKEN, png_bytes
from tests.test_service_api import make_settings

AUTH = {"Authorization": f"Bearer {TOKEN}"}

NON_JSON_ROUTES = {("GET", "/metrics"): "text/plain"}
"""Routes whose 2xx answer is not JSON, with the media type they document instead (Prometheus text)."""

SCHEMA_KEYWORDS = ("type", "$ref", "anyOf", "oneOf", "allOf", "enum", "const")
"""What a schema must have at least one of to say what the value is."""


def untyped(schema: dict[str, Any], components: dict[str, Any], where: str, seen: set[str] | None = None) -> list[str]:
    """Every place under ``schema`` that does not say what it holds, as ``where`` paths (``$ref`` followed once)."""
    seen = set() if seen is None else seen
    ref = schema.get("$ref")
    if ref is not None:
        name = ref.rsplit("/", 1)[-1]
        if not ref.startswith("#/components/schemas/") or name not in components:
            return [f"{where}: unresolvable $ref {ref}"]
        if name in seen:
            return []
        seen.add(name)
        return untyped(components[name], components, name, seen)
    if not any(key in schema for key in SCHEMA_KEYWORDS):
        return [f"{where}: no type"]
    found: list[str] = []
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if "object" in types:
        extra = schema.get("additionalProperties")
        if not schema.get("properties") and not isinstance(extra, dict):
            found.append(f"{where}: an object without properties (an untyped dict)")
        if isinstance(extra, dict):
            found += untyped(extra, components, f"{where}.<key>", seen)
    if "array" in types and "items" not in schema and "prefixItems" not in schema:
        found.append(f"{where}: an array without items")
    for key, sub in schema.get("properties", {}).items():
        found += untyped(sub, components, f"{where}.{key}", seen)
    for keyword in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for i, sub in enumerate(schema.get(keyword, [])):
            found += untyped(sub, components, f"{where}.{keyword}[{i}]", seen)
    if isinstance(schema.get("items"), dict):
        found += untyped(schema["items"], components, f"{where}[]", seen)
    return found


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(FakePipeline(banks=["widget"]), make_settings(tmp_path_factory.mktemp("openapi-types")))


@pytest.fixture(scope="module")
def schema(app) -> dict[str, Any]:
    return TestClient(app, headers=AUTH).get("/openapi.json").json()  # no lifespan: the schema needs no worker


def _component(schema: dict[str, Any], ref_holder: dict[str, Any]) -> dict[str, Any]:
    """The component a ``{"$ref": ...}`` (or an ``anyOf`` of one and null) points at."""
    refs = [ref_holder] if "$ref" in ref_holder else [s for s in ref_holder.get("anyOf", []) if "$ref" in s]
    assert len(refs) == 1, ref_holder
    return schema["components"]["schemas"][refs[0]["$ref"].rsplit("/", 1)[-1]]


def _response_schema(schema: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    responses = schema["paths"][path][method.lower()]["responses"]
    (ok,) = [r for code, r in responses.items() if code.startswith("2")]
    return ok["content"]["application/json"]["schema"]


def test_the_walk_flags_an_untyped_dict():
    """The check itself: ``dict[str, Any]`` and ``Any`` are reported, ``dict[str, float]`` and models are not."""

    class Loose(BaseModel):
        summary: dict[str, Any]
        rows: list[dict[str, Any]]
        anything: Any
        timings: dict[str, float]
        names: list[str]

    loose = FastAPI()
    loose.get("/loose", response_model=Loose)(lambda: None)
    generated = loose.openapi()
    found = untyped({"$ref": "#/components/schemas/Loose"}, generated["components"]["schemas"], "GET /loose")
    assert sorted(found) == [
        "Loose.anything: no type",
        "Loose.rows[]: an object without properties (an untyped dict)",
        "Loose.summary: an object without properties (an untyped dict)",
    ]


def test_every_route_documents_a_typed_result(schema):
    components = schema["components"]["schemas"]
    problems: list[str] = []
    operations = 0
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            operations += 1
            route = (method.upper(), path)
            ok = {code: r for code, r in operation["responses"].items() if code.startswith("2")}
            content = {media: body for r in ok.values() for media, body in r.get("content", {}).items()}
            if route in NON_JSON_ROUTES:
                assert any(m.startswith(NON_JSON_ROUTES[route]) for m in content), (route, content)
                assert "application/json" not in content, route
                continue
            if "application/json" not in content or "schema" not in content["application/json"]:
                problems.append(f"{method.upper()} {path}: no 2xx JSON schema")
                continue
            problems += untyped(content["application/json"]["schema"], components, f"{method.upper()} {path}")
    assert operations >= 13  # every route of the service; /openapi.json and /docs are not in the schema
    assert not problems, "\n".join(problems)


def test_the_bank_records_are_documented_field_by_field(schema):
    components = schema["components"]["schemas"]
    bank_list = _component(schema, _response_schema(schema, "GET", "/v1/banks"))
    summary = _component(schema, bank_list["properties"]["banks"]["items"])
    assert {"name", "bank_id", "created", "n_references", "tau", "s_max", "build_warnings", "mask"} <= set(
        summary["properties"]
    )
    assert summary["properties"]["n_references"]["type"] == "integer"
    assert summary["properties"]["tau"]["type"] == "number"
    assert summary["properties"]["build_warnings"]["items"] == {"type": "string"}

    versions = _component(schema, _response_schema(schema, "GET", "/v1/banks/{name}/versions"))
    version = _component(schema, versions["properties"]["versions"]["items"])
    assert {"version", "current", "bank_id", "created", "tau", "s_max", "n_references", "action", "note"} == set(
        version["properties"]
    )
    assert version["properties"]["version"]["type"] == "integer"
    assert version["properties"]["current"]["type"] == "boolean"

    job = _component(schema, _response_schema(schema, "GET", "/v1/jobs/{job_id}"))
    assert _component(schema, job["properties"]["result"]) == summary  # a build's result is the bank summary
    rolled = _component(schema, _response_schema(schema, "POST", "/v1/banks/{name}/rollback"))
    assert _component(schema, rolled["properties"]["bank"]) == summary
    teach = _component(schema, _response_schema(schema, "POST", "/v1/banks/{name}/references"))
    taught = _component(schema, teach["properties"]["taught"]["items"])
    assert {"name", "score_before", "score_after", "passed_before", "passes_now"} == set(taught["properties"])
    for record in ("BankSummary", "BankVersion", "TeachResult", "TaughtImage"):
        undescribed = [k for k, v in components[record]["properties"].items() if not v.get("description")]
        assert not undescribed, (record, undescribed)


def test_the_answers_carry_exactly_the_documented_fields(app, schema):
    """What the fake pipeline's service answers has every field its schema lists, and no other."""
    summary = _component(schema, {"$ref": "#/components/schemas/BankSummary"})
    version = _component(schema, {"$ref": "#/components/schemas/BankVersion"})
    teach = _component(schema, {"$ref": "#/components/schemas/TeachResult"})
    with TestClient(app, headers=AUTH) as client:
        banks = client.get("/v1/banks").json()["banks"]
        assert [b["name"] for b in banks] == ["widget"] and banks[0]["n_references"] == 3
        assert set(banks[0]) == set(summary["properties"])
        taught = client.post("/v1/banks/widget/references", files=[("images", ("good.png", png_bytes(), "image/png"))])
        assert taught.status_code == 200, taught.text
        body = taught.json()
        assert set(body) == set(teach["properties"]) and body["version"] == body["version_before"] + 1 == 2
        assert [t["name"] for t in body["taught"]] == ["good.png"] and body["references_before"] == 3
        versions = client.get("/v1/banks/widget/versions").json()["versions"]
        assert [(v["version"], v["current"]) for v in versions] == [(2, True)]
        assert set(versions[0]) == set(version["properties"])
        rolled = client.post("/v1/banks/widget/rollback", json={"version": 2}).json()
        assert rolled["version"] == 2 and set(rolled["bank"]) == set(summary["properties"])
        assert rolled["bank"]["n_references"] == body["references_after"] == versions[0]["n_references"]
