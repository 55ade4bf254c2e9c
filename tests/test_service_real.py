"""The service with the REAL pipeline (random-weight expert; a tiny offline MLLM for one test) on a real uvicorn."""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from deploy.api import create_app
from eagle.audit import AuditLog
from eagle.pipeline import Pipeline
from tests.fixtures_mllm import tiny_qwen_dir  # noqa: F401 - session fixture
from tests.service_helpers import LiveServer, parse_metrics, real_bank, real_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built():
    return real_bank()


@pytest.fixture(scope="module")
def live(built, tmp_path_factory):
    audit = AuditLog(tmp_path_factory.mktemp("audit") / "audit.sqlite3")
    settings = real_settings(built.data_dir, queue_size=16)
    pipeline = Pipeline(settings)
    app = create_app(pipeline, settings, audit=audit, warm_up=True)
    server = LiveServer(app).start()
    yield server, pipeline, audit
    server.stop()


def post(client, path, **fields):
    with open(path, "rb") as handle:
        data = handle.read()
    return client.post(
        "/v1/inspect", files={"image": (path.name, data, "image/png")}, data={"bank": "widget", **fields}
    )


def test_bank_built_through_the_api_with_the_real_expert(built):
    job = built.job
    assert job["state"] == "succeeded" and job["n_images"] == 6 and job["progress"] == 1.0 and job["error"] is None
    summary = job["result"]
    assert summary["name"] == "widget" and summary["n_references"] == 6 and summary["weights_source"] == "random"
    assert summary["n_patches"] == 6 * 16  # 32×32 input → a 4×4 patch grid per image
    assert summary["coreset_size"] == max(1, int(6 * 16 * summary["coreset_ratio"]))
    assert math.isfinite(summary["tau"]) and summary["tau"] > 0 and summary["threshold_method"] == "k_sigma"
    assert (built.data_dir / "banks" / "widget" / "meta.json").is_file()
    assert not [p for p in (built.data_dir / "jobs").iterdir() if p.is_dir()]  # upload and images cleaned up


def test_readyz_after_warm_up(live):
    server, pipeline, _ = live
    with server.client(token=None) as anonymous:
        for _ in range(600):
            response = anonymous.get("/readyz")
            if response.status_code == 200:
                break
            time.sleep(0.05)
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {
        "banks": True,
        "worker": True,
        "warm_up": True,
        "expert_weights": True,  # random weights: a warning, which never gates
        "disk": True,
    }


def test_inspect_equals_the_pipeline_called_directly(live, built):
    server, pipeline, audit = live
    with server.client() as client:
        for path in (built.good[0], built.defective[0]):
            response = post(client, path, annotated="true")
            assert response.status_code == 200, response.text
            body = response.json()
            result = body["result"]
            direct = pipeline.inspect(path.read_bytes(), "widget", image_name=path.name)
            assert result["score"] == pytest.approx(direct.score, rel=1e-5)
            assert result["tau"] == direct.tau and result["s_max"] == direct.s_max
            assert result["expert_decision"] == ("anomalous" if result["score"] >= result["tau"] else "normal")
            assert result["verdict"] == {"anomalous": "defect", "normal": "no_defect"}[result["expert_decision"]]
            assert result["bank_id"] == built.job["result"]["bank_id"] and result["mode"] == "expert-only"
            width, height = Image.open(path).size
            assert tuple(result["image_size"]) == (width, height)
            picture = Image.open(io.BytesIO(base64.b64decode(body["annotated_png"])))
            assert picture.size == (width, height) and picture.mode == "RGB"
            assert {"decode", "embed", "search", "total"} <= set(result["timings_ms"])
            (row,) = [r for r in audit.query() if r["run_id"] == body["request_id"]]
            assert row["image_sha256"] == direct.image_sha256 and row["score"] == pytest.approx(result["score"])


def test_real_pipeline_errors_are_4xx(live, built):
    server, _, _ = live
    with server.client() as client:
        bad = client.post(
            "/v1/inspect", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 50)}, data={"bank": "widget"}
        )
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_image"
        assert "x.png" in bad.json()["error"]["message"]
        gone = client.post(
            "/v1/inspect", files={"image": ("x.png", built.good[0].read_bytes())}, data={"bank": "missing"}
        )
        assert gone.status_code == 404


def test_soak_with_the_real_expert(live, built):
    """Sustained load through the real expert: zero errors, bounded memory (the 500-request soak with a fake
    pipeline is in test_service_api.py; this one runs the real model, so it is shorter)."""
    server, _, _ = live
    images = [p.read_bytes() for p in built.good + built.defective]
    process = psutil.Process()
    errors: list[str] = []

    def client_loop(n: int, offset: int) -> None:
        with server.client() as client:
            for i in range(n):
                data = images[(i + offset) % len(images)]
                response = client.post("/v1/inspect", files={"image": ("q.png", data)}, data={"bank": "widget"})
                if response.status_code != 200:
                    errors.append(response.text[:200])

    client_loop(8, 0)  # warm-up: sessions, allocator pools
    rss_before = process.memory_info().rss
    threads = [threading.Thread(target=client_loop, args=(30, k)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    growth_mb = (process.memory_info().rss - rss_before) / 2**20
    assert errors == []
    assert growth_mb < 64, f"RSS grew by {growth_mb:.1f} MiB over 60 requests"
    with server.client() as client:
        metrics = parse_metrics(client.get("/metrics").text)
    assert (
        metrics[("eagle_http_requests_total", (("method", "POST"), ("route", "/v1/inspect"), ("status", "200")))] >= 60
    )


def test_expert_only_mode_never_imports_the_mllm_stack(built, tmp_path):
    script = f"""
import json, sys
from deploy.api import create_app
from eagle.pipeline import Pipeline
from tests.service_helpers import LiveServer, real_settings
settings = real_settings({str(built.data_dir)!r}, audit_path={str(tmp_path / "audit.sqlite3")!r})
server = LiveServer(create_app(Pipeline(settings), settings, warm_up=True)).start()
with server.client() as client, open({str(built.good[0])!r}, "rb") as image:
    response = client.post("/v1/inspect", files={{"image": ("a.png", image.read())}}, data={{"bank": "widget"}})
    assert response.status_code == 200, response.text
    assert client.get("/metrics").status_code == 200 and client.get("/v1/banks").status_code == 200
server.stop()
heavy = ("transformers", "mllm", "bitsandbytes", "accelerate", "gradio")
light = {"mllm", "mllm.config", "mllm.errors"}  # its settings models (plain pydantic) and error base (no imports)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy and m not in light)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_tiny_mllm_through_the_api(built, tmp_path, tiny_qwen_dir):  # noqa: F811
    mllm = {"enabled": True, "model_id": str(tiny_qwen_dir), "max_new_tokens": 4, "explanation_max_new_tokens": 8}
    settings = real_settings(built.data_dir, mllm=mllm)
    audit = AuditLog(tmp_path / "audit.sqlite3")
    app = create_app(Pipeline(settings), settings, audit=audit, warm_up=True)
    server = LiveServer(app).start()
    try:
        with server.client(token=None) as anonymous:
            for _ in range(1200):
                ready = anonymous.get("/readyz")
                if ready.status_code == 200:
                    break
                time.sleep(0.05)
        assert ready.status_code == 200 and ready.json()["checks"]["mllm"] is True
        with server.client() as client:
            response = post(client, built.defective[0], explain="true", prompt_setting="full")
            plain = post(client, built.good[0], use_mllm="false")
        assert response.status_code == 200, response.text
        result = response.json()["result"]
        assert result["mode"] == "expert+mllm" and result["model_id"] == str(tiny_qwen_dir)
        assert result["mllm_answer"] in {"yes", "no", "unknown"}
        assert result["verdict"] == {"yes": "defect", "no": "no_defect", "unknown": "unknown"}[result["mllm_answer"]]
        assert isinstance(result["explanation"], str) and result["prompt_setting"] == "full"
        assert plain.json()["result"]["mode"] == "expert-only"
        (row,) = [r for r in audit.query() if r["run_id"] == response.json()["request_id"]]
        assert row["mllm_answer"] == result["mllm_answer"] and row["model_id"] == str(tiny_qwen_dir)
        assert row["caas_applied"] == int(result["caas_applied"])
    finally:
        server.stop()
