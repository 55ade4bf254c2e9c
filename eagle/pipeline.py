"""The one inspection pipeline behind the app, the edge service and the evaluation.

A :class:`Pipeline` holds the bank store and, loaded lazily on first need, one multimodal LLM. It turns
an image into an :class:`~eagle.records.InspectionResult`: expert score, τ, s_max, decision, boxes and
heatmap, the template shown to the model, the model's answer with CAAS applied when the expert is
unsure, an optional explanation, and per-stage timings.

Example:
    >>> from eagle.settings import Settings
    >>> pipe = Pipeline(Settings(mllm={"enabled": False}))          # expert-only
    >>> pipe.build_bank(sorted(Path("normals").glob("*.png")), "bolts")  # doctest: +SKIP
    >>> pipe.inspect(Path("query.png"), "bolts").verdict                # doctest: +SKIP
    'defect'
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from common.progress import ProgressCallback
from eagle.bank_records import BankVersion, TaughtImage, TeachResult
from eagle.banks import BankError, BankStore, BankSummary, summarize_bank, validate_bank_name
from eagle.errors import EagleError, one_line
from eagle.images import DecodedImage, ImageError, decode_image, load_image, resize_rgb, view_size
from eagle.images import image_sha256 as sha256_of_image
from eagle.records import BoxRecord, InspectionImages, InspectionResult, InspectOptions
from eagle.settings import Settings
from expert.progress import BUILD_STAGES as EXPERT_BUILD_STAGES

if TYPE_CHECKING:  # the MLLM stack is imported only when it is used
    from eagle.audit import AuditLog
    from eagle.line_health import LineHealth
    from expert.bank_schema import BankMeta
    from expert.config import ExpertSettings
    from expert.scorer import ExpertResult, ExpertScorer
    from mllm.choices import MultipleChoice
    from mllm.inspector import MLLMAnswer, MLLMInspector

log = logging.getLogger(__name__)

BUILD_STAGES: tuple[str, ...] = ("read", *EXPERT_BUILD_STAGES)
"""The stages :meth:`Pipeline.build_bank` reports, in order: reading the images, then the expert's."""


class MLLMUnavailableError(EagleError, RuntimeError):
    """The multimodal LLM is disabled or could not be loaded; the message says why and what to do.

    One behaviour for every front end: an inspection that asks for the MLLM when it cannot be loaded fails with
    this error (``mllm_unavailable``, HTTP 503) instead of silently answering expert-only; the caller asks again
    with ``use_mllm`` off (or sets ``EAGLE_MLLM__ENABLED=false``) to inspect with the expert alone.
    """

    code, http_status = "mllm_unavailable", 503


MLLM_UNAVAILABLE = "the multimodal model could not be loaded"
EXPERT_ONLY_HINT = (
    "inspect with the expert only (untick 'Ask the MLLM' in the app, send use_mllm=false to the API, "
    "run `eagle watch --no-mllm`) or set EAGLE_MLLM__ENABLED=false"
)
"""How an MLLM load failure ends, for every front end: the message names the cause and this way out."""


class BankCatalog(Protocol):
    """The bank-store calls front ends make (:class:`~eagle.banks.BankStore` implements them)."""

    def exists(self, name: str) -> bool:
        """Whether a bank of that name is saved (raises ``BankNameError`` for a bad name)."""
        ...

    def list(self) -> list[BankSummary]:
        """The saved banks."""
        ...

    def load(self, name: str) -> object:
        """The bank's scorer, loaded and test-inspected (``BankNotFoundError``, ``BankError``)."""
        ...

    def delete(self, name: str) -> None:
        """Delete a saved bank."""
        ...

    def unusable(self) -> dict[str, str]:
        """Banks whose last load failed, name → one-line reason."""
        ...

    def loaded(self) -> list[str]:
        """The names of the banks loaded now, least recently used first."""
        ...

    def history(self, name: str) -> list[BankVersion]:
        """The kept versions of a bank, oldest first (``BankNotFoundError``)."""
        ...


@runtime_checkable
class InspectionPipeline(Protocol):
    """What the edge service (API, jobs, watcher) needs of a pipeline; :class:`Pipeline` is the implementation.

    The service's test double (``tests/fake_pipeline.FakePipeline``) implements it too: one contract.
    Its failures are :class:`~eagle.errors.EagleError` subclasses or mapped by :func:`eagle.errors.as_eagle_error`.
    """

    @property
    def banks(self) -> BankCatalog:
        """The bank store."""
        ...

    @property
    def mllm_enabled(self) -> bool:
        """Whether settings ask for the MLLM (False: expert-only)."""
        ...

    def inspect(
        self,
        image: np.ndarray | bytes | Path | DecodedImage,
        bank: str,
        options: InspectOptions | None = None,
        *,
        image_name: str | None = None,
    ) -> InspectionResult:
        """Inspect one image (see :meth:`Pipeline.inspect`)."""
        ...

    def line_health(self, name: str, audit: AuditLog) -> LineHealth:
        """The drift check of a bank's current version (see :meth:`Pipeline.line_health`)."""
        ...

    def build_bank(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        name: str,
        *,
        names: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> BankSummary:
        """Build or rebuild a bank (see :meth:`Pipeline.build_bank`)."""
        ...

    def add_references(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        name: str,
        *,
        names: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> TeachResult:
        """Teach a bank that these images are normal, as a new version (see :meth:`Pipeline.add_references`)."""
        ...

    def check_mask(self, mask: bytes | str) -> None:
        """Refuse a bad inspection mask before a build is queued (see :meth:`Pipeline.check_mask`)."""
        ...

    def ready(self) -> dict[str, bool]:
        """Readiness facts (see :meth:`Pipeline.ready`)."""
        ...

    def load_mllm(self, progress: ProgressCallback | None = None) -> object:
        """Load the MLLM once (raises :class:`MLLMUnavailableError`)."""
        ...


def _unique_names(new: Sequence[str], taken: Sequence[str]) -> list[str]:
    """``new`` with a ``-taught-N`` suffix where a name is already in ``taken`` (bank names must be unique)."""
    used, out = set(taken), []
    for original in new:
        candidate, n = original, 1
        while candidate in used:
            stem, dot, suffix = original.rpartition(".")
            candidate = f"{stem}-taught-{n}.{suffix}" if dot else f"{original}-taught-{n}"
            n += 1
        used.add(candidate)
        out.append(candidate)
    return out


def _settings_of_bank(running: ExpertSettings, meta: BankMeta) -> ExpertSettings:
    """The running expert settings with the bank's own coreset, seed, threshold and reference-size settings.

    A rebuild (teach) must derive τ the way the bank's first build did, whatever the running threshold settings.
    """
    from expert.dbt import THRESHOLD_PARAMETERS

    update = {
        "coreset_ratio": meta.coreset.ratio,
        "coreset_projection_dim": meta.coreset.projection_dim,
        "coreset_starts": meta.coreset.num_starts,
        "coreset_start_method": meta.coreset.start_method,
        "seed": meta.coreset.seed,
        "threshold_method": meta.threshold.method,
        "min_unsampled_patches": meta.threshold.min_unsampled_patches,
        "dbt_search": meta.threshold.search,
        "reference_max_side": meta.reference_max_side or running.reference_max_side,
    }
    update.update({k: float(v) for k, v in meta.threshold.params.items() if k in THRESHOLD_PARAMETERS})
    return running.model_copy(update=update)


class ReferenceImagesError(ImageError):
    """Some reference images could not be read; the message lists every one of them.

    ``problems`` holds each image's one-line message, ``total`` the number of images given.
    """

    def __init__(self, message: str, *, problems: Sequence[str] = (), total: int = 0) -> None:
        super().__init__(message)
        self.problems = list(problems)
        self.total = total


def _mllm_views(image: np.ndarray, template: np.ndarray, boxed: np.ndarray | None, expert: ExpertResult) -> dict:
    """The MLLM's image arguments as PIL images, plus the expert's verdict.

    The query is the pipeline's view of the image (its original resolution, or at most 1024 px on the longest side
    but never below the MLLM's pixel budget), the boxed query is drawn on that same picture, the template is the
    bank's stored reference (kept at up to ``expert.reference_max_side`` = 1024 px) or MMAD's own template. The
    prompt brings the template to the query's size when they have the same shape (:func:`mllm.prompts.fit_template`)
    and the processor gives every image the preset's pixel budget (:func:`mllm.presets.apply_pixel_budget`), so all
    three reach the model on the same token grid.
    """
    from PIL import Image

    return {
        "query": Image.fromarray(image),
        "template": Image.fromarray(template),
        "boxed": Image.fromarray(boxed) if boxed is not None else None,
        "expert_anomalous": bool(expert.anomalous),
    }


class Pipeline:
    """Expert + (lazily loaded) MLLM, safe to call from several threads.

    Args:
        settings: the validated settings tree.
        banks_dir: where the banks are (default ``settings.banks_dir``); ``eagle score --bank DIR`` uses the
            bank directory's parent.

    The expert part runs concurrently (onnxruntime and faiss are thread-safe for inference); the MLLM is
    one model on one device, so its calls are serialised by a lock.
    """

    def __init__(self, settings: Settings, *, banks_dir: Path | None = None) -> None:
        self.settings = settings
        self.banks = BankStore(
            settings.banks_dir if banks_dir is None else Path(banks_dir),
            settings.expert,
            versions_kept=settings.bank_versions_kept,
            max_loaded=settings.max_loaded_banks,
        )
        self.banks.sweep()  # what killed writers left under the banks folder (nothing that a live process owns)
        self._weights_info = None  # WeightsInfo once the weights were loaded; the torch module is not kept
        self._backbone_lock = threading.Lock()
        self._inspector: MLLMInspector | None = None
        self._mllm_lock = threading.Lock()
        self._mllm_error: str | None = None

    # ------------------------------------------------------------------ banks
    @property
    def onnx_cache(self):
        """The :class:`~expert.onnx_cache.OnnxCache` every bank build uses (``settings.onnx_cache_path``)."""
        from expert.onnx_cache import OnnxCache

        return OnnxCache(self.settings.onnx_cache_path)

    def _export_key(self, weights_info):
        from expert.onnx_cache import ExportKey

        expert = self.settings.expert
        return ExportKey.create(expert.backbone, weights_info.checksum, crop=expert.crop)

    def _weights(self):
        """``(weights_info, backbone loader)`` for a build; call with ``_backbone_lock`` held.

        The pipeline keeps only the weights' :class:`~expert.weights.WeightsInfo` (the graph's cache key), never
        the torch module (~300 MB). The first call loads the weights (their checksum needs them), puts the graph
        in :attr:`onnx_cache` while they are loaded (a cache hit costs a sha256 check) and drops them; the
        loader it returns is called by the cache only when it must export again (e.g. a corrupted entry).
        """
        from expert.weights import BackboneWeightsError, load_backbone

        if self._weights_info is None:
            module, info = load_backbone(self.settings.expert)
            self.onnx_cache.get(self._export_key(info), module)
            del module
            self._weights_info = info
        expected = self._weights_info

        def load():
            module, info = load_backbone(self.settings.expert)
            if info.checksum != expected.checksum:
                raise BackboneWeightsError(
                    f"the backbone weights changed since they were first loaded ({expected.checksum[:19]} → "
                    f"{info.checksum[:19]}); restart to use the new weights"
                )
            return module

        return expected, load

    def warm_onnx_cache(self, *, prune: bool = False) -> Path:
        """Make sure the configured backbone's ONNX graph is in :attr:`onnx_cache` (exported once if not).

        The app calls this in a background thread at start-up and ``eagle warm-cache`` runs it in the container
        build, so a bank build does not spend 10–20 s exporting. Returns the cached graph's path.

        Args:
            prune: also remove the cached graphs of other keys (older torch, other weights or crops).

        Raises:
            BackboneWeightsError: the weights cannot be loaded (the message says how to provide them).
        """
        with self._backbone_lock:
            weights_info, load = self._weights()
            key = self._export_key(weights_info)
            path = self.onnx_cache.get(key, load)
            if prune:
                for removed in self.onnx_cache.prune(key):
                    log.info("removed cached ONNX graph %s (another key)", removed)
            return path

    def read_images(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        names: Sequence[str] | None = None,
        *,
        skip_unreadable: bool = False,
        on_unreadable: Callable[[str], None] | None = None,
    ):
        """Decode reference images, collecting every failure before raising one :class:`ReferenceImagesError`.

        ``on_unreadable(message)`` is called with each failure's one line; with ``skip_unreadable`` the readable
        images are returned instead of raising.
        """
        decoded, kept_names, problems = [], [], []
        for i, item in enumerate(images):
            name = names[i] if names is not None else (item.name if isinstance(item, Path) else f"image_{i:04d}.png")
            try:
                array = (
                    item
                    if isinstance(item, np.ndarray)
                    else load_image(item, max_pixels=self.settings.max_image_pixels, name=name)
                )
            except ImageError as err:
                problems.append(str(err))
                if on_unreadable is not None:
                    on_unreadable(str(err))
                continue
            decoded.append(array)
            kept_names.append(name)
        if problems and not skip_unreadable:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise ReferenceImagesError(
                f"{len(problems)} of {len(images)} reference images could not be read "
                f"(remove or replace them and build again):\n{listing}",
                problems=problems,
                total=len(images),
            )
        return decoded, kept_names

    def build_bank(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        name: str,
        *,
        names: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
        skip_unreadable: bool = False,
        on_unreadable: Callable[[str], None] | None = None,
        out_dir: Path | None = None,
        mask: object | None = None,
    ) -> BankSummary:
        """Build (or rebuild) the bank ``name`` from normal reference images.

        Args:
            images: files, raw bytes or decoded RGB arrays of GOOD parts.
            name: bank name (validated: letters, digits, ``._-``).
            names: display names for bytes/arrays (defaults to file names).
            progress: ``progress(stage, fraction)`` with stages ``read``, ``embed``, ``coreset``, ``dbt``, ``save``.
            skip_unreadable: build from the readable images instead of raising (``eagle build-bank
                --skip-unreadable``); the summary's ``n_references`` says how many were used.
            on_unreadable: called with each unreadable image's one-line message.
            out_dir: write the bank there instead of ``<banks_dir>/<name>`` (``eagle build-bank --out``).
            mask: the inspection mask (:mod:`expert.mask`): a ``.png`` / ``.json`` path, PNG bytes, a polygons
                dict or list (JSON form), an ``H × W`` picture in original-image pixels (bool, or RGB/RGBA: white and
                opaque = inspected), or a bool array of the patch grid's shape (an existing bank's ``bank.mask``,
                taken as is). Polygons without a size are sized like the first reference image. None: no mask.

        Raises:
            ReferenceImagesError: some images are unreadable (all are listed; nothing is built).
            BankNameError: the name is not allowed.
            EagleError: ``invalid_mask`` (422): the mask cannot be read or covers no patch.
        """
        from expert.build import build_bank

        target = self.banks.path(name) if out_dir is None else Path(out_dir)  # validates the name before any work
        validate_bank_name(name)
        if progress:
            progress("read", 0.0)
        decoded, kept_names = self.read_images(
            images, names, skip_unreadable=skip_unreadable, on_unreadable=on_unreadable
        )
        grid_mask, mask_source = self._grid_mask(mask, decoded)
        if progress:
            progress("read", 1.0)
        with self._backbone_lock:  # waits for a start-up warm-up that is exporting the graph right now
            weights_info, backbone = self._weights()

        def write(directory: Path) -> None:
            build_bank(
                decoded,
                kept_names,
                settings=self.settings.expert,
                backbone=backbone,
                weights_info=weights_info,
                out_dir=directory,
                name=name,
                progress=progress,
                onnx_cache=self.onnx_cache,
                mask=grid_mask,
                mask_source=mask_source,
            )

        if out_dir is not None:
            write(target)
            return summarize_bank(target, self.settings.expert, name=name)
        self.banks.write_version(name, write, action="build", note=f"{len(decoded)} reference images")
        self.banks.forget(name)
        return self.banks.summary(name)

    def check_mask(self, mask: bytes | str) -> None:
        """Check a mask before a background build (PNG bytes, or polygons JSON text) so it fails now, not later.

        Polygons without a size are only parsed here; they are mapped once the references give the size.

        Raises:
            EagleError: ``invalid_mask`` (422).
        """
        import json

        from expert.mask import MaskError, parse_polygons

        if isinstance(mask, bytes):
            self._grid_mask(mask, [])
            return
        try:
            spec = json.loads(mask)
        except json.JSONDecodeError as err:
            raise EagleError(f"mask polygons: not valid JSON ({err})", code="invalid_mask", http_status=422) from None
        try:
            parse_polygons(spec, default_size=(1, 1))
        except MaskError as err:
            raise EagleError(one_line(err), code="invalid_mask", http_status=422) from None
        if isinstance(spec, dict) and "width" in spec:
            self._grid_mask(spec, [])

    def _grid_mask(self, mask: object | None, decoded: Sequence[np.ndarray]) -> tuple[np.ndarray | None, str]:
        """The bank's grid mask and its description from any mask source :meth:`build_bank` accepts."""
        if mask is None:
            return None, ""
        from expert.bank_checks import expected_grid
        from expert.mask import MaskError, grid_mask_from_source

        expert = self.settings.expert
        grid = expected_grid(expert.crop)
        if isinstance(mask, np.ndarray) and mask.ndim == 2 and mask.shape == grid:  # a grid mask (e.g. a bank's own)
            return np.asarray(mask, dtype=bool), "grid"
        default_size = (decoded[0].shape[1], decoded[0].shape[0]) if decoded else None
        try:
            return grid_mask_from_source(
                mask,
                resize=expert.resize,
                crop=expert.crop,
                center_crop=expert.center_crop,
                grid=grid,
                default_size=default_size,
            )
        except MaskError as err:
            raise EagleError(one_line(err), code="invalid_mask", http_status=422) from None

    def add_references(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        name: str,
        *,
        names: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> TeachResult:
        """Teach bank ``name`` that ``images`` are normal: rebuild it from its references plus these, as a new version.

        The bank is rebuilt from its stored reference copies (at their stored size, up to
        ``expert.reference_max_side`` px) followed by the new images, with the bank's own coreset, seed and
        threshold settings, so τ and s_max are recomputed the way they were first derived. The new version is
        written completely, then made current atomically (:meth:`~eagle.banks.BankStore.write_version`); the
        previous one stays in the history. Each taught image is scored against the old and the new bank.

        Raises:
            BankNotFoundError: no such bank. ReferenceImagesError: some images are unreadable (nothing changes).
            BankError: the bank cannot be loaded, or the running backbone weights are not the bank's.
        """
        from expert.build import build_bank

        validate_bank_name(name)
        if not images:
            raise ReferenceImagesError("no images to add: give at least one image of a good part")
        decoded, new_names = self.read_images(images, names)
        with self._backbone_lock:
            weights_info, backbone = self._weights()
        before: dict = {}

        def write(directory: Path) -> None:
            scorer = self.banks.load(name)  # the current version, read under the store's write lock
            bank = scorer.bank
            meta = bank.meta
            if weights_info.checksum != meta.backbone.weights_checksum:
                raise BankError(
                    f"bank {name!r} was built with other backbone weights ({meta.backbone.weights_source}) than the "
                    f"running ones ({weights_info.source}); rebuild it from its images instead"
                )
            before.update(
                version=self.banks.current_version(name),
                tau=bank.tau,
                s_max=bank.s_max,
                n=len(meta.references),
                scores=[float(scorer.score(image).score) for image in decoded],
            )
            stored = [bank.load_reference(i) for i in range(len(meta.references))]
            stored_names = [ref.name for ref in meta.references]
            build_bank(
                [*stored, *decoded],
                [*stored_names, *_unique_names(new_names, stored_names)],
                settings=_settings_of_bank(self.settings.expert, meta),
                backbone=backbone,
                weights_info=weights_info,
                out_dir=directory,
                name=meta.name,
                progress=progress,
                onnx_cache=self.onnx_cache,
                mask=bank.mask,  # the inspection mask stays
                mask_source=meta.mask.source if meta.mask is not None else "",
            )

        shown = ", ".join(new_names[:3]) + (f" and {len(new_names) - 3} more" if len(new_names) > 3 else "")
        version = self.banks.write_version(name, write, action="teach", note=f"added {shown}")
        scorer = self.banks.load(name)
        taught = []
        for image_name, image, old_score in zip(new_names, decoded, before["scores"], strict=True):
            now = scorer.score(image)
            taught.append(
                TaughtImage(
                    name=image_name,
                    score_before=old_score,
                    score_after=float(now.score),
                    passed_before=old_score < before["tau"],
                    passes_now=not now.anomalous,
                )
            )
        return TeachResult(
            bank=name,
            version_before=before["version"],
            version=version,
            tau_before=float(before["tau"]),
            tau_after=float(scorer.bank.tau),
            s_max_before=float(before["s_max"]),
            s_max_after=float(scorer.bank.s_max),
            references_before=int(before["n"]),
            references_after=len(scorer.bank.meta.references),
            taught=taught,
        )

    # ------------------------------------------------------------------ MLLM
    @property
    def mllm_enabled(self) -> bool:
        """Whether settings ask for the MLLM at all (False: expert-only mode)."""
        return self.settings.mllm.enabled

    def mllm_loaded(self) -> bool:
        """Whether the MLLM is loaded and ready."""
        return self._inspector is not None

    def mllm_status(self) -> str:
        """One line for people: what the LLM side is doing."""
        if not self.mllm_enabled:
            return "expert-only mode (MLLM disabled in settings)"
        if self._inspector is not None:
            return f"MLLM loaded: {self._inspector.loaded.model_id} ({self._inspector.loaded.quantization})"
        if self._mllm_error:
            return f"MLLM unavailable ({self._mllm_error}); inspections asking for it fail until it loads"
        return "MLLM not loaded yet (loads on the first inspection)"

    def load_mllm(self, progress: ProgressCallback | None = None) -> MLLMInspector:
        """Load the MLLM once (later calls return the same inspector; a failed load is tried again next time).

        Raises:
            MLLMUnavailableError: disabled in settings, or loading failed (the message says why and how to inspect
                with the expert alone). :meth:`inspect` raises it too when asked for the MLLM: every front end
                reports the same ``mllm_unavailable`` error rather than silently answering expert-only.
        """
        if not self.mllm_enabled:
            raise MLLMUnavailableError("the MLLM is disabled (EAGLE_MLLM__ENABLED=false): expert-only mode")
        with self._mllm_lock:
            if self._inspector is not None:
                return self._inspector
            from mllm.inspector import MLLMInspector
            from mllm.loading import MLLMLoadError, load_mllm

            try:
                loaded = load_mllm(self.settings.mllm, progress=progress, caas=self.settings.caas)
            except MLLMLoadError as err:
                self._mllm_error = one_line(err)
                raise MLLMUnavailableError(f"{MLLM_UNAVAILABLE}: {self._mllm_error}; {EXPERT_ONLY_HINT}") from None
            self._inspector = MLLMInspector(loaded, self.settings)
            self._mllm_error = None
            return self._inspector

    def ready(self) -> dict[str, bool]:
        """Readiness facts for health checks: any bank saved, MLLM loaded (or not needed)."""
        return {
            "banks": bool(self.banks.list()),
            "mllm": self.mllm_loaded() or not self.mllm_enabled,
        }

    def line_health(self, name: str, audit: AuditLog) -> LineHealth:
        """The drift check of bank ``name``'s current version over its latest audited inspections.

        The bank is loaded (and cached) for its DBT training scores and τ; the statistics and states are
        :func:`expert.drift.assess_drift`'s, with ``settings.health``'s windows and limits.

        Raises:
            BankNotFoundError: no bank named ``name``.
        """
        from eagle.line_health import line_health

        bank = self.banks.load(name).bank
        return line_health(
            name, bank.meta.bank_id, bank.train_scores, bank.meta.threshold.tau, audit, self.settings.health
        )

    # ------------------------------------------------------------------ inspection
    def _view_limits(self) -> dict[str, int]:
        """What a query image is decoded and shown at: enough for the expert's resize and the MLLM's budget."""
        return {"min_short_side": self.settings.expert.resize, "min_pixels": self._mllm_pixel_budget()}

    def _mllm_pixel_budget(self) -> int:
        """Pixels per image the MLLM gets (the setting, else the preset's); 0 in expert-only mode."""
        if not self.mllm_enabled:
            return 0
        if self.settings.mllm.max_pixels is not None:
            return self.settings.mllm.max_pixels
        from mllm.presets import PresetError, get_preset

        try:
            return get_preset(self.settings.mllm.preset).max_pixels or 0
        except PresetError:
            return 0  # the load reports the unknown preset; the view falls back to its own bound

    def view(self, image: np.ndarray | DecodedImage) -> np.ndarray:
        """The bounded picture of a query (RGB uint8) that the MLLM sees and the boxes and heatmap are drawn on.

        At most :data:`~eagle.images.VIEW_MAX_SIDE` (1024) px on the longest side unless the expert's resize or
        the MLLM's pixel budget need more; an image already that small (or decoded reduced) is used as it is.
        """
        pixels = image.pixels if isinstance(image, DecodedImage) else image
        height, width = view_size(*pixels.shape[:2], **self._view_limits())
        return resize_rgb(pixels, height, width)

    def decode(self, image: np.ndarray | bytes | Path | DecodedImage, *, image_name: str | None = None) -> DecodedImage:
        """Decode one query image, reduced to its bounded view when larger (:func:`eagle.images.decode_image`).

        The result records the original size: the expert, the boxes and the record are in ORIGINAL pixels.
        Arrays pass through (after a shape check) at their own resolution.
        """
        if isinstance(image, DecodedImage):
            return image
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ImageError(
                    f"{image_name or 'image'}: expected an RGB uint8 array, got {image.shape} {image.dtype}"
                )
            return DecodedImage.of(image)
        limits = self._view_limits()
        return decode_image(
            image,
            max_pixels=self.settings.max_image_pixels,
            name=image_name,
            min_short_side=limits["min_short_side"],
            min_view_pixels=limits["min_pixels"],
        )

    def run_expert(self, image: np.ndarray | DecodedImage, bank: str) -> ExpertResult:
        """Score one decoded image with the bank's expert (the evaluation calls this once per image)."""
        return _score(self.banks.load(bank), image)

    def inspect(
        self,
        image: np.ndarray | bytes | Path | DecodedImage,
        bank: str,
        options: InspectOptions | None = None,
        *,
        image_name: str | None = None,
    ) -> InspectionResult:
        """Inspect one image end to end: decode, expert, then the MLLM when enabled and asked for.

        Memory and time are bounded whatever the image's pixel count: large images are decoded reduced
        (:meth:`decode`) and everything after the expert's input works at the bounded :meth:`view`.
        """
        t0 = time.perf_counter()
        if image_name is None and isinstance(image, Path):
            image_name = image.name
        decoded = self.decode(image, image_name=image_name)
        sha = sha256_of_image(decoded)
        decode_ms = (time.perf_counter() - t0) * 1000
        # One scorer for the whole request: a new bank version made current meanwhile (teach, rollback) is used
        # from the next request on, never half-way through this one (score, template and bank id agree).
        scorer = self.banks.load(bank)
        expert = _score(scorer, decoded)
        result = self.finish(decoded, expert, bank, options, image_name=image_name, image_sha256=sha, scorer=scorer)
        result.timings_ms = {"decode": decode_ms, **result.timings_ms}
        result.timings_ms["total"] = (time.perf_counter() - t0) * 1000
        return result

    def _caas_config(self, options: InspectOptions, expert: ExpertResult):
        from mllm.caas import CAASConfig, should_apply

        policy = options.caas or self.settings.caas.policy
        if not should_apply(policy, expert.score, expert.tau, expert.s_max):
            return None
        config = CAASConfig.from_settings(self.settings.caas)
        if options.alpha is not None:
            config = CAASConfig(**{**config.__dict__, "alpha": options.alpha})
        return config

    def finish(
        self,
        image: np.ndarray | DecodedImage,
        expert: ExpertResult,
        bank: str,
        options: InspectOptions | None = None,
        *,
        image_name: str | None = None,
        image_sha256: str | None = None,
        template: np.ndarray | None = None,
        template_name: str | None = None,
        scorer: ExpertScorer | None = None,
        question: MultipleChoice | None = None,
    ) -> InspectionResult:
        """Turn an expert result into the full record, asking the MLLM when enabled and requested.

        The evaluation reuses one ``expert`` result for several prompt settings by calling this repeatedly.
        ``image`` is the original or the decoded (possibly reduced) copy the expert scored; the pictures are made
        at its bounded :meth:`view`, the boxes and sizes in the record are the ORIGINAL image's.
        ``template`` (RGB uint8) replaces the bank's retrieved template (the evaluation passes MMAD's own
        ``similar_templates`` image); ``template_name`` is then recorded as the result's ``template``.
        ``scorer`` is the bank's expert that produced ``expert`` (default: the bank's current one).
        ``question`` (the evaluation's MMAD items) replaces the yes/no question with a data set's own
        multiple-choice question; ``mllm_letter`` is then one of its letters and ``mllm_answer`` the chosen option's
        text read as yes/no (``unknown`` when it is neither).
        """
        from expert.boxes import draw_boxes, find_boxes_in_original, heatmap_overlay

        options = options or InspectOptions()
        scorer = scorer or self.banks.load(bank)
        timings = dict(expert.timings_ms)
        t0 = time.perf_counter()
        if template is None:
            template_img = self.banks.template_image(bank, expert.template_index, scorer=scorer)
            template_name = scorer.reference_name(expert.template_index)
        else:
            template_img = np.ascontiguousarray(template)
            template_name = template_name or "external template"
        # Pictures at the bounded view (never the original's pixel count): boxes (ORIGINAL pixels) are
        # scaled onto it, the map is sampled onto it from the expert's crop-resolution map.
        view = self.view(image)
        view_h, view_w = view.shape[:2]
        orig_w, orig_h = expert.geometry.orig_w, expert.geometry.orig_h
        sx, sy = view_w / orig_w, view_h / orig_h
        drawn = expert.boxes
        # visual_all (the paper's Table 3 visual-only row) sends boxes on EVERY image: a normal one gets them here.
        boxes_always = (
            options.use_mllm
            and self.mllm_enabled
            and (options.prompt_setting or self.settings.prompt.setting) == "visual_all"
        )
        if boxes_always and not expert.anomalous:
            drawn = find_boxes_in_original(
                expert.crop_map,
                expert.geometry,
                max_boxes=self.settings.expert.max_boxes,
                crop_mask=expert.crop_mask,
                merge=self.settings.expert.box_merge,
            )
        view_boxes = [b.scaled(sx, sy, width=view_w, height=view_h) for b in drawn]
        # The boxed view exists whenever the expert says anomalous (the prompt promises it) or the setting sends it
        # always; in the rare case that every region was too small to box, it is the plain image.
        boxed = draw_boxes(view, view_boxes) if expert.anomalous or boxes_always else None
        view_map, view_valid = expert.map_at(view_h, view_w)
        images = InspectionImages(
            heatmap_overlay=heatmap_overlay(view, view_map, view_valid, vmin=0.0, vmax=expert.s_max),
            boxed=boxed,
            template=template_img,
        )
        del view_map, view_valid
        timings["render"] = (time.perf_counter() - t0) * 1000
        record = dict(
            image_name=image_name,
            image_sha256=image_sha256 or sha256_of_image(image),
            image_size=(int(orig_w), int(orig_h)),
            bank=bank,
            bank_id=scorer.bank.meta.bank_id,
            score=float(expert.score),
            tau=float(expert.tau),
            s_max=float(expert.s_max),
            expert_decision="anomalous" if expert.anomalous else "normal",
            low_confidence=bool(expert.low_confidence),
            # what the MLLM was shown: visual_all boxes a normal image too, and its record says so
            boxes=[BoxRecord(x0=b.x0, y0=b.y0, x1=b.x1, y1=b.y1, peak=float(b.peak)) for b in drawn],
            inspected_region=expert.geometry.inspected_region(),
            template=template_name,
            images=images,
        )
        use_mllm = options.use_mllm and self.mllm_enabled
        if not use_mllm:
            return InspectionResult(
                **record, mode="expert-only", verdict="defect" if expert.anomalous else "no_defect", timings_ms=timings
            )

        inspector = self.load_mllm()
        setting = options.prompt_setting or self.settings.prompt.setting
        caas = self._caas_config(options, expert)
        views = _mllm_views(view, template_img, boxed, expert)
        if not self.settings.prompt.template:  # 0-shot: the reference's published run sends no template
            views["template"] = None
        answer: MLLMAnswer = inspector.ask(**views, setting=setting, caas=caas, question=question)
        timings.update({f"mllm_{k}": v for k, v in answer.timings_ms.items()})
        explanation = None
        explain = self.settings.prompt.explain if options.explain is None else options.explain
        if explain:
            t1 = time.perf_counter()
            explanation = "".join(inspector.explain_stream(**views, answer=answer, setting=setting)).strip()
            timings["mllm_explain"] = (time.perf_counter() - t1) * 1000
        if options.attention_map:
            t1 = time.perf_counter()
            images.attention_overlay = inspector.attention_overlay(**views, setting=setting)
            timings["mllm_attention"] = (time.perf_counter() - t1) * 1000
        verdict = {"yes": "defect", "no": "no_defect"}.get(answer.answer, "unknown")
        return InspectionResult(
            **record,
            mode="expert+mllm",
            prompt_setting=setting,
            caas_applied=answer.caas_applied,
            caas_alpha=caas.alpha if caas is not None else None,
            mllm_letter=answer.letter,
            mllm_answer=answer.answer,
            mllm_raw=answer.raw_text,
            explanation=explanation,
            verdict=verdict,
            model_id=inspector.loaded.model_id,
            timings_ms=timings,
        )

    def explain_stream(self, image: np.ndarray | DecodedImage, result: InspectionResult) -> Iterator[str]:
        """Stream the explanation turn for a finished MLLM inspection (the app shows it as it arrives).

        ``image`` is what was inspected (array or :class:`~eagle.images.DecodedImage`); the MLLM sees its
        :meth:`view`, as in the answer turn.
        """
        from PIL import Image

        from mllm.inspector import MLLMAnswer

        if result.mode != "expert+mllm" or result.images is None:
            raise MLLMUnavailableError("this result has no MLLM answer to explain")
        inspector = self.load_mllm()
        images = result.images
        answer = MLLMAnswer(
            letter=result.mllm_letter,
            answer=result.mllm_answer or "unknown",
            raw_text=result.mllm_raw or "",
            caas_applied=result.caas_applied,
            n_input_tokens=0,
            n_new_tokens=0,
        )
        # the same views as the answer turn: no template when the prompt sends none (0-shot, the reference profile)
        template = Image.fromarray(images.template) if self.settings.prompt.template else None
        yield from inspector.explain_stream(
            query=Image.fromarray(self.view(image)),
            template=template,
            boxed=Image.fromarray(images.boxed) if images.boxed is not None else None,
            expert_anomalous=result.expert_decision == "anomalous",
            answer=answer,
            setting=result.prompt_setting or self.settings.prompt.setting,
        )


def _score(scorer: ExpertScorer, image: np.ndarray | DecodedImage) -> ExpertResult:
    """Score a query with ``scorer``; a reduced decode is scored with its ORIGINAL geometry."""
    if isinstance(image, DecodedImage):
        return scorer.score(image.pixels, original_size=image.original_size)
    return scorer.score(image)
