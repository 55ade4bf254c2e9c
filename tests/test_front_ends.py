"""One pipeline for every front end: the app, the HTTP API and the folder watcher agree.

Regression tests for: the same photo getting another ``image_sha256`` in the app than in the API and the
watcher; an MLLM that cannot be loaded answered expert-only by the app but ``500`` by the API; ``eagle watch
--bank a..b`` ending in a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
from pathlib import Path

import gradio as gr
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app import handlers
from deploy.api import create_app
from deploy.watch import FolderWatcher
from eagle import cli
from eagle.audit import AuditLog
from eagle.errors import one_line
from eagle.images import image_sha256, load_image
from eagle.models import MLLMUnavailableError
from eagle.pipeline import InspectionPipeline, Pipeline
from eagle.records import InspectOptions
from tests.fake_pipeline import FakePipeline
from tests.fixtures_pipeline import BANK, pipeline_settings, split_test_images


def _no_progress(*args, **kwargs) -> None:
    return None


def _app_inspect(pipeline: Pipeline, photo: Path, monkeypatch, *, use_mllm: bool = False):
    """Run the app's Inspect button; returns the InspectionResult it rendered."""
    rendered = []
    monkeypatch.setattr(handlers, "_render", lambda result, *_: rendered.append(result) or ("",) * 10)
    outputs = handlers.inspect(pipeline, str(photo), BANK, "full", "auto", 0.6, False, use_mllm, False, _no_progress)
    list(outputs)
    return rendered[0]


def _api_inspect(pipeline: Pipeline, photo: Path, tmp_path: Path, **fields):
    with AuditLog(tmp_path / "api-audit.sqlite3") as audit:
        app = create_app(pipeline, pipeline.settings, audit=audit)
        with TestClient(app) as client:
            return client.post(
                "/v1/inspect", files={"image": (photo.name, photo.read_bytes())}, data={"bank": BANK, **fields}
            )


def _watch_once(pipeline: Pipeline, photo: Path, tmp_path: Path):
    """Drop ``photo`` into a watched folder and run the watcher once; returns (outcomes, out folder)."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    (incoming / photo.name).write_bytes(photo.read_bytes())
    with AuditLog(tmp_path / "watch-audit.sqlite3") as audit:
        watcher = FolderWatcher(pipeline, incoming, out, BANK, audit=audit, poll_s=0.01)
        watcher.open()
        try:
            return watcher.run(threading.Event(), once=True), out
        finally:
            watcher.close()


@pytest.fixture
def photo(built_pipeline, tmp_path) -> Path:
    """A JPEG "photo" of a part: its file bytes differ from any re-encoding of its decoded pixels."""
    path = tmp_path / "photo.jpg"
    Image.open(built_pipeline.references[0]).convert("RGB").save(path, format="JPEG", quality=90)
    return path


def test_one_photo_has_one_sha256_in_the_app_the_api_and_the_watcher(built_pipeline, photo, tmp_path, monkeypatch):
    pipeline = built_pipeline.pipeline
    expected = hashlib.sha256(photo.read_bytes()).hexdigest()

    from_app = _app_inspect(pipeline, photo, monkeypatch)

    response = _api_inspect(pipeline, photo, tmp_path)
    assert response.status_code == 200, response.text
    from_api = response.json()["result"]

    outcomes, out = _watch_once(pipeline, photo, tmp_path)
    assert [o.status for o in outcomes] == ["done"]
    from_watcher = json.loads(outcomes[0].record.read_text())

    assert from_app.image_sha256 == from_api["image_sha256"] == from_watcher["image_sha256"] == expected
    assert from_app.score == pytest.approx(from_api["score"]) == pytest.approx(from_watcher["score"])
    # A decoded array has no file behind it: its hash is of its pixels, as eagle.images.image_sha256 defines.
    pixels = load_image(photo, max_pixels=10**8)
    assert pipeline.inspect(pixels, BANK).image_sha256 == image_sha256(pixels) != expected


def test_an_mllm_that_cannot_load_is_one_error_in_the_pipeline_the_api_and_the_app(
    built_pipeline, photo, tmp_path, monkeypatch
):
    settings = pipeline_settings(built_pipeline.pipeline.settings.data_dir, model_id=str(tmp_path / "no-such-model"))
    broken = Pipeline(settings)

    with pytest.raises(MLLMUnavailableError) as caught:
        broken.inspect(photo, BANK)
    err = caught.value
    assert (err.code, err.http_status) == ("mllm_unavailable", 503)
    assert "no-such-model" in str(err) and "use_mllm=false" in str(err)
    assert broken.inspect(photo, BANK, InspectOptions(use_mllm=False)).mode == "expert-only"  # asked for: fine

    response = _api_inspect(broken, photo, tmp_path)
    assert response.status_code == 503
    body = response.json()["error"]
    assert body["code"] == "mllm_unavailable" and body["message"] == one_line(err)

    with pytest.raises(gr.Error) as shown:
        _app_inspect(broken, photo, monkeypatch, use_mllm=True)
    assert shown.value.message == one_line(err)  # the same words as the API, no silent expert-only answer


@pytest.mark.parametrize("bank", ["a..b", "bolts\n", "../x"])
def test_watch_with_a_bad_bank_name_is_one_line_not_a_traceback(tmp_path, monkeypatch, bank):
    monkeypatch.setenv("EAGLE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EAGLE_MLLM__ENABLED", "false")
    (tmp_path / "in").mkdir()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["watch", "--in", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--bank", bank])
    assert code == 2 and out.getvalue() == ""
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eagle watch: error: invalid bank name"), err.getvalue()


def test_the_real_and_the_fake_pipeline_share_one_protocol(built_pipeline):
    assert isinstance(built_pipeline.pipeline, InspectionPipeline)
    assert isinstance(FakePipeline(banks=["widget"]), InspectionPipeline)


def test_an_unreadable_image_is_the_same_error_in_the_app_the_api_and_the_watcher(
    built_pipeline, tmp_path, monkeypatch
):
    pipeline = built_pipeline.pipeline
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")

    response = _api_inspect(pipeline, bad, tmp_path)
    assert response.status_code == 422
    from_api = response.json()["error"]
    assert from_api["code"] == "invalid_image"

    with pytest.raises(gr.Error) as shown:
        _app_inspect(pipeline, bad, monkeypatch)

    incoming = tmp_path / "in"
    incoming.mkdir()
    (incoming / bad.name).write_bytes(bad.read_bytes())
    with AuditLog(tmp_path / "watch-audit.sqlite3") as audit:
        watcher = FolderWatcher(pipeline, incoming, tmp_path / "out", BANK, audit=audit, poll_s=0.01)
        watcher.open()
        try:
            (outcome,) = watcher.run(threading.Event(), once=True)
        finally:
            watcher.close()
    from_watcher = json.loads(outcome.record.read_text())["error"]

    assert from_watcher["code"] == from_api["code"] == "invalid_image"
    assert shown.value.message == from_api["message"] == from_watcher["message"]


def test_one_annotated_picture_in_the_app_the_api_and_the_watcher(built_pipeline, synthetic_root, tmp_path):
    """The app's heatmap panel, the API's annotated PNG and the watcher's .annotated.png are one picture."""
    import base64

    import numpy as np

    pipeline = built_pipeline.pipeline
    photo = split_test_images(synthetic_root)[1][0]  # a defective part: the picture carries red boxes

    app_outputs = next(
        iter(handlers.inspect(pipeline, str(photo), BANK, "full", "auto", 0.6, False, False, False, _no_progress))
    )
    from_app = np.asarray(app_outputs[2])

    response = _api_inspect(pipeline, photo, tmp_path, annotated="true")
    assert response.status_code == 200, response.text
    assert response.json()["result"]["boxes"], "a defective part should get at least one box"
    png = base64.b64decode(response.json()["annotated_png"])
    from_api = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    _, out = _watch_once(pipeline, photo, tmp_path)
    from_watcher = np.asarray(Image.open(out / f"{photo.stem}.annotated.png").convert("RGB"))

    assert from_app.shape == from_api.shape == from_watcher.shape
    assert np.array_equal(from_app, from_api) and np.array_equal(from_api, from_watcher)
    red = (from_api[..., 0] == 255) & (from_api[..., 1] == 0) & (from_api[..., 2] == 0)
    assert red.any(), "the boxes are drawn in pure red"
