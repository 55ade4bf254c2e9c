"""From 28×28 patch scores to a smooth anomaly map on the ORIGINAL image's pixel grid.

Bilinear upsampling of the patch-score grid to the crop size with each patch value placed where its
feature is centred in the crop: a stride-``s`` backbone feature ``j`` sits at crop pixel ``s·j`` (PatchCore's
reference code uses ``F.interpolate(align_corners=False)``, which puts it at ``s·j + (s-1)/2`` — 3.5 px
right/down of the defect at stride 8, measured on the synthetic set; boxes then miss thin defects).
Then a gaussian blur with σ = 4 (scipy ``gaussian_filter``,
``truncate=4``: kernel size ``2·int(4σ + 0.5) + 1`` = 33 taps, ``reflect`` border); then the crop and
resize are undone exactly (:meth:`expert.preprocess.Geometry.crop_to_original`).

Example:
    >>> import numpy as np
    >>> from expert.preprocess import compute_geometry
    >>> amap, inspected = anomaly_map(np.ones((28, 28), np.float32), compute_geometry(240, 320))
    >>> amap.shape, float(amap[100, 100]), float(amap[0, 0]), bool(inspected[0, 0])
    ((240, 320), 1.0, 0.0, False)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from expert.preprocess import Geometry

GAUSSIAN_TRUNCATE = 4.0
"""Kernel radius in σ: radius ``int(4σ + 0.5)``, as scipy's default and the reference code."""


def upsample_patch_scores(patch_scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a patch-score grid to ``size`` = (height, width), patch ``j`` centred at pixel ``stride·j``.

    ``stride = size / grid``; pixels beyond the last patch centre take the edge value (clamped).

    Example:
        >>> upsample_patch_scores(np.eye(2, dtype=np.float32), (4, 4))[0].tolist()
        [1.0, 0.5, 0.0, 0.0]
    """
    grid = np.asarray(patch_scores, dtype=np.float32)
    rows = np.clip(np.arange(size[0]) * grid.shape[0] / size[0], 0, grid.shape[0] - 1)
    cols = np.clip(np.arange(size[1]) * grid.shape[1] / size[1], 0, grid.shape[1] - 1)
    coords = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(grid, coords, order=1, mode="nearest").astype(np.float32)


def smooth(crop_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blur a map with σ = ``sigma`` pixels (kernel ``2·int(4σ+0.5)+1`` taps, reflect border).

    ``sigma = 0`` returns the map unchanged.
    """
    if sigma <= 0:
        return crop_map.astype(np.float32, copy=True)
    blurred = ndimage.gaussian_filter(crop_map.astype(np.float64), sigma=sigma, mode="reflect", truncate=4.0)
    return blurred.astype(np.float32)


def anomaly_map(patch_scores: np.ndarray, geometry: Geometry, *, sigma: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Turn one image's patch scores into an anomaly map in original image coordinates.

    Args:
        patch_scores: ``[h, w]`` patch-score grid (28×28 for a 224 crop).
        geometry: the image's :class:`~expert.preprocess.Geometry` (from preprocessing).
        sigma: gaussian σ in crop pixels (0: no smoothing).

    Returns:
        ``(amap, inspected)``: float32 ``orig_h × orig_w`` map (0 outside the inspected region) and the
        bool mask of inspected pixels.

    Raises:
        ValueError: if ``patch_scores`` is not 2-D.
    """
    if patch_scores.ndim != 2:
        raise ValueError(f"patch_scores must be a 2-D grid, got shape {patch_scores.shape}")
    crop_map = smooth(upsample_patch_scores(patch_scores, (geometry.crop_h, geometry.crop_w)), sigma)
    return geometry.crop_to_original(crop_map)
