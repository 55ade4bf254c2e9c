"""The one place that decides whether a user-supplied zip is safe (reference image sets, bank archives, uploads).

A zip from a user is hostile until proven otherwise. :func:`scan_zip` reads only the central directory and
refuses, with one clear line each:

* entry names that are empty, absolute, start with a drive letter (any ``:`` in the first component), hold a
  backslash or a NUL byte, or have a ``..`` component (path traversal);
* entries whose Unix mode says symbolic link, named pipe (FIFO), character or block device or socket (each
  named by its kind), encrypted entries and compression methods other than stored, deflate, bzip2 and lzma;
* more than ``max_entries`` entries (counted from the end-of-archive record, before the central directory is
  even parsed), an entry larger than ``max_entry_bytes``, more than ``max_total_bytes`` declared in all, an
  entry over 1 MiB compressed more than ``max_ratio``:1, or an archive that unpacks to over 1 MiB compressed
  more than ``max_total_ratio``:1 in total (zip bombs made of many small, highly compressed entries).

Every entry is checked, including the ones that are then skipped: folders, hidden files (any component starting
with ``.``), macOS resource forks under ``__MACOSX/`` and, when ``suffixes`` is given, other suffixes.
:func:`extract_zip` scans first, so nothing is written for a refused archive, then inflates the chosen entries
and stops any entry that inflates to more bytes than its header declares; ``keep`` narrows (and renames) what is
written, so a caller can take exactly the files it knows (a bank import takes only the bank format's files).
Error messages name at most :data:`SHOWN_NAMES` entries (then "and N more").

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from struct import error as struct_error
from typing import Any, BinaryIO

from eagle.errors import EagleError

SUPPORTED_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
"""Compression methods the standard library inflates (anything else, e.g. AES or deflate64, is refused)."""

RATIO_CHECK_MIN_BYTES = 1024 * 1024
"""Entries at most this large skip the ratio check: small files compress well and cannot be bombs."""

SHOWN_NAMES = 3
"""Most entry names an error message lists before "and N more"."""

MIB = 1024 * 1024

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
        max_total_ratio: largest ratio of all declared uncompressed bytes to all compressed bytes, checked when the
            archive unpacks to over 1 MiB (catches many small entries that each stay under the per-entry check).
    """

    max_entries: int = 10_000
    max_entry_bytes: int = 256 * 1024 * 1024
    max_total_bytes: int = 4 * 1024 * 1024 * 1024
    max_ratio: float = 200.0
    max_total_ratio: float = 100.0

    @classmethod
    def from_settings(cls, settings: Any) -> ArchiveLimits:
        """The limits of zips of reference images, from the ``EAGLE_SERVICE__MAX_ARCHIVE_*`` settings.

        The API (``POST /v1/banks``) and the app's reference upload use this same rule.

        Args:
            settings: ``eagle.settings.Settings`` (its ``service`` group is read).
        """
        service = settings.service
        unpacked = int(service.max_archive_unpacked_mb * MIB)
        return cls(
            max_entries=service.max_archive_entries,
            max_entry_bytes=min(unpacked, cls.max_entry_bytes),
            max_total_bytes=unpacked,
        )


DEFAULT_LIMITS = ArchiveLimits()


class ArchiveError(EagleError, ValueError):
    """The archive is unreadable or unsafe; the message names the entry at fault."""

    code, http_status = "invalid_archive", 422


class ArchiveTooLargeError(ArchiveError):
    """The archive breaks a size, entry-count or compression-ratio limit (zip-bomb guard)."""

    code, http_status = "archive_too_large", 413


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
    with _open_zip(source, limits) as archive:
        return _select_entries(archive.infolist(), limits, suffixes)


def extract_zip(
    source: str | Path | BinaryIO,
    dest: str | Path,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    *,
    suffixes: set[str] | None = None,
    keep: Callable[[PurePosixPath], PurePosixPath | None] | None = None,
) -> list[Path]:
    """Extract the entries :func:`scan_zip` accepts into ``dest``; returns the written files (sorted).

    Nothing is written when the scan refuses the archive (the limits hold for the whole archive, whatever
    ``suffixes`` or ``keep`` then take). While inflating, an entry may never produce more bytes than its header
    declares (the limits were checked against those declarations).

    Args:
        source: a path or a seekable binary file object.
        dest: target directory (created).
        limits: caps on entries, sizes and compression ratio.
        suffixes: when given, only entries with these lower-case suffixes are extracted (others skipped).
        keep: maps an accepted entry's path to the relative path to write it to, or ``None`` to skip it.

    Raises:
        ArchiveTooLargeError: see :func:`scan_zip`.
        ArchiveError: see :func:`scan_zip`; also a corrupt entry or one larger than its header says, or a
            ``keep`` result that is not a plain relative path.
    """
    dest = Path(dest)
    with _open_zip(source, limits) as archive:
        entries = _select_entries(archive.infolist(), limits, suffixes)
        planned = []
        for entry in entries:
            relative = PurePosixPath(entry.filename)
            if keep is not None:
                relative = keep(relative)
                if relative is None:
                    continue
                if relative.is_absolute() or not relative.parts or ".." in relative.parts:
                    raise ArchiveError(f"entry {entry.filename!r} maps to an unsafe path {str(relative)!r}")
            planned.append((entry, dest.joinpath(*relative.parts)))
        dest.mkdir(parents=True, exist_ok=True)
        for entry, target in planned:
            _inflate(archive, entry, target)
    return sorted(target for _, target in planned)


def describe_names(names: Sequence[str], limit: int = SHOWN_NAMES) -> str:
    """``'a.png', 'b.png', 'c.png' and 297 more``: at most ``limit`` names, quoted, for one-line messages.

    Example:
        >>> describe_names(["a", "b", "c", "d", "e"])
        "'a', 'b', 'c' and 2 more"
    """
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _open_zip(source: str | Path | BinaryIO, limits: ArchiveLimits = DEFAULT_LIMITS) -> zipfile.ZipFile:
    _check_declared_count(source, limits)
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as err:
        raise ArchiveError(f"not a readable zip archive ({' '.join(str(err).split())})") from None


def _check_declared_count(source: str | Path | BinaryIO, limits: ArchiveLimits) -> None:
    """Refuse too many entries from the end-of-archive record alone, before the central directory is parsed.

    ``zipfile`` builds one object per entry while opening; a forged archive of millions of empty entries must not
    get that far. Unreadable end records are left to ``zipfile``, which names the problem.
    """
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as handle:
                end = zipfile._EndRecData(handle)  # noqa: SLF001 - the stdlib's own end-record reader
        else:
            position = source.tell()
            try:
                end = zipfile._EndRecData(source)  # noqa: SLF001
            finally:
                source.seek(position)
    except (OSError, ValueError, AttributeError, struct_error):
        return
    if end:
        count = int(end[zipfile._ECD_ENTRIES_TOTAL])  # noqa: SLF001
        if count > limits.max_entries:
            raise ArchiveTooLargeError(f"the archive has {count} entries; the limit is {limits.max_entries}")


def _select_entries(
    infos: list[zipfile.ZipInfo], limits: ArchiveLimits, suffixes: set[str] | None
) -> list[zipfile.ZipInfo]:
    if len(infos) > limits.max_entries:
        raise ArchiveTooLargeError(f"the archive has {len(infos)} entries; the limit is {limits.max_entries}")
    chosen: list[zipfile.ZipInfo] = []
    for info in infos:
        path = _check_name(info)
        _check_entry(info, limits)
        if _is_content(info, path) and (suffixes is None or path.suffix.lower() in suffixes):
            chosen.append(info)
    _check_totals(infos, limits)
    return sorted(chosen, key=lambda info: info.filename)


def _check_totals(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> None:
    """The whole archive: declared uncompressed total and total compression ratio (every entry counts)."""
    total = sum(info.file_size for info in infos)
    packed = sum(info.compress_size for info in infos)
    largest = [info.filename for info in sorted(infos, key=lambda info: info.file_size, reverse=True)]
    if total > limits.max_total_bytes:
        raise ArchiveTooLargeError(
            f"the archive expands to {_size(total)} in {len(infos)} entries (largest: {describe_names(largest)}); "
            f"the limit is {_size(limits.max_total_bytes)}"
        )
    ratio = total / max(packed, 1)
    if total > RATIO_CHECK_MIN_BYTES and ratio > limits.max_total_ratio:
        raise ArchiveTooLargeError(
            f"the archive expands to {_size(total)} from {_size(packed)} of compressed data, a ratio of "
            f"{ratio:.0f}:1 over {len(infos)} entries ({describe_names(largest)}); the limit is "
            f"{limits.max_total_ratio:g}:1 (zip-bomb guard)"
        )


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
    kind = _special_kind(info.external_attr >> 16)
    if kind is not None:
        raise ArchiveError(f"entry {name!r} is {kind}; only files and folders are allowed")
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


_SPECIAL_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _special_kind(mode: int) -> str | None:
    """What a Unix mode (the high 16 bits of ``external_attr``) says an entry is, when it is no file or folder.

    Zips made on Windows (or by tools that store no Unix mode) carry 0 there: those entries are plain files.
    """
    for test, kind in _SPECIAL_KINDS:
        if test(mode):
            return kind
    return None


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
