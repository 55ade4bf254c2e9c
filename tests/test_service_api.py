"""The edge service's HTTP API against a real uvicorn on 127.0.0.1, with a contract-faithful fake pipeline.

The real pipeline (random-weight expert) is exercised in ``test_service_real.py``; here the pipeline is a
fake so that every error path, the queue (429) and graceful shutdown can be driven deterministically.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from PIL import Image

from deploy.api import create_app
from eagle.audit import AuditLog
from eagle.settings import Settings
from tests.fake_pipeline import FakePipeline
from tests.service_helpers import (
    TOKEN,
    LiveServer,
    assert_error,
    parse_metrics,
    png_bytes,
    zip_bytes,
)

MAX_PIXELS = 40_000


def make_settings(tmp_path, **service) -> Settings:
    return Settings(
        data_dir=tmp_path,
        max_image_pixels=MAX_PIXELS,
        mllm={"enabled": False},
        expert={"min_references": 2, "weights": "random"},  # the fake pipeline builds nothing: no weights to find
        service={"token": TOKEN, "max_upload_mb": 1, "max_archive_mb": 2, "queue_size": 4, **service},
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service")
    pipeline = FakePipeline(banks=["widget"])
    app = create_app(pipeline, make_settings(tmp))
    server = LiveServer(app).start()
    yield server, pipeline, app.state.service
    server.stop()


@pytest.fixture
def client(live):
    server, _, _ = live
    with server.client() as c:
        yield c


def inspect(
    client: httpx.Client, data: bytes, bank: str = "widget", name: str = "part.png", **fields
) -> httpx.Response:
    return client.post("/v1/inspect", files={"image": (name, data, "image/png")}, data={"bank": bank, **fields})


# -- health, auth ------------------------------------------------------------------------------------------------
def test_healthz_readyz_are_public_and_the_schema_needs_the_token(live):
    server, _, _ = live
    with server.client(token=None) as anonymous:
        health = anonymous.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "alive"}
        assert len(health.headers["x-request-id"]) == 32
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["ready"] is True
        # What the configured setup needs gates readiness (random weights: a warning, not missing); the rest is
        # reported in `capabilities` only.
        assert body["checks"] == {"banks": True, "worker": True, "warm_up": True, "expert_weights": True, "disk": True}
        rows = {row["name"]: row for row in body["capabilities"]}
        assert set(rows) == {"expert_weights", "mllm_weights", "gpu", "bitsandbytes", "hub", "disk"}
        assert rows["expert_weights"]["status"] == "warning" and rows["mllm_weights"]["needed"] is False
        for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
            assert_error(anonymous.get(path), 401, "unauthorized")
    with server.client() as authorised:
        schema = authorised.get("/openapi.json").json()
        docs = authorised.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert {
        "/v1/inspect",
        "/v1/banks",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/banks/{name}",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(schema["paths"])
    form = schema["paths"]["/v1/inspect"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    ref = form["$ref"].rsplit("/", 1)[-1]
    assert {"image", "bank", "annotated", "alpha"} <= set(schema["components"]["schemas"][ref]["properties"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


PROTECTED = [
    ("POST", "/v1/inspect"),
    ("GET", "/v1/banks"),
    ("POST", "/v1/banks"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef"),
    ("DELETE", "/v1/banks/widget"),
    ("GET", "/metrics"),
    ("GET", "/v1/nonexistent"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-wrong-token", "Basic dXNlcjpwYXNz", "Bearer", TOKEN])
def test_every_protected_endpoint_needs_the_token(live, method, path, header):
    server, pipeline, _ = live
    headers = {"Authorization": header} if header else {}
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        response = anonymous.request(method, path, headers=headers)
    body = assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert TOKEN not in response.text
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert pipeline.banks.exists("widget")  # DELETE without a token did nothing


def test_token_is_checked_before_the_body_is_read(live):
    server, _, _ = live
    big = b"\0" * (3 * 1024 * 1024)  # over the 1 MiB upload limit: a 401, not a 413
    with server.client(token=None) as anonymous:
        response = anonymous.post("/v1/inspect", files={"image": ("a.png", big)}, data={"bank": "widget"})
    assert_error(response, 401, "unauthorized")


# -- inspect -----------------------------------------------------------------------------------------------------
def test_inspect_returns_the_record_and_audits_it(live, client):
    _, _, service = live
    data = png_bytes(40, 30, seed=1)
    response = inspect(client, data, name="dir/part-1.png")
    assert response.status_code == 200, response.text
    body = response.json()
    result = body["result"]
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert result["score"] == pytest.approx(array.mean() / 255.0)
    assert result["image_size"] == [40, 30]
    assert result["image_name"] == "part-1.png"  # base name only
    assert result["mode"] == "expert-only" and body["annotated_png"] is None
    assert body["request_id"] == response.headers["x-request-id"]
    rows = [r for r in service.audit.query() if r["run_id"] == body["request_id"]]
    assert len(rows) == 1
    row = rows[0]
    assert row["source"] == "api" and row["status"] == "ok" and row["bank"] == "widget"
    assert row["image_sha256"] == result["image_sha256"] and row["score"] == pytest.approx(result["score"])
    assert row["decision"] == result["expert_decision"] and row["verdict"] == result["verdict"]
    assert row["latency_ms"] > 0


def test_inspect_annotated_png_has_red_boxes(client):
    bright = np.full((30, 40, 3), 220, np.uint8)  # mean 220/255 > τ = 0.5: anomalous, one box
    buffer = io.BytesIO()
    Image.fromarray(bright).save(buffer, format="PNG")
    response = inspect(client, buffer.getvalue(), annotated="true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["result"]["verdict"] == "defect" and len(body["result"]["boxes"]) == 1
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["annotated_png"]))))
    assert picture.shape == (30, 40, 3)
    red = (picture[..., 0] == 255) & (picture[..., 1] == 0) & (picture[..., 2] == 0)
    box = body["result"]["boxes"][0]
    assert red.any() and red[box["y0"], box["x0"]]  # the box outline starts at its corner
    overlay = FakePipeline(banks=["widget"]).inspect(bright, "widget").images.heatmap_overlay
    assert (picture[~red] == overlay[~red]).all()  # elsewhere: the heatmap overlay itself


def test_inspect_rejects_bad_inputs_with_codes(client):
    ok = png_bytes()
    assert_error(inspect(client, ok, bank="nope"), 404, "bank_not_found")
    assert_error(inspect(client, ok, bank="../etc"), 422, "invalid_bank_name")
    assert_error(inspect(client, ok, bank="a/b"), 422, "invalid_bank_name")
    assert_error(inspect(client, b""), 422, "invalid_image")
    assert_error(inspect(client, b"this is text, not a picture"), 422, "invalid_image")
    assert_error(inspect(client, png_bytes(2, 1)), 422, "invalid_image")  # smaller than 2x2
    too_many = inspect(client, png_bytes(250, 200))  # 50,000 > 40,000 pixels, from the header
    body = assert_error(too_many, 422, "image_too_large")
    assert "50000 pixels" in body["error"]["message"]
    assert_error(inspect(client, ok, alpha="inf"), 422, "invalid_request")
    assert_error(inspect(client, ok, alpha="-1"), 422, "invalid_request")
    assert_error(inspect(client, ok, prompt_setting="everything"), 422, "invalid_request")
    assert_error(inspect(client, ok, use_mllm="maybe"), 422, "invalid_request")
    missing = client.post("/v1/inspect", data={"bank": "widget"})
    assert "image" in assert_error(missing, 422, "invalid_request")["error"]["message"]
    assert_error(client.post("/v1/inspect", files={"image": ("a.png", ok)}), 422, "invalid_request")
    two_files = client.post(
        "/v1/inspect", files=[("image", ("a.png", ok)), ("image", ("b.png", ok))], data={"bank": "widget"}
    )
    assert_error(two_files, 400, "bad_request")


def test_upload_limit_is_413_with_and_without_content_length(client):
    big = png_bytes() + b"\0" * (1024 * 1024 + 10)
    body = assert_error(inspect(client, big), 413, "upload_too_large")
    assert "MiB" in body["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while streaming
        boundary = b"--xyz\r\n"
        yield boundary + b'Content-Disposition: form-data; name="bank"\r\n\r\nwidget\r\n'
        yield boundary + b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(20):
            yield b"\0" * (128 * 1024)
        yield b"\r\n--xyz--\r\n"

    streamed = client.post(
        "/v1/inspect", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert_error(streamed, 413, "upload_too_large")


def test_unknown_routes_and_methods_are_json(client):
    assert_error(client.get("/v1/nonexistent"), 404, "not_found")
    assert_error(client.get("/nonexistent"), 404, "not_found")
    assert_error(client.put("/v1/inspect"), 405, "method_not_allowed")


def test_unexpected_error_is_generic_500_with_logged_traceback(live, client, caplog):
    _, pipeline, _ = live
    pipeline.fail_with = RuntimeError("secret internal detail /srv/eagle/x.py")
    try:
        with caplog.at_level(logging.ERROR, logger="deploy.middleware"):
            response = inspect(client, png_bytes())
    finally:
        pipeline.fail_with = None
    body = assert_error(response, 500, "internal_error")
    assert "secret" not in response.text
    logged = [r for r in caplog.records if r.name == "deploy.middleware"]
    assert logged and logged[-1].exc_info is not None and body["error"]["request_id"] in logged[-1].getMessage()


# -- banks and jobs ------------------------------------------------------------------------------------------------
def wait_job(client: httpx.Client, job_id: str) -> dict:
    for _ in range(500):
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["state"] in ("succeeded", "failed"):
            return status
        time.sleep(0.02)
    raise AssertionError("job did not finish")


def test_bank_build_job_list_and_delete(live, client):
    _, pipeline, _ = live
    archive = zip_bytes({"good/a.png": png_bytes(seed=1), "good/b.png": png_bytes(seed=2), "notes.txt": b"x"})
    response = client.post("/v1/banks", data={"name": "bolts"}, files={"archive": ("refs.zip", archive)})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["bank"] == "bolts" and job["n_images"] == 2 and job["state"] in ("queued", "running", "succeeded")
    done = wait_job(client, job["id"])
    assert done["state"] == "succeeded" and done["result"]["name"] == "bolts" and done["result"]["n_references"] == 2
    assert pipeline.builds[-1] == "bolts"
    assert pipeline.banks.meta("bolts")["names"] == ["good/a.png", "good/b.png"]  # only the images, in name order
    assert job["id"] in [j["id"] for j in client.get("/v1/jobs").json()["jobs"]]
    assert "bolts" in [b["name"] for b in client.get("/v1/banks").json()["banks"]]

    again = client.post("/v1/banks", data={"name": "bolts"}, files={"archive": ("refs.zip", archive)})
    assert_error(again, 409, "bank_exists")
    rebuilt = client.post(
        "/v1/banks", data={"name": "bolts", "overwrite": "true"}, files={"archive": ("refs.zip", archive)}
    )
    assert rebuilt.status_code == 202 and wait_job(client, rebuilt.json()["id"])["state"] == "succeeded"

    assert client.delete("/v1/banks/bolts").json() == {"deleted": "bolts"}
    assert_error(client.delete("/v1/banks/bolts"), 404, "bank_not_found")
    assert_error(client.delete("/v1/banks/bad..name%20x"), 422, "invalid_bank_name")
    assert "bolts" not in [b["name"] for b in client.get("/v1/banks").json()["banks"]]


@pytest.mark.parametrize(
    ("files", "status", "code"),
    [
        ({"../evil.png": b"x", "a.png": b"y"}, 422, "invalid_archive"),
        ({"/abs/a.png": b"x", "b.png": b"y"}, 422, "invalid_archive"),
        ({"a.png": png_bytes()}, 422, "invalid_archive"),  # one image < min_references
        ({"readme.txt": b"no images"}, 422, "invalid_archive"),
    ],
)
def test_bad_archives_are_refused_before_queueing(live, client, files, status, code):
    _, _, service = live
    before = len(service.jobs.list())
    response = client.post("/v1/banks", data={"name": "evil"}, files={"archive": ("x.zip", zip_bytes(files))})
    assert_error(response, status, code)
    assert len(service.jobs.list()) == before
    assert not [p for p in service.jobs.jobs_dir.iterdir() if p.is_dir()]  # staged upload removed


def test_archive_limits(live, client):
    assert_error(
        client.post("/v1/banks", data={"name": "x"}, files={"archive": ("x.zip", b"PK not a zip")}),
        422,
        "invalid_archive",
    )
    bomb = zip_bytes({"a.png": b"\0" * (3 * 1024 * 1024), "b.png": png_bytes()})  # 3 MiB of zeros → a few KB
    assert_error(
        client.post("/v1/banks", data={"name": "x"}, files={"archive": ("x.zip", bomb)}), 413, "archive_too_large"
    )
    too_big = b"PK" + b"\0" * (2 * 1024 * 1024 + 1)  # over max_archive_mb = 2
    assert_error(
        client.post("/v1/banks", data={"name": "x"}, files={"archive": ("x.zip", too_big)}), 413, "upload_too_large"
    )
    assert_error(
        client.post("/v1/banks", data={"name": "../x"}, files={"archive": ("x.zip", b"PK")}), 422, "invalid_bank_name"
    )


def test_unknown_jobs_are_404(client):
    assert_error(client.get("/v1/jobs/0123456789abcdef0123456789abcdef"), 404, "job_not_found")
    assert_error(client.get("/v1/jobs/..%2F..%2Fetc"), 404, "not_found")
    assert_error(client.get("/v1/jobs/not-a-job-id"), 404, "job_not_found")


# -- metrics -------------------------------------------------------------------------------------------------------
def test_metrics_count_requests_errors_and_stages(live, client):
    server, _, _ = live
    before = parse_metrics(client.get("/metrics").text)
    n_ok = 3
    for seed in range(n_ok):
        assert inspect(client, png_bytes(seed=seed)).status_code == 200
    assert inspect(client, b"garbage").status_code == 422
    with server.client(token="wrong-token-wrong-token") as bad:
        bad.get("/v1/banks")
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = parse_metrics(response.text)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("eagle_http_requests_total", route="/v1/inspect", method="POST", status="200") == n_ok
    assert delta("eagle_http_requests_total", route="/v1/inspect", method="POST", status="422") == 1
    assert delta("eagle_errors_total", code="invalid_image") == 1
    assert delta("eagle_errors_total", code="unauthorized") == 1
    assert delta("eagle_stage_duration_seconds_count", stage="embed") == n_ok
    assert delta("eagle_stage_duration_seconds_sum", stage="embed") == pytest.approx(n_ok * 0.002)
    assert delta("eagle_stage_duration_seconds_bucket", stage="embed", le="0.0025") == n_ok  # 2 ms each
    assert delta("eagle_stage_duration_seconds_bucket", stage="embed", le="0.001") == 0
    inf = after[("eagle_stage_duration_seconds_bucket", (("le", "+Inf"), ("stage", "total")))]
    assert inf == after[("eagle_stage_duration_seconds_count", (("stage", "total"),))]
    assert after[("eagle_queue_depth", ())] == 0 and after[("eagle_queue_capacity", ())] == 4
    assert ("eagle_bank_jobs", (("state", "succeeded"),)) in after


# -- fuzzing: never a 5xx --------------------------------------------------------------------------------------------
text_or_none = st.one_of(st.none(), st.text(max_size=40))


@hyp_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=2048),
    bank=st.text(max_size=80),
    alpha=text_or_none,
    prompt_setting=text_or_none,
    use_mllm=text_or_none,
    annotated=text_or_none,
    filename=st.text(max_size=300),
)
def test_fuzzed_inspect_requests_get_4xx_never_5xx(
    client, data, bank, alpha, prompt_setting, use_mllm, annotated, filename
):
    fields = {
        "bank": bank,
        "alpha": alpha,
        "prompt_setting": prompt_setting,
        "use_mllm": use_mllm,
        "annotated": annotated,
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    response = client.post("/v1/inspect", files={"image": (filename or "x", data)}, data=fields)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert "error" in response.json()


@hyp_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=4096),
    content_type=st.sampled_from(
        ["multipart/form-data; boundary=abc", "multipart/form-data", "application/json", "text/plain", ""]
    ),
)
def test_fuzzed_raw_bodies_get_4xx_never_5xx(client, body, content_type):
    for path in ("/v1/inspect", "/v1/banks"):
        response = client.post(path, content=body, headers={"Content-Type": content_type})
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:300])
        assert "error" in response.json()


# -- queue: 429 and graceful shutdown -----------------------------------------------------------------------------
def _post_in_thread(server: LiveServer, results: list, data: bytes) -> threading.Thread:
    def run():
        with server.client() as c:
            results.append(inspect(c, data))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_full_queue_gives_429_with_retry_after_then_recovers(tmp_path):
    pipeline = FakePipeline(banks=["widget"])
    pipeline.gate = threading.Event()
    app = create_app(pipeline, make_settings(tmp_path, queue_size=2, retry_after_s=3))
    service = app.state.service
    server = LiveServer(app).start()
    results: list[httpx.Response] = []
    threads = []
    try:
        threads.append(_post_in_thread(server, results, png_bytes(seed=0)))
        assert pipeline.entered.acquire(timeout=30)  # the first one runs (and blocks on the gate)
        for seed in (1, 2):
            threads.append(_post_in_thread(server, results, png_bytes(seed=seed)))
        deadline = time.monotonic() + 30
        while service.worker.depth < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service.worker.depth == 2  # capacity reached
        with server.client() as c:
            refused = inspect(c, png_bytes(seed=3))
            metrics = parse_metrics(c.get("/metrics").text)
        assert_error(refused, 429, "queue_full")
        assert int(refused.headers["retry-after"]) >= 3
        assert metrics[("eagle_queue_depth", ())] == 2 and metrics[("eagle_worker_busy", ())] == 1
        assert metrics[("eagle_queue_rejections_total", ())] == 1
        assert metrics[("eagle_errors_total", (("code", "queue_full"),))] == 1
        pipeline.gate.set()
        for thread in threads:
            thread.join(30)
        assert sorted(r.status_code for r in results) == [200, 200, 200]
        with server.client() as c:
            assert inspect(c, png_bytes(seed=4)).status_code == 200  # the queue drained: accepted again
    finally:
        pipeline.gate.set()
        server.stop()


def test_graceful_shutdown_finishes_accepted_work(tmp_path):
    pipeline = FakePipeline(banks=["widget"])
    pipeline.gate = threading.Event()
    audit = AuditLog(tmp_path / "audit.sqlite3")
    app = create_app(pipeline, make_settings(tmp_path, queue_size=4), audit=audit)
    service = app.state.service
    server = LiveServer(app).start()
    results: list[httpx.Response] = []
    threads = [_post_in_thread(server, results, png_bytes(seed=0))]
    assert pipeline.entered.acquire(timeout=30)
    threads += [_post_in_thread(server, results, png_bytes(seed=s)) for s in (1, 2)]
    deadline = time.monotonic() + 30
    while service.worker.depth < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.worker.depth == 2
    stopper = threading.Thread(target=server.stop)
    stopper.start()  # SIGTERM equivalent: stop listening, wait for requests in flight
    deadline = time.monotonic() + 30
    while not server.server.should_exit and time.monotonic() < deadline:
        time.sleep(0.01)
    pipeline.gate.set()
    stopper.join(60)
    for thread in threads:
        thread.join(30)
    assert sorted(r.status_code for r in results) == [200, 200, 200]
    assert not service.worker.alive and service.worker.depth == 0
    assert len(audit.query()) == 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=5)


# -- soak --------------------------------------------------------------------------------------------------------------
def test_soak_600_requests_zero_errors_bounded_memory(tmp_path):
    """600 requests from 4 concurrent clients through uvicorn, the gate, the worker, real decoding, PNG
    annotation, the audit log and metrics: not one error, and the process's RSS stays flat after warm-up."""
    import psutil

    pipeline = FakePipeline(banks=["widget"])
    app = create_app(pipeline, make_settings(tmp_path, queue_size=16))
    service = app.state.service
    server = LiveServer(app).start()
    images = [png_bytes(64, 48, seed=s) for s in range(8)]
    failures: list[tuple[int, str]] = []

    def client_loop(n: int, offset: int) -> None:
        with server.client() as c:
            for i in range(n):
                k = i + offset
                if k % 10 == 9:
                    response = c.get("/metrics" if k % 20 == 9 else "/v1/banks")
                else:
                    response = inspect(c, images[k % len(images)], annotated="true" if k % 3 == 0 else "false")
                if response.status_code != 200:
                    failures.append((response.status_code, response.text[:200]))

    try:
        client_loop(60, 0)  # warm-up
        rss_before = psutil.Process().memory_info().rss
        threads = [threading.Thread(target=client_loop, args=(150, 1000 * t)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        growth_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20
    finally:
        server.stop()
    assert failures == []
    assert growth_mb < 40, f"RSS grew by {growth_mb:.1f} MiB over 600 requests"
    inspected = sum(1 for t in range(4) for i in range(150) if (i + 1000 * t) % 10 != 9) + 54
    assert AuditLog(service.audit.path).count() == inspected  # every inspection audited exactly once


# -- the audit log records every inspection request ------------------------------------------------------
def _rows(service, response: httpx.Response) -> list[dict]:
    return [r for r in service.audit.query() if r["run_id"] == response.headers["x-request-id"]]


def _one_error_row(service, response: httpx.Response, code: str) -> dict:
    rows = _rows(service, response)
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["status"] == "error" and row["error_code"] == code and row["source"] == "api", row
    assert row["error_message"] and row["score"] is None and row["verdict"] is None
    return row


def test_every_failed_inspection_leaves_exactly_one_audit_row(live, client):
    server, pipeline, service = live
    garbage = b"this is text, not a picture" * 10
    row = _one_error_row(service, assert_error_resp(inspect(client, garbage, name="a.png"), 422), "invalid_image")
    assert row["bank"] == "widget" and row["image_name"] == "a.png"
    assert row["image_sha256"] == hashlib.sha256(garbage).hexdigest()

    empty = inspect(client, b"", name="e.png")
    assert _one_error_row(service, assert_error_resp(empty, 422), "invalid_image")["image_name"] == "e.png"

    huge = png_bytes(250, 200)
    row = _one_error_row(service, assert_error_resp(inspect(client, huge), 422), "image_too_large")
    assert row["image_sha256"] == hashlib.sha256(huge).hexdigest() and "50000 pixels" in row["error_message"]

    too_big = inspect(client, png_bytes() + b"\0" * (1024 * 1024 + 10))
    row = _one_error_row(service, assert_error_resp(too_big, 413), "upload_too_large")
    assert row["image_sha256"] == "" and "MiB" in row["error_message"]

    _one_error_row(service, assert_error_resp(inspect(client, png_bytes(), bank="nope"), 404), "bank_not_found")
    _one_error_row(service, assert_error_resp(inspect(client, png_bytes(), alpha="-1"), 422), "invalid_request")

    pipeline.fail_with = RuntimeError("secret internal detail /srv/eagle/x.py")
    try:
        crashed = inspect(client, png_bytes(seed=9))
    finally:
        pipeline.fail_with = None
    row = _one_error_row(service, assert_error_resp(crashed, 500), "internal_error")
    assert "secret" not in row["error_message"] and row["bank"] == "widget"

    with server.client(token=None) as anonymous:  # not an inspection request of anyone: no row
        refused = anonymous.post("/v1/inspect", files={"image": ("a.png", png_bytes())}, data={"bank": "widget"})
    assert refused.status_code == 401 and _rows(service, refused) == []

    for row in service.audit.query():  # never the image bytes
        assert all(not isinstance(value, bytes) for value in row.values())


def assert_error_resp(response: httpx.Response, status: int) -> httpx.Response:
    assert response.status_code == status, (response.status_code, response.text[:300])
    return response


def test_streamed_upload_over_the_limit_is_audited(live, client):
    _, _, service = live

    def chunks():
        yield b'--xyz\r\nContent-Disposition: form-data; name="bank"\r\n\r\nwidget\r\n'
        yield b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(20):
            yield b"\0" * (128 * 1024)
        yield b"\r\n--xyz--\r\n"

    streamed = client.post(
        "/v1/inspect", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    _one_error_row(service, assert_error_resp(streamed, 413), "upload_too_large")


@pytest.mark.parametrize("size", [1000, 100_000])
def test_a_file_part_without_a_file_name_gets_a_clear_4xx(live, client, size):
    _, _, service = live
    data = png_bytes() + b"\0" * size  # httpx drops an empty file name: the part arrives as a text field
    response = client.post("/v1/inspect", files={"image": ("", data, "image/png")}, data={"bank": "widget"})
    body = assert_error(response, 422, "invalid_request")
    assert "file name" in body["error"]["message"] and "64KB" not in body["error"]["message"]
    _one_error_row(service, response, "invalid_request")


def test_simultaneous_requests_fill_exactly_one_running_plus_the_queue(tmp_path):
    pipeline = FakePipeline(banks=["widget"])
    pipeline.gate = threading.Event()
    app = create_app(pipeline, make_settings(tmp_path, queue_size=2))
    service = app.state.service
    server = LiveServer(app).start()
    results: list[httpx.Response] = []
    barrier = threading.Barrier(3)

    def run(seed: int) -> None:
        with server.client() as c:
            barrier.wait(10)
            results.append(inspect(c, png_bytes(seed=seed)))

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(3)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while service.worker.depth + service.worker.busy < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r.status_code for r in results] == []  # none refused: 1 running + 2 waiting
        with server.client() as c:
            refused = inspect(c, png_bytes(seed=3))
        assert_error(refused, 429, "queue_full")
        _one_error_row(service, refused, "queue_full")
        pipeline.gate.set()
        for thread in threads:
            thread.join(30)
        assert sorted(r.status_code for r in results) == [200, 200, 200]
    finally:
        pipeline.gate.set()
        server.stop()
