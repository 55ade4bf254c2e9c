"""Declared lines: a line named before its bank exists, and the good parts collected as its first references.

A declared line is a small JSON record under the banks folder (``<banks>/.lines/<name>/line.json``, written
atomically; never a pickle) with the images operators confirmed good kept beside it
(``<banks>/.lines/<name>/references/<sha256>.png``). While a line has no bank, an inspection against it is asked of
the MLLM alone, 0-shot (no template, no expert hints, no CAAS; :mod:`eagle.inspection`), or refused with
``bank_empty`` when the MLLM is disabled. Once :attr:`DeclaredLine.ready_to_build`, the collected images are built
into the line's bank with the normal build path (:func:`build_line`, :meth:`eagle.pipeline.Pipeline.build_bank`),
and the record is removed: the line is a normal bank from then on.

Example:
    >>> import tempfile
    >>> lines = LineStore(Path(tempfile.mkdtemp()), min_references=2)
    >>> lines.declare("line-7").model_dump(include={"name", "state", "collected", "ready_to_build"})
    {'name': 'line-7', 'state': 'declared', 'collected': 0, 'ready_to_build': False}
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common import atomic
from eagle.errors import EagleError

if TYPE_CHECKING:
    from eagle.bank_records import BankSummary

__all__ = [
    "LINES_DIR",
    "BankEmptyError",
    "CollectedReference",
    "DeclaredLine",
    "LineExistsError",
    "LineStore",
    "build_line",
    "collect_confirmed",
    "is_confirmed_good",
]

log = logging.getLogger(__name__)

LINES_DIR = ".lines"
"""The folder of declared lines under the banks folder (a dot name: never taken for a bank)."""
RECORD_FILE = "line.json"
REFERENCES_DIR = "references"
_SUFFIX = ".png"


class BankEmptyError(EagleError, LookupError):
    """A declared line that has no bank yet, asked for something only a bank can do (the expert's inspection)."""

    code, http_status = "bank_empty", 409


class LineExistsError(EagleError, FileExistsError):
    """A line (declared) or a bank of that name exists already."""

    code, http_status = "bank_exists", 409


class CollectedReference(BaseModel):
    """One good part collected for a declared line."""

    model_config = ConfigDict(frozen=True)

    image_sha256: str = Field(description="SHA-256 of the image file's bytes (its file name in the line's folder).")
    image_name: str | None = Field(None, description="The inspected image's file name, when known.")
    run_id: str | None = Field(None, description="The inspection (audit run id) an operator confirmed good.")
    time: str = Field(description="When it was collected, ISO 8601 in UTC.")


class DeclaredLine(BaseModel):
    """A line declared before its bank exists (``eagle bank create NAME --empty``, ``POST /v1/lines``, the app)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The line's name (the name its bank will have).")
    state: Literal["declared"] = Field("declared", description="Always 'declared': no bank yet.")
    declared: str = Field(description="When the line was declared, ISO 8601 in UTC.")
    note: str = Field("", description="One line for people.")
    collected: int = Field(description="Good parts collected so far as the line's first references.")
    min_references: int = Field(description="How many the bank build needs (settings.expert.min_references).")
    ready_to_build: bool = Field(description="Whether enough are collected to build the bank.")
    inspection: Literal["mllm-only-0shot", "refused"] = Field(
        description="What an inspection against the line does now: the MLLM alone, 0-shot, or refused (bank_empty)."
    )


class _Record(BaseModel):
    """The on-disk record (``line.json``)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    declared: str
    note: str = ""
    references: list[CollectedReference] = Field(default_factory=list)


class LineStore:
    """The declared lines of one banks folder (``<banks>/.lines``). Thread-safe; writes are atomic.

    Args:
        banks_root: the banks folder.
        min_references: how many collected images a build needs (:attr:`DeclaredLine.ready_to_build`).
        max_pixels: largest collected image accepted (``settings.max_image_pixels``).
        mllm_enabled: whether an inspection of a declared line can be asked of the MLLM (shown in the record).
    """

    def __init__(
        self, banks_root: Path, *, min_references: int, max_pixels: int = 100_000_000, mllm_enabled: bool = True
    ) -> None:
        self.root = Path(banks_root) / LINES_DIR
        self.min_references = max(1, int(min_references))
        self.max_pixels = int(max_pixels)
        self.mllm_enabled = bool(mllm_enabled)
        self._lock = threading.RLock()

    def folder(self, name: str) -> Path:
        """The folder of line ``name`` (validated; it may not exist)."""
        from eagle.banks import validate_bank_name

        return self.root / validate_bank_name(name)

    def exists(self, name: str) -> bool:
        """Whether line ``name`` is declared."""
        return (self.folder(name) / RECORD_FILE).is_file()

    def _read(self, name: str) -> _Record:
        path = self.folder(name) / RECORD_FILE
        try:
            record = _Record.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            from eagle.banks import BankNotFoundError

            raise BankNotFoundError(f"no bank or declared line named {name!r}") from None
        except (ValidationError, ValueError) as err:
            raise EagleError(
                f"declared line {name!r}: {RECORD_FILE} is unreadable ({type(err).__name__}); "
                "delete and declare it again",
                code="bank_unusable",
                http_status=409,
            ) from None
        return record

    def _write(self, record: _Record) -> None:
        folder = self.folder(record.name)
        folder.mkdir(parents=True, exist_ok=True)
        atomic.write_text(folder / RECORD_FILE, json.dumps(record.model_dump(mode="json"), indent=2) + "\n")

    def _public(self, record: _Record) -> DeclaredLine:
        return DeclaredLine(
            name=record.name,
            declared=record.declared,
            note=record.note,
            collected=len(record.references),
            min_references=self.min_references,
            ready_to_build=len(record.references) >= self.min_references,
            inspection="mllm-only-0shot" if self.mllm_enabled else "refused",
        )

    def declare(self, name: str, *, note: str = "") -> DeclaredLine:
        """Declare line ``name`` (no bank yet).

        Raises:
            BankNameError: an invalid name. LineExistsError: it is declared already.
        """
        from eagle.audit import utc_now

        note = " ".join(str(note).split())[:200]
        with self._lock:
            if self.exists(name):
                raise LineExistsError(f"line {name!r} is declared already")
            record = _Record(name=name, declared=utc_now(), note=note)
            self._write(record)
        log.info("line %r declared (no bank yet)", name)
        return self._public(record)

    def get(self, name: str) -> DeclaredLine:
        """The declared line ``name`` (``BankNotFoundError`` when it is not declared)."""
        with self._lock:
            return self._public(self._read(name))

    def list(self) -> list[DeclaredLine]:
        """Every readable declared line, newest first."""
        if not self.root.is_dir():
            return []
        found = []
        from eagle.banks import is_valid_bank_name

        for child in self.root.iterdir():
            if child.is_dir() and is_valid_bank_name(child.name) and (child / RECORD_FILE).is_file():
                try:
                    found.append(self.get(child.name))
                except EagleError as err:
                    log.warning("%s", err)
        return sorted(found, key=lambda line: line.declared, reverse=True)

    def delete(self, name: str) -> None:
        """Remove line ``name``'s record and collected images (``BankNotFoundError`` when it is not declared)."""
        with self._lock:
            self._read(name)
            folder = self.folder(name)
            trash = folder.with_name(f".{folder.name}.deleting")
            folder.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        log.info("declared line %r deleted", name)

    def references(self, name: str) -> list[CollectedReference]:
        """The collected good parts of line ``name``, oldest first."""
        with self._lock:
            return list(self._read(name).references)

    def reference_paths(self, name: str) -> list[Path]:
        """The files of the collected good parts, oldest first (those whose file is there)."""
        folder = self.folder(name) / REFERENCES_DIR
        paths = [folder / f"{ref.image_sha256}{_SUFFIX}" for ref in self.references(name)]
        return [p for p in paths if p.is_file() and not p.is_symlink()]

    def collect(
        self, name: str, data: bytes, *, image_name: str | None = None, run_id: str | None = None
    ) -> tuple[DeclaredLine, bool]:
        """Collect ``data`` (an image file's bytes) as a good part of line ``name``; returns the line and if it is new.

        The same picture (same sha256) is collected once.

        Raises:
            BankNotFoundError: the line is not declared. ImageError: ``data`` is not an image.
        """
        from eagle.audit import utc_now
        from eagle.images import load_image

        sha = hashlib.sha256(data).hexdigest()
        load_image(
            data, max_pixels=self.max_pixels, name=image_name or "collected image"
        )  # an image, or one ImageError line
        with self._lock:
            record = self._read(name)
            if any(ref.image_sha256 == sha for ref in record.references):
                return self._public(record), False
            folder = self.folder(name) / REFERENCES_DIR
            folder.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(folder / f"{sha}{_SUFFIX}", data)
            entry = CollectedReference(image_sha256=sha, image_name=image_name, run_id=run_id, time=utc_now())
            record = record.model_copy(update={"references": [*record.references, entry]})
            self._write(record)
        log.info("line %r: collected %s (%d so far)", name, (image_name or sha[:16]), len(record.references))
        return self._public(record), True


class DeclaredLines:
    """The declared-line calls of a bank store (mixed into :class:`~eagle.banks.BankStore` and the tests' store).

    The store provides ``exists(name)`` (a built bank of that name) and ``lines`` (its :class:`LineStore`).
    """

    lines: LineStore

    def exists(self, name: str) -> bool:  # pragma: no cover - provided by the store
        raise NotImplementedError

    def is_declared(self, name: str) -> bool:
        """Whether ``name`` is a line declared without a bank (a built bank of that name wins)."""
        return self.lines.exists(name) and not self.exists(name)

    def declare(self, name: str, *, note: str = "") -> DeclaredLine:
        """Declare line ``name`` before its bank exists (:meth:`LineStore.declare`).

        Raises:
            BankNameError: an invalid name. LineExistsError: a bank or a declared line of that name exists.
        """
        if self.exists(name):
            raise LineExistsError(f"bank {name!r} exists already; a line is declared only before its bank")
        return self.lines.declare(name, note=note)

    def declared(self) -> list[DeclaredLine]:
        """The lines declared without a bank, newest first (a line whose bank was built meanwhile is left out)."""
        return [line for line in self.lines.list() if not self.exists(line.name)]


def is_confirmed_good(row: dict[str, Any]) -> bool:
    """Whether a feedback row (:meth:`eagle.audit.AuditLog.record_feedback`) says the part is good."""
    return row.get("correct_verdict") == "no_defect"


def collect_confirmed(
    lines: LineStore, row: dict[str, Any], *, shown: bytes | str | Path | None = None, kept: Any = None
) -> tuple[DeclaredLine, bool] | None:
    """Collect the part of a feedback row as a first reference, when its line is declared and it was confirmed good.

    The image comes from ``shown`` (the app's image on screen: bytes or a path) or else from the kept images
    (``kept``: an :class:`~eagle.kept_images.KeptImages`, used where ``EAGLE_KEEP_IMAGES__ENABLED`` keeps them).
    Returns the line after collecting and whether the part is new to it (the same picture is collected once);
    ``None`` when nothing applies (no declared line, not good, no image).
    Never raises for a missing image: the feedback is recorded either way.
    """
    bank = row.get("bank")
    if not bank or not is_confirmed_good(row) or not lines.exists(bank):
        return None
    sha = row.get("image_sha256") or ""
    data: bytes | None = None
    if shown is not None:
        data = shown if isinstance(shown, bytes) else Path(shown).read_bytes()
    elif kept is not None and sha and kept.has(sha):
        try:
            data = kept.read(sha)
        except EagleError as err:
            log.warning("line %r: cannot collect %s: %s", bank, sha[:16], err)
    if data is None:
        return None
    return lines.collect(bank, data, image_name=row.get("image_name") or None, run_id=row.get("run_id"))


def build_line(pipeline: Any, name: str, *, progress: Any = None) -> BankSummary:
    """Build the bank of declared line ``name`` from its collected good parts (the normal build path).

    :meth:`eagle.pipeline.Pipeline.build_bank` builds it; once built, the declared record and its copies are
    removed: the line is a normal bank.

    Raises:
        BankNotFoundError: not declared. BankEmptyError: fewer than the minimum collected.
    """
    lines: LineStore = pipeline.banks.lines
    line = lines.get(name)
    if not line.ready_to_build:
        raise BankEmptyError(
            f"line {name!r} has {line.collected} of the {line.min_references} good parts a bank needs: "
            "confirm more good parts first"
        )
    refs = lines.references(name)
    paths = lines.reference_paths(name)
    by_file = {f"{ref.image_sha256}{_SUFFIX}": ref for ref in refs}
    names = _unique_names([by_file[p.name].image_name or p.name for p in paths])
    summary = pipeline.build_bank(paths, name, names=names, progress=progress)
    lines.delete(name)
    return summary


def _unique_names(names: Sequence[str]) -> list[str]:
    """File names made unique (``a.png``, ``a-2.png``): two good parts may share an inspected file name."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0) + 1
        seen[name] = count
        if count == 1:
            out.append(name)
        else:
            stem, dot, ext = name.rpartition(".")
            out.append(f"{stem}-{count}.{ext}" if dot else f"{name}-{count}")
    return out
