"""A forged bank never makes /readyz lie and never makes an inspection 500, with the real pipeline.

The session's real bank (random-weight expert at 224, ``tests.fixtures_pipeline``) is copied twice into a fresh
data directory: once as it is (``good``) and once forged the way the issue describes (``broken``: feature_dim 16,
a 7x7 grid, τ = -1, bank_id recomputed) or with an ONNX graph that has the right signature but cannot score.
"""

from __future__ import annotations

import shutil
import time

import pytest

from deploy.api import create_app
from eagle.pipeline import Pipeline
from tests.bank_tamper import fake_onnx, shrink_features, tamper
from tests.fixtures_pipeline import pipeline_settings
from tests.service_helpers import LiveServer, assert_error, png_bytes


def _forge(kind: str):
    if kind == "crafted":
        meta, tensors = shrink_features(dim=16, grid=7, tau=-1.0)
        return {"meta": meta, "tensors": tensors}
    return {"onnx_bytes": fake_onnx()}


@pytest.mark.parametrize("kind", ["crafted", "cannot_score"])
def test_a_broken_bank_keeps_readyz_at_503_and_inspections_at_409(built_pipeline, tmp_path, kind):
    settings = pipeline_settings(tmp_path / "data")
    source = built_pipeline.pipeline.banks.path("widget")
    settings.banks_dir.mkdir(parents=True)
    shutil.copytree(source, settings.banks_dir / "good")
    tamper(shutil.copytree(source, settings.banks_dir / "broken"), **_forge(kind))
    app = create_app(Pipeline(settings), settings, warm_up=True)
    service = app.state.service
    server = LiveServer(app).start()
    try:
        assert service.warm.wait(120)
        with server.client(token=None) as client:
            ready = client.get("/readyz")
            body = assert_error(ready, 503, "not_ready")
            assert body["checks"]["banks"] is False and body["unusable_banks"] == ["broken"]
            assert "bank 'broken'" in body["error"]["message"]

            refused = client.post("/v1/inspect", files={"image": ("q.png", png_bytes(64, 64))}, data={"bank": "broken"})
            message = assert_error(refused, 409, "bank_unusable")["error"]["message"]
            assert "\n" not in message and "bank 'broken'" in message
            rows = [r for r in service.audit.query() if r["run_id"] == refused.headers["x-request-id"]]
            assert [(r["status"], r["error_code"]) for r in rows] == [("error", "bank_unusable")]

            good = client.post("/v1/inspect", files={"image": ("q.png", png_bytes(64, 64))}, data={"bank": "good"})
            assert good.status_code == 200, good.text

            assert client.delete("/v1/banks/broken").status_code == 200
            deadline = time.monotonic() + 10
            while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.get("/readyz").json()["checks"]["banks"] is True
    finally:
        server.stop()
