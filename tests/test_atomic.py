"""expert.atomic: the one atomic-write helper (temp file, fsync, rename, fsync the directory)."""

from __future__ import annotations

import os

import pytest

from expert import atomic


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
