"""The one place that decides whether a user-supplied zip is safe (reference image sets, bank archives, uploads).

A zip from a user is hostile until proven otherwise. :func:`scan_zip` reads only the central directory and
refuses, with one clear line each:

* entry names that are empty, absolute, start with a drive letter (any ``:`` in the first component), hold a
  backslash or a NUL byte, or have a ``..`` component (path traversal);
* symbolic links, encrypted entries and compression methods other than stored, deflate, bzip2 and lzma;
* more than ``max_entries`` entries, an entry larger than ``max_entry_bytes``, more than ``max_total_bytes``
  declared in all, or an entry over 1 MiB compressed more than ``max_ratio``:1 (zip bombs).

Every entry is checked, including the ones that are then skipped: folders, hidden files (any component starting
with ``.``), macOS resource forks under ``__MACOSX/`` and, when ``suffixes`` is given, other suffixes.
:func:`extract_zip` scans first, so nothing is written for a refused archive, then inflates the chosen entries
and stops any entry that inflates to more bytes than its header declares.

Failures raise :class:`ArchiveError`; breaking a size, count or ratio limit raises its subclass
:class:`ArchiveTooLargeError` (the service answers 413 for those and 422 for the rest).

Example:
    >>> import io, zipfile, tempfile
    >>> buf = io.BytesIO()
    >>> with zipfile.ZipFile(buf, "w") as z:
    ...     z.writestr("a/b.txt", "hi")
    ...     z.writestr("__MACOSX/a/._b.txt", "fork")
    >>> [info.filename for info in scan_zip(io.BytesIO(buf.getvalue()))]
    ['a/b.txt']
    >>> out = tempfile.mkdtemp()
    >>> [p.name for p in extract_zip(io.BytesIO(buf.getvalue()), out)]
    ['b.txt']
    >>> try:
    ...     scan_zip(io.BytesIO(buf.getvalue()), ArchiveLimits(max_entries=1))
    ... except ArchiveTooLargeError as err:
    ...     print(err)
    the archive has 2 entries; the limit is 1
"""

from __future__ import annotations

import lzma
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

SUPPORTED_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
"""Compression methods the standard library inflates (anything else, e.g. AES or deflate64, is refused)."""

RATIO_CHECK_MIN_BYTES = 1024 * 1024
"""Entries at most this large skip the ratio check: small files compress well and cannot be bombs."""

_IGNORED_TOP_FOLDER = "__MACOSX"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps applied to a zip before anything is inflated.

    Attributes:
        max_entries: most entries (files and folders) in the archive.
        max_entry_bytes: largest uncompressed entry.
        max_total_bytes: largest uncompressed total of all entries, as their headers declare it.
        max_ratio: largest uncompressed/compressed ratio of one entry over 1 MiB (PNG/JPEG hardly compress;
            bombs do).
    """

    max_entries: int = 10_000
    max_entry_bytes: int = 256 * 1024 * 1024
    max_total_bytes: int = 4 * 1024 * 1024 * 1024
    max_ratio: float = 200.0


DEFAULT_LIMITS = ArchiveLimits()


class ArchiveError(ValueError):
    """The archive is unreadable or unsafe; the message names the entry at fault."""


class ArchiveTooLargeError(ArchiveError):
    """The archive breaks a size, entry-count or compression-ratio limit (zip-bomb guard)."""


def scan_zip(
    source: str | Path | BinaryIO,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    *,
    suffixes: set[str] | None = None,
) -> list[zipfile.ZipInfo]:
    """Validate a zip's central directory and list its content entries (sorted by name) without inflating.

    Args:
        source: a path or a seekable binary file object.
        limits: caps on entries, sizes and compression ratio.
        suffixes: when given, only entries with these lower-case suffixes (e.g. ``{".png"}``) are listed; the
            others are still checked.

    Returns:
        The files to extract: no folders, hidden files or ``__MACOSX`` resource forks.

    Raises:
        ArchiveTooLargeError: too many entries, an entry or the total too large, or a suspicious ratio.
        ArchiveError: not a zip, or an unsafe name, a link, encryption or an unsupported compression method.
    """
    with _open_zip(source) as archive:
        return _select_entries(archive.infolist(), limits, suffixes)


def extract_zip(
    source: str | Path | BinaryIO,
    dest: str | Path,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    *,
    suffixes: set[str] | None = None,
) -> list[Path]:
    """Extract the entries :func:`scan_zip` accepts into ``dest``; returns the written files (sorted).

    Nothing is written when the scan refuses the archive. While inflating, an entry may never produce more
    bytes than its header declares (the limits were checked against those declarations).

    Args:
        source: a path or a seekable binary file object.
        dest: target directory (created).
        limits: caps on entries, sizes and compression ratio.
        suffixes: when given, only entries with these lower-case suffixes are extracted (others skipped).

    Raises:
        ArchiveTooLargeError: see :func:`scan_zip`.
        ArchiveError: see :func:`scan_zip`; also a corrupt entry or one larger than its header says.
    """
    dest = Path(dest)
    with _open_zip(source) as archive:
        entries = _select_entries(archive.infolist(), limits, suffixes)
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for entry in entries:
            target = dest.joinpath(*PurePosixPath(entry.filename).parts)
            _inflate(archive, entry, target)
            written.append(target)
    return sorted(written)


def _open_zip(source: str | Path | BinaryIO) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as err:
        raise ArchiveError(f"not a readable zip archive ({' '.join(str(err).split())})") from None


def _select_entries(
    infos: list[zipfile.ZipInfo], limits: ArchiveLimits, suffixes: set[str] | None
) -> list[zipfile.ZipInfo]:
    if len(infos) > limits.max_entries:
        raise ArchiveTooLargeError(f"the archive has {len(infos)} entries; the limit is {limits.max_entries}")
    chosen: list[zipfile.ZipInfo] = []
    total = 0
    for info in infos:
        path = _check_name(info)
        _check_entry(info, limits)
        total += info.file_size
        if total > limits.max_total_bytes:
            raise ArchiveTooLargeError(f"the archive expands to more than {limits.max_total_bytes} bytes")
        if _is_content(info, path) and (suffixes is None or path.suffix.lower() in suffixes):
            chosen.append(info)
    return sorted(chosen, key=lambda info: info.filename)


def _check_name(info: zipfile.ZipInfo) -> PurePosixPath:
    """The entry's path, after refusing traversal tricks; checks the raw name (zipfile cuts it at a NUL)."""
    name = info.orig_filename
    path = PurePosixPath(name)
    unsafe = (
        not name
        or "\x00" in name
        or "\\" in name
        or path.is_absolute()
        or (bool(path.parts) and ":" in path.parts[0])
        or any(part == ".." for part in path.parts)
    )
    if unsafe:
        raise ArchiveError(
            f"unsafe entry name {name!r} in the archive: absolute paths, drive letters, backslashes, NUL bytes "
            "and '..' are not allowed"
        )
    return path


def _check_entry(info: zipfile.ZipInfo, limits: ArchiveLimits) -> None:
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ArchiveError(f"entry {name!r} is a symbolic link; links are not allowed")
    if info.flag_bits & 0x1:
        raise ArchiveError(f"entry {name!r} is encrypted; use an unencrypted zip")
    if info.compress_type not in SUPPORTED_COMPRESSION:
        raise ArchiveError(
            f"entry {name!r} uses an unsupported compression method ({info.compress_type}); "
            "use stored, deflate, bzip2 or lzma"
        )
    if info.file_size > limits.max_entry_bytes:
        raise ArchiveTooLargeError(
            f"entry {name!r} unpacks to {info.file_size} bytes; the limit is {limits.max_entry_bytes}"
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > RATIO_CHECK_MIN_BYTES and ratio > limits.max_ratio:
        raise ArchiveTooLargeError(
            f"entry {name!r} has a compression ratio of {ratio:.0f}:1; the limit is {limits.max_ratio:g}:1 "
            "(zip-bomb guard)"
        )


def _is_content(info: zipfile.ZipInfo, path: PurePosixPath) -> bool:
    """Whether an entry is a file worth extracting (not a folder, hidden file or macOS resource fork)."""
    if info.is_dir() or not path.parts or path.parts[0] == _IGNORED_TOP_FOLDER:
        return False
    return not any(part.startswith(".") for part in path.parts)


def _inflate(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, target: Path) -> None:
    """Write one entry, refusing more bytes than its header declares (the limits trusted that number)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with archive.open(entry) as src, open(target, "wb") as out:
            remaining = entry.file_size
            while chunk := src.read(_CHUNK):
                remaining -= len(chunk)
                if remaining < 0:
                    raise ArchiveError(f"entry {entry.filename!r} is larger than its header says")
                out.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, lzma.LZMAError) as err:
        raise ArchiveError(f"corrupt entry {entry.filename!r} ({' '.join(str(err).split())})") from None
