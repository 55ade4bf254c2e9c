"""Kept inspected images: a content-addressed store of the line's pictures, off by default, pruned by count and age.

The audit log keeps each inspection's image name and sha256, never the picture. With
``EAGLE_KEEP_IMAGES__ENABLED=true`` the front ends also keep the inspected file's bytes here, named by that
sha256 (``<data_dir>/kept-images/<sha256>.img``), so a bank can later be grown from confirmed good parts
(:mod:`eagle.bank_refresh`). The same picture inspected again is one file (its age restarts). Every write is
atomic (:mod:`common.atomic`) and prunes what is older than ``max_days`` or beyond the ``max_count`` newest.

The store never follows a link: a kept folder that is a symbolic link is refused, entries are opened with
``O_NOFOLLOW``, and an entry that is a link (or not a regular file) is treated as missing. What is read back is
checked against its name's sha256 and decoded again (:func:`eagle.images.load_image`) before it is taught.

Example:
    >>> import tempfile
    >>> from eagle.settings import Settings
    >>> s = Settings(data_dir=tempfile.mkdtemp(), keep_images={"enabled": True})
    >>> kept = KeptImages.of(s)
    >>> kept.has("00" * 32)
    False
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import time
from pathlib import Path

from common import atomic
from eagle.errors import EagleError
from eagle.images import load_image

__all__ = ["KEPT_DIR", "KeptImageError", "KeptImages", "keep_inspected_image"]

KEPT_DIR = "kept-images"
"""The folder under the data directory holding kept images."""

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SUFFIX = ".img"
_DAY_S = 86_400.0

_log = logging.getLogger(__name__)


class KeptImageError(EagleError, ValueError):
    """A kept image that cannot be used: missing, a link, altered, not an image, or the store is refused."""

    code, http_status = "kept_image_unusable", 409


class KeptImages:
    """The kept-images folder of one data directory (see the module docstring).

    Args:
        root: The folder (created on first write); it must not be a symbolic link.
        max_count: Most images kept.
        max_days: Images older than this are deleted on each write.
        max_pixels: Read-back images larger than this are refused (the decompression-bomb guard).
    """

    def __init__(self, root: Path, *, max_count: int, max_days: float, max_pixels: int) -> None:
        self.root = Path(root)
        self.max_count = int(max_count)
        self.max_days = float(max_days)
        self.max_pixels = int(max_pixels)

    @classmethod
    def of(cls, settings) -> KeptImages:
        """The store of ``settings.data_dir`` with ``settings.keep_images``' limits."""
        keep = settings.keep_images
        return cls(
            Path(settings.data_dir) / KEPT_DIR,
            max_count=keep.max_count,
            max_days=keep.max_days,
            max_pixels=settings.max_image_pixels,
        )

    # -- paths -------------------------------------------------------------------------------------------------
    def _folder(self, *, create: bool) -> Path | None:
        """The folder, refusing a link; ``None`` when it does not exist and ``create`` is false."""
        if self.root.is_symlink():
            raise KeptImageError(f"the kept-images folder {str(self.root)!r} is a symbolic link; refused")
        if not self.root.exists():
            if not create:
                return None
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)  # pictures of the line: the service's user alone reads them, whatever the umask
        if not self.root.is_dir():
            raise KeptImageError(f"the kept-images folder {str(self.root)!r} is not a folder")
        return self.root

    @staticmethod
    def _checked(sha256: str) -> str:
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise KeptImageError(f"not a sha256: {str(sha256)[:80]!r}")
        return sha256

    def path(self, sha256: str) -> Path:
        """Where the image of ``sha256`` is (or would be) kept."""
        return self.root / f"{self._checked(sha256)}{_SUFFIX}"

    # -- reading -----------------------------------------------------------------------------------------------
    def has(self, sha256: str) -> bool:
        """Whether a regular file (not a link) is kept for ``sha256``."""
        try:
            folder = self._folder(create=False)
            if folder is None:
                return False
            info = os.lstat(self.path(sha256))
        except (OSError, KeptImageError):
            return False
        return stat.S_ISREG(info.st_mode)

    def list(self) -> list[tuple[str, float]]:
        """``(sha256, mtime)`` of every kept image (regular files only), newest first."""
        folder = self._folder(create=False)
        if folder is None:
            return []
        found: list[tuple[str, float]] = []
        with os.scandir(folder) as entries:
            for entry in entries:
                stem = entry.name[: -len(_SUFFIX)] if entry.name.endswith(_SUFFIX) else ""
                if not _SHA256.fullmatch(stem) or not entry.is_file(follow_symlinks=False):
                    continue
                found.append((stem, entry.stat(follow_symlinks=False).st_mtime))
        return sorted(found, key=lambda item: item[1], reverse=True)

    def read(self, sha256: str) -> bytes:
        """The kept image's bytes, checked against ``sha256`` and decoded again.

        Raises:
            KeptImageError: missing, a link or not a regular file, altered (another hash), or not a valid image.
        """
        path = self.path(sha256)
        if self._folder(create=False) is None:
            raise KeptImageError(f"no kept image {sha256[:16]}")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as err:
            raise KeptImageError(f"no kept image {sha256[:16]} ({err.strerror or err})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise KeptImageError(f"kept image {sha256[:16]} is not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as handle:
                data = handle.read()
        finally:
            os.close(fd)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise KeptImageError(f"kept image {sha256[:16]} was altered (its bytes have another sha256)")
        try:
            load_image(data, max_pixels=self.max_pixels, name=f"kept image {sha256[:16]}")
        except EagleError as err:
            raise KeptImageError(str(err)) from None
        return data

    # -- writing -----------------------------------------------------------------------------------------------
    def keep(self, sha256: str, data: bytes, *, now: float | None = None) -> bool:
        """Keep ``data`` as the image of ``sha256`` (atomically), then prune; returns whether it is kept.

        ``data`` must hash to ``sha256`` (the audit row's). An image already kept gets its age restarted.
        """
        sha256 = self._checked(sha256)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise KeptImageError(f"image bytes do not match sha256 {sha256[:16]}")
        now = time.time() if now is None else now
        self._folder(create=True)
        path = self.path(sha256)
        if self.has(sha256):
            os.utime(path, (now, now), follow_symlinks=False)
        else:
            atomic.write_bytes(path, data)  # os.replace swaps a link in the way, never writes through it
            _owner_only(path)
            os.utime(path, (now, now), follow_symlinks=False)
        self.prune(now=now)
        return self.has(sha256)

    def prune(self, *, now: float | None = None) -> list[str]:
        """Delete kept images older than ``max_days`` and beyond the ``max_count`` newest; returns their sha256s."""
        now = time.time() if now is None else now
        oldest = now - self.max_days * _DAY_S
        removed: list[str] = []
        for index, (sha256, mtime) in enumerate(self.list()):
            if index >= self.max_count or mtime < oldest:
                try:
                    os.unlink(self.path(sha256))
                except FileNotFoundError:
                    continue
                removed.append(sha256)
        return removed

    def delete(self, sha256: str) -> bool:
        """Delete one kept image (the link itself, if it is one); returns whether something was deleted."""
        try:
            os.unlink(self.path(sha256))
        except FileNotFoundError:
            return False
        return True


def keep_inspected_image(settings, sha256: str, image: bytes | str | Path) -> bool:
    """Keep an inspected image when ``settings.keep_images.enabled`` (front ends call this next to the audit row).

    ``settings`` may be ``None`` (a pipeline without settings): nothing is kept. Never raises: keeping is
    secondary to the verdict; a failure is logged. ``image`` is the inspected file's bytes or its path (read
    without following a link).

    Returns:
        Whether the image is kept now (always ``False`` with keeping off).
    """
    if settings is None or not settings.keep_images.enabled or not sha256:
        return False
    try:
        if isinstance(image, (str, Path)):
            fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
            with os.fdopen(fd, "rb") as handle:
                image = handle.read()
        return KeptImages.of(settings).keep(sha256, bytes(image))
    except Exception as err:  # noqa: BLE001 - the inspection is done and audited; only the copy is missing
        _log.warning("could not keep inspected image %s: %s", str(sha256)[:16], err)
        return False


def _owner_only(path: Path) -> None:
    """Make a kept file readable by its owner alone (0600), opened without following a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
