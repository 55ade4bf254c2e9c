"""Growing a bank through the front ends: ``GET``/``POST /v1/banks/{name}/refresh``, ``eagle bank refresh`` and the
app's Line health tab.

The service and the app run the fake pipeline (a part's score is its grey level's distance from the bank's mean
grey); every inspection goes through ``POST /v1/inspect`` (or the app's inspect handler) with keeping on, so the
kept images are the ones the front end kept. The command line runs the real pipeline (random-weight expert) over a
synthetic bank, with inspections audited and kept as the front ends do, then teaches, and rolls back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import handlers, health_refresh
from deploy.api import create_app
from eagle.audit import AuditLog, default_audit_path
from eagle.bank_refresh import read_refresh_log
from eagle.cli import main
from eagle.kept_images import KEPT_DIR, KeptImages, keep_inspected_image
from eagle.pipeline import Pipeline
from eagle.settings import Settings
from tests.fake_pipeline import FakePipeline
from tests.service_helpers import TOKEN, LiveServer, assert_error, real_env, real_settings
from tests.synthetic import train_and_good_images

GREY = 128


def grey_png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def fake_line(tmp_path: Path, *, keep: bool) -> tuple[FakePipeline, Settings]:
    pipeline = FakePipeline(tmp_path / "fake")
    pipeline.build_bank([np.full((16, 16, 3), g, np.uint8) for g in (110, 120, 128, 136, 146)], "line")
    settings = Settings(
        data_dir=tmp_path, mllm={"enabled": False}, service={"token": TOKEN}, keep_images={"enabled": keep}
    )
    return pipeline, settings


@pytest.fixture
def service(tmp_path):
    pipeline, settings = fake_line(tmp_path, keep=True)
    app = create_app(pipeline, settings)
    server = LiveServer(app).start()
    yield server, app, pipeline
    server.stop()


def test_the_api_proposes_kept_good_parts_and_teaches_only_approved_ones(service, tmp_path):
    server, app, pipeline = service
    levels = [128, 129, 127, 200]  # three parts like the bank's mean, one far off (flagged: not proposed)
    with server.client() as client:
        assert client.get("/v1/banks/line/refresh").json()["candidates"] == []
        for i, level in enumerate(levels):
            files = {"image": (f"p{i}.png", grey_png(level), "image/png")}
            assert client.post("/v1/inspect", files=files, data={"bank": "line"}).status_code == 200
        assert len(list((tmp_path / KEPT_DIR).iterdir())) == 4  # every inspected image kept, by its sha256

        proposal = client.get("/v1/banks/line/refresh").json()
        assert proposal["keeping"] is True and proposal["margin"] == 0.8
        assert [c["image_name"] for c in proposal["candidates"]] == ["p2.png", "p1.png", "p0.png"]
        assert all(c["reason"] == "margin" and c["score"] <= 0.8 * c["tau"] for c in proposal["candidates"])
        assert len(client.get("/v1/banks/line/refresh", params={"count": 1}).json()["candidates"]) == 1

        flagged = hashlib.sha256(grey_png(200)).hexdigest()
        assert_error(client.post("/v1/banks/line/refresh", json={"image_sha256": [flagged]}), 409, "invalid_refresh")
        assert client.post("/v1/banks/line/refresh", json={"image_sha256": []}).status_code == 422
        app.state.service.jobs.active_for = lambda name: True  # a build of this bank is running
        chosen = [c["image_sha256"] for c in proposal["candidates"][:2]]
        assert_error(client.post("/v1/banks/line/refresh", json={"image_sha256": chosen}), 409, "bank_busy")
        del app.state.service.jobs.active_for

        taught = client.post("/v1/banks/line/refresh", json={"image_sha256": chosen})
        assert taught.status_code == 200, taught.text
        body = taught.json()
        assert [c["image_name"] for c in body["taught"]] == ["p2.png", "p1.png"]
        assert body["result"]["version"] == body["result"]["version_before"] + 1
        assert body["result"]["references_after"] == body["result"]["references_before"] + 2
        assert client.get("/v1/banks/line/refresh").json()["candidates"] == []  # the new version's history is empty
        assert read_refresh_log(tmp_path)[-1]["approved_by"] == "api"

        assert_error(client.get("/v1/banks/nothing/refresh"), 404, "bank_not_found")
        with server.client(token=None) as anonymous:
            assert anonymous.get("/v1/banks/line/refresh").status_code == 401
            assert anonymous.post("/v1/banks/line/refresh", json={"image_sha256": chosen}).status_code == 401


def test_the_api_keeps_nothing_when_keeping_is_off(tmp_path):
    pipeline, settings = fake_line(tmp_path, keep=False)
    server = LiveServer(create_app(pipeline, settings)).start()
    try:
        with server.client() as client:
            files = {"image": ("p.png", grey_png(GREY), "image/png")}
            assert client.post("/v1/inspect", files=files, data={"bank": "line"}).status_code == 200
            proposal = client.get("/v1/banks/line/refresh").json()
    finally:
        server.stop()
    assert proposal["keeping"] is False and proposal["candidates"] == []
    assert not (tmp_path / KEPT_DIR).exists()


# -- the app -----------------------------------------------------------------------------------------------------
def app_pipeline(tmp_path: Path, *, keep: bool) -> FakePipeline:
    pipeline, settings = fake_line(tmp_path, keep=keep)
    pipeline.settings = settings  # the app reads the real pipeline's settings
    return pipeline


def app_inspect(pipeline: FakePipeline, path: Path) -> None:
    for _ in handlers.inspect(
        pipeline, str(path), "line", "full", "auto", 0.5, False, False, False, lambda *a, **k: None
    ):
        pass


def test_the_app_proposes_shows_and_teaches_on_approval(tmp_path):
    pipeline = app_pipeline(tmp_path, keep=True)
    for i, level in enumerate((127, 128, 129)):
        path = tmp_path / f"shot{i}.png"
        path.write_bytes(grey_png(level))
        app_inspect(pipeline, path)
    text, gallery, rows, proposed = health_refresh.propose_refresh(pipeline, "line")
    assert text.startswith("**3 candidate(s)** for bank 'line'")
    assert [label for _, label in gallery] == ["shot2.png", "shot1.png", "shot0.png"]
    assert gallery[0][0].shape == (16, 16, 3) and int(gallery[0][0][0, 0, 0]) == 129
    assert [row[1] for row in rows] == ["shot2.png", "shot1.png", "shot0.png"] and len(rows[0]) == 5
    before = pipeline.banks.history("line")[-1].version

    done, gallery_after, rows_after, proposal_after = health_refresh.approve_refresh(
        pipeline, "line", proposed, lambda *a, **k: None
    )
    assert gallery_after == rows_after == [] and proposal_after is None  # what was taught is no longer shown
    assert f"version {before} → {before + 1}" in done and "references" in done
    assert pipeline.banks.history("line")[-1].version == before + 1
    assert health_refresh.propose_refresh(pipeline, "line")[2] == []
    with pytest.raises(Exception, match="Propose a refresh first"):
        health_refresh.approve_refresh(pipeline, "line", None, lambda *a, **k: None)
    with pytest.raises(Exception, match="not proposed"):  # the shown proposal is stale: the bank changed since
        health_refresh.approve_refresh(pipeline, "line", proposed, lambda *a, **k: None)


def test_the_app_with_keeping_off_offers_to_teach_the_image_on_screen(tmp_path):
    pipeline = app_pipeline(tmp_path, keep=False)
    path = tmp_path / "shot.png"
    path.write_bytes(grey_png(GREY))
    app_inspect(pipeline, path)
    text, gallery, rows, proposed = health_refresh.propose_refresh(pipeline, "line")
    assert text == health_refresh.KEEPING_OFF and (gallery, rows, proposed) == ([], [], None)
    assert not (tmp_path / KEPT_DIR).exists()
    before = pipeline.banks.history("line")[-1].version
    done = health_refresh.teach_shown_image(pipeline, str(path), "line", lambda *a, **k: None)
    assert done.startswith("**Bank 'line' taught**") and "shot.png" in done
    assert pipeline.banks.history("line")[-1].version == before + 1


# -- the command line, with the real pipeline --------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _restore_logging():
    """``eagle.cli.main`` points the root logger at the (captured) stderr of its test: undo it afterwards."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    root.handlers[:] = saved
    root.setLevel(level)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_command_line_proposes_teaches_and_rolls_back(tmp_path, monkeypatch, capsys):
    images = train_and_good_images(tmp_path / "set")
    data_dir = tmp_path / "data"
    for key, value in real_env(data_dir, EAGLE_KEEP_IMAGES__ENABLED="true").items():
        if key.startswith("EAGLE_"):
            monkeypatch.setenv(key, value)
    folder = tmp_path / "normals"
    folder.mkdir()
    for path in images["train"]:
        (folder / path.name).write_bytes(path.read_bytes())
    code, _, err = run(capsys, "build-bank", "--normals", str(folder), "--name", "widget", "--no-progress")
    assert code == 0, err

    settings = real_settings(data_dir)
    settings.keep_images.enabled = True
    pipeline = Pipeline(settings)
    with AuditLog(default_audit_path(settings)) as audit:  # inspected and kept as the front ends do
        for i, path in enumerate(images["good"]):
            result = pipeline.inspect(path.read_bytes(), "widget", image_name=path.name)
            audit.record(result, source="watch", run_id=f"run{i}")
            assert keep_inspected_image(settings, result.image_sha256, path.read_bytes())
            if result.verdict == "defect":
                audit.record_feedback(f"run{i}", "overruled", operator="qa")
            else:
                audit.record_feedback(f"run{i}", "confirmed", operator="qa")
    assert len(KeptImages.of(settings).list()) == 3

    code, out, err = run(capsys, "bank", "refresh", "widget", "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("bank 'widget' (bank id ") and lines[0].endswith("3 candidates")
    assert [line.split()[1] for line in lines[1:]] == [p.name for p in reversed(images["good"])]
    assert all("an operator said no defect" in line for line in lines[1:])

    code, _, err = run(capsys, "bank", "refresh", "widget")  # not a terminal and no --yes: nothing taught
    assert code == 2 and "--yes" in err
    code, _, err = run(capsys, "bank", "refresh", "widget", "--auto")
    assert code == 2 and "EAGLE_KEEP_IMAGES__AUTO_REFRESH" in err

    code, out, err = run(capsys, "bank", "refresh", "widget", "--yes", "--json", "--no-progress")
    assert code == 0, err
    answer = json.loads(out)
    assert len(answer["proposal"]["candidates"]) == 3
    assert (answer["taught"]["version_before"], answer["taught"]["version"]) == (1, 2)
    assert answer["taught"]["references_after"] == answer["taught"]["references_before"] + 3
    code, out, _ = run(capsys, "bank", "history", "widget", "--json")
    assert [(v["version"], v["action"], v["current"]) for v in json.loads(out)] == [
        (1, "build", False),
        (2, "teach", True),
    ]
    code, out, _ = run(capsys, "bank", "refresh", "widget", "--dry-run", "--json")
    assert json.loads(out)["proposal"]["candidates"] == []  # version 2 has no inspections yet

    code, _, err = run(capsys, "bank", "rollback", "widget", "1")
    assert code == 0, err
    code, out, _ = run(capsys, "bank", "refresh", "widget", "--dry-run", "--json")
    assert len(json.loads(out)["proposal"]["candidates"]) == 3  # version 1's line history again

    monkeypatch.setenv("EAGLE_KEEP_IMAGES__AUTO_REFRESH", "true")
    code, out, err = run(capsys, "bank", "refresh", "widget", "--auto", "--json", "--no-progress", "--count", "1")
    assert code == 0, err
    assert json.loads(out)["taught"]["references_after"] == json.loads(out)["taught"]["references_before"] + 1
    assert [entry["approved_by"] for entry in read_refresh_log(data_dir)] == ["cli", "auto"]
    code, _, err = run(capsys, "bank", "refresh", "nothing", "--yes")
    assert code == 2 and "no bank named 'nothing'" in err
