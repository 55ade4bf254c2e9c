"""One bank per class, cached across evaluation runs and keyed by everything that built it.

The cache key is a SHA-256 over (a) every expert setting that can change a bank — all fields of
:class:`~eagle.settings.ExpertSettings` except the few that only affect scoring or speed
(:data:`SCORING_ONLY_FIELDS`), so a setting added later is part of the key by default — plus the size and
modification time of a local weights file, and (b) the reference images: their paths relative to the data set
root, sizes and modification times. The key is part of the bank's name (``<class>-<16 hex>``), so a changed
setting or a touched reference file gives a different name and the bank is rebuilt — never silently reused.
A cached bank that fails to load is rebuilt too; superseded banks of the same class are deleted (logged),
except in a bank folder shared by several runs (``--bank-dir``), where another run may still use them.

Banks live in the pipeline's bank store; the evaluation command points that store into the output folder
(``<out>/cache/banks``) or at ``--bank-dir`` so shards on one machine can share it.

Example:
    >>> cache = BankCache(pipeline, settings.expert, manifest=out / "banks.json")  # doctest: +SKIP
    >>> cache.get("bottle", references, root=dataset.root)  # doctest: +SKIP
    'bottle-3f9c0a7d12e4b6aa'
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eagle.bank_service import BUILD_STAGES
from eagle.evaluation.records import dump_json
from eagle.progress_bars import StageBar
from eagle.settings import ExpertSettings

log = logging.getLogger(__name__)

CACHE_VERSION = 1
#: Expert settings that do not change what a bank holds (scoring-time or speed-only knobs).
SCORING_ONLY_FIELDS: frozenset[str] = frozenset(
    {"batch_size", "min_references", "recommended_references", "gaussian_sigma", "max_boxes", "box_merge"}
)
_NAME_BODY = 47  # bank names allow 64 characters: body + "-" + 16 hex


def bank_settings(expert: ExpertSettings) -> dict[str, Any]:
    """The expert settings that shape a bank, JSON-ready (a weights file adds its size and mtime)."""
    data = expert.model_dump(mode="json", exclude=set(SCORING_ONLY_FIELDS))
    if expert.weights_path is not None and expert.weights == "file":
        path = Path(expert.weights_path)
        stat = path.stat() if path.exists() else None
        data["weights_file"] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns} if stat else None
    try:  # the bank format is part of what a bank is
        from expert.bank_schema import BANK_FORMAT_VERSION

        data["bank_format_version"] = BANK_FORMAT_VERSION
    except ImportError:  # pragma: no cover - the expert package is always installed with eagle
        pass
    return data


def reference_listing(references: Sequence[Path], root: Path | None = None) -> list[list]:
    """``[relative path, size, mtime_ns]`` per reference image, in the given order.

    Raises:
        FileNotFoundError: a reference image is missing.
    """
    listing = []
    for path in references:
        stat = Path(path).stat()
        rel = Path(path).relative_to(root).as_posix() if root and Path(path).is_relative_to(root) else str(path)
        listing.append([rel, stat.st_size, stat.st_mtime_ns])
    return listing


def cache_key(expert: ExpertSettings, references: Sequence[Path], root: Path | None = None) -> str:
    """The hex SHA-256 of the bank-shaping settings and the reference listing (see the module docstring)."""
    payload = {
        "cache_version": CACHE_VERSION,
        "settings": bank_settings(expert),
        "references": reference_listing(references, root),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def bank_name(class_name: str, key: str) -> str:
    """A valid bank name for ``class_name`` and ``key``: ``<sanitised class>-<first 16 hex of key>``.

    Example:
        >>> bank_name("MVTec-AD/bottle", "ab" * 32)
        'MVTec-AD_bottle-abababababababab'
    """
    body = re.sub(r"[^A-Za-z0-9._-]", "_", class_name).strip("._-") or "class"
    return f"{body[:_NAME_BODY]}-{key[:16]}"


def _class_of(name: str) -> str | None:
    body, _, suffix = name.rpartition("-")
    return body if re.fullmatch(r"[0-9a-f]{16}", suffix) else None


class BankCache:
    """Build-or-load the bank of each class through a pipeline (``build_bank`` and ``banks``).

    Args:
        pipeline: an :class:`eagle.pipeline.Pipeline` (or an object with ``build_bank`` and ``banks``).
        expert: the expert settings the pipeline builds with.
        manifest: JSON file recording, per class, the bank used and what keyed it.
        progress: show a progress bar (:class:`eagle.progress_bars.StageBar`) while a bank builds.
        prune: delete superseded banks of a class after building a new one. Leave it off for a bank folder
            shared by concurrent runs (another run may be using a bank built with its own settings).
    """

    def __init__(
        self,
        pipeline,
        expert: ExpertSettings,
        *,
        manifest: Path | None = None,
        progress: bool = True,
        prune: bool = True,
    ):
        self.pipeline = pipeline
        self.expert = expert
        self.manifest = Path(manifest) if manifest else None
        self.progress = progress
        self.prune = prune
        self.built: list[str] = []  # bank names built by this cache object (tests and logs)

    def _usable(self, name: str, n_references: int) -> bool:
        store = self.pipeline.banks
        if not store.exists(name):
            return False
        try:
            store.load(name)
        except (ValueError, OSError, KeyError) as err:  # BankError is a ValueError
            log.warning("cached bank %s is unusable (%s): rebuilding it", name, err)
            return False
        summary = next((s for s in store.list() if s.name == name), None)
        n_saved = getattr(summary, "n_references", n_references)
        if n_saved != n_references:
            log.warning("cached bank %s holds %s references, expected %d: rebuilding it", name, n_saved, n_references)
            return False
        return True

    def get(self, class_name: str, references: Sequence[Path], *, root: Path | None = None) -> str:
        """Return the name of a bank for ``class_name`` built from ``references``, building it if needed.

        Raises:
            FileNotFoundError: a reference image vanished.
            eagle.bank_service.ReferenceImagesError: reference images are unreadable (all listed).
        """
        key = cache_key(self.expert, references, root)
        name = bank_name(class_name, key)
        reused = self._usable(name, len(references))
        if not reused:
            with StageBar(BUILD_STAGES, desc=f"bank {class_name}", enabled=self.progress) as bar:
                self.pipeline.build_bank(list(references), name, progress=bar if self.progress else None)
            self.built.append(name)
            log.info("built bank %s for class %s from %d references", name, class_name, len(references))
            if self.prune:
                self._prune(name)
        self._record(class_name, name, key, len(references), reused)
        return name

    def _prune(self, keep: str) -> None:
        body = _class_of(keep)
        for summary in self.pipeline.banks.list():
            if summary.name != keep and _class_of(summary.name) == body:
                log.info("deleting superseded bank %s (built with other settings or references)", summary.name)
                self.pipeline.banks.delete(summary.name)

    def _record(self, class_name: str, name: str, key: str, n_references: int, reused: bool) -> None:
        if self.manifest is None:
            return
        data = json.loads(self.manifest.read_text(encoding="utf-8")) if self.manifest.exists() else {}
        data[class_name] = {
            "bank": name,
            "key": key,
            "n_references": n_references,
            "reused": reused,
            "settings": bank_settings(self.expert),
        }
        dump_json(self.manifest, data)
