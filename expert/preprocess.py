"""Image → network input, and the exact geometry to map results back onto the ORIGINAL image.

Center-crop mode (the paper's): the shorter side is resized to ``resize`` (256; the longer side to
``int(resize · long / short)``, as torchvision's ``Resize``), then a ``crop``×``crop`` (224) window is cut
from the centre (offsets ``round((size - crop) / 2)``, as torchvision's ``CenterCrop``). The border outside
that window is NOT inspected; :meth:`Geometry.inspected_region` says which part of the original was.
No-crop mode (``center_crop=False``): the whole image is resized to ``crop``×``crop`` (aspect not kept).

Resizing uses PIL's bilinear filter (antialiased when shrinking), exactly as torchvision's transforms on
PIL images in the reference code; then per-channel normalisation ``(pixel / 255 - mean) / std`` with the
statistics the backbone was trained with (:func:`expert_normalization`: the backbone's timm ``pretrained_cfg``,
or the ``normalize_mean`` / ``normalize_std`` settings; ImageNet's for the default WideResNet-50-2).

Pixel-centre convention: original pixel ``x`` has its centre at ``x + 0.5``; it maps to the resized
continuous coordinate ``(x + 0.5) · resized_w / orig_w`` and to crop pixel coordinate
``(x + 0.5) · resized_w / orig_w - 0.5 - crop_left``. An original pixel is inspected iff its centre falls
inside the crop window.

Example:
    >>> import numpy as np
    >>> tensor, geo = preprocess(np.zeros((240, 320, 3), np.uint8))
    >>> tensor.shape, (geo.resized_h, geo.resized_w, geo.crop_top, geo.crop_left)
    ((3, 224, 224), (256, 341, 16, 58))
    >>> geo.inspected_region()
    (54, 15, 265, 225)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from expert.errors import ExpertError

if TYPE_CHECKING:
    from expert.config import ExpertSettings

Triple = tuple[float, float, float]
"""Three per-channel (R, G, B) values."""

IMAGENET_MEAN_VALUES: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD_VALUES: Triple = (0.229, 0.224, 0.225)
IMAGENET_MEAN = np.array(IMAGENET_MEAN_VALUES, np.float32)
IMAGENET_STD = np.array(IMAGENET_STD_VALUES, np.float32)
"""ImageNet statistics (float32): :func:`preprocess`'s default and the default backbone's ``pretrained_cfg``."""


class NormalizationError(ExpertError, ValueError):
    """The backbone's input statistics cannot be determined (the message says which settings to give)."""

    code = "invalid_settings"


@dataclass(frozen=True)
class Normalization:
    """Per-channel RGB statistics of the network input: ``(pixel / 255 - mean) / std``.

    Attributes:
        mean: R, G, B means (of pixels scaled to [0, 1]).
        std: R, G, B standard deviations (all > 0).
        source: where the values came from, for messages (e.g. ``"pretrained_cfg of 'resnet18'"``).
    """

    mean: Triple
    std: Triple
    source: str = "given"

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` as float32 arrays of shape ``[3]``, the form :func:`preprocess` computes with."""
        return np.array(self.mean, np.float32), np.array(self.std, np.float32)


def as_triple(values: Sequence[float], what: str = "value") -> Triple:
    """``values`` as three finite floats (R, G, B).

    Raises:
        ValueError: not exactly three finite numbers.

    Example:
        >>> as_triple([0.5, 0.5, 0.5])
        (0.5, 0.5, 0.5)
    """
    found = tuple(float(v) for v in values)
    if len(found) != 3 or not all(np.isfinite(found)):
        raise ValueError(f"{what} must be three finite numbers (R, G, B), got {list(values)!r}")
    return found[0], found[1], found[2]


@functools.lru_cache(maxsize=32)
def backbone_normalization(name: str) -> Normalization:
    """The input statistics timm records for backbone ``name`` (its ``pretrained_cfg`` mean and std).

    Read from timm's registry: nothing is downloaded and no model is created, so this works offline and with
    random weights.

    Raises:
        NormalizationError: timm has no pretrained config (or no mean/std) for ``name``.

    Example:
        >>> backbone_normalization("wide_resnet50_2.tv_in1k").mean
        (0.485, 0.456, 0.406)
        >>> backbone_normalization("tf_mobilenetv3_small_minimal_100.in1k").std
        (0.5, 0.5, 0.5)
    """
    import timm

    try:
        cfg = timm.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        cfg = None
    mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
    if mean is None or std is None:
        raise NormalizationError(
            f"timm has no pretrained_cfg with mean/std for backbone {name!r}: set EAGLE_EXPERT__NORMALIZE_MEAN and "
            "EAGLE_EXPERT__NORMALIZE_STD to the statistics its weights were trained with"
        )
    return Normalization(
        mean=as_triple(mean, "pretrained_cfg mean"),
        std=as_triple(std, "pretrained_cfg std"),
        source=f"pretrained_cfg of {name!r}",
    )


def expert_normalization(settings: ExpertSettings) -> Normalization:
    """The statistics the expert normalises with: ``normalize_mean`` / ``normalize_std`` when set, else the backbone's.

    Each of the two settings overrides its half on its own; None takes the backbone's ``pretrained_cfg`` value
    (:func:`backbone_normalization`).

    Raises:
        NormalizationError: a value is not set and timm has none for the backbone.

    Example:
        >>> from expert.config import ExpertSettings
        >>> expert_normalization(ExpertSettings()).std
        (0.229, 0.224, 0.225)
        >>> expert_normalization(ExpertSettings(normalize_mean=(0.5, 0.5, 0.5))).mean
        (0.5, 0.5, 0.5)
    """
    mean, std = settings.normalize_mean, settings.normalize_std
    if mean is not None and std is not None:
        return Normalization(mean=mean, std=std, source="EAGLE_EXPERT__NORMALIZE_MEAN / __NORMALIZE_STD")
    base = backbone_normalization(settings.backbone)
    if mean is None and std is None:
        return base
    overridden = "EAGLE_EXPERT__NORMALIZE_MEAN" if mean is not None else "EAGLE_EXPERT__NORMALIZE_STD"
    return Normalization(
        mean=base.mean if mean is None else mean,
        std=base.std if std is None else std,
        source=f"{base.source} with {overridden}",
    )


def _ceil_div(numerator: int, denominator: int) -> int:
    return -((-numerator) // denominator)


@dataclass(frozen=True)
class Geometry:
    """How an original image became the network input (all integers, so mappings are exact).

    Attributes:
        orig_h: original height.
        orig_w: original width.
        resized_h: height after resizing.
        resized_w: width after resizing.
        crop_top: first resized row inside the crop.
        crop_left: first resized column inside the crop.
        crop_h: crop height (the network input height).
        crop_w: crop width.
    """

    orig_h: int
    orig_w: int
    resized_h: int
    resized_w: int
    crop_top: int
    crop_left: int
    crop_h: int
    crop_w: int

    def _inspected_span(self, orig: int, resized: int, start: int, size: int) -> tuple[int, int]:
        # Pixel p is inspected iff start <= (p + 0.5) * resized / orig < start + size, solved in integers:
        # p >= (2·start·orig - resized) / (2·resized), p < (2·(start+size)·orig - resized) / (2·resized).
        first = _ceil_div(2 * start * orig - resized, 2 * resized)
        end = _ceil_div(2 * (start + size) * orig - resized, 2 * resized)
        return max(0, first), min(orig, end)

    def inspected_region(self) -> tuple[int, int, int, int]:
        """Return ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of the original pixels the network saw.

        Example:
            >>> Geometry(300, 200, 384, 256, 80, 16, 224, 224).inspected_region()
            (12, 62, 187, 237)
        """
        x0, x1 = self._inspected_span(self.orig_w, self.resized_w, self.crop_left, self.crop_w)
        y0, y1 = self._inspected_span(self.orig_h, self.resized_h, self.crop_top, self.crop_h)
        return x0, y0, x1, y1

    def crop_to_original_xy(self, x: float, y: float) -> tuple[float, float]:
        """Map a continuous crop-pixel coordinate (pixel centres at integers) to the original image's.

        Example:
            >>> Geometry(512, 512, 256, 256, 16, 16, 224, 224).crop_to_original_xy(0.0, 0.0)
            (32.5, 32.5)
        """
        ox = (x + 0.5 + self.crop_left) * self.orig_w / self.resized_w - 0.5
        oy = (y + 0.5 + self.crop_top) * self.orig_h / self.resized_h - 0.5
        return ox, oy

    def original_to_crop_xy(self, x: float, y: float) -> tuple[float, float]:
        """Inverse of :meth:`crop_to_original_xy`."""
        cx = (x + 0.5) * self.resized_w / self.orig_w - 0.5 - self.crop_left
        cy = (y + 0.5) * self.resized_h / self.orig_h - 0.5 - self.crop_top
        return cx, cy

    def inspected_mask(self) -> np.ndarray:
        """Bool ``orig_h × orig_w`` mask of the inspected pixels (the rectangle of :meth:`inspected_region`)."""
        x0, y0, x1, y1 = self.inspected_region()
        mask = np.zeros((self.orig_h, self.orig_w), bool)
        mask[y0:y1, x0:x1] = True
        return mask

    def crop_to_original(self, map_hw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Place a crop-space value map back onto the original pixel grid.

        Each inspected original pixel takes the bilinear interpolation of ``map_hw`` at its crop
        coordinate (:meth:`original_to_crop_xy`; edges replicated for the half pixel at the border).

        Args:
            map_hw: ``crop_h × crop_w`` float map (e.g. the smoothed anomaly map).

        Returns:
            ``(values, inspected)``: float32 ``orig_h × orig_w`` map (0 on uninspected pixels) and the
            bool mask of inspected pixels.

        Raises:
            ValueError: if ``map_hw`` is not ``crop_h × crop_w``.
        """
        if map_hw.shape != (self.crop_h, self.crop_w):
            raise ValueError(f"map has shape {map_hw.shape}, expected the crop size {(self.crop_h, self.crop_w)}")
        xs = (np.arange(self.orig_w, dtype=np.float64) + 0.5) * self.resized_w / self.orig_w - 0.5 - self.crop_left
        ys = (np.arange(self.orig_h, dtype=np.float64) + 0.5) * self.resized_h / self.orig_h - 0.5 - self.crop_top
        map_x = np.broadcast_to(xs[None, :], (self.orig_h, self.orig_w)).astype(np.float32)
        map_y = np.broadcast_to(ys[:, None], (self.orig_h, self.orig_w)).astype(np.float32)
        values = cv2.remap(
            np.ascontiguousarray(map_hw, dtype=np.float32),
            map_x,
            map_y,
            interpolation=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        inspected = self.inspected_mask()
        values[~inspected] = 0.0
        return values, inspected


def compute_geometry(
    height: int, width: int, *, resize: int = 256, crop: int = 224, center_crop: bool = True
) -> Geometry:
    """Compute the :class:`Geometry` of an ``height × width`` image without touching pixels.

    Example:
        >>> geometry = compute_geometry(300, 200)
        >>> geometry.resized_h, geometry.resized_w, geometry.crop_top, geometry.crop_left
        (384, 256, 80, 16)
    """
    if not center_crop:
        return Geometry(height, width, crop, crop, 0, 0, crop, crop)
    if crop > resize:
        raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
    if width <= height:  # torchvision Resize(int): shorter side -> resize, longer side truncated
        resized_w, resized_h = resize, int(resize * height / width)
    else:
        resized_h, resized_w = resize, int(resize * width / height)
    top = int(round((resized_h - crop) / 2.0))
    left = int(round((resized_w - crop) / 2.0))
    return Geometry(height, width, resized_h, resized_w, top, left, crop, crop)


def preprocess(
    image: np.ndarray,
    *,
    resize: int = 256,
    crop: int = 224,
    center_crop: bool = True,
    normalization: Normalization | None = None,
) -> tuple[np.ndarray, Geometry]:
    """Turn an RGB uint8 image into the network input.

    Args:
        image: ``H × W × 3`` RGB uint8.
        resize: shorter side after resizing (center-crop mode).
        crop: network input size.
        center_crop: False: resize the whole image to ``crop × crop`` instead.
        normalization: the backbone's input statistics (:func:`expert_normalization`); None: ImageNet's.

    Returns:
        ``(tensor, geometry)``: float32 ``3 × crop × crop`` normalised array and its :class:`Geometry`.

    Raises:
        ValueError: if ``image`` is not ``H × W × 3`` uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    geometry = compute_geometry(image.shape[0], image.shape[1], resize=resize, crop=crop, center_crop=center_crop)
    resized = Image.fromarray(image).resize((geometry.resized_w, geometry.resized_h), Image.Resampling.BILINEAR)
    array = np.asarray(resized)
    window = array[
        geometry.crop_top : geometry.crop_top + geometry.crop_h,
        geometry.crop_left : geometry.crop_left + geometry.crop_w,
    ]
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalization is None else normalization.arrays()
    normalised = (window.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32), geometry
