"""The saved banks of one data directory: list, load (cached), delete, export and import as zips.

Bank directories follow :mod:`expert.bank`'s format (docs/bank-format.md); this module adds names, a
cache of loaded experts, and safe zip transport. Nothing is ever unpickled.

A bank counts as loaded only once it has scored: :meth:`BankStore.load` validates the bank
(:func:`expert.bank.load_bank`, meaning included), opens its feature extractor, then runs one real inspection
of a stored reference image (:func:`probe_expert`). Whatever goes wrong becomes one :class:`BankError` line
(the service answers ``409 bank_unusable``, never 500), is remembered until the bank changes on disk, and is
listed by :meth:`BankStore.unusable` (the service's ``/readyz`` reports it). An import runs the same checks
before the bank is moved into place, and takes from the zip only the files of the bank format.

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

import logging
import math
import os
import re
import shutil
import threading
import weakref
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from common import atomic
from eagle import bank_versions
from eagle.archives import ArchiveLimits, describe_names, extract_zip, scan_zip
from eagle.bank_records import BankSummary, BankVersion
from eagle.bank_versions import BankVersionNotFoundError
from eagle.errors import EagleError, is_disk_full
from eagle.lines import DeclaredLines, LineStore
from eagle.settings import ExpertSettings
from expert.bank import is_bank_file, read_meta
from expert.bank_schema import EMBEDDINGS_FILE, META_FILE, ONNX_FILE, TENSORS_FILE, BankError

if TYPE_CHECKING:
    from expert.scorer import ExpertScorer

__all__ = [
    "BANK_NAME_MAX_LENGTH",
    "BANK_NAME_PATTERN",
    "BANK_NAME_REGEX",
    "BankError",
    "BankNameError",
    "BankNotFoundError",
    "BankStore",
    "BankSummary",
    "BankVersion",
    "BankVersionNotFoundError",
    "probe_expert",
    "validate_bank_name",
]

log = logging.getLogger(__name__)

IMPORT_STAGING_PREFIX = ".import-"
"""Staging folder of a bank import under the banks directory (:func:`common.atomic.staging_dir`: host and pid)."""

LEGACY_STAGING_AGE_S = 24 * 3600.0
"""Import staging folders named before they carried host and pid are removed once this old (seconds)."""

BANK_ZIP_LIMITS = ArchiveLimits(max_entries=20_000, max_entry_bytes=ArchiveLimits().max_total_bytes)
"""Caps for importing a bank zip: one file (the memory bank grows with the references) may take the whole total;
the total ratio and entry count are the rules of :class:`eagle.archives.ArchiveLimits` for every zip."""

BANK_NAME_MAX_LENGTH = 64
"""Longest bank name (characters)."""

BANK_NAME_REGEX = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?$"
"""The bank-name rule as a regular expression that Python and JSON Schema (the service's OpenAPI ``pattern``) read
alike: letters, digits, ``._-``, starting with a letter or digit, no ``..`` anywhere; at most
:data:`BANK_NAME_MAX_LENGTH` characters on top."""

BANK_NAME_PATTERN = re.compile(BANK_NAME_REGEX)
""":data:`BANK_NAME_REGEX` compiled, matched with ``fullmatch``. Every front end checks names with
:func:`validate_bank_name`."""


class BankNameError(EagleError, ValueError):
    """A bank name that is not allowed (it would escape the data directory or is not portable)."""

    code, http_status = "invalid_bank_name", 422


class BankNotFoundError(EagleError, FileNotFoundError):
    """No saved bank has that name."""

    code, http_status = "bank_not_found", 404


def is_valid_bank_name(name: object) -> bool:
    """Whether ``name`` follows the bank-name rule (:data:`BANK_NAME_PATTERN`, :data:`BANK_NAME_MAX_LENGTH`)."""
    return isinstance(name, str) and len(name) <= BANK_NAME_MAX_LENGTH and BANK_NAME_PATTERN.fullmatch(name) is not None


def validate_bank_name(name: object) -> str:
    r"""Return ``name`` if it is a valid bank name, else raise :class:`BankNameError`: the one rule for every front end.

    Example:
        >>> validate_bank_name("line-3.bolts")
        'line-3.bolts'
        >>> for bad in ("a..b", "bolts\n", ".hidden", "a/b"):
        ...     try:
        ...         validate_bank_name(bad)
        ...     except BankNameError as err:
        ...         print(repr(bad), err.code)
        'a..b' invalid_bank_name
        'bolts\n' invalid_bank_name
        '.hidden' invalid_bank_name
        'a/b' invalid_bank_name
    """
    if not is_valid_bank_name(name):
        shown = name if isinstance(name, str) else type(name).__name__
        raise BankNameError(
            f"invalid bank name {shown!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(no '..')"
        )
    return name  # type: ignore[return-value]


class BankStore(DeclaredLines):
    """Banks under one root directory (``settings.banks_dir``), one sub-directory each.

    Banks are versioned (:mod:`eagle.bank_versions`): every change (:meth:`write_version`: build, teach, import)
    writes a complete new version and swaps the ``<root>/<name>`` symlink to it atomically; the ``versions_kept``
    newest are kept, :meth:`rollback` points back at one. Loaded experts are cached per name, pinned to the
    version directory they were loaded from, and reloaded when the name points at another version (a change
    made by this process or any other, e.g. ``eagle bank add`` next to a running service): a request uses the
    old version or the new one, never a half-written bank. At most ``max_loaded`` experts stay loaded (each holds
    its memory bank and an ONNX session, docs/edge.md); the least recently used is dropped first and loaded again
    when next asked for (a request that is using a dropped one finishes with it). Thread-safe.
    """

    def __init__(
        self,
        root: Path,
        settings: ExpertSettings,
        *,
        versions_kept: int = 5,
        max_loaded: int = 4,
        lines: LineStore | None = None,
    ) -> None:
        self.root = Path(root)
        self.lines = lines if lines is not None else LineStore(self.root, min_references=settings.min_references)
        """The lines declared before their bank exists (:mod:`eagle.lines`)."""
        self.settings = settings
        self.versions_kept = max(1, int(versions_kept))
        self.max_loaded = max(1, int(max_loaded))
        self._cache: OrderedDict[str, ExpertScorer] = OrderedDict()  # least recently used first
        self._stamps: dict[str, tuple[str, int, int]] = {}
        self._write_lock = threading.Lock()
        self._templates: dict[tuple[str, str, int], np.ndarray] = {}  # (name, bank id, index)
        self._broken: dict[str, tuple[tuple[str, int, int], str]] = {}
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
            if self.is_declared(name):
                from eagle.lines import BankEmptyError

                raise BankEmptyError(f"line {name!r} is declared but has no bank yet: build a bank first")
            raise BankNotFoundError(f"no bank named {name!r} (saved banks: {known})")
        return path

    def summary(self, name: str) -> BankSummary:
        """The :class:`BankSummary` of a saved bank."""
        return summarize_bank(self._require(name), self.settings, name=name)

    def list(self) -> list[BankSummary]:
        """Every readable bank, newest first (unreadable directories are skipped)."""
        if not self.root.is_dir():
            return []
        summaries = []
        for child in self.root.iterdir():
            if child.is_dir() and is_valid_bank_name(child.name) and (child / META_FILE).is_file():
                try:
                    summaries.append(self.summary(child.name))
                except (BankError, ValueError, OSError):
                    continue
        return sorted(summaries, key=lambda s: s.created, reverse=True)

    def load(self, name: str) -> ExpertScorer:
        """The expert of bank ``name``, loaded, test-inspected once (:func:`probe_expert`) and cached.

        A bank that fails is remembered (its error is raised again at once) until its meta.json changes, or
        :meth:`forget` is called (rebuild, import, delete). A cached expert is reloaded when the bank now points
        at another version (or its meta.json changed); it is loaded from the version's own directory, so its
        reference images stay those of the version it scores with.

        Raises:
            BankNotFoundError: no such bank (a ``FileNotFoundError``).
            BankError: unreadable, built with other settings, or unable to score.
        """
        with self._lock:
            path = self._require(name)
            stamp = _stamp(path)
            scorer = self._cache.get(name)
            if scorer is not None and self._stamps.get(name) == stamp:
                self._cache.move_to_end(name)
                return scorer
            broken = self._broken.get(name)
            if broken is not None and broken[0] == stamp:
                raise BankError(broken[1])
            try:
                scorer = open_expert(Path(stamp[0]), self.settings, label=f"bank {name!r}")
            except BankError as err:
                self._broken[name] = (stamp, str(err))
                raise
            if name in self._cache:
                log.info("bank %r changed on disk (now %s): reloaded", name, Path(stamp[0]).name)
            self._broken.pop(name, None)
            for key in [k for k in self._templates if k[0] == name]:
                del self._templates[key]
            self._cache[name] = scorer
            self._cache.move_to_end(name)
            self._stamps[name] = stamp
            while len(self._cache) > self.max_loaded:
                oldest = next(iter(self._cache))
                self._drop_loaded(oldest)
                log.info("bank %r unloaded (the least recently used of %d loaded banks)", oldest, self.max_loaded + 1)
            return scorer

    def loaded(self) -> list[str]:
        """The names of the banks loaded now, least recently used first."""
        with self._lock:
            return list(self._cache)

    def _drop_loaded(self, name: str) -> None:
        scorer = self._cache.pop(name, None)
        if scorer is not None:  # once the last request using it is done, give its memory back to the system
            weakref.finalize(scorer, _release_free_heap)
        self._stamps.pop(name, None)
        for key in [k for k in self._templates if k[0] == name]:
            del self._templates[key]

    def sweep(self) -> list[str]:
        """Remove what killed writers left under the banks directory (start-up); returns the removed entries' names.

        Import staging folders of dead processes on this host (and unnamed old ones over a day old), and for
        every bank whose writer lock is free: unfinished versions and scratch (:func:`bank_versions.clean_stale`).
        Never anything a live process owns. Failures (a read-only folder) are logged, not raised.
        """
        if not self.root.is_dir():
            return []
        try:
            gone = atomic.remove_dead_staging(self.root, IMPORT_STAGING_PREFIX, legacy_age_s=LEGACY_STAGING_AGE_S)
            removed = [p.name for p in gone]
            versions = self.root / bank_versions.VERSIONS_DIR
            names = {p.name for p in self.root.iterdir() if is_valid_bank_name(p.name)}
            if versions.is_dir():
                names |= {p.name for p in versions.iterdir() if p.is_dir() and is_valid_bank_name(p.name)}
            removed += bank_versions.sweep(self.root, sorted(names))
        except OSError as err:
            log.warning("could not clean left-overs under %s: %s", self.root, err)
            return []
        if gone:
            log.info("removed %d import staging folder(s) of dead processes under %s", len(gone), self.root)
        return removed

    def unusable(self) -> dict[str, str]:
        """Banks whose last load failed, with the one-line reason (empty once each is rebuilt or deleted)."""
        with self._lock:
            return {name: message for name, (_, message) in self._broken.items() if self.exists(name)}

    def template_image(self, name: str, index: int, *, scorer: ExpertScorer | None = None) -> np.ndarray:
        """The stored copy of reference ``index`` of bank ``name`` (RGB uint8), cached per bank version.

        ``scorer``: the expert that scored the query (so the template comes from the same version); default the
        bank's current one.
        """
        scorer = scorer or self.load(name)
        key = (name, scorer.bank.meta.bank_id, index)
        with self._lock:
            if key not in self._templates:
                self._templates[key] = scorer.bank.load_reference(index)
            return self._templates[key]

    def reference_name(self, name: str, index: int) -> str:
        """The original file name of reference ``index``."""
        return self.load(name).bank.meta.references[index].name

    def forget(self, name: str) -> None:
        """Drop cached objects of bank ``name`` (after a rebuild or delete)."""
        with self._lock:
            self._cache.pop(name, None)
            self._stamps.pop(name, None)
            self._broken.pop(name, None)
            for key in [k for k in self._templates if k[0] == name]:
                del self._templates[key]

    def delete(self, name: str) -> None:
        """Delete bank ``name`` from disk, with every kept version (a declared line: its record and collected parts)."""
        if self.lines.exists(name) and not self.exists(name):
            self.lines.delete(name)
            return
        path = self._require(name)
        with self._write_lock, bank_versions.writer_lock(self.root, name), self._lock:
            self.forget(name)
            if path.is_symlink():
                path.unlink()
            else:
                trash = path.with_name(f".{path.name}.deleting")
                path.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            bank_versions.remove_versions(self.root, name)
        if self.lines.exists(name):  # a line declared before a bank of its name was built elsewhere
            self.lines.delete(name)

    # ------------------------------------------------------------------ versions
    def write_version(self, name: str, write: Callable[[Path], object], *, action: str, note: str = "") -> int:
        """Write a new version of bank ``name`` and make it current; returns its number.

        ``write(directory)`` must save a complete bank into ``directory`` (an empty, reserved version directory),
        e.g. with :func:`expert.bank.save_bank` or :func:`expert.build.build_bank`. Only once it returned is the
        bank's symlink swapped to it (atomically); then the oldest versions beyond :attr:`versions_kept` are
        pruned. If ``write`` fails, nothing changes. An unversioned bank becomes version 1 first.

        Args:
            name: the bank (validated).
            write: saves the bank into the directory it is given.
            action: what made the version (``build``, ``teach``, ``import``), shown by :meth:`history`.
            note: one line for people (e.g. which images were taught).
        """
        self.path(name)
        self.root.mkdir(parents=True, exist_ok=True)
        with self._write_lock, bank_versions.writer_lock(self.root, name):
            bank_versions.clean_stale(self.root, name)  # what a killed writer of this bank left (none is alive)
            bank_versions.adopt_legacy(self.root, name)
            parent = bank_versions.current_version(self.root, name)
            number, target = bank_versions.reserve_version(self.root, name)
            try:
                write(target)
                if not (target / META_FILE).is_file():
                    raise BankError(f"bank {name!r}: version {number} was not written")
                bank_versions.write_note(self.root, name, number, action=action, note=note, parent=parent)
                bank_versions.point_to(self.root, name, number)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                bank_versions.drop_if_empty(self.root, name)
                raise
            bank_versions.prune(self.root, name, self.versions_kept)
        log.info("bank %r: version %d (%s) is current", name, number, action)
        return number

    def current_version(self, name: str) -> int | None:
        """The number of the version bank ``name`` uses now (None: an unversioned bank saved before versions)."""
        self._require(name)
        return bank_versions.current_version(self.root, name)

    def history(self, name: str) -> list[BankVersion]:
        """The kept versions of bank ``name``, oldest first, with τ, reference count, date and what made them."""
        self._require(name)
        return bank_versions.history(self.root, name)

    def rollback(self, name: str, version: int) -> BankSummary:
        """Make kept ``version`` current again by moving the pointer (nothing is copied or deleted).

        The next change is numbered above the highest kept version, so a rollback is never overwritten.

        Raises:
            BankVersionNotFoundError: no such kept version. BankError: that version fails its test inspection.
        """
        self._require(name)
        with self._write_lock, bank_versions.writer_lock(self.root, name):
            if bank_versions.current_version(self.root, name) is None:
                bank_versions.adopt_legacy(self.root, name)
            target = bank_versions.version_dir(self.root, name, int(version))
            if not (target / META_FILE).is_file():
                kept = [v.version for v in bank_versions.history(self.root, name)]
                raise BankVersionNotFoundError(f"bank {name!r} has no version {version} (kept: {kept})")
            open_expert(target, self.settings, label=f"bank {name!r} version {version}")
            bank_versions.point_to(self.root, name, int(version))
        log.info("bank %r rolled back to version %d", name, version)
        return self.summary(name)

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
        """Import a bank zip as ``name``: extracted safely, validated and test-inspected like :meth:`load`.

        The zip may hold the bank files at its top level or inside one folder. Only the files of the bank
        format are extracted (meta.json, bank.safetensors, backbone.onnx when meta.json has a checksum for it,
        and the reference images meta.json lists); anything else in the zip is skipped and named in the log. The
        zip's limits (:data:`BANK_ZIP_LIMITS`: entries, sizes, total ratio) are checked before anything is
        written. An existing bank of that name gets the import as its new version (:meth:`write_version`) only after
        it passed.

        Raises:
            ArchiveError: unsafe, corrupt or too large zip. BankError: not a valid bank, built with other
                settings, or unable to score (one line).
        """
        zip_path = Path(zip_path)
        self.path(name)  # validates the name before any work
        entries = scan_zip(zip_path, BANK_ZIP_LIMITS)
        metas = [e.filename for e in entries if PurePosixPath(e.filename).name == META_FILE]
        if len(metas) != 1:
            found = f"found {len(metas)}" + (f": {describe_names(metas)}" if metas else "")
            raise BankError(f"the zip must contain exactly one bank ({META_FILE}); {found}")
        prefix = PurePosixPath(metas[0]).parent
        self.root.mkdir(parents=True, exist_ok=True)
        atomic.remove_dead_staging(self.root, IMPORT_STAGING_PREFIX, legacy_age_s=LEGACY_STAGING_AGE_S)
        with atomic.staging(self.root, IMPORT_STAGING_PREFIX) as staging:
            root = Path(staging) / "bank"
            extract_zip(zip_path, root, BANK_ZIP_LIMITS, keep=_bank_file_in(prefix, {META_FILE}))
            meta = read_meta(root)
            wanted = {META_FILE, TENSORS_FILE} | {ref.file for ref in meta.references}
            if meta.backbone.onnx_sha256 is not None:
                wanted.add(ONNX_FILE)
            if meta.embeddings is not None:  # optional: a bank without it teaches by embedding every reference again
                wanted.add(EMBEDDINGS_FILE)
            outside = sorted(f for f in wanted if not is_bank_file(f))
            if outside:
                raise BankError(f"{META_FILE}: reference files outside the bank format: {describe_names(outside)}")
            written = extract_zip(zip_path, root, BANK_ZIP_LIMITS, keep=_bank_file_in(prefix, wanted))
            taken = {p.relative_to(root).as_posix() for p in written}
            skipped = [e.filename for e in entries if _relative(PurePosixPath(e.filename), prefix) not in wanted]
            if skipped:
                log.warning(
                    "bank zip %s: skipped %d file(s) that are not part of the bank: %s",
                    zip_path.name,
                    len(skipped),
                    describe_names(skipped),
                )
            missing = sorted(wanted - taken - {META_FILE, EMBEDDINGS_FILE})
            if missing:
                raise BankError(f"the zip's bank lacks {describe_names(missing)}")
            try:
                open_expert(root, self.settings, label=f"bank zip {zip_path.name!r}")
            except BankError as err:
                raise BankError(str(err).replace(str(root), zip_path.name)) from None
            self.write_version(name, lambda version: os.replace(root, version), action="import", note=zip_path.name)
            with self._lock:
                self.forget(name)
        return self.summary(name)


def _relative(path: PurePosixPath, prefix: PurePosixPath) -> str | None:
    """``path`` relative to the bank's folder in the zip, or None when it lies outside."""
    if prefix == PurePosixPath("."):
        return path.as_posix()
    if path.parts[: len(prefix.parts)] != prefix.parts:
        return None
    return PurePosixPath(*path.parts[len(prefix.parts) :]).as_posix()


def _bank_file_in(prefix: PurePosixPath, wanted: set[str]) -> Callable[[PurePosixPath], PurePosixPath | None]:
    """A ``keep`` function for :func:`eagle.archives.extract_zip`: only ``wanted`` files under ``prefix``."""

    def keep(path: PurePosixPath) -> PurePosixPath | None:
        relative = _relative(path, prefix)
        return PurePosixPath(relative) if relative in wanted and is_bank_file(relative) else None

    return keep


def _stamp(path: Path) -> tuple[str, int, int]:
    """What identifies a bank's state on disk: the version directory it points at, its meta.json's time and size."""
    real = os.path.realpath(path)
    try:
        info = (Path(real) / META_FILE).stat()
    except OSError:
        return (real, 0, 0)
    return (real, info.st_mtime_ns, info.st_size)


def _release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; nothing where it is missing).

    A dropped bank frees its ONNX session and arrays, but glibc keeps freed heap pages for reuse, so without this
    the process's RSS keeps what the dropped banks held (bench/bench_bank_memory.py measures both).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        pass


def open_expert(path: Path, settings: ExpertSettings, *, label: str) -> ExpertScorer:
    """Load a bank directory's expert and test-inspect it (:func:`probe_expert`); every failure is one BankError.

    Args:
        path: the bank directory.
        settings: the running expert settings.
        label: how messages name the bank (``"bank 'widget'"``).

    Raises:
        BankError: the bank is invalid, incompatible with ``settings``, or cannot score.
    """
    from expert.scorer import load_expert

    try:
        scorer = load_expert(path, settings)
    except BankError as err:
        if is_disk_full(err):
            raise  # not the bank's fault: the front ends answer disk_full
        raise BankError(f"{label} is unusable: {_one_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - e.g. onnxruntime refusing the graph: the bank cannot be used
        if is_disk_full(err):
            raise
        raise BankError(f"{label}: the feature extractor cannot be loaded ({_one_line(err)})") from None
    probe_expert(scorer, label=label)
    return scorer


def summarize_bank(path: Path, settings: ExpertSettings, *, name: str | None = None) -> BankSummary:
    """The :class:`BankSummary` of the bank directory ``path`` (in a store or anywhere, e.g. ``build-bank --out``).

    ``name`` defaults to the bank's own name in its meta.json.
    """
    meta = read_meta(path)
    low = meta.counts.references < settings.recommended_references
    return BankSummary(
        name=name or meta.name,
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
        precision=meta.backbone.precision,
        build_warnings=tuple(meta.warnings),
        mask=(
            None
            if meta.mask is None
            else f"{meta.mask.patches} of {meta.dims.grid_h * meta.dims.grid_w} patches ({meta.mask.source})"
        ),
        warning=(
            f"built from {meta.counts.references} references; {settings.recommended_references}+ are "
            "recommended for a reliable threshold"
        )
        if low
        else None,
    )


def probe_expert(scorer: ExpertScorer, *, label: str = "bank") -> None:
    """Run one real inspection of the bank's first stored reference image; raise one BankError line if it fails.

    Proves what validation cannot: that the ONNX graph runs on this machine, its features fit the memory bank,
    and the score, map and template retrieval come out finite and in range.
    """
    bank = scorer.bank
    reference = bank.meta.references[0].name if bank.meta.references else "?"
    try:
        result = scorer.score(bank.load_reference(0))
        if not math.isfinite(result.score) or not np.isfinite(result.anomaly_map).all():
            raise BankError("the score or anomaly map is not finite")
        if not 0 <= result.template_index < len(bank.meta.references):
            raise BankError(f"template index {result.template_index} out of range")
    except Exception as err:  # noqa: BLE001 - whatever breaks here would break every inspection
        raise BankError(f"{label} failed its test inspection of reference {reference!r}: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, BankError) else f"{type(err).__name__}: {text}"[:500]
