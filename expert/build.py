"""Building a bank from normal reference images: on disk (:func:`build_bank`) or in memory (:func:`fit_bank`).

Four stages (:data:`expert.progress.BUILD_STAGES`), reported through ``progress(stage, fraction)`` calls
(:class:`common.progress.ProgressCallback`; nothing is printed):

1. ``embed``: the patch embedder's ONNX graph is taken from the export cache (:mod:`expert.onnx_cache`;
   exported once per backbone, weights, crop, opset and torch version), then every reference image is
   preprocessed (normalised with the backbone's own statistics, :func:`expert.preprocess.expert_normalization`,
   which ``meta.json`` records) and embedded with that graph into one preallocated float32 [N, P, D] array
   (P = 784, D = 1024 at 224);
2. ``coreset``: greedy k-center over all N·P patches (``coreset_ratio``); each kept patch keeps its image id;
3. ``dbt``: training scores (``dbt_search``: leave-own-out by default) → τ and s_max (``threshold_method``),
   global descriptors; τ > s_max (an empty CAAS band) is recorded as a bank warning;
4. ``save``: the ONNX backbone goes into the bank (the bank carries its own feature extractor), with
   downscaled reference copies, ``bank.safetensors`` and ``meta.json``, written atomically.

Scoring a query against the bank is :mod:`expert.scorer`.

Example:
    >>> from expert.config import ExpertSettings
    >>> from expert.scorer import load_expert
    >>> from expert.weights import load_backbone
    >>> settings = ExpertSettings(weights="random")
    >>> backbone, info = load_backbone(settings)  # doctest: +SKIP
    >>> bank = build_bank(images, names, settings=settings, backbone=backbone, weights_info=info,
    ...                   out_dir="banks/widget", name="widget")            # doctest: +SKIP
    >>> load_expert("banks/widget", settings).score(query).anomalous        # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import atomic
from common.progress import ProgressCallback, report
from expert.backbone import PatchEmbedder, build_patch_embedder
from expert.bank import file_sha256, load_embeddings, save_bank
from expert.bank_schema import Bank, MaskMeta, QuantizationMeta, make_meta
from expert.config import ExpertSettings
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
from expert.embedder import Embedder, OnnxEmbedder, TorchEmbedder, embed_images, providers_for
from expert.mask import MaskError, check_grid_mask
from expert.onnx_cache import BackboneSource, ExportKey, OnnxCache
from expert.preprocess import Normalization, expert_normalization
from expert.retrieval import global_descriptors
from expert.weights import WeightsInfo

log = logging.getLogger(__name__)

EXPORT_SCRATCH_PREFIX = ".eagle-export-"
"""Scratch folder of a build, next to its output (:func:`common.atomic.staging_dir`)."""

__all__ = ["ReferenceCountError", "StoredEmbeddings", "build_bank", "fit_bank", "stored_embeddings"]


class ReferenceCountError(DBTError):
    """Too few reference images to build a bank (the message gives the minimum and how to change it)."""


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


@dataclass(frozen=True)
class StoredEmbeddings:
    """Patch embeddings of a bank's first references, kept from an earlier build, and the graph that made them.

    Attributes:
        features: float32 [K, P, D], the first K references' patch features (every patch, no mask applied).
        graph_sha256: sha256 of the ONNX graph that computed them; :func:`build_bank` reuses them only when its
            own graph is that one (an int8 graph re-calibrated on new references is not: all are embedded again).
    """

    features: np.ndarray
    graph_sha256: str


def stored_embeddings(bank: Bank) -> StoredEmbeddings | None:
    """The bank's stored embeddings for :func:`build_bank` to reuse (None: the bank stores none, as older banks).

    Raises:
        BankError: the stored file is corrupted or does not fit the bank (:func:`expert.bank.load_embeddings`).
    """
    features = load_embeddings(bank)
    graph = bank.meta.embeddings.graph_sha256 if bank.meta.embeddings is not None else bank.embeddings_graph
    if features is None or graph is None:
        return None
    return StoredEmbeddings(features=features, graph_sha256=graph)


def _embed_stage(
    embedder: Embedder,
    images: Sequence[np.ndarray],
    settings: ExpertSettings,
    progress: ProgressCallback | None,
    normalization: Normalization,
    known: np.ndarray | None = None,
) -> np.ndarray:
    """[N, P, D] float32 features of ``images``; the first ``len(known)`` are taken from ``known``, not embedded."""
    features: np.ndarray | None = None  # [N, P, D], allocated once the first batch gives P and D
    first = 0 if known is None else len(known)
    if known is not None and first:
        features = np.empty((len(images), *known.shape[1:]), dtype=np.float32)
        features[:first] = known
    report(progress, "embed", first / len(images))
    for start in range(first, len(images), settings.batch_size):
        chunk = list(images[start : start + settings.batch_size])
        batch, _ = embed_images(
            embedder,
            chunk,
            resize=settings.resize,
            crop=settings.crop,
            center_crop=settings.center_crop,
            batch_size=settings.batch_size,
            normalization=normalization,
        )
        if features is None:
            features = np.empty((len(images), *batch.shape[1:]), dtype=np.float32)
        features[start : start + len(chunk)] = batch
        report(progress, "embed", (start + len(chunk)) / len(images))
    if features is None:  # pragma: no cover - _check_inputs refuses an empty reference set
        raise ValueError("no reference images to embed")
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
    report(progress, "coreset", 0.0)
    n_images, n_patches, dim = features.shape
    selected = greedy_coreset(
        features.reshape(n_images * n_patches, dim),
        ratio=settings.coreset_ratio,
        projection_dim=settings.coreset_projection_dim,
        num_starts=settings.coreset_starts,
        start_method=settings.coreset_start_method,
        seed=settings.seed,
        progress=progress,
    )
    report(progress, "coreset", 1.0)
    return selected


def _dbt_stage(
    features: np.ndarray, selected: np.ndarray, settings: ExpertSettings, progress: ProgressCallback | None
) -> tuple[np.ndarray, np.ndarray, Threshold]:
    report(progress, "dbt", 0.0)
    scores, used = training_scores(
        features,
        selected,
        search=settings.dbt_search,
        distance=settings.distance,
        min_unsampled=settings.min_unsampled_patches,
        progress=progress,
    )
    threshold = compute_threshold(
        scores, settings.threshold_method, **threshold_params(settings.threshold_method, settings)
    )
    report(progress, "dbt", 1.0)
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
    normalization: Normalization,
    mask: np.ndarray | None = None,
    mask_source: str = "",
) -> Bank:
    n_images, n_patches, dim = features.shape
    if grid[0] * grid[1] != n_patches:
        raise ValueError(f"patch grid {grid} does not match {n_patches} patches per image")
    descriptors = global_descriptors(features)  # the whole image: retrieval picks the most similar reference
    if mask is not None:  # memory bank, coreset ids and DBT skips are over the patches inside the mask only
        features = features[:, mask.reshape(-1)]
        n_patches = features.shape[1]
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
        normalization=normalization,
    )
    meta.warnings = list(warnings)
    if mask is not None:
        meta.mask = MaskMeta(patches=int(mask.sum()), source=mask_source)
    return Bank(
        memory_bank=features.reshape(n_images * n_patches, dim)[selected],
        train_scores=np.asarray(scores, dtype=np.float32),
        coreset_image_ids=(selected // n_patches).astype(np.int64),
        global_descriptors=descriptors,
        meta=meta,
        inspection_mask=None if mask is None else mask.astype(np.uint8),
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


def _int8_graph(
    cache: OnnxCache,
    key: ExportKey,
    fp32_graph: Path,
    images: Sequence[np.ndarray],
    settings: ExpertSettings,
    scratch: str | Path,
) -> tuple[Path, QuantizationMeta]:
    from expert.quantize import calibration_tensors, int8_graph

    calibration = calibration_tensors(
        images,
        resize=settings.resize,
        crop=settings.crop,
        center_crop=settings.center_crop,
        normalization=expert_normalization(settings),
    )
    return int8_graph(cache, key, fp32_graph, calibration, fallback_dir=scratch)


def _reusable(stored: StoredEmbeddings | None, graph: str, n_images: int) -> np.ndarray | None:
    """The stored features when they came from ``graph`` and fit the build, else None (embed them again)."""
    if stored is None:
        return None
    if stored.graph_sha256 != graph:
        log.info("stored embeddings come from another graph (an int8 graph is re-calibrated): embedding all images")
        return None
    if len(stored.features) > n_images:
        return None
    return stored.features


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
    mask: np.ndarray | None = None,
    mask_source: str = "",
    known_features: np.ndarray | None = None,
) -> Bank:
    """Compute a bank in memory (stages ``embed``, ``coreset``, ``dbt``); nothing is written.

    :func:`build_bank` is this plus the ONNX export and the atomic save; use this one to inspect or test
    a bank's contents cheaply (``save_bank(bank, dir, reference_images=images)`` saves it without ONNX).

    Args and raises: as :func:`build_bank` (without ``out_dir``; no :class:`~expert.bank_schema.BankError`), plus
    ``embedder``: what computes the reference features (default: the torch module built on ``backbone``;
    :func:`build_bank` passes the exported ONNX backbone, the same one that will score queries).
    ``backbone`` may be None when ``embedder`` is given (the patch grid then follows the features).
    ``mask`` / ``mask_source``: as :func:`build_bank`.
    ``known_features``: float32 [K, P, D] features of the first K images, computed earlier by this same
    ``embedder`` (only the other N - K images are embedded; the caller vouches for their origin).

    Returns:
        An unsaved :class:`~expert.bank_schema.Bank` (``directory`` is None) with ``patch_embeddings`` set.
    """
    count_warning = _check_inputs(images, names, settings)
    normalization = expert_normalization(settings)  # the backbone's statistics (or the settings'), recorded in meta
    warnings = [w for w in (count_warning, _duplicate_warning(images, names)) if w]
    for warning in warnings:
        log.warning("bank %s: %s", name, warning)
    if embedder is None:
        if backbone is None:
            raise ValueError("fit_bank needs a backbone or an embedder")
        embedder = TorchEmbedder(_as_patch_embedder(backbone, settings.crop))
    if known_features is not None:
        known_features = _check_known(known_features, len(images))
    features = _embed_stage(embedder, images, settings, progress, normalization, known_features)
    grid = _patch_grid(backbone, settings.crop, features.shape[1])
    if mask is not None:
        try:
            mask = check_grid_mask(mask, grid)
        except MaskError as err:
            raise ValueError(str(err)) from None
    # Patches outside the inspection mask never count: the coreset and the DBT training scores see only those inside.
    inside = features if mask is None else features[:, mask.reshape(-1)]
    selected = _coreset_stage(inside, settings, progress)
    scores, used, threshold = _dbt_stage(inside, selected, settings, progress)
    del inside
    for warning in _threshold_warnings(scores, used, threshold):
        log.warning("bank %s: %s", name, warning)
        warnings.append(warning)
    bank = _assemble_bank(
        names=names,
        grid=grid,
        settings=settings,
        weights_info=weights_info,
        features=features,
        selected=selected,
        scores=scores,
        used=used,
        threshold=threshold,
        warnings=warnings,
        name=name,
        normalization=normalization,
        mask=mask,
        mask_source=mask_source,
    )
    bank.patch_embeddings = features
    return bank


def _check_known(known: np.ndarray, n_images: int) -> np.ndarray:
    known = np.asarray(known)
    if known.dtype != np.float32 or known.ndim != 3 or len(known) > n_images:
        raise ValueError(f"known features must be float32 [K <= {n_images}, P, D], got {known.dtype} {known.shape}")
    return known


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
    mask: np.ndarray | None = None,
    mask_source: str = "",
    stored: StoredEmbeddings | None = None,
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
        mask: the inspection mask, bool ``[grid_h, grid_w]`` (:mod:`expert.mask` makes it from a PNG or polygons);
            patches outside it never count: not in the coreset, not in the DBT training scores (τ), and queries
            scored against the bank ignore them too. None: every patch.
        mask_source: where the mask came from (recorded in meta.json ``mask.source``).
        stored: patch embeddings of the first ``len(stored.features)`` images from an earlier build
            (:func:`stored_embeddings`, a teach): used instead of embedding those images again when they came from
            the very graph this build embeds with (float32, so the coreset, τ and s_max are those of a full
            rebuild), else ignored and every image is embedded. The bank stores every reference's embeddings
            (``embeddings.safetensors``) for the next teach.

    Returns:
        The saved :class:`~expert.bank_schema.Bank` (``bank.directory`` set).

    Raises:
        ReferenceCountError: fewer than ``settings.min_references`` images (fewer than
            ``settings.recommended_references`` only logs a warning, also kept in the bank's meta).
        ValueError: images and names differ in length, repeated names, an image is not RGB uint8, or the mask is
            not the patch grid's shape or is empty.
        NormalizationError: timm records no input statistics for the backbone and the settings give none
            (a ``ValueError``; :func:`expert.preprocess.expert_normalization`).
        DBTError: no reference image is usable for the threshold (the message says why).
        BankError: the bank cannot be written.
    """
    _check_inputs(images, names, settings)  # bad input fails before any graph is loaded or exported
    expert_normalization(settings)  # so does a backbone whose input statistics are unknown
    out_dir = Path(out_dir).expanduser()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Named after this host and process: a killed build's scratch is removed by the next build here.
    with atomic.staging(out_dir.parent, EXPORT_SCRATCH_PREFIX) as scratch:
        # The graph first (cached, or exported), then embed the references with it: the bank's features come
        # from the very extractor that scores queries (and onnxruntime is faster than torch on CPU).
        report(progress, "embed", 0.0)
        cache = onnx_cache if isinstance(onnx_cache, OnnxCache) else OnnxCache(onnx_cache or Path(scratch) / "onnx")
        key = ExportKey.create(settings.backbone, weights_info.checksum, crop=settings.crop)
        onnx_file = cache.get(key, backbone, fallback_dir=scratch)
        quantization = None
        if settings.precision == "int8":  # the bank's own references calibrate the int8 graph (expert.quantize)
            onnx_file, quantization = _int8_graph(cache, key, onnx_file, images, settings, scratch)
        graph = file_sha256(onnx_file)
        known = _reusable(stored, graph, len(images))
        bank = fit_bank(
            images,
            names,
            settings=settings,
            backbone=None,
            weights_info=weights_info,
            name=name,
            progress=progress,
            embedder=OnnxEmbedder(onnx_file, providers_for(settings.precision)),
            mask=mask,
            mask_source=mask_source,
            known_features=known,
        )
        bank.embeddings_graph = graph
        bank.meta.backbone.quantization = quantization
        report(progress, "save", 0.0)
        save_bank(
            bank,
            out_dir,
            onnx_source=onnx_file,
            reference_images=images,
            reference_max_side=settings.reference_max_side,
        )
    report(progress, "save", 1.0)
    return bank
