"""Atomic file writes: the one helper every writer of the project uses (banks, ONNX cache, evaluation, service).

A reader sees the old file or the whole new one, never a part, and a finished write survives a power cut:

1. write a temporary file in the destination's directory (same filesystem, so the rename is atomic),
2. flush and ``fsync`` it,
3. ``os.replace`` it over the destination,
4. ``fsync`` the directory, so the rename itself is on disk.

A failed write removes its temporary file and leaves the destination untouched. Temporary files are named
``.<name>.<random>.tmp`` next to the destination (hidden; a directory listing of ``*.json`` never sees one).

Why here: ``common/`` is the bottom layer of the import contracts (it imports nothing else of the project), so
every package that writes files (``expert/``, ``eagle/``, ``deploy/``) imports this one module directly.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_text(folder / "a.json", '{"ok": true}')
    >>> (folder / "a.json").read_text()
    '{"ok": true}'
    >>> with atomic_path(folder / "b.bin") as tmp:
    ...     _ = tmp.write_bytes(b"xyz")
    >>> sorted(p.name for p in folder.iterdir())
    ['a.json', 'b.bin']
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX only; elsewhere writers are not serialised across processes (atomic renames keep every file whole)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_path",
    "file_lock",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "link_or_copy",
    "process_alive",
    "remove_dead_staging",
    "replace",
    "staging",
    "staging_dir",
    "try_file_lock",
    "write_bytes",
    "write_text",
]


def fsync_dir(directory: str | Path) -> None:
    """``fsync`` a directory (its entries: renames, creations); filesystems that refuse it are ignored."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str | Path) -> None:
    """``fsync`` a file's data written by someone else (e.g. a library that wrote it by name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """``fsync`` every file and directory under ``root``, and ``root`` itself (before renaming it into place)."""
    root = Path(root)
    for path in [*root.rglob("*"), root]:
        if path.is_dir():
            fsync_dir(path)
        else:
            fsync_file(path)


def replace(source: str | Path, destination: str | Path) -> None:
    """``os.replace(source, destination)``, then ``fsync`` the destination's directory (and the source's)."""
    source, destination = Path(source), Path(destination)
    os.replace(source, destination)
    fsync_dir(destination.parent)
    if source.parent != destination.parent:
        fsync_dir(source.parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without error, it becomes ``path`` atomically.

    For writers that need a file name (``np.savez``, an ONNX export, ``save_file``). The parent directory
    is created. On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for a plain open()
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (module docstring)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically and durably (module docstring)."""
    write_bytes(path, text.encode(encoding))


def link_or_copy(source: str | Path, destination: str | Path) -> bool:
    """Make ``destination`` a hard link to ``source``; copy the bytes where a link is impossible.

    For files that are written once and never changed in place (every writer here replaces files by rename), so
    that sharing one inode is invisible to readers: a bank version shares its ``backbone.onnx`` (about 100 MB) with
    the version before it and with the ONNX cache instead of storing another copy. Deleting one name leaves the
    others intact. A link is impossible across filesystems, on filesystems without hard links, or where the
    source's owner forbids it; those get a plain copy.

    Args:
        source: an existing file.
        destination: a path that does not exist yet.

    Returns:
        True when a link was made, False when the bytes were copied.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.bin").write_bytes(b"xyz")
        >>> link_or_copy(folder / "a.bin", folder / "b.bin"), (folder / "b.bin").read_bytes()
        (True, b'xyz')
    """
    try:
        os.link(source, destination)
        return True
    except OSError:
        shutil.copyfile(source, destination)
        return False


@contextlib.contextmanager
def try_file_lock(path: str | Path) -> Iterator[bool]:
    """Like :func:`file_lock`, but never waits: yields False (holding nothing) when another holder has it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if fcntl is None:  # pragma: no cover - Windows
            yield True
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block: one writer at a time.

    Serialises writers across processes (the API service, an ``eagle`` command and the watcher on one data
    folder, or replicas on shared storage that supports ``flock``) and across threads that open the file
    separately. The lock goes with the process: a writer that dies never leaves it held. The lock file itself
    stays (empty); never delete it while others may wait on it.

    Example:
        >>> import tempfile
        >>> lock = Path(tempfile.mkdtemp()) / ".bank.lock"
        >>> with file_lock(lock):
        ...     pass  # read the current state, write the next one
        >>> lock.exists()
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def remove_dead_staging(parent: str | Path, prefix: str, *, legacy_age_s: float | None = None) -> list[Path]:
    """Remove the staging folders ``<prefix><host>-<pid>-<random>`` in ``parent`` whose process on this host is gone.

    Folders of live processes and of other hosts (shared storage, other pods) are never touched. ``legacy_age_s``:
    also remove folders named ``<prefix><random>`` (no host and pid: written before staging folders carried them)
    whose last change is older than that many seconds.

    Returns:
        The folders removed.
    """
    parent = Path(parent)
    mine = re.compile(rf"{re.escape(prefix)}{re.escape(_host())}-(\d+)-[^/]+")
    named = re.compile(rf"{re.escape(prefix)}[^-/]+-\d+-[^/]+")
    removed = []
    try:
        children = list(parent.iterdir())
    except OSError:
        return []
    for child in children:
        if not child.name.startswith(prefix) or child.is_symlink() or not child.is_dir():
            continue
        match = mine.fullmatch(child.name)
        if match is not None:
            stale = not process_alive(int(match.group(1)))
        elif named.fullmatch(child.name) is None and legacy_age_s is not None:
            try:
                stale = time.time() - child.stat().st_mtime > legacy_age_s
            except OSError:
                continue
        else:
            continue
        if stale:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def staging_dir(parent: str | Path, prefix: str) -> Path:
    """A new private staging folder ``<parent>/<prefix><host>-<pid>-<random>``; first removes those of dead processes.

    A writer that is killed (``kill -9``, out of memory, a power cut) cannot remove its staging folder; the name
    says which process on which host made it, so the next writer using the same ``prefix`` in ``parent`` removes
    it (:func:`remove_dead_staging`), and never another live process's. The caller removes its own folder when done.

    Example:
        >>> folder = staging_dir(tempfile.mkdtemp(), ".import-")
        >>> folder.name.startswith(f".import-{_host()}-{os.getpid()}-")
        True
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{_host()}-{os.getpid()}-", dir=parent))


@contextlib.contextmanager
def staging(parent: str | Path, prefix: str) -> Iterator[Path]:
    """:func:`staging_dir` for the block, removed afterwards (like :class:`tempfile.TemporaryDirectory`)."""
    folder = staging_dir(parent, prefix)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
