"""Left-overs of killed writers: staging folders named by host and pid, unfinished versions, lock namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common import atomic
from eagle import bank_versions
from eagle.banks import IMPORT_STAGING_PREFIX, BankStore
from eagle.settings import ExpertSettings


def _fake_bank(directory: Path) -> None:
    """Enough of a bank for the version bookkeeping (write_version only needs meta.json)."""
    (directory / "meta.json").write_text("{}")


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_staging_dir_removes_dead_keeps_live_and_foreign(tmp_path):
    host = atomic._host()
    dead = tmp_path / f".import-{host}-{_dead_pid()}-abc"
    live = tmp_path / f".import-{host}-{os.getpid()}-def"
    foreign = tmp_path / f".import-otherhost-{_dead_pid()}-ghi"
    for folder in (dead, live, foreign):
        folder.mkdir()
    mine = atomic.staging_dir(tmp_path, ".import-")
    assert not dead.exists() and live.is_dir() and foreign.is_dir()
    assert mine.name.startswith(f".import-{host}-{os.getpid()}-")


def test_killed_writer_leaves_nothing_after_restart(tmp_path):
    root = tmp_path / "banks"
    store = BankStore(root, ExpertSettings())
    assert store.write_version("widget", _fake_bank, action="build") == 1
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from eagle.banks import BankStore
        from eagle.settings import ExpertSettings
        from common import atomic

        store = BankStore(Path({str(root)!r}), ExpertSettings())
        atomic.staging_dir(store.root, ".import-")  # an import's staging, as import_zip makes it

        def write(directory):
            atomic.staging_dir(directory.parent, ".eagle-export-")  # a build's ONNX scratch
            (directory / "references").mkdir()
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-build

        store.write_version("widget", write, action="build")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (root / ".versions" / "widget" / "0002").is_dir()  # the unfinished version is there ...
    removed = BankStore(root, ExpertSettings()).sweep()  # ... until the next start-up
    assert sorted(Path(r).name.split("-")[0] for r in removed) == [".eagle", ".import", "0002"]
    assert sorted(p.name for p in (root / ".versions" / "widget").iterdir()) == ["0001", "0001.json"]
    assert [p.name for p in root.iterdir() if p.name.startswith(IMPORT_STAGING_PREFIX)] == []
    assert store.current_version("widget") == 1 and store.exists("widget")
    assert store.write_version("widget", _fake_bank, action="teach") == 2


def test_sweep_skips_a_bank_whose_writer_is_alive(tmp_path):
    root = tmp_path / "banks"
    store = BankStore(root, ExpertSettings())
    store.write_version("widget", _fake_bank, action="build")
    reserved = bank_versions.version_dir(root, "widget", 2)
    reserved.mkdir()
    with bank_versions.writer_lock(root, "widget"):  # a live writer holds the lock: its version is not touched
        assert store.sweep() == []
    assert reserved.is_dir()
    assert store.sweep() == [".versions/widget/0002"]


@pytest.mark.parametrize("first", ["X", "X.lock"])
def test_bank_named_like_a_lock_file_builds_in_both_orders(tmp_path, first):
    store = BankStore(tmp_path / "banks", ExpertSettings())
    second = "X.lock" if first == "X" else "X"
    assert store.write_version(first, _fake_bank, action="build") == 1
    assert store.write_version(second, _fake_bank, action="build") == 1
    assert store.write_version(first, _fake_bank, action="teach") == 2
    assert store.exists("X") and store.exists("X.lock")
    versions = sorted(p.name for p in (tmp_path / "banks" / ".versions" / "X.lock").iterdir() if p.is_dir())
    assert versions == (["0001"] if first == "X" else ["0001", "0002"])


def test_old_lock_file_in_the_way_is_removed(tmp_path):
    root = tmp_path / "banks"
    (root / ".versions").mkdir(parents=True)
    (root / ".versions" / "X.lock").write_bytes(b"")  # bank X's lock where older releases kept it
    store = BankStore(root, ExpertSettings())
    assert store.write_version("X.lock", _fake_bank, action="build") == 1
    assert (root / ".versions" / "X.lock" / "0001" / "meta.json").is_file()
