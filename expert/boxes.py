"""The visual prompt: defect boxes from an anomaly map, drawn red on the original image; a heatmap for people.

Box finding (DESIGN.md "Visual prompt"):

1. the map (inspected pixels only) is normalised by its own maximum;
2. binarised at 2/3 of the maximum; if more than half of the inspected pixels pass (a diffuse map),
   the threshold becomes the median instead (pixels strictly above it pass);
3. external contours (OpenCV); contours whose area is ≤ 0.1 % of the image area are dropped;
4. each contour's bounding rectangle is scored by its peak (the map's maximum inside the rectangle);
5. greedy merging, strongest first: a box merges into an already kept one when their IoU > 0.3 or when
   their centres are *close* — closer than half the diagonal of the smaller of the two boxes; a merged
   box is the union rectangle with the larger peak, and merging repeats until nothing changes;
6. the ``max_boxes`` (3) boxes with the highest peaks are kept, strongest first.

Example:
    >>> amap = np.zeros((100, 150), np.float32)
    >>> amap[20:40, 30:60] = 1.0
    >>> find_boxes(amap)
    [Box(x0=30, y0=20, x1=60, y1=40, peak=1.0)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

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

RED = (255, 0, 0)


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


def find_boxes(amap: np.ndarray, valid: np.ndarray | None = None, *, max_boxes: int = 3) -> list[Box]:
    """Find up to ``max_boxes`` defect boxes in an anomaly map (see the module docstring for the rules).

    Args:
        amap: float ``H × W`` anomaly map in original image coordinates (higher = more anomalous).
        valid: bool ``H × W`` mask of inspected pixels (default: all).
        max_boxes: most boxes returned.

    Returns:
        Boxes in original pixels, highest peak first; empty when the map has no positive maximum.

    Raises:
        ValueError: if shapes disagree or ``max_boxes < 1``.
    """
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
    return merge_boxes(boxes)[:max_boxes]


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
        frame = np.zeros((height, width), bool)
        frame[oy0:oy1, ox0:ox1] = True
        if ix1 > ix0 and iy1 > iy0:
            frame[iy0:iy1, ix0:ix1] = False
        out[frame] = RED
    return out


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

    Raises:
        ValueError: if shapes disagree.
    """
    height, width = image.shape[:2]
    if amap.shape != (height, width) or valid.shape != (height, width):
        raise ValueError(f"map {amap.shape} and mask {valid.shape} must match the image size {(height, width)}")
    values = amap[valid] if valid.any() else np.zeros(1, np.float32)
    low = float(values.min()) if vmin is None else float(vmin)
    high = float(values.max()) if vmax is None else float(vmax)
    scaled = np.clip((amap.astype(np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    jet = cv2.applyColorMap(np.rint(scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * jet.astype(np.float64)
    grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    shaded = np.repeat((0.35 * grey + 60.0)[..., None], 3, axis=2)
    ys, xs = np.mgrid[0:height, 0:width]
    spacing = max(8, line_width(height, width) * 4)
    hatch = ((xs + ys) % spacing) < max(1, spacing // 8)
    shaded[hatch] = 200.0
    out = np.where(valid[..., None], blended, shaded)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
