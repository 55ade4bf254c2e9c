"""A verified on-disk cache of exported ONNX patch embedders, shared by every bank built with the same graph.

Exporting the patch embedder takes 10–20 s on 2 cores, yet the graph depends only on what
:class:`ExportKey` holds: the backbone's name, its weights checksum, the crop (network input size), the
ONNX opset, the torch and onnxscript versions (the exporter) and a fingerprint of the embedding code
(``expert/backbone.py``, so a change to the computation can never be served a stale graph). One entry per
key, in the directory the caller hands in (``eagle`` passes ``EAGLE_ONNX_CACHE_DIR``, default
``<data_dir>/cache/onnx``; the expert knows nothing of ``data_dir``)::

    <directory>/<digest>.onnx     the graph (one self-contained file)
    <directory>/<digest>.json     sidecar: the full key, the graph's sha256 and size

* Written atomically (:mod:`common.atomic`: temp file → fsync → rename → fsync the directory), the graph
  first, then its sidecar; a per-key ``flock`` serialises writers (a second process waiting for the same
  key finds the first one's entry instead of exporting again), and readers never see a torn file.
* Verified on use: the sidecar's key must equal the requested one and the graph's sha256 the sidecar's; a
  corrupted or incomplete entry is logged as a warning, removed and exported again.
* A cache directory that cannot be written (read-only volume) is not an error: the graph is exported into
  ``fallback_dir`` with a warning.

Example:
    >>> from expert.config import ExpertSettings
    >>> from expert.weights import load_backbone
    >>> module, info = load_backbone(ExpertSettings(weights="random"))
    >>> cache = OnnxCache("/tmp/eagle-cache/onnx")
    >>> key = ExportKey.create("wide_resnet50_2.tv_in1k", info.checksum, crop=224)
    >>> path = cache.get(key, module)        # doctest: +SKIP
    >>> cache.get(key, module) == path       # second call: no export, only the sha256 check   # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch

from common import atomic
from expert import backbone as _backbone_module
from expert.backbone import PatchEmbedder, build_patch_embedder
from expert.bank import file_sha256
from expert.embedder import ONNX_OPSET, export_onnx

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of the sidecar format; part of every key's digest."""

_CHUNK = 1 << 20


class CacheKey(Protocol):
    """What an entry is keyed by: a JSON-ready description (stored in the sidecar) and its digest (the file name)."""

    def as_dict(self) -> dict[str, Any]:
        """Everything the graph depends on, JSON-ready."""
        ...

    def digest(self) -> str:
        """A short hex digest of :meth:`as_dict` (the entry's file name)."""
        ...


BackboneSource = torch.nn.Module | Callable[[], torch.nn.Module]
"""A loaded backbone (or :class:`~expert.backbone.PatchEmbedder`), or a zero-argument loader called only when
an export is actually needed (so a cache hit never holds the torch weights)."""


@cache
def embedding_code_fingerprint() -> str:
    """16 hex digits of sha256 over the source of ``expert/backbone.py`` (the computation that is exported).

    Example:
        >>> len(embedding_code_fingerprint())
        16
    """
    source = Path(_backbone_module.__file__).read_bytes()
    return hashlib.sha256(source).hexdigest()[:16]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class ExportKey:
    """Everything an exported graph depends on; equal keys ⇒ interchangeable ``.onnx`` files.

    Attributes:
        backbone: the timm model name (``ExpertSettings.backbone``).
        weights_checksum: ``WeightsInfo.checksum`` (sha256 over the state dict).
        crop: the square network input size.
        opset: the ONNX opset exported to.
        torch_version: ``torch.__version__`` (the exporter front end).
        onnxscript_version: the installed onnxscript (the dynamo exporter's op library and optimiser).
        code: :func:`embedding_code_fingerprint`.
    """

    backbone: str
    weights_checksum: str
    crop: int
    opset: int
    torch_version: str
    onnxscript_version: str
    code: str

    @classmethod
    def create(cls, backbone: str, weights_checksum: str, *, crop: int, opset: int = ONNX_OPSET) -> ExportKey:
        """The key for this backbone, weights and crop under the running torch/onnxscript and embedding code.

        Example:
            >>> a = ExportKey.create("wrn", "sha256:00", crop=224)
            >>> a.digest() == ExportKey.create("wrn", "sha256:00", crop=224).digest()
            True
            >>> a.digest() == ExportKey.create("wrn", "sha256:00", crop=256).digest()
            False
        """
        return cls(
            backbone=backbone,
            weights_checksum=weights_checksum,
            crop=int(crop),
            opset=int(opset),
            torch_version=str(torch.__version__),
            onnxscript_version=_version("onnxscript"),
            code=embedding_code_fingerprint(),
        )

    def as_dict(self) -> dict[str, str | int]:
        """The key as a JSON-ready dict (stored in the sidecar)."""
        return {"format": CACHE_FORMAT, **asdict(self)}

    def digest(self) -> str:
        """24 hex digits of sha256 over the canonical JSON of :meth:`as_dict`: the entry's file name."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def _resolve_module(source: BackboneSource, crop: int) -> PatchEmbedder:
    module = source if isinstance(source, torch.nn.Module) else source()
    if isinstance(module, PatchEmbedder):
        return module.eval()
    return build_patch_embedder(module, input_size=crop)


class OnnxCache:
    """Exported patch embedders on disk, keyed by :class:`ExportKey`, written atomically, verified on use.

    Args:
        directory: where entries live (created on first write).
        exporter: ``exporter(module, path, crop)`` writes the graph; default :func:`expert.embedder.export_onnx`
            (tests count its calls).
    """

    def __init__(
        self, directory: str | Path, *, exporter: Callable[[torch.nn.Module, Path, int], Path] | None = None
    ) -> None:
        self.directory = Path(directory).expanduser()
        self._exporter = exporter

    def __repr__(self) -> str:
        return f"OnnxCache({str(self.directory)!r})"

    def path(self, key: CacheKey) -> Path:
        """Where ``key``'s graph lives (it may not exist yet)."""
        return self.directory / f"{key.digest()}.onnx"

    def sidecar(self, key: CacheKey) -> Path:
        """Where ``key``'s sidecar JSON lives."""
        return self.directory / f"{key.digest()}.json"

    def _export(self, module: torch.nn.Module, path: Path, key: ExportKey) -> Path:
        if self._exporter is not None:
            return Path(self._exporter(module, path, key.crop))
        return export_onnx(module, path, input_size=key.crop, opset=key.opset)

    # ------------------------------------------------------------------ reading
    def lookup(self, key: CacheKey) -> Path | None:
        """The verified graph for ``key``, or None (missing; a corrupted entry is removed with a warning).

        Verification: the sidecar parses, names exactly ``key``, and the graph's size and sha256 equal the
        sidecar's. Takes the key's lock, so it never reads an entry half-way through being replaced.
        """
        if not self.path(key).is_file():
            return None
        try:
            with self._lock(key):
                return self._verified(key)
        except OSError:  # lock file cannot be created (read-only directory): verify without the lock
            return self._verified(key)

    def _verified(self, key: CacheKey) -> Path | None:
        path, sidecar = self.path(key), self.sidecar(key)
        if not path.is_file():
            return None
        problem = None
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
            if info.get("key") != key.as_dict():
                problem = "its sidecar names another key"
            elif info.get("size") != path.stat().st_size:
                problem = f"size {path.stat().st_size} bytes, sidecar says {info.get('size')}"
            elif file_sha256(path) != info.get("sha256"):
                problem = "sha256 differs from its sidecar"
        except FileNotFoundError:
            problem = "its sidecar is missing"
        except (OSError, ValueError, AttributeError) as err:
            problem = f"its sidecar is unreadable ({type(err).__name__})"
        if problem is None:
            return path
        log.warning("ONNX cache entry %s is corrupted (%s): removing it and exporting again", path, problem)
        for stale in (path, sidecar):
            with contextlib.suppress(OSError):
                stale.unlink()
        return None

    # ------------------------------------------------------------------ writing
    def _lock(self, key: CacheKey) -> contextlib.AbstractContextManager[None]:
        return atomic.file_lock(self.directory / f".{key.digest()}.lock")

    def get(self, key: ExportKey, backbone: BackboneSource, *, fallback_dir: str | Path | None = None) -> Path:
        """Return a verified graph for ``key``, exporting (and caching) it first when needed.

        Args:
            key: what the graph must be (:meth:`ExportKey.create`).
            backbone: the loaded backbone (or :class:`~expert.backbone.PatchEmbedder`), or a zero-argument
                loader called only on a miss.
            fallback_dir: where to export when the cache directory cannot be written (a warning is logged);
                None: a fresh temporary directory (the caller owns it).

        Returns:
            The graph's path: inside the cache, or inside ``fallback_dir`` when the cache is not writable.
            Treat it as read-only; copy it to keep it.

        Raises:
            expert.embedder.OnnxExportError: the exported graph is wrong (nothing is cached then).
        """
        try:
            with self._lock(key):
                found = self._verified(key)
                if found is not None:
                    log.debug("ONNX cache hit: %s", found)
                    return found
                return self._store(key, _resolve_module(backbone, key.crop))
        except OSError as err:
            if not self._unwritable(err):
                raise
            target = Path(fallback_dir) if fallback_dir is not None else Path(tempfile.mkdtemp(prefix="eagle-onnx-"))
            log.warning(
                "ONNX cache directory %s is not writable (%s): exporting into %s without caching (every build "
                "exports again; make the directory writable or run `eagle warm-cache` where it is)",
                self.directory,
                err.strerror or type(err).__name__,
                target,
            )
            target.mkdir(parents=True, exist_ok=True)
            return self._export(_resolve_module(backbone, key.crop), target / "backbone.onnx", key)

    @staticmethod
    def _unwritable(err: OSError) -> bool:
        import errno

        return err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC)

    def _store(self, key: ExportKey, module: torch.nn.Module) -> Path:
        """Export ``module`` into the cache under ``key`` (the caller holds the key's lock)."""
        return self._store_with(key, lambda tmp: self._export(module, tmp, key), what="exported")

    def _store_with(self, key: CacheKey, write: Callable[[Path], object], *, what: str) -> Path:
        """Write ``key``'s graph with ``write(tmp_path)``, then its sidecar (the caller holds the key's lock)."""
        path, digest = self.path(key), key.digest()
        for stale in self.directory.glob(f".{digest}.onnx.*.tmp"):  # left by a writer that died under the lock
            with contextlib.suppress(OSError):
                stale.unlink()
        with atomic.atomic_path(path) as tmp:  # .<digest>.onnx.<random>.tmp until the graph is complete
            write(tmp)
            sha, size = file_sha256(tmp), tmp.stat().st_size
        sidecar = {"key": key.as_dict(), "sha256": sha, "size": size}
        atomic.write_text(self.sidecar(key), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        log.info("ONNX graph %s and cached: %s (%.0f MB)", what, path, size / 2**20)
        return path

    def get_derived(
        self,
        key: CacheKey,
        make: Callable[[Path], object],
        *,
        what: str = "derived",
        fallback_dir: str | Path | None = None,
    ) -> Path:
        """Return a verified graph for ``key`` made by ``make(path)`` (e.g. a quantised copy of a cached graph).

        The same verification, locking and read-only fallback as :meth:`get`; ``key`` is any :class:`CacheKey`
        (e.g. :class:`expert.quantize.QuantKey`, which names the graph it was made from) and must hold everything
        the graph depends on.

        Args:
            key: what the graph must be.
            make: writes the graph to the path it is given (called only on a miss).
            what: how the log describes the new entry ("quantised").
            fallback_dir: as :meth:`get`.
        """
        try:
            with self._lock(key):
                found = self._verified(key)
                if found is not None:
                    log.debug("ONNX cache hit: %s", found)
                    return found
                return self._store_with(key, make, what=what)
        except OSError as err:
            if not self._unwritable(err):
                raise
            target = Path(fallback_dir) if fallback_dir is not None else Path(tempfile.mkdtemp(prefix="eagle-onnx-"))
            log.warning(
                "ONNX cache directory %s is not writable (%s): writing the %s graph into %s without caching",
                self.directory,
                err.strerror or type(err).__name__,
                what,
                target,
            )
            target.mkdir(parents=True, exist_ok=True)
            graph = target / f"{key.digest()}.onnx"
            make(graph)
            return graph

    # ------------------------------------------------------------------ housekeeping
    def entries(self) -> list[Path]:
        """The cached graphs (``*.onnx``), sorted."""
        return sorted(self.directory.glob("*.onnx")) if self.directory.is_dir() else []

    def prune(self, keep: ExportKey) -> list[Path]:
        """Remove every entry except ``keep``'s (e.g. graphs of an older torch); returns the removed graphs.

        Graphs derived from ``keep``'s (their sidecar key's ``base`` is ``keep``: the int8 graphs of
        :mod:`expert.quantize`) are kept too.
        """
        removed = []
        for graph in self.entries():
            if graph.stem == keep.digest() or self._derived_from(graph, keep):
                continue
            for stale in (graph, graph.with_suffix(".json"), self.directory / f".{graph.stem}.lock"):
                with contextlib.suppress(OSError):
                    stale.unlink()
            removed.append(graph)
        return removed

    @staticmethod
    def _derived_from(graph: Path, base: ExportKey) -> bool:
        try:
            info = json.loads(graph.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        key = info.get("key") if isinstance(info, dict) else None
        return isinstance(key, dict) and key.get("base") == base.as_dict()
