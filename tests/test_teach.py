"""Teach the bank end to end: `eagle bank add|history|rollback`, `POST /v1/banks/{name}/references`.

The service runs on a real uvicorn with the real (random-weight, 32 × 32) pipeline; the CLI works on the same data
directory next to it, as on a line's box: the running service picks up every new version without a restart.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from deploy.api import create_app
from eagle.cli import main
from eagle.pipeline import Pipeline
from tests.service_helpers import LiveServer, assert_error, real_env, real_settings
from tests.synthetic import train_and_good_images

BANK = "widget"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    return train_and_good_images(tmp_path_factory.mktemp("teach-data"))


@pytest.fixture(autouse=True)
def _restore_logging():
    """``eagle.cli.main`` points the root logger at the (captured) stderr of its test: undo it afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    data_dir = tmp_path / "data"
    for key, value in real_env(data_dir).items():
        if key.startswith("EAGLE_"):
            monkeypatch.setenv(key, value)
    return data_dir


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_add_history_rollback(env, images, capsys, tmp_path):
    folder = tmp_path / "normals"
    folder.mkdir()
    for path in images["train"]:
        (folder / path.name).write_bytes(path.read_bytes())
    code, _, err = run(capsys, "build-bank", "--normals", str(folder), "--name", BANK, "--no-progress")
    assert code == 0, err

    code, out, err = run(capsys, "bank", "add", BANK, str(images["good"][0]), "--json", "--no-progress")
    assert code == 0, err
    change = json.loads(out)
    assert (change["version_before"], change["version"]) == (1, 2)
    assert (change["references_before"], change["references_after"]) == (6, 7)
    assert change["taught"][0]["name"] == images["good"][0].name and "passes_now" in change["taught"][0]

    taught = tmp_path / "more"
    taught.mkdir()
    for path in images["good"][1:]:
        (taught / f"more-{path.name}").write_bytes(path.read_bytes())
    code, out, err = run(capsys, "bank", "add", BANK, str(taught), "--no-progress")  # a folder of images
    assert code == 0, err
    assert "version 2 → 3" in out and "references 7 → 9" in out and "τ " in out and "more-" in out

    code, out, err = run(capsys, "bank", "history", BANK, "--json")
    assert code == 0, err
    history = json.loads(out)
    assert [(v["version"], v["current"], v["n_references"], v["action"]) for v in history] == [
        (1, False, 6, "build"),
        (2, False, 7, "teach"),
        (3, True, 9, "teach"),
    ]
    assert all(isinstance(v["tau"], float) and v["created"] for v in history)
    assert history[1]["tau"] == pytest.approx(change["tau_after"])

    code, out, _ = run(capsys, "bank", "history", BANK)
    assert code == 0 and "*       3" in out and "teach" in out

    code, _, err = run(capsys, "bank", "rollback", BANK, "1")
    assert code == 0 and "version 1" in err
    code, out, _ = run(capsys, "bank", "show", BANK, "--json")
    assert json.loads(out)["n_references"] == 6

    code, _, err = run(capsys, "bank", "rollback", BANK, "7")
    assert code == 2 and "no version 7" in err and "\n" not in err.strip()
    code, _, err = run(capsys, "bank", "add", "nope", str(images["good"][0]), "--no-progress")
    assert code == 2 and "no bank named 'nope'" in err
    code, _, err = run(capsys, "bank", "add", BANK, str(tmp_path / "missing.png"), "--no-progress")
    assert code == 2 and "missing.png" in err


@pytest.fixture
def live(tmp_path, images):
    settings = real_settings(tmp_path / "data")
    pipeline = Pipeline(settings)
    pipeline.build_bank(images["train"], BANK)
    server = LiveServer(create_app(pipeline, settings)).start()
    yield server, pipeline, settings
    server.stop()


def _inspect(client, path: Path) -> dict:
    response = client.post(
        "/v1/inspect",
        files={"image": (path.name, path.read_bytes(), "image/png")},
        data={"bank": BANK, "use_mllm": "false"},
    )
    assert response.status_code == 200, response.text
    return response.json()["result"]


def test_api_teach_and_the_service_picks_up_every_version(live, images, monkeypatch, capsys):
    server, pipeline, settings = live
    first = pipeline.banks.summary(BANK)
    with server.client() as client:
        before = _inspect(client, images["good"][0])
        assert before["bank_id"] == first.bank_id

        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in images["good"][:2]]
        response = client.post(f"/v1/banks/{BANK}/references", files=files)
        assert response.status_code == 200, response.text
        change = response.json()
        assert (change["version_before"], change["version"]) == (1, 2)
        assert change["references_after"] == 8 and len(change["taught"]) == 2
        assert change["tau_before"] == pytest.approx(first.tau)
        assert change["taught"][0]["score_before"] == pytest.approx(before["score"], rel=1e-5)

        after = _inspect(client, images["good"][0])  # no restart: the new version answers
        assert after["bank_id"] != first.bank_id and after["tau"] == pytest.approx(change["tau_after"])
        assert after["score"] == pytest.approx(change["taught"][0]["score_after"], rel=1e-5)

        versions = client.get(f"/v1/banks/{BANK}/versions").json()["versions"]
        assert [(v["version"], v["current"]) for v in versions] == [(1, False), (2, True)]

        # a change made next to the service by the CLI is picked up too
        for key, value in real_env(Path(settings.data_dir)).items():
            if key.startswith("EAGLE_"):
                monkeypatch.setenv(key, value)
        assert main(["bank", "rollback", BANK, "1"]) == 0
        capsys.readouterr()
        assert _inspect(client, images["good"][0])["bank_id"] == first.bank_id

        # ... and so is a rollback through the API
        rolled = client.post(f"/v1/banks/{BANK}/rollback", json={"version": 2})
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["version"] == 2 and rolled.json()["bank"]["bank_id"] == after["bank_id"]
        assert _inspect(client, images["good"][0])["bank_id"] == after["bank_id"]
        assert_error(client.post(f"/v1/banks/{BANK}/rollback", json={"version": 9}), 404, "bank_version_not_found")
        assert_error(client.post(f"/v1/banks/{BANK}/rollback", json={"version": 0}), 422, "invalid_request")
        assert_error(client.post("/v1/banks/nope/rollback", json={"version": 1}), 404, "bank_not_found")
        assert main(["bank", "rollback", BANK, "1"]) == 0
        capsys.readouterr()

        assert_error(client.post("/v1/banks/nope/references", files=files), 404, "bank_not_found")
        assert_error(client.post("/v1/banks/a..b/references", files=files), 422, "invalid_bank_name")
        bad = [("images", ("bad.png", b"not an image", "image/png"))]
        body = assert_error(client.post(f"/v1/banks/{BANK}/references", files=bad), 422, "invalid_image")
        assert "bad.png" in body["error"]["message"]
        assert pipeline.banks.current_version(BANK) == 1  # nothing changed
        assert_error(client.get("/v1/banks/nope/versions"), 404, "bank_not_found")


def test_the_teach_route_has_the_upload_body_limit_not_the_small_default():
    from deploy.middleware import route_value

    table = {("POST", "/v1/inspect"): "upload", ("POST", "/v1/banks/{name}/references"): "teach"}
    assert route_value(table, "POST", "/v1/banks/line-3/references", "small") == "teach"
    assert route_value(table, "POST", "/v1/inspect", "small") == "upload"
    for method, path in (
        ("GET", "/v1/banks/line-3/references"),
        ("POST", "/v1/banks//references"),
        ("POST", "/v1/banks/a/b/references"),
        ("POST", "/v1/banks/line-3"),
    ):
        assert route_value(table, method, path, "small") == "small"
