"""Versioned banks: every change to a bank is a new, complete bank directory; a symlink names the current one.

Layout under the banks directory (docs/bank-format.md, "Versions")::

    <banks>/
      line-3 -> .versions/line-3/0003     the current version (a relative symlink, swapped atomically)
      .versions/line-3/
        0001/  0002/  0003/               complete bank directories (expert.bank's format), never edited
        0001.json  0002.json  0003.json   what made each version: action, note, time, parent

A change (rebuild, "teach the bank", import) writes the next version in full, then replaces the symlink with
``os.replace`` (one atomic rename): a reader sees the old version or the new one, never a half-written bank.
Rollback moves the symlink back to a kept version; the next change still gets a number above the highest.
After each change the oldest versions beyond ``keep`` are pruned (the current one never is).

Writers of one bank take turns: every change (and rollback, delete) holds ``.versions/.locks/<name>.lock``
(:func:`writer_lock`, an ``flock``; in a hidden folder, so no bank name can reach it: before, bank ``X``'s lock
``.versions/X.lock`` was where bank ``X.lock`` keeps its versions; such old lock files are removed), so the API
service, an ``eagle bank add`` and the watcher on one data folder never build on the same version at once (two
teaches at once would otherwise both start from version N, and the second would silently drop the first one's
images). Stop processes of older releases before upgrading: they still lock the old place.

A bank saved before versions existed is a plain directory ``<banks>/<name>/``: it loads as it is and becomes
version 1 on its first change (it is moved under ``.versions`` and the symlink takes its place).

A writer killed mid-way (``kill -9``, out of memory) leaves its reserved version directory (empty or without
meta.json) and scratch folders behind; :func:`clean_stale` removes them under the bank's writer lock (every
change runs it first; :func:`sweep` does it for every bank at start-up). Holding the lock proves that no live
writer owns them. A version directory with meta.json is complete (it is renamed into place whole) and is kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from common import atomic
from eagle.bank_records import BankVersion
from eagle.errors import EagleError
from expert.bank import read_meta
from expert.bank_schema import META_FILE, BankError

__all__ = [
    "VERSIONS_DIR",
    "BankVersion",
    "BankVersionNotFoundError",
    "adopt_legacy",
    "clean_stale",
    "current_version",
    "drop_if_empty",
    "history",
    "point_to",
    "prune",
    "remove_versions",
    "reserve_version",
    "sweep",
    "version_dir",
    "versions_root",
    "write_note",
    "writer_lock",
]

log = logging.getLogger(__name__)

VERSIONS_DIR = ".versions"
"""Hidden folder under the banks directory holding every bank's versions (hidden: not a valid bank name)."""

LOCKS_DIR = ".locks"
"""Hidden folder under :data:`VERSIONS_DIR` holding the writer locks (hidden: no bank's versions folder)."""


class BankVersionNotFoundError(EagleError, FileNotFoundError):
    """The bank has no kept version with that number."""

    code, http_status = "bank_version_not_found", 404


def versions_root(root: Path, name: str) -> Path:
    """``<banks>/.versions/<name>``."""
    return Path(root) / VERSIONS_DIR / name


def writer_lock(root: Path, name: str) -> contextlib.AbstractContextManager[None]:
    """Hold ``<banks>/.versions/.locks/<name>.lock`` while reading the current version and writing the next."""
    return atomic.file_lock(lock_path(root, name))


def lock_path(root: Path, name: str) -> Path:
    """``<banks>/.versions/.locks/<name>.lock``: the writer lock of bank ``name``."""
    return Path(root) / VERSIONS_DIR / LOCKS_DIR / f"{name}.lock"


def _remove_legacy_lock(path: Path) -> None:
    """Remove an empty regular file at ``path``: a writer lock where locks were kept before (``.versions/X.lock``)."""
    with contextlib.suppress(OSError):
        if path.is_file() and not path.is_symlink() and path.stat().st_size == 0:
            path.unlink()


def version_dir(root: Path, name: str, version: int) -> Path:
    """``<banks>/.versions/<name>/<NNNN>``."""
    return versions_root(root, name) / f"{version:04d}"


def _numbers(root: Path, name: str) -> list[int]:
    folder = versions_root(root, name)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def current_version(root: Path, name: str) -> int | None:
    """The version ``<banks>/<name>`` points at; None for an unversioned (legacy) or missing bank."""
    link = Path(root) / name
    if not link.is_symlink():
        return None
    target = Path(os.readlink(link)).name
    return int(target) if target.isdigit() else None


def reserve_version(root: Path, name: str) -> tuple[int, Path]:
    """Claim the next version number (above every kept one) by creating its empty directory; returns both.

    ``os.mkdir`` fails when another writer (another process) took the number first; the next one is tried.
    """
    folder = versions_root(root, name)
    _remove_legacy_lock(folder)  # bank "X.lock": the old lock file of bank "X" was here
    folder.mkdir(parents=True, exist_ok=True)
    number = max(_numbers(root, name), default=0) + 1
    while True:
        path = version_dir(root, name, number)
        try:
            os.mkdir(path)
        except FileExistsError:
            number += 1
            continue
        return number, path


def point_to(root: Path, name: str, version: int) -> None:
    """Make ``<banks>/<name>`` point at ``version``: a new symlink renamed over the old one (atomic).

    Raises:
        BankVersionNotFoundError: no complete version with that number is kept.
    """
    target = version_dir(root, name, version)
    if not (target / META_FILE).is_file():
        raise BankVersionNotFoundError(f"bank {name!r} has no version {version} (kept: {_numbers(root, name)})")
    link = Path(root) / name
    if link.exists() and not link.is_symlink():
        raise BankError(f"{link}: an unversioned bank is in the way; adopt it first")
    temporary = Path(root) / f".{name}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(Path(VERSIONS_DIR) / name / target.name, temporary, target_is_directory=True)
    try:
        os.replace(temporary, link)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    atomic.fsync_dir(root)


def adopt_legacy(root: Path, name: str) -> None:
    """Turn an unversioned bank directory into version 1 of its history (nothing to do when already versioned).

    The directory is renamed to ``.versions/<name>/0001`` and the symlink created in its place: between the two
    renames (microseconds) the bank is missing, exactly as when a bank was replaced before versions existed.
    """
    link = Path(root) / name
    if link.is_symlink() or not (link / META_FILE).is_file():
        return
    folder = versions_root(root, name)
    _remove_legacy_lock(folder)
    folder.mkdir(parents=True, exist_ok=True)
    number = max(_numbers(root, name), default=0) + 1
    os.rename(link, version_dir(root, name, number))
    write_note(root, name, number, action="adopted", note="the bank as it was before versions were kept")
    point_to(root, name, number)


def write_note(root: Path, name: str, version: int, *, action: str, note: str = "", parent: int | None = None) -> None:
    """Record what made ``version`` (``<NNNN>.json`` next to its directory, written atomically)."""
    record = {
        "version": version,
        "action": action,
        "note": note,
        "parent": parent,
        "written_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic.write_text(versions_root(root, name) / f"{version:04d}.json", json.dumps(record, indent=2) + "\n")


def _read_note(root: Path, name: str, version: int) -> dict:
    try:
        return json.loads((versions_root(root, name) / f"{version:04d}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def history(root: Path, name: str) -> list[BankVersion]:
    """Every kept version of bank ``name``, oldest first (an unversioned bank: one entry, version 0)."""
    current = current_version(root, name)
    link = Path(root) / name
    if current is None and (link / META_FILE).is_file():
        meta = read_meta(link)
        return [_version(0, True, meta, {"action": "unversioned", "note": "becomes version 1 on its next change"})]
    found = []
    for number in _numbers(root, name):
        try:
            meta = read_meta(version_dir(root, name, number))
        except (BankError, OSError):
            continue  # a version being written (its directory reserved) or damaged
        found.append(_version(number, number == current, meta, _read_note(root, name, number)))
    return found


def _version(number: int, current: bool, meta, note: dict) -> BankVersion:
    return BankVersion(
        version=number,
        current=current,
        bank_id=meta.bank_id,
        created=meta.created_utc,
        tau=meta.threshold.tau,
        s_max=meta.threshold.s_max,
        n_references=meta.counts.references,
        action=str(note.get("action", "")),
        note=str(note.get("note", "")),
    )


def prune(root: Path, name: str, keep: int) -> list[int]:
    """Delete the oldest versions beyond the ``keep`` newest (never the current one); returns those removed."""
    numbers = _numbers(root, name)
    current = current_version(root, name)
    kept = set(numbers[-max(1, keep) :]) | ({current} if current is not None else set())
    removed = []
    for number in numbers:
        if number in kept:
            continue
        path = version_dir(root, name, number)
        if not (path / META_FILE).is_file():
            continue  # reserved by a writer right now
        trash = path.with_name(f".{path.name}.pruning-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        (versions_root(root, name) / f"{number:04d}.json").unlink(missing_ok=True)
        removed.append(number)
    if removed:
        log.info("bank %r: pruned version(s) %s (keeping %d)", name, removed, keep)
    return removed


def drop_if_empty(root: Path, name: str) -> None:
    """Remove ``.versions/<name>`` when it holds nothing (a first build that failed leaves no trace)."""
    folder = versions_root(root, name)
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (or already gone)


def remove_versions(root: Path, name: str) -> None:
    """Delete every kept version of ``name`` (the bank is being deleted)."""
    folder = versions_root(root, name)
    if folder.is_dir():
        trash = folder.with_name(f".{name}.deleting-{uuid.uuid4().hex[:8]}")
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def clean_stale(root: Path, name: str) -> list[str]:
    """Remove what killed writers of bank ``name`` left behind; call it holding :func:`writer_lock`.

    Removed: version directories without meta.json (reserved, never finished), hidden scratch entries in
    ``.versions/<name>/`` (a save's staging, a build's ONNX scratch, a half-pruned version, a note's temporary
    file), notes of versions that are gone, and the bank's temporary symlinks and half-deleted folders. Complete
    versions are never touched.

    Returns:
        The removed entries' names (relative to the banks directory), for the log.
    """
    root = Path(root)
    removed: list[Path] = []
    folder = versions_root(root, name)
    if folder.is_dir() and not folder.is_symlink():
        for child in list(folder.iterdir()):
            if child.name.isdigit() and child.is_dir() and not (child / META_FILE).is_file():
                removed.append(child)
            elif child.name.startswith("."):
                removed.append(child)
        for child in list(folder.glob("[0-9]*.json")):
            if child.stem.isdigit() and not (folder / child.stem).is_dir():
                removed.append(child)
    tag = re.escape(name)
    for parent, pattern in (
        (root, rf"\.{tag}\.link-[0-9a-f]{{8}}"),
        (root, rf"\.{tag}\.deleting"),
        (root / VERSIONS_DIR, rf"\.{tag}\.deleting-[0-9a-f]{{8}}"),
    ):
        rule = re.compile(pattern)
        with contextlib.suppress(OSError):
            removed.extend(p for p in parent.iterdir() if rule.fullmatch(p.name))
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    legacy = root / VERSIONS_DIR / f"{name}.lock"
    if legacy.is_file():
        _remove_legacy_lock(legacy)
    names = [p.relative_to(root).as_posix() for p in removed]
    if names:
        log.info("bank %r: removed %d left-over(s) of interrupted writers: %s", name, len(names), ", ".join(names))
    drop_if_empty(root, name)
    return names


def sweep(root: Path, names: list[str]) -> list[str]:
    """:func:`clean_stale` for each bank in ``names`` whose writer lock is free now (busy ones are skipped).

    Returns:
        Every removed entry's name (relative to the banks directory).
    """
    removed: list[str] = []
    for name in names:
        with atomic.try_file_lock(lock_path(root, name)) as held:
            if held:
                removed.extend(clean_stale(root, name))
    return removed
