"""The visual prompt: defect boxes from an anomaly map, drawn red on the original image; a heatmap for people.

Box finding:

1. the map (inspected pixels only) is normalised by its own maximum;
2. binarised at 2/3 of the maximum; if more than half of the inspected pixels pass (a diffuse map),
   the threshold becomes the median instead (pixels strictly above it pass);
3. external contours (OpenCV); contours whose area is ≤ 0.1 % of the image area are dropped;
4. each contour's bounding rectangle is scored by its peak (the map's maximum inside the rectangle);
5. greedy merging, strongest first: a box merges into an already kept one when their IoU > 0.3 or when
   their centres are *close* — closer than half the diagonal of the smaller of the two boxes; a merged
   box is the union rectangle with the larger peak, and merging repeats until nothing changes;
6. the ``max_boxes`` (3) boxes with the highest peaks are kept, strongest first.

Step 5 is selectable (``merge``, :data:`MERGE_RULES`; the setting ``EAGLE_EXPERT__BOX_MERGE``): ``eagle`` is the
rule above; ``reference`` is the reference code's (``visualize_anomaly_with_mask_fast_topk_merge``): ONE greedy
pass, strongest first, each still-unused box gathering every later unused box whose IoU with IT (not with the
growing group) is > 0.3 or whose centre lies closer than 20 original-image pixels to its centre; each group
becomes its union rectangle, and groups are never merged again (:func:`merge_boxes_reference`).

Bounded cost (:func:`find_boxes_in_original`): the expert keeps its map at crop resolution; the rules above run on
that map sampled onto a grid over the original image whose longest side is at most :data:`BOX_GRID_MAX_SIDE`
(the original grid itself for images no larger), and the boxes are scaled back to original pixels, so boxes
of a 64 MP image cost what those of a 1 MP one do. Drawing and the heatmap work on whatever (bounded) view
they are given; :meth:`Box.scaled` brings original-pixel boxes onto such a view.

Example:
    >>> amap = np.zeros((100, 150), np.float32)
    >>> amap[20:40, 30:60] = 1.0
    >>> find_boxes(amap)
    [Box(x0=30, y0=20, x1=60, y1=40, peak=1.0)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import cv2
import numpy as np

from expert.anomaly_map import render_map
from expert.config import BoxMerge
from expert.preprocess import Geometry

BINARISE_FRACTION = 2.0 / 3.0
"""Pixels at or above this fraction of the map's maximum are candidate defect pixels."""

DIFFUSE_SHARE = 0.5
"""If more than this share of inspected pixels pass, binarise at the median instead."""

MIN_AREA_FRACTION = 0.001
"""Contours with area ≤ this fraction of the image area are dropped."""

MERGE_IOU = 0.3
"""Boxes with IoU above this are merged."""

CLOSE_CENTRES = 0.5
"""Boxes whose centres are closer than this × the smaller box's diagonal are merged."""

REFERENCE_MERGE_DISTANCE = 20.0
"""The reference's ``merge_distance``: boxes whose centres are closer than this many original pixels are merged."""

MERGE_RULES: tuple[BoxMerge, ...] = get_args(BoxMerge)
"""Box-merge rules: ours (repeated, size-relative closeness) or the reference code's (one pass, 20 px)."""

RED = (255, 0, 0)

BOX_GRID_MAX_SIDE = 1024
"""Longest side of the grid boxes are found on; larger images are boxed on a reduced grid and scaled back."""


@dataclass(frozen=True)
class Box:
    """A defect box in original image pixels: columns ``x0..x1-1``, rows ``y0..y1-1``; ``peak`` = map maximum."""

    x0: int
    y0: int
    x1: int
    y1: int
    peak: float

    @property
    def area(self) -> int:
        """Pixel count of the rectangle."""
        return max(0, self.x1 - self.x0) * max(0, self.y1 - self.y0)

    @property
    def centre(self) -> tuple[float, float]:
        """``(x, y)`` centre in continuous pixel coordinates."""
        return (self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0

    @property
    def diagonal(self) -> float:
        """Length of the rectangle's diagonal."""
        return math.hypot(self.x1 - self.x0, self.y1 - self.y0)

    def iou(self, other: Box) -> float:
        """Intersection over union of two boxes (0 when disjoint).

        Example:
            >>> Box(0, 0, 10, 10, 1.0).iou(Box(5, 0, 15, 10, 1.0))
            0.3333333333333333
        """
        w = min(self.x1, other.x1) - max(self.x0, other.x0)
        h = min(self.y1, other.y1) - max(self.y0, other.y0)
        inter = max(0, w) * max(0, h)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def scaled(self, sx: float, sy: float, *, width: int | None = None, height: int | None = None) -> Box:
        """The same box on a grid scaled by ``(sx, sy)`` (edges rounded; at least one pixel wide and high).

        ``width`` / ``height`` (the target grid's size) clip the result.

        Example:
            >>> Box(10, 20, 30, 40, 0.5).scaled(0.5, 0.5)
            Box(x0=5, y0=10, x1=15, y1=20, peak=0.5)
        """
        x0, y0 = math.floor(self.x0 * sx + 0.5), math.floor(self.y0 * sy + 0.5)
        x1, y1 = math.floor(self.x1 * sx + 0.5), math.floor(self.y1 * sy + 0.5)
        if width is not None:
            x0, x1 = min(max(0, x0), width - 1), min(max(1, x1), width)
        if height is not None:
            y0, y1 = min(max(0, y0), height - 1), min(max(1, y1), height)
        return Box(x0, y0, max(x1, x0 + 1), max(y1, y0 + 1), self.peak)

    def union(self, other: Box) -> Box:
        """The smallest box holding both, with the larger peak."""
        return Box(
            min(self.x0, other.x0),
            min(self.y0, other.y0),
            max(self.x1, other.x1),
            max(self.y1, other.y1),
            max(self.peak, other.peak),
        )


def should_merge(a: Box, b: Box) -> bool:
    """True when ``a`` and ``b`` overlap (IoU > 0.3) or their centres are close (< 0.5 × smaller diagonal)."""
    if a.iou(b) > MERGE_IOU:
        return True
    (ax, ay), (bx, by) = a.centre, b.centre
    return math.hypot(ax - bx, ay - by) < CLOSE_CENTRES * min(a.diagonal, b.diagonal)


def merge_boxes(boxes: list[Box]) -> list[Box]:
    """Greedily merge boxes (strongest peak first) until no pair satisfies :func:`should_merge`.

    Returns:
        The merged boxes, sorted by peak (highest first).
    """
    current = sorted(boxes, key=lambda box: box.peak, reverse=True)
    changed = True
    while changed:
        changed = False
        kept: list[Box] = []
        for box in current:
            for i, other in enumerate(kept):
                if should_merge(other, box):
                    kept[i] = other.union(box)
                    changed = True
                    break
            else:
                kept.append(box)
        current = sorted(kept, key=lambda box: box.peak, reverse=True)
    return current


def merge_boxes_reference(boxes: list[Box], *, distance: float = REFERENCE_MERGE_DISTANCE) -> list[Box]:
    """The reference code's merge: one greedy pass, strongest peak first (see the module docstring).

    Each box not yet taken starts a group and takes every later box not yet taken whose IoU with the STARTING box
    is > 0.3 or whose centre is closer than ``distance`` pixels to the starting box's centre; the group becomes its
    union rectangle (peak: the group's largest). Unions are not compared again.

    Example:
        >>> a, b, c = Box(0, 0, 10, 10, 3.0), Box(20, 0, 30, 10, 2.0), Box(40, 0, 50, 10, 1.0)
        >>> merge_boxes_reference([a, b, c])  # centres 20 px apart: not closer than 20, nothing merges
        [Box(x0=0, y0=0, x1=10, y1=10, peak=3.0), Box(x0=20, y0=0, x1=30, y1=10, peak=2.0), \
Box(x0=40, y0=0, x1=50, y1=10, peak=1.0)]
    """
    order = sorted(boxes, key=lambda box: box.peak, reverse=True)
    taken = [False] * len(order)
    merged: list[Box] = []
    for i, base in enumerate(order):
        if taken[i]:
            continue
        group = base
        (bx, by) = base.centre
        for j in range(i + 1, len(order)):
            if taken[j]:
                continue
            other = order[j]
            (ox, oy) = other.centre
            if base.iou(other) > MERGE_IOU or math.hypot(bx - ox, by - oy) < distance:
                group = group.union(other)
                taken[j] = True
        merged.append(group)
    return sorted(merged, key=lambda box: box.peak, reverse=True)


def binarise(amap: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Candidate defect pixels (uint8 0/255): ≥ 2/3 of the max, or > the median if that selects > 50 %.

    Args:
        amap: float map; only ``valid`` pixels count.
        valid: bool mask of inspected pixels.
    """
    values = amap[valid]
    peak = float(values.max())
    normalised = np.where(valid, amap / peak, 0.0)
    selected = valid & (normalised >= BINARISE_FRACTION)
    if selected.sum() > DIFFUSE_SHARE * valid.sum():
        median = float(np.median(normalised[valid]))
        selected = valid & (normalised > median)
    return selected.astype(np.uint8) * 255


def find_boxes(
    amap: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    max_boxes: int = 3,
    merge: str = "eagle",
    merge_distance: float = REFERENCE_MERGE_DISTANCE,
) -> list[Box]:
    """Find up to ``max_boxes`` defect boxes in an anomaly map (see the module docstring for the rules).

    Args:
        amap: float ``H × W`` anomaly map in original image coordinates (higher = more anomalous).
        valid: bool ``H × W`` mask of inspected pixels (default: all).
        max_boxes: most boxes returned.
        merge: the merge rule, ``eagle`` (:func:`merge_boxes`) or ``reference`` (:func:`merge_boxes_reference`).
        merge_distance: the ``reference`` rule's centre distance, in this map's pixels.

    Returns:
        Boxes in original pixels, highest peak first; empty when the map has no positive maximum.

    Raises:
        ValueError: if shapes disagree, ``max_boxes < 1`` or an unknown merge rule.
    """
    if merge not in MERGE_RULES:
        raise ValueError(f"unknown box-merge rule {merge!r}; expected one of {', '.join(MERGE_RULES)}")
    if amap.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D, got shape {amap.shape}")
    if valid is None:
        valid = np.ones(amap.shape, bool)
    if valid.shape != amap.shape:
        raise ValueError(f"valid mask shape {valid.shape} differs from the map's {amap.shape}")
    if max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    amap = np.nan_to_num(amap.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if not valid.any() or float(amap[valid].max()) <= 0.0:
        return []
    binary = binarise(amap, valid)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    min_area = MIN_AREA_FRACTION * amap.shape[0] * amap.shape[1]
    masked = np.where(valid, amap, -np.inf)
    boxes = []
    for contour in contours:
        if cv2.contourArea(contour) <= min_area:
            continue
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append(Box(x, y, x + w, y + h, float(masked[y : y + h, x : x + w].max())))
    merged = merge_boxes(boxes) if merge == "eagle" else merge_boxes_reference(boxes, distance=merge_distance)
    return merged[:max_boxes]


def box_grid_size(height: int, width: int, max_side: int = BOX_GRID_MAX_SIDE) -> tuple[int, int]:
    """``(rows, cols)`` of the grid boxes are found on for an ``height × width`` image (never larger than it).

    Example:
        >>> box_grid_size(480, 640), box_grid_size(6000, 8000)
        ((480, 640), (768, 1024))
    """
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def find_boxes_in_original(
    crop_map: np.ndarray,
    geometry: Geometry,
    *,
    max_boxes: int = 3,
    max_side: int = BOX_GRID_MAX_SIDE,
    crop_mask: np.ndarray | None = None,
    merge: str = "eagle",
) -> list[Box]:
    """Boxes in ORIGINAL pixels from the crop-resolution map, at a cost bounded by ``max_side``.

    The map is sampled (:func:`expert.anomaly_map.render_map`) onto :func:`box_grid_size`'s grid over the
    original image, :func:`find_boxes` runs there, and the boxes are scaled back and clipped to the inspected
    region. For images whose longest side is at most ``max_side`` the grid IS the original pixel grid and the
    result equals ``find_boxes(*anomaly_map(...))`` exactly; above, edges are within about one grid cell
    (``max(orig) / max_side`` original pixels) of it.

    Args:
        crop_map: ``crop_h × crop_w`` smoothed map (:func:`expert.anomaly_map.crop_anomaly_map`).
        geometry: the image's :class:`~expert.preprocess.Geometry` (original size, resize, crop).
        max_boxes: most boxes returned.
        max_side: longest side of the working grid.
        crop_mask: bool ``crop_h × crop_w`` inspection mask (:func:`expert.mask.crop_mask`): pixels outside it are
            not valid, so no box comes from them and they do not enter the binarisation statistics.
        merge: the merge rule (:func:`find_boxes`); the ``reference`` rule's 20 px are ORIGINAL pixels, converted to
            the working grid.

    Returns:
        Boxes in original pixel coordinates, highest peak first.
    """
    rows, cols = box_grid_size(geometry.orig_h, geometry.orig_w, max_side)
    amap, valid = render_map(crop_map, geometry, rows, cols)
    if crop_mask is not None:
        valid &= render_map(np.asarray(crop_mask, dtype=np.float32), geometry, rows, cols)[0] >= 0.5
    distance = REFERENCE_MERGE_DISTANCE * cols / geometry.orig_w
    boxes = find_boxes(amap, valid, max_boxes=max_boxes, merge=merge, merge_distance=distance)
    if (rows, cols) == (geometry.orig_h, geometry.orig_w):
        return boxes
    x0, y0, x1, y1 = geometry.inspected_region()
    sx, sy = geometry.orig_w / cols, geometry.orig_h / rows
    out = []
    for box in boxes:
        big = box.scaled(sx, sy)
        bx0, bx1 = min(max(big.x0, x0), x1 - 1), max(min(big.x1, x1), x0 + 1)
        by0, by1 = min(max(big.y0, y0), y1 - 1), max(min(big.y1, y1), y0 + 1)
        out.append(Box(bx0, by0, max(bx1, bx0 + 1), max(by1, by0 + 1), box.peak))
    return out


def line_width(height: int, width: int) -> int:
    """Box line width for an image: ``max(2, round(0.006 · max(h, w)))`` so it survives the MLLM's resize.

    Example:
        >>> line_width(224, 224), line_width(1024, 768), line_width(3000, 4000)
        (2, 6, 24)
    """
    return max(2, round(0.006 * max(height, width)))


def draw_boxes(image: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """Draw pure red (255, 0, 0) frames around ``boxes`` on a copy of the RGB image.

    Each frame is :func:`line_width` pixels thick and lies just OUTSIDE its box (so the defect stays
    visible); where the box touches the image border the frame is moved inside. No anti-aliasing: every
    frame pixel is exactly (255, 0, 0).

    Args:
        image: RGB uint8 ``H × W × 3`` (original resolution).
        boxes: boxes in that image's pixel coordinates.

    Returns:
        A new RGB uint8 image.
    """
    out = image.copy()
    height, width = image.shape[:2]
    thickness = line_width(height, width)
    for box in boxes:
        ox0, oy0 = max(0, box.x0 - thickness), max(0, box.y0 - thickness)
        ox1, oy1 = min(width, box.x1 + thickness), min(height, box.y1 + thickness)
        if ox1 <= ox0 or oy1 <= oy0:
            continue
        ix0, iy0, ix1, iy1 = ox0 + thickness, oy0 + thickness, ox1 - thickness, oy1 - thickness
        if ix1 <= ix0 or iy1 <= iy0:  # the frame covers the whole rectangle
            out[oy0:oy1, ox0:ox1] = RED
            continue
        out[oy0:iy0, ox0:ox1] = RED  # four bands: cost in proportion to the frame, not the image
        out[iy1:oy1, ox0:ox1] = RED
        out[iy0:iy1, ox0:ix0] = RED
        out[iy0:iy1, ix1:ox1] = RED
    framed: np.ndarray = out
    return framed


def heatmap_overlay(
    image: np.ndarray,
    amap: np.ndarray,
    valid: np.ndarray,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend a jet-coloured anomaly map onto the image; grey and hatch the uninspected border.

    Args:
        image: RGB uint8 ``H × W × 3``.
        amap: float ``H × W`` anomaly map (same geometry as ``image``).
        valid: bool ``H × W`` inspected pixels.
        vmin: map value shown blue (default: the minimum over inspected pixels).
        vmax: map value shown red (default: the maximum over inspected pixels).
        alpha: weight of the colour map in the blend.

    Returns:
        RGB uint8 image: inspected pixels ``(1-alpha)·image + alpha·jet(map)``; uninspected pixels are a
        darkened grey version of the image crossed by diagonal hatching.

    Works in uint8 and float32 (about 12 bytes per pixel of temporaries): give it a bounded view (the pipeline
    renders at most ~1024 px on the longest side, :func:`expert.anomaly_map.render_map`), not a 60 MP original.

    Raises:
        ValueError: if shapes disagree.
    """
    height, width = image.shape[:2]
    if amap.shape != (height, width) or valid.shape != (height, width):
        raise ValueError(f"map {amap.shape} and mask {valid.shape} must match the image size {(height, width)}")
    values = amap[valid] if valid.any() else np.zeros(1, np.float32)
    low = float(values.min()) if vmin is None else float(vmin)
    high = float(values.max()) if vmax is None else float(vmax)
    del values
    # uint8 and float32 throughout (the caller passes a bounded view, see eagle.pipeline): no float64 copies.
    scale = np.float32(255.0 / max(high - low, 1e-12))
    levels = np.clip((amap.astype(np.float32, copy=False) - np.float32(low)) * scale, 0.0, 255.0)
    jet = cv2.applyColorMap(np.rint(levels).astype(np.uint8), cv2.COLORMAP_JET)
    del levels
    image = np.ascontiguousarray(image)
    blended = cv2.addWeighted(image, 1.0 - alpha, np.ascontiguousarray(jet[..., ::-1]), alpha, 0.0)
    del jet
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    shaded = cv2.convertScaleAbs(grey, alpha=0.35, beta=60.0)
    spacing = max(8, line_width(height, width) * 4)
    diagonal = np.add.outer(np.arange(height, dtype=np.int32), np.arange(width, dtype=np.int32)) % spacing
    shaded[diagonal < max(1, spacing // 8)] = 200
    del diagonal
    outside = ~valid
    blended[outside] = shaded[outside][:, None]
    return blended
