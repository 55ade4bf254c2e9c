"""Turn what people upload (files, a folder, zips) into a list of image files to read."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

from eagle.archives import DEFAULT_LIMITS, ArchiveLimits, extract_zip
from eagle.images import IMAGE_EXTENSIONS


def collect_reference_files(
    uploads: Iterable[str | Path] | None,
    workdir: str | Path | None = None,
    *,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> list[Path]:
    """Expand uploaded paths: image files stay, zips are safely extracted, anything else is kept for the reader.

    Non-image files inside a folder upload are kept too, so that the reader reports them instead of them
    silently vanishing; zip members with other suffixes are skipped (archives often carry notes).

    Args:
        uploads: paths Gradio gives for a multi-file or folder upload.
        workdir: where zips are extracted (a fresh temporary directory by default).
        limits: the zip limits; the app passes ``ArchiveLimits.from_settings(settings)``, the rule the API's
            ``POST /v1/banks`` applies to the same kind of zip.

    Returns:
        Files in a stable order (sorted by name within each upload).
    """
    files: list[Path] = []
    for item in uploads or []:
        path = Path(item)
        if path.suffix.lower() == ".zip":
            target = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="eagle-refs-"))
            files.extend(extract_zip(path, target / path.stem, limits, suffixes=set(IMAGE_EXTENSIONS)))
        elif path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        elif path.is_file():
            files.append(path)
    return files
