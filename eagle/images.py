"""Read user images safely into RGB uint8 arrays, with one clear error per bad file.

Every image the product touches (references, queries, uploads, evaluation sets) goes through
:func:`load_image`, which:

* refuses empty files, non-images (e.g. a text file named ``.png``), truncated or corrupt files, and images
  smaller than 2×2 pixels;
* refuses images with more than ``max_pixels`` pixels from the HEADER, before any pixel is decoded
  (decompression-bomb guard). Pillow's own guard (``Image.MAX_IMAGE_PIXELS``, which only warns up to twice
  its limit) is not relied on: the size is checked here explicitly; Pillow's limit is only raised (never
  lowered) when ``max_pixels`` is above it, so that a deliberately large setting is honoured;
* applies the EXIF orientation;
* converts every mode to RGB uint8: grayscale and palette are expanded; 16-bit data is SCALED to 8 bits
  (``round(v / 257)``), never clipped (16-bit colour PNG/TIFF are decoded with OpenCV, which keeps all
  16 bits); transparency (RGBA, LA, palette with a transparent colour) is composited onto WHITE;
  CMYK/YCbCr/LAB are converted by Pillow; float images in [0, 1] are scaled by 255 (others clipped).

Example:
    >>> import io
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("L", (3, 2), 128).save(buffer, format="PNG")
    >>> load_image(buffer.getvalue(), max_pixels=1_000_000, name="gray.png").shape
    (2, 3, 3)
    >>> try:
    ...     load_image(b"", max_pixels=100, name="empty.png")
    ... except ImageError as err:
    ...     print(err)
    empty.png: empty file (0 bytes)
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
MIN_SIDE = 2
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, IndexError, TypeError)


class ImageError(ValueError):
    """A file cannot be used as an image; the one-line message starts with the file's name."""


def list_images(directory: Path) -> list[Path]:
    """All image files under ``directory`` (recursive), sorted by path.

    Images are recognised by extension (case-insensitive): png, jpg, jpeg, bmp, tif, tiff, webp.
    Hidden files (name starting with ``.``, e.g. macOS ``._x.png`` resource forks) are skipped.

    Raises:
        ImageError: if ``directory`` is not a directory.

    Example:
        ``list_images(Path("normals"))`` → ``[Path("normals/a.png"), Path("normals/sub/b.JPG")]``
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ImageError(f"{directory}: not a directory")
    return sorted(
        path
        for path in directory.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def _read_source(source: str | Path | bytes, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<image bytes>"
    path = Path(source)
    label = name or str(path)
    try:
        return path.read_bytes(), label
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, not an image file") from None
    except OSError as err:
        raise ImageError(f"{label}: cannot read file ({err.strerror or err})") from None


def _describe_non_image(data: bytes) -> str:
    head = data[:64]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"not an image: the file holds text ({text.strip()[:24]!r}…)"
    return f"not an image in a supported format (starts with bytes {head[:8].hex(' ')})"


def _open_header(data: bytes, label: str, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and enforce the pixel limit before any decoding."""
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0) and Image.MAX_IMAGE_PIXELS is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels  # only ever raised, so Pillow's guard never pre-empts ours
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        match = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
        raise ImageError(
            f"{label}: image header claims {size}, more than the limit of {max_pixels:,} (EAGLE_MAX_IMAGE_PIXELS); "
            "refused before decoding"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: {_describe_non_image(data)}") from None
    except _DECODE_ERRORS as err:
        raise ImageError(f"{label}: corrupt image header ({err})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{label}: image is {width}×{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} (EAGLE_MAX_IMAGE_PIXELS); refused before decoding"
        )
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError(f"{label}: image is too small ({width}×{height}); at least {MIN_SIDE}×{MIN_SIDE} pixels")
    return image


def _is_16bit_colour(image: Image.Image, data: bytes) -> bool:
    if image.format == "PNG" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 26:
        bit_depth, colour_type = data[24], data[25]
        return bit_depth == 16 and colour_type in (2, 6)
    if image.format == "TIFF":
        bits = getattr(image, "tag_v2", {}).get(258)
        return isinstance(bits, tuple) and len(bits) >= 3 and all(b == 16 for b in bits)
    return False


def _scale_16bit(array: np.ndarray) -> np.ndarray:
    return np.rint(array.astype(np.float64) / 257.0).astype(np.uint8)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _decode_16bit_colour(data: bytes, label: str, orientation: int) -> np.ndarray:
    import cv2

    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.ndim != 3 or decoded.dtype != np.uint16:
        raise ImageError(f"{label}: cannot decode the 16-bit colour image (truncated or corrupt)")
    rgb = _scale_16bit(decoded[..., 2::-1])
    if decoded.shape[2] == 4:
        rgb = _composite_on_white(rgb, _scale_16bit(decoded[..., 3]))
    transpose = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
                 6: Image.ROTATE_270, 7: Image.TRANSVERSE, 8: Image.ROTATE_90}.get(orientation)  # fmt: skip
    if transpose is not None:
        rgb = np.asarray(Image.fromarray(rgb).transpose(transpose))
    return np.ascontiguousarray(rgb)


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.repeat(_scale_16bit(np.asarray(image))[..., None], 3, axis=2)
    if mode == "I":
        values = np.asarray(image)
        gray = _scale_16bit(np.clip(values, 0, 65535)) if values.max(initial=0) > 255 else values.astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
        return np.repeat(np.clip(np.rint(values), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if (mode == "P" and "transparency" in image.info) or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"))
        return _composite_on_white(rgba[..., :3], rgba[..., 3])
    return np.asarray(image.convert("RGB"))


def load_image(source: str | Path | bytes, *, max_pixels: int, name: str | None = None) -> np.ndarray:
    """Decode an image file (path or bytes) into an RGB uint8 ``H × W × 3`` array.

    Args:
        source: a path, or the file's bytes.
        max_pixels: largest accepted ``width × height`` (checked from the header, before decoding).
        name: how to name the file in error messages (default: the path, or ``<image bytes>``).

    Returns:
        RGB uint8 array at the original resolution, EXIF orientation applied.

    Raises:
        ImageError: empty, unreadable, non-image, truncated/corrupt, too large or too small input; the
            one-line message names the file and the problem.
    """
    data, label = _read_source(source, name)
    if len(data) == 0:
        raise ImageError(f"{label}: empty file (0 bytes)")
    image = _open_header(data, label, max_pixels)
    try:
        orientation = int(image.getexif().get(0x0112, 1))
    except _DECODE_ERRORS:
        orientation = 1
    if _is_16bit_colour(image, data):
        return _decode_16bit_colour(data, label, orientation)
    try:
        image.load()
        oriented = ImageOps.exif_transpose(image)
        rgb = _to_rgb(oriented)
    except _DECODE_ERRORS as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"{label}: cannot decode image, the file is truncated or corrupt ({reason})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:  # pragma: no cover - defensive
        raise ImageError(f"{label}: unsupported pixel layout {rgb.shape} {rgb.dtype}")
    return np.ascontiguousarray(rgb)
