"""A deterministic MVTec-AD-like data set for tests: a woven product texture with scratches, holes and stains.

The texture is drawn in coordinates relative to the image's SHORTER side, so after the expert's
"shorter side → 256, center-crop 224" preprocessing every image looks alike whatever its aspect ratio.
Defects are placed in the central area that survives that crop, and their masks are exact.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> root = make_mvtec_like(Path(tempfile.mkdtemp()), n_train=2, n_test_good=1, n_test_bad_per_type=1)
    >>> sorted(p.name for p in (root / "widget" / "test").iterdir())
    ['good', 'hole', 'scratch', 'stain']
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

DEFECT_TYPES: tuple[str, ...] = ("scratch", "hole", "stain")
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((224, 224), (240, 320), (300, 200))

_PERIODS_PER_SIDE = 20.0  # weave periods across the shorter side: ~11 px per period at 224
_BASE_COLOUR = np.array([150.0, 140.0, 120.0])  # a beige fabric


def make_good_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one defect-free product image.

    A regular two-direction weave (period = shorter side / 20) in a beige colour, with small random
    phase, brightness and colour jitter and mild pixel noise — consistent from image to image.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        rng: the random generator (determinism: same state, same image).

    Returns:
        RGB uint8 array ``height × width × 3``.

    Example:
        >>> make_good_image(20, 30, np.random.default_rng(0)).shape
        (20, 30, 3)
    """
    short = float(min(height, width))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    # Coordinates in "periods", relative to the image centre, so a resize maps texture onto texture.
    u = (xs - width / 2.0) / short * _PERIODS_PER_SIDE
    v = (ys - height / 2.0) / short * _PERIODS_PER_SIDE
    phase_u, phase_v = rng.uniform(-0.15, 0.15, size=2)
    warp = np.sin(2 * np.pi * (u + phase_u))
    weft = np.sin(2 * np.pi * (v + phase_v))
    # Over-under weave: threads alternate in a checkerboard of half periods.
    checker = np.sign(np.sin(np.pi * (u + phase_u)) * np.sin(np.pi * (v + phase_v)))
    pattern = np.where(checker > 0, warp, weft)
    brightness = rng.uniform(-6.0, 6.0)
    colour = _BASE_COLOUR + rng.uniform(-4.0, 4.0, size=3)
    image = colour[None, None, :] + brightness + 28.0 * pattern[..., None]
    image += rng.normal(0.0, 3.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def noisy_part(seed: int, size: int) -> np.ndarray:
    """A flat grey ``size`` x ``size`` RGB "part" with Gaussian noise (sd 12): the mask tests' normal image."""
    rng = np.random.default_rng(seed)
    return np.clip(128 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)


def part_with_red_square(box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """:func:`noisy_part` of seed 0 with a solid red square ``(x0, y0, x1, y1)``: a defect at a known place."""
    image = noisy_part(0, size)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = (255, 0, 0)
    return image


def train_and_good_images(root: Path) -> dict[str, list[Path]]:
    """A small "widget" data set under ``root``: ``{"train": 6 good references, "good": 3 good test images}``."""
    made = make_mvtec_like(root, n_train=6, n_test_good=3, n_test_bad_per_type=1)
    return {
        "train": sorted((made / "widget" / "train" / "good").glob("*.png")),
        "good": sorted((made / "widget" / "test" / "good").glob("*.png")),
    }


def _central_point(height: int, width: int, rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A random (x, y) within ``margin`` × shorter side of the image centre."""
    short = min(height, width)
    dx, dy = rng.uniform(-margin, margin, size=2) * short
    return width / 2.0 + dx, height / 2.0 + dy


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` onto a copy of ``image``.

    * ``scratch``: a bright straight line, ~3 % of the shorter side thick, ~35 % long.
    * ``hole``: a dark disc, radius ~7 % of the shorter side.
    * ``stain``: a saturated blue-green blob (union of overlapping ellipses), ~10 % across.

    All defects lie within the central ±20 % of the shorter side, so they survive the center crop.

    Args:
        image: RGB uint8 defect-free image.
        kind: one of :data:`DEFECT_TYPES`.
        rng: the random generator.

    Returns:
        ``(defective image, mask)``: the mask is uint8 with 255 on defect pixels and 0 elsewhere.

    Raises:
        ValueError: for an unknown ``kind``.

    Example:
        >>> img = make_good_image(64, 64, np.random.default_rng(0))
        >>> bad, mask = add_defect(img, "hole", np.random.default_rng(1))
        >>> bool(mask.any()), bad.shape
        (True, (64, 64, 3))
    """
    height, width = image.shape[:2]
    short = min(height, width)
    mask = np.zeros((height, width), np.uint8)
    out = image.copy()
    cx, cy = _central_point(height, width, rng, 0.2)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half = 0.175 * short
        p0 = (round(cx - half * np.cos(angle)), round(cy - half * np.sin(angle)))
        p1 = (round(cx + half * np.cos(angle)), round(cy + half * np.sin(angle)))
        thickness = max(2, round(0.03 * short))
        cv2.line(mask, p0, p1, 255, thickness=thickness, lineType=cv2.LINE_8)
        colour = np.array([235, 235, 240], np.float64)
    elif kind == "hole":
        radius = max(2, round(rng.uniform(0.06, 0.08) * short))
        cv2.circle(mask, (round(cx), round(cy)), radius, 255, thickness=-1)
        colour = np.array([20, 18, 15], np.float64)
    elif kind == "stain":
        for _ in range(4):
            ex, ey = cx + rng.uniform(-0.04, 0.04) * short, cy + rng.uniform(-0.04, 0.04) * short
            axes = (max(2, round(rng.uniform(0.03, 0.06) * short)), max(2, round(rng.uniform(0.03, 0.06) * short)))
            cv2.ellipse(mask, (round(ex), round(ey)), axes, rng.uniform(0, 180), 0, 360, 255, thickness=-1)
        colour = np.array([30, 150, 170], np.float64)
    else:
        raise ValueError(f"unknown defect type {kind!r}; expected one of {DEFECT_TYPES}")
    inside = mask > 0
    noise = rng.normal(0.0, 3.0, size=(int(inside.sum()), 3))
    out[inside] = np.clip(np.rint(colour + noise), 0, 255).astype(np.uint8)
    return out, mask


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def make_mvtec_like(
    root: Path,
    *,
    category: str = "widget",
    n_train: int = 12,
    n_test_good: int = 6,
    n_test_bad_per_type: int = 3,
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES,
    seed: int = 0,
) -> Path:
    """Write an MVTec-AD-style folder and return ``root``.

    Layout: ``<root>/<category>/train/good/000.png``, ``test/good``, ``test/<defect>`` for each of
    :data:`DEFECT_TYPES`, and ``ground_truth/<defect>/<name>_mask.png`` (255 = defect). Image sizes
    (height, width) cycle through ``sizes``. The same arguments always write the same bytes.

    Args:
        root: output directory (created if missing).
        category: the product category's folder name.
        n_train: defect-free training images.
        n_test_good: defect-free test images.
        n_test_bad_per_type: defective test images per defect type.
        sizes: (height, width) pairs cycled over the images of each split.
        seed: random seed.

    Returns:
        ``root`` (the category folder is ``root / category``).
    """
    root = Path(root)
    base = root / category
    rng = np.random.default_rng(seed)

    def size(i: int) -> tuple[int, int]:
        return sizes[i % len(sizes)]

    for i in range(n_train):
        _save_png(base / "train" / "good" / f"{i:03d}.png", make_good_image(*size(i), rng))
    for i in range(n_test_good):
        _save_png(base / "test" / "good" / f"{i:03d}.png", make_good_image(*size(i), rng))
    for kind in DEFECT_TYPES:
        for i in range(n_test_bad_per_type):
            image, mask = add_defect(make_good_image(*size(i), rng), kind, rng)
            _save_png(base / "test" / kind / f"{i:03d}.png", image)
            _save_png(base / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return root
