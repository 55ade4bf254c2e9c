"""Input limits checked before any work is queued: upload size and image pixels (from the header).

Bank names are checked by the one rule of :func:`eagle.banks.validate_bank_name`, not here.

Body sizes are enforced by FastAPI's own per-route ``max_body_size`` (a 413 before the body is read when
``Content-Length`` is too large, or as soon as a streamed body passes the limit); this module computes those
limits from settings and checks what only the content can tell.

Example:
    >>> check_image_pixels(_tiny_png(), max_pixels=10, name="a.png")  # 2x2 = 4 pixels: fine
    HeaderSize(pixels=4, width=2, height=2)
    >>> try:
    ...     check_image_pixels(_tiny_png(), max_pixels=3, name="a.png")
    ... except ImageTooLarge as err:
    ...     print(err)
    image 'a.png' has 4 pixels (2x2); the limit is 3 (EAGLE_MAX_IMAGE_PIXELS)
"""

from __future__ import annotations

import io
import re
import warnings
from typing import NamedTuple

from PIL import Image

from deploy.errors import ImageTooLarge

MIB = 1024 * 1024
FORM_LIMITS: dict[str, int] = {"max_files": 1, "max_fields": 16, "max_part_size": 64 * 1024}
"""Multipart limits for every form endpoint: one file, a few short text fields."""


def mib_to_bytes(mib: int | float) -> int:
    """Convert a size in MiB from settings to bytes."""
    return int(mib * MIB)


class HeaderSize(NamedTuple):
    """What an image header announces: the pixel count, and the dimensions when PIL exposes them."""

    pixels: int
    width: int | None
    height: int | None

    def describe(self) -> str:
        """``'120000000 pixels (12000x10000)'``, or just the count."""
        dims = f" ({self.width}x{self.height})" if self.width is not None else ""
        return f"{self.pixels} pixels{dims}"


def image_size_from_header(data: bytes) -> HeaderSize | None:
    """The size announced by the image header, read without decoding pixels; ``None`` if PIL cannot tell.

    PIL refuses absurd sizes at open (``DecompressionBombError``); its message carries the pixel count, which is
    returned so that the caller reports the image as too large rather than as unreadable.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return HeaderSize(int(img.width) * int(img.height), int(img.width), int(img.height))
    except Image.DecompressionBombError as err:
        match = re.search(r"\((\d+) pixels\)", str(err))
        return HeaderSize(int(match.group(1)), None, None) if match else None
    except Exception:  # noqa: BLE001 - not an image PIL knows; the decoder will name the problem
        return None


def check_image_pixels(data: bytes, *, max_pixels: int, name: str | None = None) -> HeaderSize | None:
    """Refuse an image whose header announces more than ``max_pixels`` pixels.

    Returns:
        The header's size, or ``None`` when the header is unreadable (left to the decoder, which gives the
        precise ``invalid_image`` message).

    Raises:
        ImageTooLarge: the header announces more than ``max_pixels`` pixels.
    """
    size = image_size_from_header(data)
    if size is not None and size.pixels > max_pixels:
        label = f"image {name!r}" if name else "image"
        raise ImageTooLarge(f"{label} has {size.describe()}; the limit is {max_pixels} (EAGLE_MAX_IMAGE_PIXELS)")
    return size


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()
