"""The annotated picture of one inspection: the anomaly heatmap over the image with the defect boxes in red.

One picture for every front end: the app shows it, the API returns it (``annotated=true`` → base64 PNG) and the
watched folder writes it (``<name>.annotated.png``). Drawing is the expert's own (:func:`expert.boxes.draw_boxes`),
the same red boxes the MLLM sees. The picture has the size of the pipeline's bounded view (at most
1024 px on the longest side for usual images, :meth:`eagle.pipeline.Pipeline.view`), not the original's: the
boxes (ORIGINAL pixels in the record) are scaled onto it, so its cost does not grow with the image.
"""

from __future__ import annotations

import base64
from typing import Any

import cv2
import numpy as np


class NoImagesError(ValueError):
    """The result record carries no pictures (the pipeline was asked not to render them)."""


def annotated_image(result: Any) -> np.ndarray:
    """Heatmap overlay with the result's boxes drawn on it, RGB uint8 at the overlay's (bounded) resolution.

    Args:
        result: an ``eagle.records.InspectionResult`` whose ``images`` are present.

    Raises:
        NoImagesError: ``result.images`` is ``None``.
    """
    images = getattr(result, "images", None)
    if images is None:
        raise NoImagesError("the inspection result carries no images to annotate")
    base = np.ascontiguousarray(images.heatmap_overlay)
    if not result.boxes:
        return base
    from expert.boxes import Box, draw_boxes

    height, width = base.shape[:2]
    orig_w, orig_h = result.image_size
    sx, sy = width / orig_w, height / orig_h
    boxes = [Box(b.x0, b.y0, b.x1, b.y1, b.peak).scaled(sx, sy, width=width, height=height) for b in result.boxes]
    return draw_boxes(base, boxes)


def encode_png(rgb: np.ndarray, *, compression: int = 3) -> bytes:
    r"""PNG bytes of an RGB uint8 image (compression 0-9; 3 is fast and still small).

    Example:
        >>> encode_png(np.zeros((2, 2, 3), np.uint8))[:8]
        b'\x89PNG\r\n\x1a\n'
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 H×W×3 image, got {rgb.dtype} {rgb.shape}")
    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def annotated_png_base64(result: Any) -> str:
    """Base64 (ASCII) of the annotated PNG, for JSON responses."""
    return base64.b64encode(encode_png(annotated_image(result))).decode("ascii")
