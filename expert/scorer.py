"""Scoring query images against a bank: :func:`load_expert` → :class:`ExpertScorer` → :class:`ExpertResult`.

Preprocess → embed (batch of 1) → faiss k = 1 search → patch-score grid → image score = max → anomaly map (kept
at crop resolution, with the geometry to map it back) → boxes in ORIGINAL coordinates only when score ≥ τ →
template retrieval. Nothing of the original's pixel count is allocated after preprocessing, so memory and time
do not grow with the image. Building the bank is :mod:`expert.build`.

Example:
    >>> from expert.config import ExpertSettings
    >>> scorer = load_expert("banks/widget", ExpertSettings())       # doctest: +SKIP
    >>> result = scorer.score(image)                                 # doctest: +SKIP
    >>> result.anomalous, result.boxes[:1], result.template_name     # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from expert.anomaly_map import crop_anomaly_map, render_map
from expert.backbone import build_patch_embedder
from expert.bank import load_bank
from expert.bank_checks import check_weights
from expert.bank_schema import Bank, BankError
from expert.boxes import Box, find_boxes_in_original
from expert.config import ExpertSettings
from expert.embedder import Embedder, OnnxEmbedder, TorchEmbedder, providers_for
from expert.mask import crop_mask
from expert.preprocess import Geometry, Normalization, compute_geometry, preprocess
from expert.retrieval import global_descriptors, most_similar
from expert.search import PatchIndex
from expert.weights import load_backbone

__all__ = [
    "DEFAULT_SCORE_BATCH",
    "MAX_SCORE_BATCH",
    "SCORE_STAGES",
    "ExpertResult",
    "ExpertScorer",
    "load_expert",
    "make_embedder",
]

SCORE_STAGES: tuple[str, ...] = ("preprocess", "embed", "search", "map", "boxes", "retrieval")
"""The stages timed in :attr:`ExpertResult.timings_ms`, in order."""

DEFAULT_SCORE_BATCH = 4
"""Images per forward pass of :meth:`ExpertScorer.score_many` by default (see bench/README.md, precision)."""

MAX_SCORE_BATCH = 32
"""Largest ``batch_size`` :meth:`ExpertScorer.score_many` accepts (memory stays bounded by it)."""


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
        crop_mask: bool ``crop_h × crop_w`` inspection mask at crop resolution (the bank's, :mod:`expert.mask`), or
            None without a mask. Patches outside it never count: ``patch_scores`` and the map are 0 there, the
            image score is the max over the patches inside, and :meth:`map_at` reports them as not inspected.
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
    crop_mask: np.ndarray | None = None

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

        Costs ~5 bytes per output pixel: use a bounded size for display (the pipeline does). With an inspection
        mask, pixels outside it are not inspected (False; value 0), so the heatmap greys them like the border.
        """
        values, inspected = render_map(self.crop_map, self.geometry, height, width)
        if self.crop_mask is not None:
            inspected &= render_map(self.crop_mask.astype(np.float32), self.geometry, height, width)[0] >= 0.5
            values[~inspected] = 0.0
        return values, inspected

    @property
    def anomaly_map(self) -> np.ndarray:
        """float32 ``orig_h × orig_w`` map in ORIGINAL pixels (0 outside the inspected region).

        Computed on each access, at the ORIGINAL resolution (for pixel-level evaluation): prefer :meth:`map_at`.
        """
        return self.map_at(self.geometry.orig_h, self.geometry.orig_w)[0]

    @property
    def valid_mask(self) -> np.ndarray:
        """The bool ``orig_h × orig_w`` mask, True where the network saw the image inside the inspection mask."""
        if self.crop_mask is None:
            return self.geometry.inspected_mask()
        return self.map_at(self.geometry.orig_h, self.geometry.orig_w)[1]


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
        bank: the loaded :class:`~expert.bank_schema.Bank`.
        embedder: the feature extractor (:class:`~expert.embedder.OnnxEmbedder` or
            :class:`~expert.embedder.TorchEmbedder`) the bank was built with.
        settings: the running expert settings (preprocessing must match the bank; σ and max_boxes are read here).
            Images are resized, cropped and normalised as the bank records (``meta.preprocessing``).

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
        self.mask = bank.mask  # bool grid, or None: every patch counts
        preprocessing = bank.meta.preprocessing
        self._resize, self._crop, self._center_crop = (
            preprocessing.resize,
            preprocessing.crop,
            preprocessing.center_crop,
        )
        # The statistics the bank's features were computed with (load_bank refused running settings that differ).
        self.normalization: Normalization = preprocessing.normalization

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
        tensor, geometry = self._preprocess(image)
        return self.embedder(tensor[None])[0], geometry

    def _preprocess(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """:func:`~expert.preprocess.preprocess` with the bank's resize, crop and normalisation."""
        return preprocess(
            image,
            resize=self._resize,
            crop=self._crop,
            center_crop=self._center_crop,
            normalization=self.normalization,
        )

    def _prepare(self, image: np.ndarray, original_size: tuple[int, int] | None) -> tuple[np.ndarray, Geometry]:
        """Network input and the ORIGINAL image's geometry, from the original or from a reduced copy of it."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
        if original_size is None or tuple(original_size) == (image.shape[1], image.shape[0]):
            return self._preprocess(image)
        width, height = (int(v) for v in original_size)
        geometry = compute_geometry(height, width, resize=self._resize, crop=self._crop, center_crop=self._center_crop)
        # Resize the reduced copy straight to the size the original would have been resized to: the crop window
        # and every mapping back are then exactly the original's; only the pixel values come from the copy.
        from PIL import Image

        resized = np.asarray(
            Image.fromarray(image).resize((geometry.resized_w, geometry.resized_h), Image.Resampling.BILINEAR)
        )
        tensor, inner = self._preprocess(resized)
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
        return self._finish(features, geometry, watch)

    def score_many(
        self,
        images: Sequence[np.ndarray],
        *,
        batch_size: int = DEFAULT_SCORE_BATCH,
        original_sizes: Sequence[tuple[int, int] | None] | None = None,
    ) -> list[ExpertResult]:
        """Score several images, embedding up to ``batch_size`` of them in one forward pass.

        The results equal :meth:`score`'s image by image (the embedding of one image does not depend on the
        others in its batch, up to float rounding); only the embedding is batched, which on CPU gains
        throughput by amortising per-run overhead and keeping the cores busy. Memory is bounded by
        ``batch_size``: one batch of network inputs and features (~3.8 MB per image at 224) is alive at a time.
        Each result's ``timings_ms["embed"]`` is its batch's embedding time divided by the batch's size.

        Args:
            images: RGB uint8 ``H × W × 3`` arrays (any sizes).
            batch_size: images per forward pass, 1 to :data:`MAX_SCORE_BATCH`.
            original_sizes: per image, as :meth:`score`'s ``original_size`` (None: the images are originals).

        Raises:
            ValueError: a bad image, ``batch_size`` outside its range, or ``original_sizes`` of another length.
        """
        if not 1 <= batch_size <= MAX_SCORE_BATCH:
            raise ValueError(f"batch_size must be in [1, {MAX_SCORE_BATCH}], got {batch_size}")
        sizes = list(original_sizes) if original_sizes is not None else [None] * len(images)
        if len(sizes) != len(images):
            raise ValueError(f"{len(images)} images but {len(sizes)} original sizes")
        results: list[ExpertResult] = []
        for start in range(0, len(images), batch_size):
            chunk = range(start, min(start + batch_size, len(images)))
            began = time.perf_counter()
            prepared = [self._prepare(images[i], sizes[i]) for i in chunk]
            preprocess_ms = (time.perf_counter() - began) * 1000.0 / len(chunk)
            began = time.perf_counter()
            features = np.asarray(self.embedder(np.stack([t for t, _ in prepared])), dtype=np.float32)
            embed_ms = (time.perf_counter() - began) * 1000.0 / len(chunk)
            for row, (_, geometry) in enumerate(prepared):
                watch = _Stopwatch()
                watch.timings.update(preprocess=preprocess_ms, embed=embed_ms)
                results.append(self._finish(features[row], geometry, watch))
        return results

    def _finish(self, features: np.ndarray, geometry: Geometry, watch: _Stopwatch) -> ExpertResult:
        """Search, map, decision, boxes and template from one image's ``[P, D]`` patch features."""
        patch_scores = self.index.search(features).reshape(self.grid)
        if self.mask is not None:  # patches outside the inspection mask never count (score, map, boxes)
            patch_scores = np.where(self.mask, patch_scores, np.float32(0.0)).astype(np.float32)
        score = float(patch_scores.max())
        watch.lap("search")
        crop_size = (geometry.crop_h, geometry.crop_w)
        crop_map = crop_anomaly_map(patch_scores, crop_size, sigma=self.settings.gaussian_sigma)
        inside = None if self.mask is None else crop_mask(self.mask, crop_size)
        if inside is not None:
            crop_map[~inside] = 0.0
        watch.lap("map")
        anomalous = score >= self.tau
        boxes = (
            find_boxes_in_original(
                crop_map, geometry, max_boxes=self.settings.max_boxes, crop_mask=inside, merge=self.settings.box_merge
            )
            if anomalous
            else []
        )
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
            crop_mask=inside,
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
    precision = bank.meta.backbone.precision
    if runtime == "onnx":
        if not bank.has_onnx:
            raise BankError(
                f"{bank.directory}: bank has no backbone.onnx; rebuild it, or set EAGLE_EXPERT__RUNTIME=torch"
            )
        return OnnxEmbedder(bank.onnx_path, providers_for(precision))
    if runtime == "torch":
        if precision != "fp32":
            raise BankError(
                f"{bank.directory}: bank precision {precision!r}: its features come from its quantised ONNX graph, "
                "which the torch runtime cannot run; set EAGLE_EXPERT__RUNTIME=onnx"
            )
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
