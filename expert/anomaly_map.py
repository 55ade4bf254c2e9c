"""From 28×28 patch scores to a smooth anomaly map on the ORIGINAL image's pixel grid.

Bilinear upsampling of the patch-score grid to the crop size with each patch value placed where its
feature is centred in the crop: a stride-``s`` backbone feature ``j`` sits at crop pixel ``s·j`` (PatchCore's
reference code uses ``F.interpolate(align_corners=False)``, which puts it at ``s·j + (s-1)/2`` — 3.5 px
right/down of the defect at stride 8, measured on the synthetic set; boxes then miss thin defects).
Then a gaussian blur with σ = 4 (scipy ``gaussian_filter``,
``truncate=4``: kernel size ``2·int(4σ + 0.5) + 1`` = 33 taps, ``reflect`` border); then the crop and
resize are undone exactly (:meth:`expert.preprocess.Geometry.crop_to_original`).

Memory: the expert keeps only the crop-resolution map (:func:`crop_anomaly_map`, 224×224 float32) and the
geometry. :func:`render_map` samples it onto ANY grid that covers the original image (the original pixel grid
itself, or a reduced one for display and for box finding), so nothing of the original's size is built unless
asked for (:func:`anomaly_map` does, for evaluation at the original resolution).

Example:
    >>> import numpy as np
    >>> from expert.preprocess import compute_geometry
    >>> amap, inspected = anomaly_map(np.ones((28, 28), np.float32), compute_geometry(240, 320))
    >>> amap.shape, float(amap[100, 100]), float(amap[0, 0]), bool(inspected[0, 0])
    ((240, 320), 1.0, 0.0, False)
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from expert.preprocess import Geometry


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
    result: np.ndarray = ndimage.map_coordinates(grid, coords, order=1, mode="nearest").astype(np.float32)
    return result


def smooth(crop_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blur a map with σ = ``sigma`` pixels (kernel ``2·int(4σ+0.5)+1`` taps, reflect border).

    ``sigma = 0`` returns the map unchanged.
    """
    if sigma <= 0:
        return crop_map.astype(np.float32, copy=True)
    # truncate = 4σ: scipy's default and the reference code's kernel radius int(4σ + 0.5)
    blurred = ndimage.gaussian_filter(crop_map.astype(np.float64), sigma=sigma, mode="reflect", truncate=4.0)
    result: np.ndarray = blurred.astype(np.float32)
    return result


def crop_anomaly_map(patch_scores: np.ndarray, crop_size: tuple[int, int], *, sigma: float = 4.0) -> np.ndarray:
    """The smoothed anomaly map at the network input's (crop) resolution: upsample, then blur.

    Args:
        patch_scores: ``[h, w]`` patch-score grid (28×28 for a 224 crop).
        crop_size: ``(crop_h, crop_w)`` of the network input.
        sigma: gaussian σ in crop pixels (0: no smoothing).

    Returns:
        float32 ``crop_h × crop_w`` map.

    Raises:
        ValueError: if ``patch_scores`` is not 2-D.

    Example:
        >>> crop_anomaly_map(np.ones((28, 28), np.float32), (224, 224)).shape
        (224, 224)
    """
    if patch_scores.ndim != 2:
        raise ValueError(f"patch_scores must be a 2-D grid, got shape {patch_scores.shape}")
    return smooth(upsample_patch_scores(patch_scores, crop_size), sigma)


def _inspected_cells(count: int, orig: int, start: int, end: int) -> tuple[int, int]:
    """Output cells ``[first, stop)`` of a ``count``-cell axis over ``orig`` pixels whose centre is in ``[start, end)``.

    Cell ``u`` covers original coordinates ``[u·orig/count, (u+1)·orig/count)``; its centre
    ``(u + 0.5)·orig/count`` is inside iff ``start·2·count <= (2u + 1)·orig < end·2·count`` (integers: exact).
    """
    first = max(0, -((-(2 * start * count - orig)) // (2 * orig)))
    stop = min(count, -((-(2 * end * count - orig)) // (2 * orig)))
    return first, max(first, stop)


def render_map(crop_map: np.ndarray, geometry: Geometry, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample a crop-resolution map onto a ``height × width`` grid covering the whole ORIGINAL image.

    Output pixel ``(v, u)`` stands for the original continuous point ``((u + 0.5)·orig_w/width - 0.5, ...)``
    and takes the bilinear interpolation of ``crop_map`` there (edges replicated for the half pixel at the
    crop border); pixels whose centre lies outside the inspected region are 0. With ``height × width`` equal to
    the original size this is exactly :meth:`~expert.preprocess.Geometry.crop_to_original`; smaller grids cost
    memory and time in proportion to ``height × width`` only, whatever the original's size.

    Args:
        crop_map: ``crop_h × crop_w`` float map (:func:`crop_anomaly_map`).
        geometry: the image's :class:`~expert.preprocess.Geometry`.
        height: output rows (≥ 1).
        width: output columns (≥ 1).

    Returns:
        ``(values, inspected)``: float32 ``height × width`` map (0 where not inspected) and the bool mask.

    Raises:
        ValueError: if ``crop_map`` is not ``crop_h × crop_w`` or the output size is not positive.

    Example:
        >>> from expert.preprocess import compute_geometry
        >>> values, inspected = render_map(np.ones((224, 224), np.float32), compute_geometry(3000, 4000), 75, 100)
        >>> values.shape, float(values[37, 50]), bool(inspected[37, 5]), bool(inspected[37, 50])
        ((75, 100), 1.0, False, True)
    """
    if crop_map.shape != (geometry.crop_h, geometry.crop_w):
        raise ValueError(f"map has shape {crop_map.shape}, expected the crop size {(geometry.crop_h, geometry.crop_w)}")
    if height < 1 or width < 1:
        raise ValueError(f"output size must be positive, got {height}×{width}")
    x0, y0, x1, y1 = geometry.inspected_region()
    c0, c1 = _inspected_cells(width, geometry.orig_w, x0, x1)
    r0, r1 = _inspected_cells(height, geometry.orig_h, y0, y1)
    values = np.zeros((height, width), np.float32)
    inspected = np.zeros((height, width), bool)
    if c1 > c0 and r1 > r0:
        xs = (np.arange(c0, c1, dtype=np.float64) + 0.5) * geometry.resized_w / width - 0.5 - geometry.crop_left
        ys = (np.arange(r0, r1, dtype=np.float64) + 0.5) * geometry.resized_h / height - 0.5 - geometry.crop_top
        map_x = np.broadcast_to(xs.astype(np.float32)[None, :], (r1 - r0, c1 - c0))
        map_y = np.broadcast_to(ys.astype(np.float32)[:, None], (r1 - r0, c1 - c0))
        values[r0:r1, c0:c1] = cv2.remap(
            np.ascontiguousarray(crop_map, dtype=np.float32),
            np.ascontiguousarray(map_x),
            np.ascontiguousarray(map_y),
            interpolation=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        inspected[r0:r1, c0:c1] = True
    return values, inspected


def anomaly_map(patch_scores: np.ndarray, geometry: Geometry, *, sigma: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Turn one image's patch scores into an anomaly map in original image coordinates (full resolution).

    Costs ``5 × orig_h × orig_w`` bytes and more: for display and boxes, use :func:`crop_anomaly_map` with
    :func:`render_map` at a bounded size instead.

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
    crop_map = crop_anomaly_map(patch_scores, (geometry.crop_h, geometry.crop_w), sigma=sigma)
    return render_map(crop_map, geometry, geometry.orig_h, geometry.orig_w)
