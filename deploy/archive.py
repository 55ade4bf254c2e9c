"""Safe unpacking of an uploaded zip of normal images (the input of a bank build).

A zip from the network is hostile until proven otherwise. :func:`scan_archive` reads only the central
directory and refuses, with one clear line each:

* entries with absolute paths, drive letters, backslashes, ``..`` components or NUL bytes (path traversal);
* symbolic links, encrypted entries and unsupported compression;
* more than ``max_entries`` entries, an entry larger than ``max_entry_bytes``, more than ``max_total_bytes``
  in all, or a compression ratio above ``max_ratio`` (zip bombs);
* archives holding no image at all.

This check runs while the upload request is still open, so a bad archive is answered at once (422/413) instead
of becoming a failed job; the job then extracts with :func:`eagle.archives.extract_zip`, which validates again
and counts the bytes actually inflated.

Example:
    >>> import io, zipfile, tempfile
    >>> from pathlib import Path
    >>> buf = io.BytesIO()
    >>> with zipfile.ZipFile(buf, "w") as zf:
    ...     zf.writestr("good/001.png", b"not checked here")
    ...     zf.writestr("../evil.png", b"x")
    >>> path = Path(tempfile.mkdtemp()) / "refs.zip"
    >>> _ = path.write_bytes(buf.getvalue())
    >>> try:
    ...     scan_archive(path, ArchiveLimits())
    ... except InvalidArchive as err:
    ...     print(err)
    unsafe entry name '../evil.png' in the archive: absolute paths and '..' are not allowed
"""

from __future__ import annotations

import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from deploy.errors import ArchiveTooLarge, InvalidArchive
from eagle.images import IMAGE_EXTENSIONS

_IGNORED_PREFIXES = ("__MACOSX/",)


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps applied to an uploaded archive.

    Attributes:
        max_entries: most entries (files and folders) in the archive.
        max_entry_bytes: largest uncompressed entry.
        max_total_bytes: largest uncompressed total of the images extracted.
        max_ratio: largest uncompressed/compressed ratio of one entry (PNG/JPEG hardly compress; bombs do).
    """

    max_entries: int = 10_000
    max_entry_bytes: int = 256 * 1024 * 1024
    max_total_bytes: int = 4 * 1024 * 1024 * 1024
    max_ratio: float = 200.0


@dataclass(frozen=True)
class ArchiveImage:
    """One image entry accepted by :func:`scan_archive`."""

    info: zipfile.ZipInfo
    display_name: str


def scan_archive(path: Path, limits: ArchiveLimits) -> list[ArchiveImage]:
    """Validate an archive's directory and list its image entries (sorted by name) without extracting.

    Raises:
        InvalidArchive: not a zip, unsafe names, links, encryption, unsupported compression, or no images.
        ArchiveTooLarge: too many entries, too large, or too compressible.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as err:
        raise InvalidArchive(f"the upload is not a readable zip archive ({' '.join(str(err).split())})") from None
    if len(infos) > limits.max_entries:
        raise ArchiveTooLarge(f"the archive has {len(infos)} entries; the limit is {limits.max_entries}")
    images: list[ArchiveImage] = []
    total = 0
    for info in infos:
        _check_name(info.filename)
        if info.is_dir() or info.filename.startswith(_IGNORED_PREFIXES):
            continue
        _check_entry(info, limits)
        posix = PurePosixPath(info.filename)
        hidden = any(part.startswith(".") for part in posix.parts)
        if hidden or posix.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        total += info.file_size
        if total > limits.max_total_bytes:
            raise ArchiveTooLarge(f"the archive's images unpack to more than {limits.max_total_bytes} bytes")
        images.append(ArchiveImage(info, posix.name))
    if not images:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise InvalidArchive(f"the archive holds no images (looked for {extensions})")
    return sorted(images, key=lambda image: image.info.filename)


def _check_name(name: str) -> None:
    posix = PurePosixPath(name)
    unsafe = (
        not name
        or "\x00" in name
        or "\\" in name
        or name.startswith("/")
        or re.match(r"^[A-Za-z]:", name) is not None
        or any(part == ".." for part in posix.parts)
    )
    if unsafe:
        raise InvalidArchive(f"unsafe entry name {name!r} in the archive: absolute paths and '..' are not allowed")


def _check_entry(info: zipfile.ZipInfo, limits: ArchiveLimits) -> None:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InvalidArchive(f"entry {info.filename!r} is a symbolic link; links are not allowed")
    if info.flag_bits & 0x1:
        raise InvalidArchive(f"entry {info.filename!r} is encrypted; upload an unencrypted zip")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        raise InvalidArchive(f"entry {info.filename!r} uses an unsupported compression method")
    if info.file_size > limits.max_entry_bytes:
        raise ArchiveTooLarge(
            f"entry {info.filename!r} unpacks to {info.file_size} bytes; the limit is {limits.max_entry_bytes}"
        )
    if info.file_size > 1024 * 1024 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        raise ArchiveTooLarge(
            f"entry {info.filename!r} is compressed {info.file_size / max(info.compress_size, 1):.0f}:1; "
            f"the limit is {limits.max_ratio:.0f}:1 (zip-bomb guard)"
        )
