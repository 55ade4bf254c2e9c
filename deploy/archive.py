"""The service's check of an uploaded zip of normal images (the input of a bank build).

The rules (unsafe names, links and other special files, encryption, compression methods, entry count, sizes,
zip-bomb ratio) live in :mod:`eagle.archives` alone; this adapter runs :func:`eagle.archives.scan_zip` on the
image entries while the upload request is still open, so a bad archive is answered at once instead of becoming a
failed job (the errors carry their own codes: :class:`~eagle.archives.ArchiveTooLargeError` → 413
``archive_too_large``, any other :class:`~eagle.archives.ArchiveError` → 422 ``invalid_archive``) and adds the
service's own rule: the archive must hold images. The job then
extracts with :func:`eagle.archives.extract_zip`, which applies the same rules and counts the bytes inflated.

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
    ... except ArchiveError as err:
    ...     print(err.http_status, err.code)
    422 invalid_archive
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from eagle.archives import ArchiveError, ArchiveLimits, scan_zip
from eagle.images import IMAGE_EXTENSIONS


def scan_archive(path: Path, limits: ArchiveLimits) -> list[zipfile.ZipInfo]:
    """Validate an uploaded archive's directory and list its image entries (sorted by name) without extracting.

    Raises:
        ArchiveError: not a zip, unsafe names, links or special files (FIFO, device, socket), encryption,
            unsupported compression, or no images.
        ArchiveTooLargeError: too many entries, an entry or the total too large, or too compressible.
    """
    images = scan_zip(path, limits, suffixes=set(IMAGE_EXTENSIONS))
    if not images:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ArchiveError(f"the archive holds no images (looked for {extensions})")
    return images
