"""The expert end to end: build a bank from normal images, and score query images against it.

Building (:func:`build_bank`), four stages, each with a tqdm bar and ``progress(stage, fraction)`` calls:

1. ``embed``: the patch embedder's ONNX graph is taken from the export cache (:mod:`expert.onnx_cache`;
   exported once per backbone, weights, crop, opset and torch version), then every reference image is
   preprocessed and embedded with that graph into one preallocated float32 [N, P, D] array (P = 784,
   D = 1024 at 224);
2. ``coreset``: greedy k-center over all N·P patches (``coreset_ratio``); each kept patch keeps its image id;
3. ``dbt``: training scores (``dbt_search``: leave-own-out by default) → τ and s_max (``threshold_method``),
   global descriptors; τ > s_max (an empty CAAS band) is recorded as a bank warning;
4. ``save``: the ONNX backbone goes into the bank (the bank carries its own feature extractor), with
   downscaled reference copies, ``bank.safetensors`` and ``meta.json``, written atomically.

Scoring (:class:`ExpertScorer`): preprocess → embed (batch of 1) → faiss k = 1 search → patch-score grid →
image score = max → anomaly map (kept at crop resolution, with the geometry to map it back) → boxes in ORIGINAL
coordinates only when score ≥ τ → template retrieval. Nothing of the original's pixel count is allocated after
preprocessing, so memory and time do not grow with the image (issue 11).

Example:
    >>> from eagle.settings import ExpertSettings
    >>> from expert.weights import load_backbone
    >>> settings = ExpertSettings(weights="random")
    >>> backbone, info = load_backbone(settings)
    >>> bank = build_bank(images, names, settings=settings, backbone=backbone, weights_info=info,
    ...                   out_dir="banks/widget", name="widget")            # doctest: +SKIP
    >>> load_expert("banks/widget", settings).score(query).anomalous        # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch
from tqdm.auto import tqdm

from eagle.settings import ExpertSettings
from expert.anomaly_map import crop_anomaly_map, render_map
from expert.backbone import PatchEmbedder, build_patch_embedder
from expert.bank import Bank, BankError, check_weights, load_bank, make_meta, save_bank
from expert.boxes import Box, find_boxes_in_original
from expert.coreset import greedy_coreset
from expert.dbt import (
    DBTError,
    Threshold,
    check_reference_count,
    compute_threshold,
    empty_band_warning,
    skip_reasons,
    threshold_params,
    training_scores,
)
from expert.embedder import Embedder, OnnxEmbedder, TorchEmbedder, embed_images
from expert.onnx_cache import BackboneSource, ExportKey, OnnxCache
from expert.preprocess import Geometry, compute_geometry, preprocess
from expert.retrieval import global_descriptors, most_similar
from expert.search import PatchIndex
from expert.weights import WeightsInfo, load_backbone

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float], None]
"""``progress(stage, fraction)``: stage is one of :data:`BUILD_STAGES`, fraction in [0, 1]."""

BUILD_STAGES: tuple[str, ...] = ("embed", "coreset", "dbt", "save")
SCORE_STAGES: tuple[str, ...] = ("preprocess", "embed", "search", "map", "boxes", "retrieval")


class ReferenceCountError(DBTError):
    """Too few reference images to build a bank (the message gives the minimum and how to change it)."""


# ---------------------------------------------------------------------------------------------- building
def _report(progress: ProgressCallback | None, stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, float(min(1.0, max(0.0, fraction))))


def _check_inputs(images: Sequence[np.ndarray], names: Sequence[str], settings: ExpertSettings) -> str | None:
    if len(images) != len(names):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    if len(set(names)) != len(names):
        duplicated = sorted(name for name, count in Counter(names).items() if count > 1)
        raise ValueError(f"reference names must be unique; repeated: {duplicated[:5]}")
    for name, image in zip(names, images, strict=True):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            shape = getattr(image, "shape", None)
            raise ValueError(f"reference {name!r}: expected an H×W×3 uint8 RGB array, got {shape}")
    try:
        return check_reference_count(
            len(images), minimum=settings.min_references, recommended=settings.recommended_references
        )
    except DBTError as err:
        raise ReferenceCountError(
            f"{err} (the minimum is set by EAGLE_EXPERT__MIN_REFERENCES; DBT's leave-own-out threshold needs "
            "normal images other than the one being scored)"
        ) from None


def _embed_stage(
    embedder: Embedder, images: Sequence[np.ndarray], settings: ExpertSettings, progress: ProgressCallback | None
) -> np.ndarray:
    features: np.ndarray | None = None  # [N, P, D], allocated once the first batch gives P and D
    _report(progress, "embed", 0.0)
    with tqdm(total=len(images), desc="embed", unit="img") as bar:
        for start in range(0, len(images), settings.batch_size):
            chunk = list(images[start : start + settings.batch_size])
            batch, _ = embed_images(
                embedder,
                chunk,
                resize=settings.resize,
                crop=settings.crop,
                center_crop=settings.center_crop,
                batch_size=settings.batch_size,
            )
            if features is None:
                features = np.empty((len(images), *batch.shape[1:]), dtype=np.float32)
            features[start : start + len(chunk)] = batch
            bar.update(len(chunk))
            _report(progress, "embed", (start + len(chunk)) / len(images))
    return features


def _as_patch_embedder(backbone: torch.nn.Module, crop: int) -> PatchEmbedder:
    if isinstance(backbone, PatchEmbedder):
        return backbone.eval()
    return build_patch_embedder(backbone, input_size=crop)


def _patch_grid(backbone: torch.nn.Module | None, crop: int, n_patches: int) -> tuple[int, int]:
    """The patch grid: the module's when there is one, else the square grid of ``n_patches`` (ONNX-only build)."""
    if backbone is not None:
        return _as_patch_embedder(backbone, crop).grid_size
    side = int(round(n_patches**0.5))
    if side * side != n_patches:
        raise ValueError(f"{n_patches} patches per image do not form a square grid; pass the backbone")
    return side, side


def _coreset_stage(features: np.ndarray, settings: ExpertSettings, progress: ProgressCallback | None) -> np.ndarray:
    _report(progress, "coreset", 0.0)
    n_images, n_patches, dim = features.shape
    selected = greedy_coreset(
        features.reshape(n_images * n_patches, dim),
        ratio=settings.coreset_ratio,
        projection_dim=settings.coreset_projection_dim,
        num_starts=settings.coreset_starts,
        start_method=settings.coreset_start_method,
        seed=settings.seed,
        progress=True,
    )
    _report(progress, "coreset", 1.0)
    return selected


def _dbt_stage(features: np.ndarray, selected: np.ndarray, settings: ExpertSettings, progress):
    _report(progress, "dbt", 0.0)
    scores, used = training_scores(
        features,
        selected,
        search=settings.dbt_search,
        distance=settings.distance,
        min_unsampled=settings.min_unsampled_patches,
        progress=True,
    )
    threshold = compute_threshold(
        scores, settings.threshold_method, **threshold_params(settings.threshold_method, settings)
    )
    _report(progress, "dbt", 1.0)
    return scores, used, threshold


def _assemble_bank(
    *,
    names: Sequence[str],
    grid: tuple[int, int],
    settings: ExpertSettings,
    weights_info: WeightsInfo,
    features: np.ndarray,
    selected: np.ndarray,
    scores: np.ndarray,
    used: np.ndarray,
    threshold: Threshold,
    warnings: list[str],
    name: str,
) -> Bank:
    n_images, n_patches, dim = features.shape
    if grid[0] * grid[1] != n_patches:
        raise ValueError(f"patch grid {grid} does not match {n_patches} patches per image")
    descriptors = global_descriptors(features)
    meta = make_meta(
        name=name,
        settings=settings,
        weights_info=weights_info,
        threshold=threshold,
        reference_names=list(names),
        used_for_dbt=used,
        skip_reasons=skip_reasons(
            n_images, n_patches, selected, min_unsampled=settings.min_unsampled_patches, search=settings.dbt_search
        ),
        grid=grid,
        feature_dim=dim,
        descriptor_dim=descriptors.shape[1],
        coreset_size=len(selected),
    )
    meta.warnings = list(warnings)
    return Bank(
        memory_bank=features.reshape(n_images * n_patches, dim)[selected],
        train_scores=np.asarray(scores, dtype=np.float32),
        coreset_image_ids=(selected // n_patches).astype(np.int64),
        global_descriptors=descriptors,
        meta=meta,
    )


def _duplicate_warning(images: Sequence[np.ndarray], names: Sequence[str]) -> str | None:
    first_of: dict[str, str] = {}
    duplicates = []
    for name, image in zip(names, images, strict=True):
        digest = hashlib.sha256(f"{image.shape}".encode() + np.ascontiguousarray(image).tobytes()).hexdigest()
        if digest in first_of:
            duplicates.append(f"{name} = {first_of[digest]}")
        else:
            first_of[digest] = name
    if not duplicates:
        return None
    shown = ", ".join(duplicates[:5]) + (", ..." if len(duplicates) > 5 else "")
    return (
        f"{len(duplicates)} reference images are pixel-identical copies of others ({shown}); "
        "duplicates add no information to the threshold: use varied normal images"
    )


def _threshold_warnings(scores: np.ndarray, used: np.ndarray, threshold: Threshold) -> list[str]:
    warnings = []
    skipped = int(len(used) - used.sum())
    if skipped:
        warnings.append(f"{skipped} of {len(used)} reference images were skipped by DBT (see meta references)")
    if len(scores) > 1 and float(np.ptp(scores)) == 0.0:
        warnings.append(
            f"all {len(scores)} DBT training scores are equal (sigma = 0): tau = {float(scores[0]):.6g}; "
            "add varied normal images for a meaningful threshold"
        )
    band = empty_band_warning(threshold)
    if band:
        warnings.append(band)
    return warnings


def fit_bank(
    images: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    settings: ExpertSettings,
    backbone: torch.nn.Module | None,
    weights_info: WeightsInfo,
    name: str,
    progress: ProgressCallback | None = None,
    embedder: Embedder | None = None,
) -> Bank:
    """Compute a bank in memory (stages ``embed``, ``coreset``, ``dbt``); nothing is written.

    :func:`build_bank` is this plus the ONNX export and the atomic save; use this one to inspect or test
    a bank's contents cheaply (``save_bank(bank, dir, reference_images=images)`` saves it without ONNX).

    Args and raises: as :func:`build_bank` (without ``out_dir``; no :class:`~expert.bank.BankError`), plus
    ``embedder``: what computes the reference features (default: the torch module built on ``backbone``;
    :func:`build_bank` passes the exported ONNX backbone, the same one that will score queries).
    ``backbone`` may be None when ``embedder`` is given (the patch grid then follows the features).

    Returns:
        An unsaved :class:`~expert.bank.Bank` (``directory`` is None).
    """
    count_warning = _check_inputs(images, names, settings)
    warnings = [w for w in (count_warning, _duplicate_warning(images, names)) if w]
    for warning in warnings:
        log.warning("bank %s: %s", name, warning)
    if embedder is None:
        if backbone is None:
            raise ValueError("fit_bank needs a backbone or an embedder")
        embedder = TorchEmbedder(_as_patch_embedder(backbone, settings.crop))
    features = _embed_stage(embedder, images, settings, progress)
    selected = _coreset_stage(features, settings, progress)
    scores, used, threshold = _dbt_stage(features, selected, settings, progress)
    for warning in _threshold_warnings(scores, used, threshold):
        log.warning("bank %s: %s", name, warning)
        warnings.append(warning)
    return _assemble_bank(
        names=names,
        grid=_patch_grid(backbone, settings.crop, features.shape[1]),
        settings=settings,
        weights_info=weights_info,
        features=features,
        selected=selected,
        scores=scores,
        used=used,
        threshold=threshold,
        warnings=warnings,
        name=name,
    )


def build_bank(
    images: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    settings: ExpertSettings,
    backbone: BackboneSource,
    weights_info: WeightsInfo,
    out_dir: str | Path,
    name: str,
    progress: ProgressCallback | None = None,
    onnx_cache: OnnxCache | str | Path | None = None,
) -> Bank:
    """Build a bank from normal reference images and save it to ``out_dir`` (atomically).

    Stages (:data:`BUILD_STAGES`): ``embed`` (the ONNX graph of the patch embedder is taken from
    ``onnx_cache`` — exported first on a miss — and the references are embedded with it), ``coreset``,
    ``dbt`` (see :func:`fit_bank`), then ``save``: the graph is copied into the bank (so the bank carries
    its own feature extractor), with downscaled reference copies, and :func:`expert.bank.save_bank` renames
    the finished bank into place. With a cached graph the torch weights are never touched (a loader passed
    as ``backbone`` is not even called) and the export's 10–20 s are saved.

    Args:
        images: the N reference images, RGB uint8 ``H × W × 3`` (any sizes).
        names: one unique display name per image (usually the file name), stored in the bank.
        settings: the expert settings (preprocessing, coreset, distance, τ method, reference counts).
        backbone: the loaded feature extractor (:func:`expert.weights.load_backbone`), a
            :class:`~expert.backbone.PatchEmbedder` built on it, or a zero-argument loader of either (called
            only when the graph must be exported).
        weights_info: the backbone's :class:`~expert.weights.WeightsInfo` (recorded in the bank; its checksum
            is part of the graph's cache key).
        out_dir: bank directory (an existing bank there is replaced atomically).
        name: the bank's name (recorded in meta.json).
        progress: ``progress(stage, fraction)`` called as each stage of :data:`BUILD_STAGES` advances.
        onnx_cache: the :class:`~expert.onnx_cache.OnnxCache` (or its directory) to take the graph from and
            store it in; None exports into a scratch directory every time (nothing cached).

    Returns:
        The saved :class:`~expert.bank.Bank` (``bank.directory`` set).

    Raises:
        ReferenceCountError: fewer than ``settings.min_references`` images (fewer than
            ``settings.recommended_references`` only logs a warning, also kept in the bank's meta).
        ValueError: images and names differ in length, repeated names, or an image is not RGB uint8.
        DBTError: no reference image is usable for the threshold (the message says why).
        BankError: the bank cannot be written.
    """
    _check_inputs(images, names, settings)  # bad input fails before any graph is loaded or exported
    out_dir = Path(out_dir).expanduser()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with TemporaryDirectory(prefix=".eagle-export-", dir=out_dir.parent) as scratch:
        # The graph first (cached, or exported), then embed the references with it: the bank's features come
        # from the very extractor that scores queries (and onnxruntime is faster than torch on CPU).
        _report(progress, "embed", 0.0)
        cache = onnx_cache if isinstance(onnx_cache, OnnxCache) else OnnxCache(onnx_cache or Path(scratch) / "onnx")
        key = ExportKey.create(settings.backbone, weights_info.checksum, crop=settings.crop)
        onnx_file = cache.get(key, backbone, fallback_dir=scratch)
        bank = fit_bank(
            images,
            names,
            settings=settings,
            backbone=None,
            weights_info=weights_info,
            name=name,
            progress=progress,
            embedder=OnnxEmbedder(onnx_file),
        )
        _report(progress, "save", 0.0)
        with tqdm(total=1, desc="save", unit="bank") as bar:
            save_bank(
                bank,
                out_dir,
                onnx_source=onnx_file,
                reference_images=images,
                reference_max_side=settings.reference_max_side,
            )
            bar.update(1)
    _report(progress, "save", 1.0)
    return bank


# ---------------------------------------------------------------------------------------------- scoring
@dataclass
class ExpertResult:
    """What the expert says about one image.

    Attributes:
        score: image score s_img = max patch score (the bank's distance: squared L2 by default).
        tau: the bank's DBT threshold.
        s_max: the largest DBT training score.
        anomalous: ``score >= tau``.
        low_confidence: ``tau <= score <= s_max`` (the expert is unsure; CAAS turns on).
        patch_scores: ``[grid_h, grid_w]`` float32 nearest-neighbour distances (28×28 at 224).
        crop_map: float32 ``crop_h × crop_w`` smoothed anomaly map at the network input's resolution; with
            ``geometry`` it gives the map on any grid over the original (:meth:`map_at`).
        boxes: predicted defect boxes in ORIGINAL pixels (empty unless ``anomalous``).
        template_index: index of the most similar reference image in the bank.
        template_name: that reference's name.
        geometry: how the original image (its size, even when a reduced copy was scored) was resized and cropped.
        timings_ms: milliseconds per stage of :data:`SCORE_STAGES`.
    """

    score: float
    tau: float
    s_max: float
    anomalous: bool
    low_confidence: bool
    patch_scores: np.ndarray
    crop_map: np.ndarray
    boxes: list[Box]
    template_index: int
    template_name: str
    geometry: Geometry
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def inspected_region(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the original pixels the network saw (x1, y1 exclusive)."""
        return self.geometry.inspected_region()

    @property
    def original_size(self) -> tuple[int, int]:
        """``(width, height)`` of the original image."""
        return self.geometry.orig_w, self.geometry.orig_h

    def map_at(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The anomaly map and inspected mask on a ``height × width`` grid over the original image.

        Costs ~5 bytes per output pixel: use a bounded size for display (the pipeline does).
        """
        return render_map(self.crop_map, self.geometry, height, width)

    @property
    def anomaly_map(self) -> np.ndarray:
        """float32 ``orig_h × orig_w`` map in ORIGINAL pixels (0 outside the inspected region).

        Computed on each access, at the ORIGINAL resolution (for pixel-level evaluation): prefer :meth:`map_at`.
        """
        return self.map_at(self.geometry.orig_h, self.geometry.orig_w)[0]

    @property
    def valid_mask(self) -> np.ndarray:
        """The bool ``orig_h × orig_w`` mask, True where the network saw the image (computed on each access)."""
        return self.geometry.inspected_mask()


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = (now - self._last) * 1000.0
        self._last = now


class ExpertScorer:
    """Score query images against a loaded bank.

    Args:
        bank: the loaded :class:`~expert.bank.Bank`.
        embedder: the feature extractor (:class:`~expert.embedder.OnnxEmbedder` or
            :class:`~expert.embedder.TorchEmbedder`) the bank was built with.
        settings: the running expert settings (preprocessing must match the bank; σ and max_boxes are read here).

    Example:
        >>> scorer = load_expert("banks/widget", ExpertSettings())      # doctest: +SKIP
        >>> result = scorer.score(image)                                 # doctest: +SKIP
        >>> result.anomalous, result.boxes[:1], result.template_name     # doctest: +SKIP
    """

    def __init__(self, bank: Bank, embedder: Embedder, settings: ExpertSettings) -> None:
        self.bank = bank
        self.embedder = embedder
        self.settings = settings
        self.index = PatchIndex(bank.memory_bank, distance=bank.meta.distance)
        self.grid = (bank.meta.dims.grid_h, bank.meta.dims.grid_w)
        preprocessing = bank.meta.preprocessing
        self._preprocess = dict(
            resize=preprocessing.resize, crop=preprocessing.crop, center_crop=preprocessing.center_crop
        )

    @property
    def tau(self) -> float:
        """The bank's decision threshold."""
        return float(self.bank.meta.threshold.tau)

    @property
    def s_max(self) -> float:
        """The bank's largest training score."""
        return float(self.bank.meta.threshold.s_max)

    def reference_name(self, index: int) -> str:
        """Name of reference image ``index``."""
        return self.bank.meta.references[index].name

    def template_image(self, index: int) -> np.ndarray:
        """The stored (downscaled) copy of reference image ``index``, RGB uint8."""
        return self.bank.load_reference(index)

    def patch_features(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """Preprocess and embed one image: ``([P, D] float32, geometry)``."""
        tensor, geometry = preprocess(image, **self._preprocess)
        return self.embedder(tensor[None])[0], geometry

    def _prepare(self, image: np.ndarray, original_size: tuple[int, int] | None) -> tuple[np.ndarray, Geometry]:
        """Network input and the ORIGINAL image's geometry, from the original or from a reduced copy of it."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
        if original_size is None or tuple(original_size) == (image.shape[1], image.shape[0]):
            return preprocess(image, **self._preprocess)
        width, height = (int(v) for v in original_size)
        geometry = compute_geometry(height, width, **self._preprocess)
        # Resize the reduced copy straight to the size the original would have been resized to: the crop window
        # and every mapping back are then exactly the original's; only the pixel values come from the copy.
        from PIL import Image

        resized = np.asarray(Image.fromarray(image).resize((geometry.resized_w, geometry.resized_h), Image.BILINEAR))
        tensor, inner = preprocess(resized, **self._preprocess)
        if (inner.crop_top, inner.crop_left, inner.crop_h, inner.crop_w) != (
            geometry.crop_top,
            geometry.crop_left,
            geometry.crop_h,
            geometry.crop_w,
        ):  # pragma: no cover - compute_geometry is idempotent on its own output
            raise AssertionError(f"crop of the resized copy {inner} differs from the original's {geometry}")
        return tensor, geometry

    def score(self, image: np.ndarray, *, original_size: tuple[int, int] | None = None) -> ExpertResult:
        """Score one RGB uint8 ``H × W × 3`` image: the original, or a reduced copy of it.

        Args:
            image: the pixels to score.
            original_size: ``(width, height)`` of the original when ``image`` is a reduced copy (e.g. from
                :func:`eagle.images.decode_image`); the geometry, the map and the boxes are then the original's.

        Raises:
            ValueError: if ``image`` is not an ``H × W × 3`` uint8 array.
        """
        watch = _Stopwatch()
        tensor, geometry = self._prepare(image, original_size)
        watch.lap("preprocess")
        features = np.asarray(self.embedder(tensor[None]), dtype=np.float32)[0]
        watch.lap("embed")
        patch_scores = self.index.search(features).reshape(self.grid)
        score = float(patch_scores.max())
        watch.lap("search")
        crop_size = (geometry.crop_h, geometry.crop_w)
        crop_map = crop_anomaly_map(patch_scores, crop_size, sigma=self.settings.gaussian_sigma)
        watch.lap("map")
        anomalous = score >= self.tau
        boxes = find_boxes_in_original(crop_map, geometry, max_boxes=self.settings.max_boxes) if anomalous else []
        watch.lap("boxes")
        template = most_similar(global_descriptors(features)[0], self.bank.global_descriptors)
        watch.lap("retrieval")
        return ExpertResult(
            score=score,
            tau=self.tau,
            s_max=self.s_max,
            anomalous=anomalous,
            low_confidence=self.tau <= score <= self.s_max,
            patch_scores=patch_scores,
            crop_map=crop_map,
            boxes=boxes,
            template_index=template,
            template_name=self.reference_name(template),
            geometry=geometry,
            timings_ms=watch.timings,
        )


def make_embedder(bank: Bank, settings: ExpertSettings, *, runtime: str | None = None) -> Embedder:
    """The feature extractor for ``bank`` per ``runtime`` (default ``settings.runtime``).

    ``onnx``: the bank's own ``backbone.onnx`` through onnxruntime. ``torch``: the backbone rebuilt from
    ``settings`` (:func:`expert.weights.load_backbone`); its weights checksum must equal the bank's.

    Raises:
        BankError: the bank has no ONNX file (runtime onnx), or the rebuilt weights differ (runtime torch).
        BackboneWeightsError: the torch backbone's weights cannot be loaded.
    """
    runtime = runtime or settings.runtime
    if runtime == "onnx":
        if not bank.has_onnx:
            raise BankError(
                f"{bank.directory}: bank has no backbone.onnx; rebuild it, or set EAGLE_EXPERT__RUNTIME=torch"
            )
        return OnnxEmbedder(bank.onnx_path)
    if runtime == "torch":
        module, info = load_backbone(settings)
        check_weights(bank.meta, info)
        return TorchEmbedder(build_patch_embedder(module, input_size=bank.meta.preprocessing.crop))
    raise ValueError(f"unknown runtime {runtime!r}; expected 'onnx' or 'torch'")


def load_expert(bank_dir: str | Path, settings: ExpertSettings, *, runtime: str | None = None) -> ExpertScorer:
    """Load a bank directory and its feature extractor into a ready :class:`ExpertScorer`.

    Args:
        bank_dir: the bank directory (as written by :func:`build_bank`).
        settings: the running expert settings; those that change features or scores must match the bank.
        runtime: ``"onnx"`` or ``"torch"``; default ``settings.runtime``.

    Raises:
        BankError: missing, corrupted or incompatible bank (one-line message), or weights that differ.
        BackboneWeightsError: runtime torch and the weights cannot be loaded.
    """
    bank = load_bank(bank_dir, settings)
    return ExpertScorer(bank, make_embedder(bank, settings, runtime=runtime), settings)
