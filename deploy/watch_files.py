"""What the watched folder may read: regular files that live in it, opened without following any link.

Anyone who can drop a file into the watched folder can also drop a symbolic link to a file elsewhere (a
password file, another line's images), a hard link to one, a named pipe that blocks whoever opens it, or a
device. The watcher reads none of those: :func:`refusal` says, from ``lstat`` alone (nothing is opened), why an
entry is not a file the watcher reads, and :func:`read_regular_file` opens with ``O_NOFOLLOW | O_NONBLOCK`` and
checks the OPENED file again (an entry swapped for a link between the check and the open is still refused), so
the watcher never reads through a link and never blocks on a pipe.

Hard links: a second name of a file (``st_nlink > 1``) cannot be told apart from the file itself, wherever the
other name lives (possibly outside the folder, in a place the dropper could not read but the watcher can), so
files with more than one name are refused too: copy files in, do not link them.

Example:
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> os.symlink("/etc/hostname", os.path.join(folder, "a.png"))
    >>> refusal(os.lstat(os.path.join(folder, "a.png")))
    'a symbolic link: the watcher reads only regular files inside the folder (copy the file in instead)'
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from eagle.errors import EagleError

_ONLY_FILES = "the watcher reads only regular files inside the folder"
_KINDS = (
    (stat.S_ISLNK, "a symbolic link", "copy the file in instead"),
    (stat.S_ISDIR, "a folder", "put its images in the folder itself"),
    (stat.S_ISFIFO, "a named pipe (FIFO)", None),
    (stat.S_ISSOCK, "a socket", None),
    (stat.S_ISCHR, "a character device", None),
    (stat.S_ISBLK, "a block device", None),
)


def kind_of(st: os.stat_result) -> str:
    """What kind of entry an ``lstat`` result describes, in words: ``'a symbolic link'``, ``'a regular file'``..."""
    for test, kind, _ in _KINDS:
        if test(st.st_mode):
            return kind
    return "a regular file" if stat.S_ISREG(st.st_mode) else "not a regular file"


class NotARegularFileError(EagleError):
    """An entry of the watched folder is no regular file of its own (a link, a pipe, a device...); never read."""

    code, http_status = "not_a_regular_file", 422


def refusal(st: os.stat_result) -> str | None:
    """Why an entry with this ``lstat`` result is not read, in one line; ``None`` for a regular file with one name.

    Args:
        st: the entry's ``os.lstat`` (or ``os.fstat`` of it, once opened) result.
    """
    for test, kind, advice in _KINDS:
        if test(st.st_mode):
            return f"{kind}: {_ONLY_FILES}" + (f" ({advice})" if advice else "")
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file: {_ONLY_FILES}"
    if st.st_nlink > 1:
        return (
            f"a hard link (the file has {st.st_nlink} names): {_ONLY_FILES} alone, and a second name may belong to a "
            "file elsewhere (copy the file in instead of linking it)"
        )
    return None


def _open_regular(path: Path, label: str) -> int:
    """A read-only descriptor of ``path`` after both checks (``lstat`` before, ``fstat`` after the open)."""
    reason = refusal(os.lstat(path))
    if reason is not None:
        raise NotARegularFileError(f"{label}: {reason}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:  # became a link after the check
            raise NotARegularFileError(f"{label}: {refusal(os.lstat(path)) or 'a symbolic link'}") from None
        raise
    reason = refusal(os.fstat(fd))
    if reason is not None:
        os.close(fd)
        raise NotARegularFileError(f"{label}: {reason}")
    return fd


def read_regular_file(path: Path, *, label: str | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file with one name; links are never followed.

    Args:
        path: the file.
        label: how messages name it (default: ``path``'s name).

    Raises:
        NotARegularFileError: ``path`` is a link, folder, pipe, socket, device or has several names (the message
            names the kind, never anything the target holds).
        FileNotFoundError: ``path`` vanished.
    """
    with os.fdopen(_open_regular(path, label or path.name), "rb") as handle:
        return handle.read()


def read_ends(path: Path, head_bytes: int, tail_bytes: int) -> tuple[bytes, bytes, int]:
    """``(first head_bytes, last tail_bytes, size)`` of ``path``, opened as :func:`read_regular_file` does.

    Raises:
        NotARegularFileError: as :func:`read_regular_file`.
        FileNotFoundError: ``path`` vanished.
    """
    fd = _open_regular(path, path.name)
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, head_bytes, 0), os.pread(fd, tail_bytes, max(0, size - tail_bytes)), size
    finally:
        os.close(fd)
