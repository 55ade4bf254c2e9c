"""common.atomic: the one atomic-write helper (temp file, fsync, rename, fsync the directory)."""

from __future__ import annotations

import os

import pytest

from common import atomic


def test_write_replaces_the_whole_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "deep" / "state.json"
    atomic.write_text(target, "old")
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_each_step_is_durable(tmp_path, monkeypatch):
    """The temp file's data is fsync'ed before the rename, and the directory after it."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic.write_text(tmp_path / "a.txt", "x")
    assert events == ["fsync", "replace", "fsync"]


def test_files_get_the_usual_permissions(tmp_path):
    """Not mkstemp's 0600: a written file is as readable as one written with open() (umask applies)."""
    umask = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_file_lock_lets_one_holder_in_at_a_time(tmp_path):
    """Two holders opening the lock file separately (as two processes do) never overlap."""
    import threading
    import time

    lock = tmp_path / "sub" / ".bank.lock"
    events: list[str] = []
    inside = threading.Event()

    def second() -> None:
        inside.wait(10)
        with atomic.file_lock(lock):
            events.append("second in")

    thread = threading.Thread(target=second)
    thread.start()
    with atomic.file_lock(lock):
        events.append("first in")
        inside.set()
        time.sleep(0.3)  # the second holder is waiting on the lock now
        events.append("first out")
    thread.join(10)
    assert events == ["first in", "first out", "second in"] and lock.is_file()


def test_link_or_copy_links_and_falls_back_to_a_copy(tmp_path, monkeypatch):
    source = tmp_path / "graph.onnx"
    source.write_bytes(b"graph")
    assert atomic.link_or_copy(source, tmp_path / "linked.onnx") is True
    assert (tmp_path / "linked.onnx").stat().st_ino == source.stat().st_ino

    def refuse(*args):
        raise PermissionError("hard links not allowed here")

    monkeypatch.setattr(os, "link", refuse)
    assert atomic.link_or_copy(source, tmp_path / "copied.onnx") is False
    copied = tmp_path / "copied.onnx"
    assert copied.read_bytes() == b"graph" and copied.stat().st_ino != source.stat().st_ino
