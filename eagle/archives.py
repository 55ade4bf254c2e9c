"""Safe extraction of user-supplied zip files (reference image sets, bank archives).

Every member is checked before anything is written: no absolute paths, no ``..``, no links, a cap on
member count, on total uncompressed size and on the compression ratio (zip bombs).

Example:
    >>> import io, zipfile, tempfile
    >>> buf = io.BytesIO()
    >>> with zipfile.ZipFile(buf, "w") as z:
    ...     z.writestr("a/b.txt", "hi")
    >>> out = tempfile.mkdtemp()
    >>> [p.name for p in extract_zip(io.BytesIO(buf.getvalue()), out)]
    ['b.txt']
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

MAX_MEMBERS = 20_000
MAX_TOTAL_BYTES = 4 * 1024**3
MAX_RATIO = 200


class ArchiveError(ValueError):
    """The archive is unreadable or unsafe; the message names the member at fault."""


def _safe_member_path(name: str) -> PurePosixPath | None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or any(part == ".." for part in path.parts) or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(f"unsafe path in archive: {name!r}")
    if not path.parts or name.endswith("/"):
        return None
    if path.parts[0] == "__MACOSX" or any(part.startswith(".") for part in path.parts):
        return None  # resource forks and hidden files are not content
    return path


def extract_zip(
    source: str | Path | BinaryIO,
    dest: str | Path,
    *,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    suffixes: set[str] | None = None,
) -> list[Path]:
    """Extract a zip into ``dest`` after validating every member; returns the extracted files (sorted).

    Args:
        source: a path or a binary file object.
        dest: target directory (created).
        max_members: most members accepted.
        max_total_bytes: most uncompressed bytes accepted.
        suffixes: when given, only members with these lower-case suffixes are extracted (others skipped).

    Raises:
        ArchiveError: not a zip, corrupt, or unsafe (path traversal, links, too large, suspicious ratio).
    """
    dest = Path(dest)
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as err:
        raise ArchiveError(f"not a readable zip file ({err})") from None
    with archive:
        members = archive.infolist()
        if len(members) > max_members:
            raise ArchiveError(f"archive has {len(members)} members; at most {max_members} are accepted")
        total = sum(m.file_size for m in members)
        if total > max_total_bytes:
            raise ArchiveError(f"archive expands to {total} bytes; at most {max_total_bytes} are accepted")
        chosen: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        for member in members:
            path = _safe_member_path(member.filename)
            if path is None or member.is_dir():
                continue
            if stat.S_ISLNK(member.external_attr >> 16):
                raise ArchiveError(f"links are not accepted in archives: {member.filename!r}")
            if member.compress_size and member.file_size / member.compress_size > MAX_RATIO:
                raise ArchiveError(f"suspicious compression ratio for {member.filename!r} (zip bomb?)")
            if suffixes is not None and path.suffix.lower() not in suffixes:
                continue
            chosen.append((member, path))
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for member, path in chosen:
            target = dest.joinpath(*path.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(member) as src, open(target, "wb") as out:
                    remaining = member.file_size
                    while chunk := src.read(1 << 20):
                        remaining -= len(chunk)
                        if remaining < 0:
                            raise ArchiveError(f"{member.filename!r} is larger than its header says")
                        out.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise ArchiveError(f"corrupt member {member.filename!r} ({err})") from None
            written.append(target)
    return sorted(written)
