"""Image → network input, and the exact geometry to map results back onto the ORIGINAL image.

Center-crop mode (the paper's): the shorter side is resized to ``resize`` (256; the longer side to
``int(resize · long / short)``, as torchvision's ``Resize``), then a ``crop``×``crop`` (224) window is cut
from the centre (offsets ``round((size - crop) / 2)``, as torchvision's ``CenterCrop``). The border outside
that window is NOT inspected; :meth:`Geometry.inspected_region` says which part of the original was.
No-crop mode (``center_crop=False``): the whole image is resized to ``crop``×``crop`` (aspect not kept).

Resizing uses PIL's bilinear filter (antialiased when shrinking), exactly as torchvision's transforms on
PIL images in the reference code; then ImageNet mean/std normalisation.

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

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


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


def compute_geometry(height: int, width: int, *, resize: int = 256, crop: int = 224, center_crop: bool = True):
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
    image: np.ndarray, *, resize: int = 256, crop: int = 224, center_crop: bool = True
) -> tuple[np.ndarray, Geometry]:
    """Turn an RGB uint8 image into the network input.

    Args:
        image: ``H × W × 3`` RGB uint8.
        resize: shorter side after resizing (center-crop mode).
        crop: network input size.
        center_crop: False: resize the whole image to ``crop × crop`` instead.

    Returns:
        ``(tensor, geometry)``: float32 ``3 × crop × crop`` ImageNet-normalised array and its :class:`Geometry`.

    Raises:
        ValueError: if ``image`` is not ``H × W × 3`` uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    geometry = compute_geometry(image.shape[0], image.shape[1], resize=resize, crop=crop, center_crop=center_crop)
    resized = Image.fromarray(image).resize((geometry.resized_w, geometry.resized_h), Image.BILINEAR)
    array = np.asarray(resized)
    window = array[
        geometry.crop_top : geometry.crop_top + geometry.crop_h,
        geometry.crop_left : geometry.crop_left + geometry.crop_w,
    ]
    normalised = (window.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32), geometry
