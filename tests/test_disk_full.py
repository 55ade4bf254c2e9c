"""A full disk (ENOSPC / EDQUOT) is its own failure: code disk_full, HTTP 507, CLI exit 3, audit rows held."""

from __future__ import annotations

import errno
import io
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from eagle.banks import BankStore
from eagle.errors import EXIT_DISK_FULL, DiskFullError, as_eagle_error, describe, is_disk_full
from eagle.settings import ExpertSettings
from expert.bank_schema import BankError


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT])
def test_oserror_maps_to_disk_full_507(number):
    info = describe(OSError(number, "No space left on device", "/data/banks/x/bank.safetensors"))
    assert info is not None and (info.code, info.http_status) == ("disk_full", 507)
    assert "/data/banks/x/bank.safetensors" in info.message and "\n" not in info.message


def test_wrapped_and_sqlite_full_disk_are_recognised():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise BankError("cannot write the bank") from err
    except BankError as wrapped:
        assert describe(wrapped).code == "disk_full"
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert describe(OSError(errno.EACCES, "Permission denied")) is None  # still a bug, not a full disk


def test_cli_exit_code_for_a_full_disk():
    assert as_eagle_error(DiskFullError("the disk is full")).exit_code == EXIT_DISK_FULL == 3
    assert as_eagle_error(BankError("bad bank")).exit_code == 2


def test_full_disk_during_a_version_write_leaves_nothing(tmp_path):
    store = BankStore(tmp_path / "banks", ExpertSettings())

    def write(directory):
        (directory / "references").mkdir()
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "bank.safetensors"))

    with pytest.raises(OSError) as caught:
        store.write_version("widget", write, action="build")
    assert describe(caught.value).code == "disk_full"
    assert not store.exists("widget") and not (tmp_path / "banks" / ".versions" / "widget").exists()


def test_audit_rows_are_held_while_the_disk_is_full_and_written_after(tmp_path, caplog):
    from eagle.audit import AuditLog

    log = AuditLog(tmp_path / "audit.sqlite3")
    real = log._conn
    full = sqlite3.OperationalError("database or disk is full")

    class FullConnection:  # the database refuses writes, as SQLite does on a full disk
        def execute(self, *args, **kwargs):
            raise full

        def rollback(self):
            real.rollback()

    log._conn = FullConnection()
    kwargs = dict(source="api", image_name="a.png", image_sha256="0" * 64, bank="widget", error_code="disk_full")
    assert log.record_failure(run_id="r1", error_message="the disk is full", **kwargs)
    assert log.pending == 1 and "held in memory" in caplog.text
    log._conn = real
    assert log.record_failure(run_id="r2", error_message="the disk is full", **kwargs)
    assert log.pending == 0 and [r["run_id"] for r in log.query()] == ["r1", "r2"]
    log.close()


def test_real_full_tmpfs_maps_to_disk_full(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root / CAP_SYS_ADMIN)")
    try:
        store = BankStore(mount / "banks", ExpertSettings())

        def write(directory):
            (directory / "bank.safetensors").write_bytes(b"\0" * (2 * 1024 * 1024))

        with pytest.raises(OSError) as caught:
            store.write_version("widget", write, action="build")
        assert describe(caught.value).code == "disk_full"
        assert not store.exists("widget") and list((mount / "banks").iterdir()) in ([], [mount / "banks" / ".versions"])
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------------------------------------------------------- the service (API)


def _no_space(path: object) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def _half_written_tensors(tensors, filename, metadata=None):
    """``safetensors.numpy.save_file`` on a disk that fills up half-way through the file."""
    Path(filename).write_bytes(b"\0" * 4096)
    raise _no_space(filename)


def _tree(root: Path) -> list[str]:
    """Every file, folder and link under ``root`` (relative)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A live service on a copy of the shared real bank's data folder (random-weight expert, 32 px input)."""
    from deploy.api import create_app
    from eagle.audit import AuditLog
    from eagle.pipeline import Pipeline
    from tests.service_helpers import LiveServer, real_bank, real_settings

    built = real_bank()
    data = tmp_path_factory.mktemp("disk-full-service") / "data"
    subprocess.run(["cp", "-a", str(built.data_dir), str(data)], check=True)  # keeps the ONNX hard links
    shutil.rmtree(data / "jobs", ignore_errors=True)
    settings = real_settings(data)
    audit = AuditLog(tmp_path_factory.mktemp("disk-full-audit") / "audit.sqlite3")
    pipeline = Pipeline(settings)
    server = LiveServer(create_app(pipeline, settings, audit=audit)).start()
    yield SimpleNamespace(server=server, pipeline=pipeline, audit=audit, data=data, good=built.good)
    server.stop()
    audit.close()


def _assert_disk_full(response, image: bytes) -> str:
    from tests.service_helpers import assert_error

    message = assert_error(response, 507, "disk_full")["error"]["message"]
    assert message.startswith("the disk is full") and message.endswith("nothing was changed; free space and retry")
    assert image[:64].hex() not in response.text and "\\x89PNG" not in response.text and "IHDR" not in response.text
    return message


def test_teach_on_a_full_disk_answers_507_and_leaves_nothing(service, monkeypatch, caplog):
    import expert.bank

    banks = service.data / "banks"
    before, version = _tree(banks), service.pipeline.banks.current_version("widget")
    image = service.good[0].read_bytes()
    monkeypatch.setattr(expert.bank, "save_file", _half_written_tensors)
    with caplog.at_level("ERROR", logger="deploy.api"), service.server.client() as client:
        response = client.post("/v1/banks/widget/references", files=[("images", ("good.png", image, "image/png"))])
    message = _assert_disk_full(response, image)
    assert ".safetensors" in message and str(banks) in message  # where it happened: a path of the bank
    assert _tree(banks) == before and service.pipeline.banks.current_version("widget") == version
    assert f"POST /v1/banks/widget/references answered 507: {message}" in caplog.text


def test_build_on_a_full_disk_answers_507_or_fails_its_job_with_disk_full(service, monkeypatch):
    import deploy.api
    import expert.bank
    from tests.service_helpers import zip_bytes

    archive = zip_bytes({f"good/{p.name}": p.read_bytes() for p in service.good})
    jobs, banks = service.data / "jobs", service.data / "banks"
    before = _tree(banks)

    def staged_half(upload, dest):  # the upload does not fit where it is staged
        Path(dest).write_bytes(b"\0" * 1024)
        raise _no_space(dest)

    with service.server.client() as client:
        with monkeypatch.context() as patch:
            patch.setattr(deploy.api, "_copy_upload", staged_half)
            response = client.post("/v1/banks", data={"name": "fresh"}, files={"archive": ("good.zip", archive)})
        _assert_disk_full(response, archive)
        assert [p for p in jobs.iterdir() if p.is_dir()] == []  # the staged upload is gone

        monkeypatch.setattr(expert.bank, "save_file", _half_written_tensors)  # the bank itself does not fit
        response = client.post("/v1/banks", data={"name": "fresh"}, files={"archive": ("good.zip", archive)})
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 120
        while (job := client.get(f"/v1/jobs/{response.json()['id']}").json())["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
    assert job["state"] == "failed" and job["error"]["code"] == "disk_full", job
    assert job["error"]["message"].startswith("the disk is full while writing ")
    # only the bank's (empty) writer lock file is new: locks stay, so that no two writers ever hold different ones
    assert sorted(set(_tree(banks)) - set(before)) == [".versions/.locks/fresh.lock"]
    assert set(before) <= set(_tree(banks)) and not service.pipeline.banks.exists("fresh")
    assert [p for p in jobs.iterdir() if p.is_dir()] == []


def test_inspect_whose_upload_cannot_be_spooled_answers_507_and_is_audited(service, monkeypatch):
    import tempfile

    import starlette.formparsers

    class FullSpool(tempfile.SpooledTemporaryFile):
        def rollover(self):  # an upload over 1 MB moves to a temporary file on disk: that disk is full
            raise _no_space(tempfile.gettempdir())

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(buffer, format="PNG")
    image = buffer.getvalue()
    assert len(image) > 1024 * 1024
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", FullSpool)
    with service.server.client() as client:
        response = client.post("/v1/inspect", files={"image": ("big.png", image, "image/png")}, data={"bank": "widget"})
    _assert_disk_full(response, image)
    rows = service.audit.query()
    row = next(r for r in rows if r["run_id"] == response.headers["x-request-id"])
    assert (row["status"], row["error_code"]) == ("error", "disk_full")


def test_inspect_while_the_audit_disk_is_full_answers_and_audits_when_space_returns(service):
    audit = service.audit
    real = audit._conn

    class FullConnection:  # SQLite refuses every write, as on a full disk
        def execute(self, *args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")

        def rollback(self):
            real.rollback()

    image = service.good[1].read_bytes()
    with service.server.client() as client:
        with audit._lock:
            audit._conn = FullConnection()
        try:
            first = client.post("/v1/inspect", files={"image": ("a.png", image, "image/png")}, data={"bank": "widget"})
            assert first.status_code == 200, first.text  # the inspection itself needs no space
            assert audit.pending == 1
        finally:
            with audit._lock:
                audit._conn = real
        second = client.post("/v1/inspect", files={"image": ("b.png", image, "image/png")}, data={"bank": "widget"})
        assert second.status_code == 200, second.text
    assert audit.pending == 0
    run_ids = [r["run_id"] for r in audit.query()]
    assert run_ids.index(first.json()["request_id"]) < run_ids.index(second.json()["request_id"])


def _fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte (unbuffered writes); returns the filler file."""
    import os

    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1024 * 1024, 65536, 4096, 512, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError as err:
                assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def _onnx_cache_inside(data: Path, shared: Path) -> Path:
    """``<data>/cache/onnx`` holding the bank's graph as ``shared`` files it: a hard link, no second ~95 MB copy.

    The data folder then holds everything (the default cache folder), so that a bank version written there links
    the cached graph instead of copying it in from the run's shared cache on another filesystem.
    """
    import json
    import os

    from expert.bank import file_sha256

    graph = (data / "banks" / "widget" / "backbone.onnx").resolve()
    sha = file_sha256(graph)
    sidecar = next(p for p in shared.glob("*.json") if json.loads(p.read_text())["sha256"] == sha)
    local = data / "cache" / "onnx"
    local.mkdir(parents=True, exist_ok=True)
    if not (local / sidecar.name).exists():  # already copied in when the shared cache is the data dir's own
        os.link(graph, local / f"{sidecar.stem}.onnx")
        shutil.copyfile(sidecar, local / sidecar.name)
    return local


def test_service_on_a_really_full_tmpfs(tmp_path):
    """The data folder on a 128 MB tmpfs filled to the last byte: teach 507, inspect answers and its row waits."""
    from deploy.api import create_app
    from eagle.audit import AuditLog
    from eagle.pipeline import Pipeline
    from tests.service_helpers import LiveServer, real_bank, real_settings

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root / CAP_SYS_ADMIN)")
    server = audit = None
    try:
        built = real_bank()
        data = mount / "data"
        subprocess.run(["cp", "-a", str(built.data_dir), str(data)], check=True)  # ~96 MB: the ONNX graph
        shutil.rmtree(data / "jobs", ignore_errors=True)
        settings = real_settings(data)
        settings.onnx_cache_dir = _onnx_cache_inside(data, real_settings(built.data_dir).onnx_cache_path)
        audit = AuditLog(data / "audit-full.sqlite3")
        pipeline = Pipeline(settings)
        server = LiveServer(create_app(pipeline, settings, audit=audit)).start()
        banks = data / "banks"
        image = built.good[0].read_bytes()
        with server.client() as client:
            assert (
                client.post("/v1/inspect", files={"image": ("w.png", image)}, data={"bank": "widget"}).status_code
                == 200
            )
            before, version = _tree(banks), pipeline.banks.current_version("widget")
            filler = _fill(mount)
            taught = client.post("/v1/banks/widget/references", files=[("images", ("good.png", image, "image/png"))])
            _assert_disk_full(taught, image)
            assert _tree(banks) == before and pipeline.banks.current_version("widget") == version
            first = client.post("/v1/inspect", files={"image": ("a.png", image)}, data={"bank": "widget"})
            assert first.status_code == 200, first.text
            assert audit.pending == 1  # SQLite could not write the row: held in memory
            filler.unlink()  # space returns
            second = client.post("/v1/inspect", files={"image": ("b.png", image)}, data={"bank": "widget"})
            assert second.status_code == 200 and audit.pending == 0
            taught = client.post("/v1/banks/widget/references", files=[("images", ("good.png", image, "image/png"))])
            assert taught.status_code == 200, taught.text
        run_ids = [r["run_id"] for r in audit.query()]
        assert first.json()["request_id"] in run_ids and second.json()["request_id"] in run_ids
        assert pipeline.banks.current_version("widget") == version + 1
    finally:
        if server is not None:
            server.stop()
        if audit is not None:
            audit.close()
        subprocess.run(["umount", "-l", str(mount)], check=False)
