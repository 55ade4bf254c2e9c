"""The watched folder: readiness of files, exactly-once processing, crash windows, and a real kill -9 + restart."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.watch import FolderWatcher, WatcherBusyError
from eagle.audit import AuditLog
from tests.fake_pipeline import FakePipeline
from tests.service_helpers import png_bytes, real_bank, real_env


class SimulatedCrash(BaseException):
    """Stands for the process dying at a precise point (not an Exception: nothing may catch it)."""


def make_watcher(tmp_path: Path, pipeline=None, audit=None, **kw) -> FolderWatcher:
    (tmp_path / "in").mkdir(exist_ok=True)
    audit = audit or AuditLog(tmp_path / "audit.sqlite3")
    return FolderWatcher(
        pipeline or FakePipeline(banks=["widget"]),
        tmp_path / "in",
        tmp_path / "out",
        "widget",
        audit=audit,
        poll_s=0.01,
        **kw,
    )


def run_once(watcher: FolderWatcher):
    watcher.open()
    try:
        return watcher.run(threading.Event(), once=True)
    finally:
        watcher.close()


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_watch_processes_every_image_once_and_keeps_inputs(tmp_path):
    watcher = make_watcher(tmp_path)
    incoming = tmp_path / "in"
    images = {f"p{i}.png": png_bytes(20, 16, seed=i) for i in range(3)}
    for name, data in images.items():
        (incoming / name).write_bytes(data)
    (incoming / "broken.png").write_bytes(b"text, not an image")
    for ignored in ("notes.txt", ".hidden.png", "half.png.part", "~lock.png"):
        (incoming / ignored).write_bytes(png_bytes())
    outcomes = run_once(watcher)

    assert sorted((o.name, o.status) for o in outcomes) == [
        ("broken.png", "failed"),
        ("p0.png", "done"),
        ("p1.png", "done"),
        ("p2.png", "done"),
    ]
    assert names(incoming / "done") == sorted(images) and names(incoming / "failed") == ["broken.png"]
    assert names(incoming / "processing") == []
    assert sorted(p.name for p in incoming.iterdir() if p.is_file() and p.name != ".eagle-watch.lock") == [
        ".hidden.png",
        "half.png.part",
        "notes.txt",
        "~lock.png",
    ]  # left alone
    for name, data in images.items():
        assert (incoming / "done" / name).read_bytes() == data  # moved, byte-identical
        record = json.loads((tmp_path / "out" / f"{Path(name).stem}.json").read_text())
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert record["score"] == pytest.approx(pixels.mean() / 255) and record["input_name"] == name
        annotated = Image.open(tmp_path / "out" / f"{Path(name).stem}.annotated.png")
        assert annotated.size == (20, 16)
    error = json.loads((tmp_path / "out" / "broken.error.json").read_text())
    assert error["error"]["code"] == "invalid_image" and error["input_name"] == "broken.png"
    rows = watcher.audit.query()
    assert sorted((r["image_name"], r["status"]) for r in rows) == [
        ("broken.png", "error"),
        ("p0.png", "ok"),
        ("p1.png", "ok"),
        ("p2.png", "ok"),
    ]
    assert {r["source"] for r in rows} == {"watch"} and len({r["run_id"] for r in rows}) == 4


def test_files_are_taken_only_when_stable(tmp_path):
    watcher = make_watcher(tmp_path, stable_polls=2, events=False, truncated_retry_s=0)  # the polling rule alone
    watcher.open()
    path = tmp_path / "in" / "a.png"
    data = png_bytes()
    path.write_bytes(data[:100])
    assert watcher.scan() == ([], [path])  # first sighting
    with open(path, "ab") as handle:
        handle.write(data[100:])  # still being written: size changed
    assert watcher.scan() == ([], [path])
    assert watcher.scan() == ([path], [])  # unchanged across two polls: ready
    empty = tmp_path / "in" / "b.png"
    empty.touch()
    polls = 0
    while empty not in watcher.scan()[0]:
        polls += 1
        assert polls < 50
    assert polls + 1 == 2 * 10  # a zero-byte file must stay so ten times longer
    watcher.close()


CRASH_POINTS = ["after_picture", "after_record", "after_audit", "before_move"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_anywhere_is_recovered_exactly_once(tmp_path, monkeypatch, point):
    import deploy.watch as watch_module

    audit = AuditLog(tmp_path / "audit.sqlite3")
    watcher = make_watcher(tmp_path, audit=audit)
    (tmp_path / "in" / "part.png").write_bytes(png_bytes(seed=7))
    real_write, real_record = watch_module.atomic.write_bytes, audit.record

    def write(path, data):
        real_write(path, data)
        if (point == "after_picture" and path.name.endswith(".annotated.png")) or (
            point == "after_record" and path.name == "part.json"
        ):
            raise SimulatedCrash

    def record(*args, **kwargs):
        real_record(*args, **kwargs)
        if point == "after_audit":
            raise SimulatedCrash
        return True

    def move(*args):
        raise SimulatedCrash

    monkeypatch.setattr(watch_module.atomic, "write_bytes", write)
    monkeypatch.setattr(audit, "record", record)
    if point == "before_move":
        monkeypatch.setattr(watcher, "_move", move)
    with pytest.raises(SimulatedCrash):
        run_once(watcher)
    assert len(names(tmp_path / "in" / "processing")) == 1  # the journal holds it
    monkeypatch.undo()

    restarted = make_watcher(tmp_path, audit=AuditLog(tmp_path / "audit.sqlite3"))
    outcomes = run_once(restarted)
    assert [o.status for o in outcomes] == ["done"]
    assert names(tmp_path / "in" / "done") == ["part.png"] and names(tmp_path / "in" / "processing") == []
    assert names(tmp_path / "out") == ["part.annotated.png", "part.json"]  # rewritten, not duplicated
    rows = restarted.audit.query()
    assert len(rows) == 1 and rows[0]["run_id"] == json.loads((tmp_path / "out" / "part.json").read_text())["run_id"]


def test_same_name_twice_keeps_both(tmp_path):
    watcher = make_watcher(tmp_path)
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(seed=1))
    first = run_once(watcher)[0]
    (tmp_path / "in" / "a.png").write_bytes(png_bytes(seed=2))
    second = run_once(make_watcher(tmp_path, audit=watcher.audit))[0]
    assert first.run_id != second.run_id
    assert names(tmp_path / "in" / "done") == sorted(["a.png", f"a.{second.run_id[:8]}.png"])
    assert names(tmp_path / "out") == sorted(
        ["a.json", "a.annotated.png", f"a.{second.run_id[:8]}.json", f"a.{second.run_id[:8]}.annotated.png"]
    )
    assert len(watcher.audit.query()) == 2


def test_input_that_keeps_crashing_the_process_is_failed(tmp_path):
    watcher = make_watcher(tmp_path, max_attempts=3)
    watcher.open()
    run_id = "0" * 32
    claimed = tmp_path / "in" / "processing" / f"{run_id}__poison.png"
    claimed.write_bytes(png_bytes())
    (tmp_path / "in" / "processing" / f".{run_id}.attempts").write_text("3")  # three starts already died
    outcome = watcher.process_claimed(claimed)
    watcher.close()
    assert outcome.status == "failed" and outcome.error_code == "crashed"
    assert names(tmp_path / "in" / "failed") == ["poison.png"] and names(tmp_path / "in" / "processing") == []
    assert watcher.audit.query()[0]["error_code"] == "crashed"


def test_one_watcher_per_folder_and_out_must_differ(tmp_path):
    first = make_watcher(tmp_path)
    first.open()
    with pytest.raises(WatcherBusyError, match=f"pid {os.getpid()}"):
        make_watcher(tmp_path).open()
    first.close()
    make_watcher(tmp_path).open()  # released
    same = FolderWatcher(FakePipeline(banks=["widget"]), tmp_path / "in", tmp_path / "in", "widget", audit=first.audit)
    with pytest.raises(ValueError, match="--out must differ"):
        same.open()


# -- the real thing: `eagle watch` killed with SIGKILL mid-run, then restarted ---------------------------------------
def _eagle(*args: str) -> list[str]:
    return [sys.executable, "-m", "eagle", *args]


def test_kill_9_during_watch_then_restart_loses_and_duplicates_nothing(tmp_path):
    built = real_bank()
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    sources = (built.good + built.defective) * 3
    inputs = {}
    for i, source in enumerate(sources):
        name = f"img{i:03d}.png"
        inputs[name] = source.read_bytes()
        (incoming / name).write_bytes(inputs[name])
    (incoming / "junk.png").write_bytes(b"not an image")
    inputs["junk.png"] = b"not an image"
    audit_path = tmp_path / "audit.sqlite3"
    env = real_env(built.data_dir, EAGLE_SERVICE__AUDIT_PATH=str(audit_path), EAGLE_SERVICE__WATCH_POLL_S="0.05")
    command = _eagle("watch", "--in", str(incoming), "--out", str(out), "--bank", built.bank)

    log = tmp_path / "first.log"
    with open(log, "wb") as stderr:
        first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 180
        while len(list((incoming / "done").glob("*.png"))) < 3:
            assert first.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the watcher made no progress"
            time.sleep(0.005)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finished_before = len(list((incoming / "done").glob("*"))) + len(list((incoming / "failed").glob("*")))
    assert finished_before < len(inputs), "killed too late to test anything"

    second = subprocess.run(command + ["--once"], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stderr[-2000:]  # 1: junk.png failed (named on stderr)
    assert "junk.png" in second.stderr

    done, failed = names(incoming / "done"), names(incoming / "failed")
    assert sorted(done + failed) == sorted(inputs)  # every input exactly once
    assert failed == ["junk.png"]
    assert names(incoming / "processing") == []
    assert not [p for p in incoming.iterdir() if p.is_file() and not p.name.startswith(".")]
    for name in done:
        assert (incoming / "done" / name).read_bytes() == inputs[name]
    rows = AuditLog(audit_path).query()
    assert sorted(r["image_name"] for r in rows) == sorted(inputs)  # one row per processed input
    assert len({r["run_id"] for r in rows}) == len(inputs)
    records = sorted(out.glob("*.json"))
    assert len(records) == len(inputs) and len(list(out.glob("*.annotated.png"))) == len(done)
    for name in done:
        record = json.loads((out / f"{Path(name).stem}.json").read_text())
        row = next(r for r in rows if r["image_name"] == name)
        assert record["run_id"] == row["run_id"] and record["score"] == pytest.approx(row["score"])
        assert record["bank_id"] == built.job["result"]["bank_id"]
