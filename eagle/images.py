"""Read user images safely into RGB uint8 arrays, with one clear error per bad file.

Every image the product touches (references, queries, uploads, evaluation sets) goes through
:func:`load_image`, which:

* refuses empty files, non-images (e.g. a text file named ``.png``), truncated or corrupt files, and images
  smaller than 2×2 pixels; a message says what KIND of file it got ("a text file (29 bytes)", "a PDF document"),
  never what the file holds (no quoted text or bytes: a file read by mistake must not leak through an error,
  a log or an audit row); empty, cut-short and undecodable files raise :class:`TruncatedImageError`, which a
  caller that watches a writer may retry;
* refuses images with more than ``max_pixels`` pixels from the HEADER, before any pixel is decoded
  (decompression-bomb guard). Pillow's own guard (``Image.MAX_IMAGE_PIXELS``, which only warns up to twice
  its limit) is not relied on: the size is checked here explicitly; Pillow's limit is only raised (never
  lowered) when ``max_pixels`` is above it, so that a deliberately large setting is honoured;
* applies the EXIF orientation;
* converts every mode to RGB uint8: grayscale and palette are expanded; 16-bit data is SCALED to 8 bits
  (``round(v / 257)``), never clipped (16-bit colour PNG/TIFF are decoded with OpenCV, which keeps all
  16 bits); transparency (RGBA, LA, palette with a transparent colour) is composited onto WHITE;
  CMYK/YCbCr/LAB are converted by Pillow; float images in [0, 1] are scaled by 255 (others clipped).

Bounded decoding (:func:`decode_image`, what inspections use): an image larger than what the expert and the MLLM
need is decoded REDUCED — JPEGs through libjpeg's DCT scaling (``Image.draft``, 1/2 to 1/8, the full image is never
built), other formats by resizing right after decoding — to the smallest size whose longest side is at least
:data:`VIEW_MAX_SIDE` (1024: the MLLM's pixel budget is smaller) and whose shorter side is at least the expert's
``resize`` (256), never above :data:`VIEW_MAX_PIXELS`. The original (EXIF-oriented) size is recorded, so that the
expert maps its results, and callers report boxes, in ORIGINAL pixel coordinates.

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

import codecs
import hashlib
import io
import math
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from eagle.errors import EagleError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
MIN_SIDE = 2
VIEW_MAX_SIDE = 1024
"""Images are decoded for inspection, and shown, at this longest side (unless the expert needs more)."""
VIEW_MAX_PIXELS = 4_194_304
"""Upper bound on a reduced view's pixel count (2048², reached only for extreme aspect ratios)."""
_TRANSPOSE = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
              6: Image.ROTATE_270, 7: Image.TRANSVERSE, 8: Image.ROTATE_90}  # fmt: skip
"""EXIF orientation → the PIL transpose that displays the image upright."""
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, IndexError, TypeError)


class ImageError(EagleError, ValueError):
    """A file cannot be used as an image; the one-line message starts with the file's name."""

    code, http_status = "invalid_image", 422


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


_SUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"RIFF", "WebP"),
)
"""Signatures of the supported formats: a short file that starts with one (or is cut inside one) is an image cut
short."""
_HEADER_BYTES = 64
"""Files shorter than this that start like a supported format are taken as cut short (the decoder needs more)."""
_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\x7fELF", "an executable (ELF)"),
    (b"MZ", "a Windows executable"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"GIF8", "a GIF image"),
)
"""Other kinds a wrong file commonly is, named by kind (never by what it holds)."""
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")


class TruncatedImageError(ImageError):
    """The file ends before an image does: empty, cut short or damaged (perhaps still being written).

    Same code and status as :class:`ImageError`; the watched folder retries these for a while before failing them.
    """


def _size_text(n: int) -> str:
    return "1 byte" if n == 1 else f"{n:,} bytes"


def _is_text(head: bytes) -> bool:
    try:  # not final: a multi-byte character may be cut at the end of the sample
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return bool(text) and all(c.isprintable() or c in "\r\n\t\f\v" for c in text)


def _describe_non_image(data: bytes) -> tuple[str, bool]:
    """What kind of file ``data`` is, in words, and whether it may be an image cut short.

    The message names the KIND of file and its size, never what it holds: a text file's words or a binary
    file's bytes could be anything (the watched folder must not echo a file it was tricked into reading).
    """
    size = _size_text(len(data))
    text = _is_text(data[:512])
    for magic, label in _SUPPORTED_MAGIC:
        started = data.startswith(magic) or magic.startswith(data)
        if started and len(data) < _HEADER_BYTES and not text:  # the decoder saw too little to know the format
            if label == "WebP" and len(data) >= 12 and data[8:12] != b"WEBP":
                break  # another RIFF file (WAV, AVI...)
            return f"a {label} file cut short ({size}): truncated, or still being written", True
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return f"not an image in a supported format: a HEIF/AVIF image ({size}); convert it to PNG or JPEG", False
    for magic, label in _OTHER_MAGIC:
        if data.startswith(magic):
            return f"not an image: {label} ({size})", False
    if text:
        return f"not an image: a text file ({size})", False
    return f"not an image in a supported format (binary data, {size})", False


_QUOTED = re.compile(r"b?'[^']*'|b?\"[^\"]*\"")


def _reason(err: BaseException) -> str:
    """A decoder's complaint, first line only, with anything quoted from the file (bytes, names) replaced."""
    text = str(err).splitlines()[0] if str(err) else ""
    text = _QUOTED.sub("…", text).strip()
    return text[:120] if text else type(err).__name__


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
        description, cut_short = _describe_non_image(data)
        raise (TruncatedImageError if cut_short else ImageError)(f"{label}: {description}") from None
    except _DECODE_ERRORS as err:
        raise TruncatedImageError(f"{label}: corrupt image header, truncated or damaged ({_reason(err)})") from None
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


_ROWS_PER_CHUNK = 512
"""16-bit data is scaled in strips of rows, so a large 16-bit image costs no float copy of its own size."""


def _scale_16bit(array: np.ndarray) -> np.ndarray:
    # round(v / 257) in float32 is exact: v / 257 is never within 0.002 of a .5 tie, float32 errs by < 1e-5.
    out = np.empty(array.shape, np.uint8)
    for start in range(0, array.shape[0], _ROWS_PER_CHUNK):
        strip = array[start : start + _ROWS_PER_CHUNK]
        out[start : start + _ROWS_PER_CHUNK] = np.rint(strip.astype(np.float32) / np.float32(257.0))
    return out


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    # (rgb·α + 255·(255 - α)) / 255 is never a .5 tie either: float32 rounds like float64 here, at half the memory.
    out = np.empty(rgb.shape, np.uint8)
    for start in range(0, rgb.shape[0], _ROWS_PER_CHUNK):
        rows = slice(start, start + _ROWS_PER_CHUNK)
        a = alpha[rows].astype(np.float32)[..., None] / np.float32(255.0)
        out[rows] = np.rint(rgb[rows].astype(np.float32) * a + np.float32(255.0) * (1.0 - a))
    return out


def _decode_16bit_colour(data: bytes, label: str, orientation: int) -> np.ndarray:
    import cv2

    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.ndim != 3 or decoded.dtype != np.uint16:
        raise TruncatedImageError(f"{label}: cannot decode the 16-bit colour image (truncated or corrupt)")
    rgb = _scale_16bit(decoded[..., 2::-1])
    if decoded.shape[2] == 4:
        rgb = _composite_on_white(rgb, _scale_16bit(decoded[..., 3]))
    transpose = _TRANSPOSE.get(orientation)
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


@dataclass(frozen=True)
class DecodedImage:
    """A decoded query image, possibly reduced, and the size of the original it stands for.

    Attributes:
        pixels: RGB uint8 ``h × w × 3`` (the original, or a reduced copy of it).
        original_size: ``(width, height)`` of the original image, EXIF orientation applied.
        sha256: hex digest of the file's bytes, when decoded from bytes or a path.
    """

    pixels: np.ndarray
    original_size: tuple[int, int]
    sha256: str | None = None

    @property
    def reduced(self) -> bool:
        """True when ``pixels`` is smaller than the original."""
        return self.original_size != (self.pixels.shape[1], self.pixels.shape[0])

    @classmethod
    def of(cls, pixels: np.ndarray) -> DecodedImage:
        """Wrap a full-resolution array (its own size is the original size)."""
        return cls(pixels, (int(pixels.shape[1]), int(pixels.shape[0])))


TAIL_BYTES = 65536
"""How much of a file's end :func:`looks_complete` needs (an image's end marker sits in its last bytes)."""


def looks_complete(head: bytes, tail: bytes, size: int) -> bool | None:
    """Whether a file that may still be being written already holds a whole image, from its first and last bytes.

    Cheap (nothing is decoded): PNG ends with its ``IEND`` chunk, JPEG with the end-of-image marker ``FF D9``, and
    BMP and WebP declare their file size in the header. Other formats (TIFF...) cannot be told this way.

    Args:
        head: the file's first bytes (at least 16).
        tail: the file's last :data:`TAIL_BYTES` bytes (the whole file when smaller).
        size: the file's size in bytes.

    Returns:
        ``True`` when the image looks whole, ``False`` when it is certainly cut short (or empty), ``None`` when the
        format is not one of those (or not an image at all): let the decoder judge.

    Example:
        >>> png = bytes.fromhex("89504e470d0a1a0a") + b"..." + b"IEND" + bytes.fromhex("ae426082")
        >>> looks_complete(png, png, len(png)), looks_complete(png[:9], png[:9], 9), looks_complete(b"II*", b"", 4)
        (True, False, None)
    """
    if size == 0:
        return False
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND\xaeB`\x82" in tail
    if head.startswith(b"\xff\xd8\xff"):
        return b"\xff\xd9" in (tail[2:] if len(tail) == size else tail)
    if head.startswith(b"BM") and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return None if declared == 0 else size >= declared
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return size >= int.from_bytes(head[4:8], "little") + 8
    return None


def image_sha256(image: bytes | str | Path | np.ndarray | DecodedImage) -> str:
    """The ``image_sha256`` of an inspection record: one definition for the app, the API, the watcher and the CLI.

    * a file (path) or its bytes: sha256 of the file's bytes, so the same photo has the same hash however it
      arrives (uploaded to the API, dropped in a watched folder, opened in the app, scored by ``eagle score``);
    * a :class:`DecodedImage`: the hash of the file it was decoded from (recorded at decoding);
    * a decoded array (no file behind it): sha256 of its RGB uint8 pixels in C order (``h × w × 3`` bytes).
      That is not the hash of any file holding the same picture, so front ends pass the file, not its pixels.

    Example:
        >>> image_sha256(b"abc")[:16]
        'ba7816bf8f01cfea'
        >>> image_sha256(np.zeros((1, 1, 3), np.uint8))[:16]  # the three bytes 0, 0, 0
        '709e80c88487a241'
    """
    if isinstance(image, DecodedImage):
        return image.sha256 or image_sha256(image.pixels)
    if isinstance(image, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()
    if isinstance(image, (str, Path)):
        return hashlib.sha256(Path(image).read_bytes()).hexdigest()
    return hashlib.sha256(bytes(image)).hexdigest()


def view_size(
    height: int,
    width: int,
    *,
    max_side: int = VIEW_MAX_SIDE,
    min_short_side: int = 0,
    min_pixels: int = 0,
    max_pixels: int = VIEW_MAX_PIXELS,
) -> tuple[int, int]:
    """``(height, width)`` of the bounded view of an image: never larger than the image itself.

    The scale is the smallest that keeps the longest side ≥ ``max_side``, the shorter side ≥ ``min_short_side``
    and the pixel count ≥ ``min_pixels`` (an MLLM's per-image budget), capped so the view has at most
    ``max(max_pixels, min_pixels)`` pixels; sides stay ≥ 2 pixels.

    Example:
        >>> view_size(3000, 4000), view_size(600, 800), view_size(300, 8000, min_short_side=256)
        ((768, 1024), (600, 800), (256, 6827))
    """
    area = height * width
    scale = max(max_side / max(height, width), min_short_side / min(height, width), math.sqrt(min_pixels / area))
    scale = min(1.0, scale, math.sqrt(max(max_pixels, min_pixels) / area))
    if scale >= 1.0:
        return height, width
    rows, cols = max(min(height, MIN_SIDE), round(height * scale)), max(min(width, MIN_SIDE), round(width * scale))
    cap = max(max_pixels, min_pixels)
    if rows * cols > cap:  # a side clamped to MIN_SIDE: shorten the other one
        rows, cols = (rows, max(1, cap // rows)) if cols >= rows else (max(1, cap // cols), cols)
    return rows, cols


def resize_rgb(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an RGB uint8 array to ``height × width`` (PIL bilinear, antialiased; a copy-free no-op if equal)."""
    if pixels.shape[:2] == (height, width):
        return pixels
    resized = Image.fromarray(pixels).resize((width, height), Image.BILINEAR, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(resized))


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except _DECODE_ERRORS:
        return 1


def _oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``(width, height)`` after applying an EXIF orientation (5-8 swap the axes)."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _decode_full(image: Image.Image, data: bytes, label: str, orientation: int) -> np.ndarray:
    if _is_16bit_colour(image, data):
        return _decode_16bit_colour(data, label, orientation)
    try:
        image.load()
        oriented = ImageOps.exif_transpose(image)
        rgb = _to_rgb(oriented)
    except _DECODE_ERRORS as err:
        raise TruncatedImageError(
            f"{label}: cannot decode image, the file is truncated or corrupt ({_reason(err)})"
        ) from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:  # pragma: no cover - defensive
        raise ImageError(f"{label}: unsupported pixel layout {rgb.shape} {rgb.dtype}")
    return np.ascontiguousarray(rgb)


def _decode_reduced(
    image: Image.Image, data: bytes, label: str, orientation: int, target: tuple[int, int]
) -> np.ndarray:
    """Decode to ``target`` = (width, height) in the file's STORED orientation, then orient."""
    if _is_16bit_colour(image, data):  # OpenCV decodes those at full size; reduce right after (rare)
        full = _decode_16bit_colour(data, label, 1)
        return _orient_array(resize_rgb(full, target[1], target[0]), orientation)
    try:
        if image.format == "JPEG":
            image.draft(None, target)  # DCT scaling: decodes at 1/2, 1/4 or 1/8, still ≥ target
        image.load()
        if image.mode in ("RGB", "L", "RGBA", "LA"):  # PIL resizes these (alpha premultiplied), then convert small
            small = image.resize(target, Image.BILINEAR, reducing_gap=3.0) if image.size != target else image
            rgb = _to_rgb(small)
        else:  # palette, CMYK, 16/32-bit, float...: to RGB first (its own rules), then resize
            rgb = resize_rgb(_to_rgb(image), target[1], target[0])
    except _DECODE_ERRORS as err:
        raise TruncatedImageError(
            f"{label}: cannot decode image, the file is truncated or corrupt ({_reason(err)})"
        ) from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:  # pragma: no cover - defensive
        raise ImageError(f"{label}: unsupported pixel layout {rgb.shape} {rgb.dtype}")
    return _orient_array(rgb, orientation)


def _orient_array(rgb: np.ndarray, orientation: int) -> np.ndarray:
    transpose = _TRANSPOSE.get(orientation)
    if transpose is None:
        return np.ascontiguousarray(rgb)
    return np.ascontiguousarray(np.asarray(Image.fromarray(rgb).transpose(transpose)))


def load_image(source: str | Path | bytes, *, max_pixels: int, name: str | None = None) -> np.ndarray:
    """Decode an image file (path or bytes) into an RGB uint8 ``H × W × 3`` array at FULL resolution.

    For inspecting one image, prefer :func:`decode_image` (bounded memory, whatever the pixel count).

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
        raise TruncatedImageError(f"{label}: empty file (0 bytes)")
    image = _open_header(data, label, max_pixels)
    return _decode_full(image, data, label, _orientation(image))


def decode_image(
    source: str | Path | bytes,
    *,
    max_pixels: int,
    name: str | None = None,
    max_side: int = VIEW_MAX_SIDE,
    min_short_side: int = 0,
    min_view_pixels: int = 0,
    max_view_pixels: int = VIEW_MAX_PIXELS,
) -> DecodedImage:
    """Decode an image for inspection: reduced to :func:`view_size` when larger, with its original size.

    Same checks and errors as :func:`load_image`. Memory stays bounded by the reduced size for JPEGs (decoded
    at 1/2 to 1/8 scale), and by one decoded copy of the original for other formats (dropped right after
    reducing): 4 bytes per pixel for 8-bit RGB(A) PNG/TIFF/WebP, more for 16-bit colour.

    Args:
        source: a path, or the file's bytes.
        max_pixels: largest accepted ``width × height`` (checked from the header, before decoding).
        name: how to name the file in error messages.
        max_side: the reduced image keeps at least this longest side (the MLLM's and the display's need).
        min_short_side: ... and at least this shorter side (the expert's ``resize``).
        min_view_pixels: ... and at least this many pixels (the MLLM's per-image pixel budget).
        max_view_pixels: ... but at most this many pixels.

    Returns:
        A :class:`DecodedImage` (``pixels`` RGB uint8, ``original_size`` after EXIF orientation, ``sha256``).

    Raises:
        ImageError: as :func:`load_image`.

    Example:
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (4000, 3000), (9, 99, 199)).save(buffer, format="JPEG")
        >>> decoded = decode_image(buffer.getvalue(), max_pixels=64_000_000)
        >>> decoded.pixels.shape, decoded.original_size, decoded.reduced
        ((768, 1024, 3), (4000, 3000), True)
    """
    data, label = _read_source(source, name)
    if len(data) == 0:
        raise TruncatedImageError(f"{label}: empty file (0 bytes)")
    sha = image_sha256(data)
    image = _open_header(data, label, max_pixels)
    orientation = _orientation(image)
    stored_w, stored_h = image.size
    target_h, target_w = view_size(
        stored_h,
        stored_w,
        max_side=max_side,
        min_short_side=min_short_side,
        min_pixels=min_view_pixels,
        max_pixels=max_view_pixels,
    )
    original = _oriented_size((stored_w, stored_h), orientation)
    if (target_w, target_h) == (stored_w, stored_h):
        return DecodedImage(_decode_full(image, data, label, orientation), original, sha)
    return DecodedImage(_decode_reduced(image, data, label, orientation, (target_w, target_h)), original, sha)
