"""The saved banks of one data directory: list, load (cached), delete, export and import as zips.

Bank directories follow :mod:`expert.bank`'s format (docs/bank-format.md); this module adds names, a
cache of loaded experts, and safe zip transport. Nothing is ever unpickled.

Example:
    >>> from eagle.settings import ExpertSettings
    >>> store = BankStore(Path("/tmp/eagle-doc-banks"), ExpertSettings())
    >>> store.path("line-3")
    PosixPath('/tmp/eagle-doc-banks/line-3')
    >>> validate_bank_name("../etc")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    BankNameError: invalid bank name '../etc'...
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eagle.archives import ArchiveLimits, extract_zip
from eagle.settings import ExpertSettings
from expert.bank import META_FILE, BankError, load_bank, read_meta

if TYPE_CHECKING:
    from expert.model import ExpertScorer

__all__ = ["BankError", "BankNameError", "BankStore", "BankSummary"]

BANK_ZIP_LIMITS = ArchiveLimits(max_entries=20_000, max_entry_bytes=ArchiveLimits().max_total_bytes)
"""Caps for importing a bank zip: one file (the memory bank grows with the references) may take the whole total."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class BankNameError(ValueError):
    """A bank name that is not allowed (it would escape the data directory or is not portable)."""


@dataclass(frozen=True)
class BankSummary:
    """What people need to know about a saved bank, read from its meta.json alone."""

    name: str
    bank_id: str
    created: str
    n_references: int
    n_patches: int
    coreset_size: int
    coreset_ratio: float
    threshold_method: str
    tau: float
    s_max: float
    backbone: str
    weights_source: str
    distance: str
    warning: str | None = None


def validate_bank_name(name: str) -> str:
    """Return ``name`` if it is a valid bank name, else raise :class:`BankNameError`."""
    if not isinstance(name, str) or not _NAME.match(name) or name in {".", ".."} or ".." in name:
        raise BankNameError(
            f"invalid bank name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


class BankStore:
    """Banks under one root directory (``settings.banks_dir``), one sub-directory each.

    Loaded experts are cached per name and dropped when the bank is rebuilt, deleted or replaced.
    Thread-safe.
    """

    def __init__(self, root: Path, settings: ExpertSettings) -> None:
        self.root = Path(root)
        self.settings = settings
        self._cache: dict[str, ExpertScorer] = {}
        self._templates: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.RLock()

    def path(self, name: str) -> Path:
        """The directory of bank ``name`` (validated; it may not exist yet)."""
        return self.root / validate_bank_name(name)

    def exists(self, name: str) -> bool:
        """Whether bank ``name`` is saved."""
        return (self.path(name) / META_FILE).is_file()

    def _require(self, name: str) -> Path:
        path = self.path(name)
        if not (path / META_FILE).is_file():
            known = ", ".join(s.name for s in self.list()) or "none yet"
            raise FileNotFoundError(f"no bank named {name!r} (saved banks: {known})")
        return path

    def summary(self, name: str) -> BankSummary:
        """The :class:`BankSummary` of a saved bank."""
        path = self._require(name)
        meta = read_meta(path)
        low = meta.counts.references < self.settings.recommended_references
        return BankSummary(
            name=name,
            bank_id=meta.bank_id,
            created=meta.created_utc,
            n_references=meta.counts.references,
            n_patches=meta.counts.patches,
            coreset_size=meta.counts.coreset,
            coreset_ratio=meta.coreset.ratio,
            threshold_method=meta.threshold.method,
            tau=meta.threshold.tau,
            s_max=meta.threshold.s_max,
            backbone=meta.backbone.id,
            weights_source=meta.backbone.weights,
            distance=meta.distance,
            warning=(
                f"built from {meta.counts.references} references; {self.settings.recommended_references}+ are "
                "recommended for a reliable threshold"
            )
            if low
            else None,
        )

    def list(self) -> list[BankSummary]:
        """Every readable bank, newest first (unreadable directories are skipped)."""
        if not self.root.is_dir():
            return []
        summaries = []
        for child in self.root.iterdir():
            if child.is_dir() and _NAME.match(child.name) and (child / META_FILE).is_file():
                try:
                    summaries.append(self.summary(child.name))
                except (BankError, ValueError, OSError):
                    continue
        return sorted(summaries, key=lambda s: s.created, reverse=True)

    def load(self, name: str) -> ExpertScorer:
        """The expert of bank ``name``, loaded once and cached.

        Raises:
            FileNotFoundError: no such bank. BankError: unreadable, or built with other settings.
        """
        with self._lock:
            scorer = self._cache.get(name)
            if scorer is None:
                from expert.model import load_expert

                scorer = load_expert(self._require(name), self.settings)
                self._cache[name] = scorer
            return scorer

    def template_image(self, name: str, index: int) -> np.ndarray:
        """The stored copy of reference ``index`` of bank ``name`` (RGB uint8), cached."""
        key = (name, index)
        with self._lock:
            if key not in self._templates:
                self._templates[key] = self.load(name).bank.load_reference(index)
            return self._templates[key]

    def reference_name(self, name: str, index: int) -> str:
        """The original file name of reference ``index``."""
        return self.load(name).bank.meta.references[index].name

    def forget(self, name: str) -> None:
        """Drop cached objects of bank ``name`` (after a rebuild or delete)."""
        with self._lock:
            self._cache.pop(name, None)
            for key in [k for k in self._templates if k[0] == name]:
                del self._templates[key]

    def delete(self, name: str) -> None:
        """Delete bank ``name`` from disk."""
        path = self._require(name)
        with self._lock:
            self.forget(name)
            trash = path.with_name(f".{path.name}.deleting")
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def export_zip(self, name: str, dest: Path) -> Path:
        """Write bank ``name`` as a zip (its files under a top folder named after the bank)."""
        path = self._require(name)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                archive.write(file, Path(name) / file.relative_to(path))
        return dest

    def import_zip(self, zip_path: Path, name: str) -> BankSummary:
        """Import a bank zip as ``name``: extracted safely, validated with :func:`expert.bank.load_bank`.

        The zip may hold the bank files at its top level or inside one folder. An existing bank of that
        name is replaced only after the new one validated.

        Raises:
            ArchiveError: unsafe or corrupt zip. BankError: not a valid bank, or built with other settings.
        """
        target = self.path(name)
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".import-") as staging:
            staging_path = Path(staging) / "x"
            extract_zip(zip_path, staging_path, BANK_ZIP_LIMITS)
            candidates = [p.parent for p in staging_path.rglob(META_FILE)]
            if len(candidates) != 1:
                raise BankError(f"the zip must contain exactly one bank ({META_FILE}); found {len(candidates)}")
            root = candidates[0]
            load_bank(root, self.settings)  # full validation: files, tensors, format version, settings
            with self._lock:
                self.forget(name)
                if target.exists():
                    old = target.with_name(f".{target.name}.replaced")
                    target.rename(old)
                    root.rename(target)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    root.rename(target)
        return self.summary(name)
