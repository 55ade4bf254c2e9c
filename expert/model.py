"""The expert end to end: build a bank from normal images, and score query images against it.

Building (:func:`build_bank`), four stages, each with a tqdm bar and ``progress(stage, fraction)`` calls:

1. ``embed``: the patch embedder is exported to ONNX, then every reference image is preprocessed and
   embedded with that graph ([N, P, D], P = 784, D = 1024 at 224);
2. ``coreset``: greedy k-center over all N·P patches (``coreset_ratio``); each kept patch keeps its image id;
3. ``dbt``: leave-own-out training scores → τ and s_max (``threshold_method``), global descriptors;
4. ``save``: the ONNX backbone goes into the bank (the bank carries its own feature extractor), with
   downscaled reference copies, ``bank.safetensors`` and ``meta.json``, written atomically.

Scoring (:class:`ExpertScorer`): preprocess → embed (batch of 1) → faiss k = 1 search → patch-score grid →
image score = max → anomaly map in ORIGINAL coordinates → boxes only when score ≥ τ → template retrieval.

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
from expert.anomaly_map import anomaly_map
from expert.backbone import PatchEmbedder, build_patch_embedder
from expert.bank import Bank, BankError, check_weights, load_bank, make_meta, save_bank
from expert.boxes import Box, find_boxes
from expert.coreset import greedy_coreset
from expert.dbt import (
    DBTError,
    Threshold,
    check_reference_count,
    compute_threshold,
    leave_own_out_scores,
    skip_reasons,
    threshold_params,
)
from expert.embedder import Embedder, OnnxEmbedder, TorchEmbedder, embed_images, export_onnx
from expert.preprocess import Geometry, preprocess
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
    scores, used = leave_own_out_scores(
        features,
        selected,
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
        skip_reasons=skip_reasons(n_images, n_patches, selected, min_unsampled=settings.min_unsampled_patches),
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


def _threshold_warnings(scores: np.ndarray, used: np.ndarray) -> list[str]:
    warnings = []
    skipped = int(len(used) - used.sum())
    if skipped:
        warnings.append(f"{skipped} of {len(used)} reference images were skipped by DBT (see meta references)")
    if len(scores) > 1 and float(np.ptp(scores)) == 0.0:
        warnings.append(
            f"all {len(scores)} DBT training scores are equal (sigma = 0): tau = {float(scores[0]):.6g}; "
            "add varied normal images for a meaningful threshold"
        )
    return warnings


def fit_bank(
    images: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    settings: ExpertSettings,
    backbone: torch.nn.Module,
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

    Returns:
        An unsaved :class:`~expert.bank.Bank` (``directory`` is None).
    """
    count_warning = _check_inputs(images, names, settings)
    warnings = [w for w in (count_warning, _duplicate_warning(images, names)) if w]
    for warning in warnings:
        log.warning("bank %s: %s", name, warning)
    module = _as_patch_embedder(backbone, settings.crop)
    features = _embed_stage(embedder or TorchEmbedder(module), images, settings, progress)
    selected = _coreset_stage(features, settings, progress)
    scores, used, threshold = _dbt_stage(features, selected, settings, progress)
    for warning in _threshold_warnings(scores, used):
        log.warning("bank %s: %s", name, warning)
        warnings.append(warning)
    return _assemble_bank(
        names=names,
        grid=module.grid_size,
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
    backbone: torch.nn.Module,
    weights_info: WeightsInfo,
    out_dir: str | Path,
    name: str,
    progress: ProgressCallback | None = None,
) -> Bank:
    """Build a bank from normal reference images and save it to ``out_dir`` (atomically).

    Stages (:data:`BUILD_STAGES`): ``embed`` (the patch embedder is first exported to ONNX, and the
    references are embedded with that graph), ``coreset``, ``dbt`` (see :func:`fit_bank`), then ``save``:
    the ONNX file goes into the bank (so the bank carries its own feature extractor), with downscaled
    reference copies, and :func:`expert.bank.save_bank` renames the finished bank into place.

    Args:
        images: the N reference images, RGB uint8 ``H × W × 3`` (any sizes).
        names: one unique display name per image (usually the file name), stored in the bank.
        settings: the expert settings (preprocessing, coreset, distance, τ method, reference counts).
        backbone: the loaded feature extractor (:func:`expert.weights.load_backbone`) or a
            :class:`~expert.backbone.PatchEmbedder` built on it.
        weights_info: the backbone's :class:`~expert.weights.WeightsInfo` (recorded in the bank).
        out_dir: bank directory (an existing bank there is replaced atomically).
        name: the bank's name (recorded in meta.json).
        progress: ``progress(stage, fraction)`` called as each stage of :data:`BUILD_STAGES` advances.

    Returns:
        The saved :class:`~expert.bank.Bank` (``bank.directory`` set).

    Raises:
        ReferenceCountError: fewer than ``settings.min_references`` images (fewer than
            ``settings.recommended_references`` only logs a warning, also kept in the bank's meta).
        ValueError: images and names differ in length, repeated names, or an image is not RGB uint8.
        DBTError: no reference image is usable for the threshold (the message says why).
        BankError: the bank cannot be written.
    """
    module = _as_patch_embedder(backbone, settings.crop)
    out_dir = Path(out_dir).expanduser()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with TemporaryDirectory(prefix=".eagle-export-", dir=out_dir.parent) as scratch:
        # Export first, then embed the references with the exported graph: the bank's features come from
        # the very extractor that scores queries (and onnxruntime is faster than torch on CPU).
        _report(progress, "embed", 0.0)
        with tqdm(total=1, desc="export ONNX", unit="graph") as bar:
            onnx_file = export_onnx(module, Path(scratch) / "backbone.onnx", input_size=settings.crop)
            bar.update(1)
        bank = fit_bank(
            images,
            names,
            settings=settings,
            backbone=module,
            weights_info=weights_info,
            name=name,
            progress=progress,
            embedder=OnnxEmbedder(onnx_file),
        )
        _report(progress, "save", 0.0)
        with tqdm(total=1, desc="save", unit="bank") as bar:
            save_bank(
                bank, out_dir, onnx_source=onnx_file, reference_images=images, thumbnail=settings.reference_thumbnail
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
        anomaly_map: float32 ``H × W`` map in ORIGINAL image pixels (0 outside the inspected region).
        valid_mask: bool ``H × W``, True where the network saw the image.
        boxes: predicted defect boxes in original pixels (empty unless ``anomalous``).
        template_index: index of the most similar reference image in the bank.
        template_name: that reference's name.
        geometry: how the image was resized and cropped.
        timings_ms: milliseconds per stage of :data:`SCORE_STAGES`.
    """

    score: float
    tau: float
    s_max: float
    anomalous: bool
    low_confidence: bool
    patch_scores: np.ndarray
    anomaly_map: np.ndarray
    valid_mask: np.ndarray
    boxes: list[Box]
    template_index: int
    template_name: str
    geometry: Geometry
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def inspected_region(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the original pixels the network saw (x1, y1 exclusive)."""
        return self.geometry.inspected_region()


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

    def score(self, image: np.ndarray) -> ExpertResult:
        """Score one RGB uint8 ``H × W × 3`` image (original resolution).

        Raises:
            ValueError: if ``image`` is not an ``H × W × 3`` uint8 array.
        """
        watch = _Stopwatch()
        tensor, geometry = preprocess(image, **self._preprocess)
        watch.lap("preprocess")
        features = np.asarray(self.embedder(tensor[None]), dtype=np.float32)[0]
        watch.lap("embed")
        patch_scores = self.index.search(features).reshape(self.grid)
        score = float(patch_scores.max())
        watch.lap("search")
        amap, valid = anomaly_map(patch_scores, geometry, sigma=self.settings.gaussian_sigma)
        watch.lap("map")
        anomalous = score >= self.tau
        boxes = find_boxes(amap, valid, max_boxes=self.settings.max_boxes) if anomalous else []
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
            anomaly_map=amap,
            valid_mask=valid,
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
