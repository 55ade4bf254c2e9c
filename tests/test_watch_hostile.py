"""The watched folder against hostile and slow writers: links, pipes, devices, secrets, and writers that pause.

Nothing outside the folder is read or echoed: links (to a secret file, an image elsewhere, a folder), hard links,
pipes, sockets and devices are moved to failed/ unread with code ``not_a_regular_file``; a text file holding a
secret is failed as "a text file" and the secret appears in no output, audit row or log, from the watcher, the
API or the CLI. A writer that pauses gets its image inspected, not failed as truncated.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from deploy.api import create_app
from deploy.watch import FolderWatcher, UnsafeFolderError
from eagle.audit import AuditLog
from eagle.settings import Settings
from tests.cli_helpers import run_cli
from tests.fake_pipeline import FakePipeline
from tests.service_helpers import TOKEN, LiveServer, png_bytes, real_bank, real_env
from tests.test_service_watch import make_watcher, names

CANARY = "SECRET-CANARY-123"
SECRET = f"root:{CANARY}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"


def run_bounded(watcher: FolderWatcher, seconds: float = 20.0):
    """``watcher.run(once=True)`` in a thread: a pipe opened by mistake would block for ever; fail instead."""
    result: dict = {}

    def target() -> None:
        watcher.open()
        try:
            result["outcomes"] = watcher.run(threading.Event(), once=True)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = exc
        finally:
            watcher.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the watcher blocked (it opened a pipe?)"
    if "error" in result:
        raise result["error"]
    return result["outcomes"]


def everything_written(tmp_path: Path) -> bytes:
    """The bytes of every regular file the watcher wrote: out/, the audit database (and its WAL), failed/'s own."""
    blobs = [p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()]
    blobs += [p.read_bytes() for p in tmp_path.glob("audit.sqlite3*")]
    return b"\n".join(blobs)


@pytest.fixture
def outside(tmp_path):
    """Things outside the watched folder: a secret text file, an image, a folder."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "shadow").write_text(SECRET)
    (folder / "other.png").write_bytes(png_bytes(seed=5))
    (folder / "images").mkdir()
    (folder / "images" / "x.png").write_bytes(png_bytes(seed=6))
    return folder


def test_links_pipes_sockets_and_hard_links_are_refused_unread(tmp_path, outside, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    incoming = tmp_path / "in"
    incoming.mkdir()
    links = {"secret.png": outside / "shadow", "other.png": outside / "other.png", "images.png": outside / "images"}
    for name, target in links.items():
        os.symlink(target, incoming / name)
    os.symlink(outside / "shadow", incoming / "notes.txt")  # any name: a link is refused whatever it is called
    os.link(outside / "shadow", incoming / "hard.png")
    os.mkfifo(incoming / "pipe.png")
    os.mknod(incoming / "sock.png", stat.S_IFSOCK | 0o600)
    (incoming / "good.png").write_bytes(png_bytes(seed=1))
    (incoming / "text.png").write_text(SECRET)  # a text file posing as an image: failed, never quoted
    (incoming / "batch").mkdir()
    (incoming / "batch" / "inner.png").write_bytes(png_bytes(seed=2))
    watcher = make_watcher(tmp_path, truncated_retry_s=0)
    outcomes = run_bounded(watcher)

    by_name = {o.name: o for o in outcomes}
    refused = {"secret.png", "other.png", "images.png", "notes.txt", "hard.png", "pipe.png", "sock.png"}
    assert set(by_name) == refused | {"good.png", "text.png"}
    assert by_name["good.png"].status == "done"
    assert by_name["text.png"].error_code == "invalid_image"
    assert {by_name[n].error_code for n in refused} == {"not_a_regular_file"}
    assert names(incoming / "failed") == sorted(refused | {"text.png"})
    assert names(incoming) == ["batch", "done", "failed", "processing"]  # the sub-folder is left in place
    assert names(incoming / "batch") == ["inner.png"]
    for name, target in links.items():  # the links themselves were moved, never followed
        assert os.readlink(incoming / "failed" / name) == str(target)
    assert (outside / "shadow").read_text() == SECRET and names(outside / "images") == ["x.png"]
    assert stat.S_ISFIFO(os.lstat(incoming / "failed" / "pipe.png").st_mode)
    assert stat.S_ISSOCK(os.lstat(incoming / "failed" / "sock.png").st_mode)
    assert os.lstat(incoming / "failed" / "hard.png").st_nlink == 2

    kinds = {
        "secret.png": "a symbolic link",
        "other.png": "a symbolic link",
        "images.png": "a symbolic link",
        "notes.txt": "a symbolic link",
        "hard.png": "a hard link (the file has 2 names)",
        "pipe.png": "a named pipe (FIFO)",
        "sock.png": "a socket",
    }
    for name, kind in kinds.items():
        record = json.loads((tmp_path / "out" / f"{Path(name).stem}.error.json").read_text())
        assert record["error"]["code"] == "not_a_regular_file" and record["image_sha256"] == ""
        assert record["error"]["message"].startswith(f"{name}: {kind}: the watcher reads only regular files")
        assert "\n" not in record["error"]["message"]
    text_error = json.loads((tmp_path / "out" / "text.error.json").read_text())["error"]["message"]
    assert text_error == f"text.png: not an image: a text file ({len(SECRET.encode())} bytes)"
    rows = {r["image_name"]: r for r in watcher.audit.query()}
    assert {n: rows[n]["error_code"] for n in refused} == dict.fromkeys(refused, "not_a_regular_file")
    assert all(rows[n]["image_sha256"] == "" and kinds[n] in rows[n]["error_message"] for n in refused)
    failure_logs = [r.getMessage() for r in caplog.records if "failed (not_a_regular_file" in r.getMessage()]
    assert len(failure_logs) == len(refused)

    for written in (everything_written(tmp_path), caplog.text.encode(), "".join(capsys.readouterr()).encode()):
        assert CANARY.encode() not in written and b"root:" not in written
    assert CANARY not in json.dumps(watcher.audit.query())


def test_a_plain_sub_folder_is_logged_once_not_every_scan(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="deploy.watch")
    watcher = make_watcher(tmp_path, events=False)
    (tmp_path / "in" / "batch").mkdir()
    watcher.open()
    try:
        for _ in range(5):
            assert watcher.scan() == ([], [])
    finally:
        watcher.close()
    assert [r.getMessage() for r in caplog.records if "batch" in r.getMessage()] == [
        "leaving the sub-folder batch in place (only files in the folder itself are taken)"
    ]


def test_a_device_is_refused_unread(tmp_path):
    try:
        os.mknod(tmp_path / "probe", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD here")
    os.unlink(tmp_path / "probe")
    (tmp_path / "in").mkdir()
    os.mknod(tmp_path / "in" / "null.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    watcher = make_watcher(tmp_path)
    [outcome] = run_bounded(watcher)
    assert outcome.error_code == "not_a_regular_file"
    message = json.loads((tmp_path / "out" / "null.error.json").read_text())["error"]["message"]
    assert message.startswith("null.png: a character device: ")
    assert stat.S_ISCHR(os.lstat(tmp_path / "in" / "failed" / "null.png").st_mode)


def test_a_link_swapped_in_after_the_claim_or_left_in_processing_is_refused(tmp_path, outside):
    watcher = make_watcher(tmp_path)
    watcher.open()
    try:
        (tmp_path / "in" / "a.png").write_bytes(png_bytes())
        claimed = watcher.claim(tmp_path / "in" / "a.png")
        claimed.unlink()
        os.symlink(outside / "shadow", claimed)  # swapped between the scan and the read
        outcome = watcher.process_claimed(claimed)
        assert outcome.error_code == "not_a_regular_file"
        os.symlink(outside / "shadow", tmp_path / "in" / "processing" / f"{'1' * 32}__b.png")  # a "journal" link
        assert [p.name for p in watcher.journal()] == [f"{'1' * 32}__b.png"]
        assert watcher.run(threading.Event(), once=True)[0].error_code == "not_a_regular_file"
    finally:
        watcher.close()
    assert names(tmp_path / "in" / "failed") == ["a.png", "b.png"]
    assert CANARY.encode() not in everything_written(tmp_path)


@pytest.mark.parametrize("own", ["processing", "done", "failed"])
def test_the_watcher_refuses_to_start_when_its_own_folder_is_a_link(tmp_path, outside, own):
    (tmp_path / "in").mkdir()
    os.symlink(outside / "images", tmp_path / "in" / own)
    with pytest.raises(UnsafeFolderError, match=f"{own} is a symbolic link, not a folder"):
        make_watcher(tmp_path).open()
    assert names(outside / "images") == ["x.png"]  # nothing was created or moved there


def test_the_lock_file_is_never_opened_through_a_link(tmp_path, outside):
    (tmp_path / "in").mkdir()
    os.symlink(outside / "shadow", tmp_path / "in" / ".eagle-watch.lock")
    with pytest.raises(UnsafeFolderError, match="is a symbolic link"):
        make_watcher(tmp_path).open()
    assert (outside / "shadow").read_text() == SECRET  # not truncated, no pid written into it


# -- the same secret through the API and the CLI ---------------------------------------------------------------------
def test_the_api_never_echoes_a_secret_text_file(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    settings = Settings(
        data_dir=tmp_path,
        mllm={"enabled": False},
        expert={"weights": "random"},
        service={"token": TOKEN, "audit_path": str(tmp_path / "audit.sqlite3")},
    )
    server = LiveServer(create_app(FakePipeline(banks=["widget"]), settings)).start()
    try:
        with server.client() as client:
            response = client.post(
                "/v1/inspect", files={"image": ("shadow.png", SECRET.encode(), "image/png")}, data={"bank": "widget"}
            )
    finally:
        server.stop()
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_image"
    assert "a text file" in response.json()["error"]["message"]
    assert CANARY not in response.text and CANARY not in caplog.text
    rows = AuditLog(tmp_path / "audit.sqlite3").query()
    assert [r["error_code"] for r in rows] == ["invalid_image"] and CANARY not in json.dumps(rows)
    assert CANARY.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("audit.sqlite3*"))


def test_the_cli_never_echoes_a_secret_but_follows_a_link_it_is_given(tmp_path, monkeypatch, caplog):
    built = real_bank()
    for key, value in real_env(built.data_dir).items():
        if key.startswith("EAGLE_"):
            monkeypatch.setenv(key, value)
    secret = tmp_path / "shadow.png"
    secret.write_text(SECRET)
    link = tmp_path / "link.png"
    os.symlink(built.good[0], link)  # a path handed to the CLI explicitly may be a link
    bank_dir = built.data_dir / "banks" / ".versions" / built.bank / "0001"
    code, out, err = run_cli(["score", "--bank", str(bank_dir), str(secret), str(link), "--json"])
    assert code == 1
    assert f"{secret}: not an image: a text file ({len(SECRET.encode())} bytes)" in err
    [record] = [json.loads(line) for line in out.splitlines()]
    assert record["image"] == str(link) and record["score"] > 0
    assert CANARY not in out + err + caplog.text


# -- 0b: a writer that pauses is not a broken image -----------------------------------------------------------------
def slow_writer(path: Path, data: bytes, *, chunks: int = 4, pause_s: float = 0.4, finish: bool = True):
    """Write ``data`` to ``path`` in ``chunks`` pieces through one open file, pausing between them (a thread)."""

    def write() -> None:
        step = -(-len(data) // chunks)
        with open(path, "wb") as handle:
            for i in range(chunks if finish else chunks - 1):
                handle.write(data[i * step : (i + 1) * step])
                handle.flush()
                time.sleep(pause_s)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def watch_until(watcher: FolderWatcher, done: callable, seconds: float = 20.0):
    """Run ``watcher`` in a thread until ``done()`` holds (or fail after ``seconds``); returns the outcomes."""
    stop, outcomes = threading.Event(), []
    watcher.open()
    thread = threading.Thread(target=lambda: outcomes.extend(watcher.run(stop)), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + seconds
        while not done():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
        watcher.close()
    return outcomes


@pytest.mark.parametrize("events", [True, False], ids=["close-write events", "polling only"])
def test_a_pausing_writer_gets_its_image_inspected_not_failed(tmp_path, events):
    data = png_bytes(64, 48, seed=3)
    watcher = make_watcher(tmp_path, events=events, truncated_retry_s=3.0)  # poll 0.01 s: pauses look "stable"
    incoming = tmp_path / "in"
    writer = slow_writer(incoming / "slow.png", data, pause_s=0.4)
    outcomes = watch_until(watcher, lambda: names(incoming / "done") or names(incoming / "failed"))
    writer.join(10)
    assert [(o.name, o.status) for o in outcomes] == [("slow.png", "done")]
    assert (incoming / "done" / "slow.png").read_bytes() == data and names(incoming / "failed") == []
    assert json.loads((tmp_path / "out" / "slow.json").read_text())["input_name"] == "slow.png"
    assert len(watcher.audit.query()) == 1


def test_a_writer_that_never_finishes_is_failed_as_truncated_after_the_retry_time(tmp_path):
    data = png_bytes(64, 48, seed=4)
    watcher = make_watcher(tmp_path, truncated_retry_s=1.0)
    incoming = tmp_path / "in"
    writer = slow_writer(incoming / "cut.png", data, pause_s=0.2, finish=False)  # 3 of 4 chunks, then closes
    writer.join(10)
    last_change = os.stat(incoming / "cut.png").st_mtime
    outcomes = watch_until(watcher, lambda: names(incoming / "failed"))
    assert [(o.name, o.status, o.error_code) for o in outcomes] == [("cut.png", "failed", "invalid_image")]
    failed_at = os.stat(tmp_path / "out" / "cut.error.json").st_mtime
    assert failed_at - last_change >= 1.0  # not before the retry time
    message = json.loads((tmp_path / "out" / "cut.error.json").read_text())["error"]["message"]
    assert "cut short" in message or "truncated" in message
    assert message.endswith("unchanged for 1 s (EAGLE_SERVICE__WATCH_TRUNCATED_RETRY_S)")
    assert (incoming / "failed" / "cut.png").read_bytes() == data[: 3 * -(-len(data) // 4)]


def test_a_cut_short_tiff_is_put_back_while_its_writer_may_go_on(tmp_path):
    """Formats whose end cannot be seen cheaply (TIFF) are claimed, found truncated by the decoder, and put back."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, "TIFF")
    data = buffer.getvalue()
    watcher = make_watcher(tmp_path, events=False, truncated_retry_s=30.0)
    incoming = tmp_path / "in"
    (incoming / "t.tif").write_bytes(data[: len(data) // 2])
    watcher.open()
    try:
        claimed = watcher.claim(incoming / "t.tif")
        assert watcher.process_claimed(claimed) is None  # put back, not failed
        assert names(incoming) == ["done", "failed", "processing", "t.tif"] and names(incoming / "processing") == []
        with open(incoming / "t.tif", "ab") as handle:
            handle.write(data[len(data) // 2 :])
        outcome = watcher.process_claimed(watcher.claim(incoming / "t.tif"))
    finally:
        watcher.close()
    assert outcome.status == "done" and (incoming / "done" / "t.tif").read_bytes() == data
    assert names(incoming / "failed") == [] and len(watcher.audit.query()) == 1


def test_with_close_write_events_a_pausing_tiff_writer_is_waited_for_not_claimed_early(tmp_path, caplog):
    """A TIFF's end cannot be seen cheaply: only the writer's close says it is whole (polling would claim it early)."""
    import io

    import numpy as np
    from PIL import Image

    caplog.set_level(logging.INFO, logger="deploy.watch")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, "TIFF")
    data = buffer.getvalue()
    watcher = make_watcher(tmp_path, events=True, truncated_retry_s=10.0)
    incoming = tmp_path / "in"
    watcher.open()
    watcher.close()  # create the folders first: the writer must start after the watcher does
    outcomes = []
    stop = threading.Event()
    watcher.open()
    assert watcher._tracker.active, "inotify close-write events are expected on Linux"
    thread = threading.Thread(target=lambda: outcomes.extend(watcher.run(stop)), daemon=True)
    thread.start()
    try:
        slow_writer(incoming / "slow.tif", data, pause_s=0.4).join(10)
        deadline = time.monotonic() + 10
        while not names(incoming / "done") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
        watcher.close()
    assert [(o.name, o.status) for o in outcomes] == [("slow.tif", "done")]
    assert (incoming / "done" / "slow.tif").read_bytes() == data
    assert not [r for r in caplog.records if "put back" in r.getMessage()]  # never claimed half-written
