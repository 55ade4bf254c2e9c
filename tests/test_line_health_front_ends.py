"""Line health through the front ends: ``GET /v1/banks/{name}/health``, the Prometheus gauges and
``eagle bank health``.

The service runs with the fake pipeline (a part's score is its grey level's distance from the bank's mean grey, in
1/255), so a line whose light drifts is a stream of grey images whose grey level rises step by step; every
inspection goes through ``POST /v1/inspect`` and its audit row, as on a real line. The command line runs the real
pipeline over the synthetic bank (random-weight expert) and audit rows written as the service writes them.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from deploy.api import create_app
from eagle.audit import AuditLog, default_audit_path
from eagle.settings import Settings
from expert.drift import DriftSettings
from tests.cli_helpers import run_cli
from tests.fake_pipeline import FakePipeline
from tests.service_helpers import TOKEN, LiveServer, assert_error, parse_metrics

GREY = 128.0
LIMITS = DriftSettings(window=40, min_inspections=20)


def _grey_png(level: float) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), int(round(level)), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _levels(rng: np.random.Generator, n: int, drift: float = 0.0) -> list[float]:
    """Grey levels of good parts: the bank's spread (± about 3 grey levels), shifted by ``drift``."""
    return list(GREY + rng.normal(0.0, 3.0, n) + drift)


@pytest.fixture
def line(tmp_path):
    pipeline = FakePipeline(tmp_path / "fake")
    pipeline.settings.health = LIMITS
    rng = np.random.default_rng(0)
    pipeline.build_bank([np.full((16, 16, 3), int(round(g)), np.uint8) for g in _levels(rng, 30)], "line")
    settings = Settings(
        data_dir=tmp_path, mllm={"enabled": False}, expert={"weights": "random"}, service={"token": TOKEN}
    )
    server = LiveServer(create_app(pipeline, settings)).start()
    yield server, rng
    server.stop()


def _inspect_all(client, levels: list[float]) -> None:
    for i, level in enumerate(levels):
        files = {"image": (f"{i}.png", _grey_png(level), "image/png")}
        response = client.post("/v1/inspect", files=files, data={"bank": "line"})
        assert response.status_code == 200, response.text


def test_the_api_and_the_metrics_follow_a_line_from_ok_to_watch_to_drifting(line):
    server, rng = line
    with server.client() as client:
        first = client.get("/v1/banks/line/health")
        assert first.status_code == 200
        assert first.json()["state"] == "not_enough_inspections" and first.json()["n_references"] == 30

        _inspect_all(client, _levels(rng, 40))
        stable = client.get("/v1/banks/line/health").json()
        assert stable["state"] == "ok", stable["reason"]
        assert stable["n_recent"] == 40 and len(stable["recent"]) == 40 and len(stable["train_scores"]) == 30
        assert stable["reason"].startswith("median score moved ")
        metrics = parse_metrics(client.get("/metrics").text)
        assert metrics[("eagle_line_health_state", (("bank", "line"),))] == 0.0

        _inspect_all(client, _levels(rng, 40, drift=3.0))  # the light starts to age: 3 grey levels
        watch = client.get("/v1/banks/line/health").json()
        assert watch["state"] == "watch" and watch["level"] == 1, watch["reason"]
        metrics = parse_metrics(client.get("/metrics").text)
        assert metrics[("eagle_line_health_state", (("bank", "line"),))] == 1.0

        _inspect_all(client, _levels(rng, 40, drift=8.0))  # then every part looks 8 grey levels off
        drifting = client.get("/v1/banks/line/health").json()
        assert drifting["state"] == "drifting" and drifting["level"] == 2, drifting["reason"]
        assert drifting["median_shift"] > 2 and drifting["above_tau"] > drifting["expected_above_tau_max"]
        metrics = parse_metrics(client.get("/metrics").text)
        assert metrics[("eagle_line_health_state", (("bank", "line"),))] == 2.0
        shift = metrics[("eagle_line_health_median_shift_sigma", (("bank", "line"),))]
        assert shift == pytest.approx(drifting["median_shift"])

        assert_error(client.get("/v1/banks/nothing/health"), 404, "bank_not_found")
        with server.client(token=None) as anonymous:
            assert anonymous.get("/v1/banks/line/health").status_code == 401


def test_the_command_line_judges_the_real_banks_audited_scores(built_pipeline, tmp_path, monkeypatch):
    """``eagle bank health`` on the synthetic bank (12 references): too few for the default, judged with 10."""
    pipeline = built_pipeline.pipeline
    data_dir = pipeline.settings.data_dir
    bank = pipeline.banks.load("widget").bank
    monkeypatch.setenv("EAGLE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("EAGLE_EXPERT__WEIGHTS", "random")
    monkeypatch.setenv("EAGLE_SERVICE__AUDIT_PATH", str(tmp_path / "audit.sqlite3"))
    code, out, err = run_cli(["bank", "health", "widget"])
    assert code == 0, err
    assert out.splitlines()[0] == f"widget (bank id {bank.meta.bank_id}): not_enough_references"
    assert "the bank has 12 DBT training scores; drift is judged from 20 on" in out

    train = np.asarray(bank.train_scores, dtype=np.float64)
    rng = np.random.default_rng(1)
    settings = Settings(data_dir=data_dir, service={"audit_path": tmp_path / "audit.sqlite3"})
    with AuditLog(default_audit_path(settings)) as audit:  # the scores a stable line gives: the bank's own
        for i, score in enumerate(rng.choice(train, 30)):
            audit._insert(_row(i, bank.meta.bank_id, float(score)))
    monkeypatch.setenv("EAGLE_HEALTH__MIN_REFERENCES", "10")
    monkeypatch.setenv("EAGLE_HEALTH__MIN_INSPECTIONS", "20")
    code, out, _ = run_cli(["bank", "health", "widget", "--json"])
    health = json.loads(out)
    assert code == 0 and health["state"] == "ok" and health["n_references"] == 12 and health["n_recent"] == 30
    with AuditLog(default_audit_path(settings)) as audit:  # then every part scores three spreads higher
        for i, score in enumerate(rng.choice(train, 200) + 3 * train.std(ddof=1), start=30):
            audit._insert(_row(i, bank.meta.bank_id, float(score)))
    code, out, _ = run_cli(["bank", "health", "widget", "--json"])
    assert json.loads(out)["state"] == "drifting" and json.loads(out)["median_shift"] == pytest.approx(3, abs=0.6)
    code, _, err = run_cli(["bank", "health", "nothing"])
    assert code == 2 and "no bank named 'nothing'" in err


def _row(i: int, bank_id: str, score: float) -> dict:
    return {
        "time": f"2026-12-07T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
        "run_id": f"run{i}",
        "source": "watch",
        "image_name": f"{i}.png",
        "image_sha256": f"{i:064x}",
        "bank": "widget",
        "bank_id": bank_id,
        "score": score,
        "status": "ok",
    }
