"""The inspection mask: which patches of the grid a bank inspects (a region of interest).

A mask is given in ORIGINAL-image pixels, drawn over (or sized like) a reference image:

* a binary PNG (:func:`read_mask_png`): a pixel is inside iff it is opaque (alpha ≥ 128, when the PNG has an alpha
  channel that is not fully opaque) and bright (luminance ≥ 128); white = inspected, black or transparent = ignored.
  A PNG that is not black-and-white (grey levels, colours, half-transparent pixels) is read by the same rule; it
  is not refused, but the rule is logged and appended to the mask's description (:func:`png_reading_note`), so
  ``bank show`` says how it was read;
* polygons (:func:`parse_polygons`): JSON ``{"width": W, "height": H, "polygons": [[[x, y], ...], ...]}`` (or a
  bare list of polygons, sized like the first reference image), vertices in original pixel coordinates, pixel
  ``(x, y)`` being the one whose top-left corner is at ``(x, y)``; filled with PIL's ``ImageDraw.polygon``
  (outline pixels included), the union of all polygons is inside; at most :data:`MAX_POLYGON_POINTS` vertices in
  all.

The pixel mask is then mapped to the patch grid (:func:`to_grid`) through the exact resize + crop the expert uses
(:mod:`expert.preprocess`): **a patch counts iff the original pixel under its centre is inside**. Patch ``(r, c)``
is centred at crop pixel ``(stride·c, stride·r)`` (stride = crop / grid = 8 px), the same place the anomaly map
puts its value (:mod:`expert.anomaly_map`); that point is mapped back with
:meth:`~expert.preprocess.Geometry.crop_to_original_xy` and the pixel containing it decides. The grid mask is
what the bank stores (``inspection_mask`` in ``bank.safetensors``, docs/bank-format.md): it must be the grid's
shape and not empty. Because it lives on the grid, every query is masked at the same patches, whatever its size
(PatchCore already assumes the parts are framed like the references).

Patches outside the mask never count: not in the memory bank, not in the DBT training scores (so τ is what the
same mask gives), not in a query's image score, map or boxes (:mod:`expert.build`, :mod:`expert.scorer`).

Example:
    >>> import numpy as np
    >>> pixels = np.zeros((224, 224), bool)
    >>> pixels[:, :112] = True                        # left half of a 224 × 224 image
    >>> grid = to_grid(pixels, resize=224, crop=224, center_crop=False, grid=(28, 28))
    >>> int(grid.sum()), bool(grid[0, 13]), bool(grid[0, 14])
    (392, True, False)
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from expert.errors import ExpertError
from expert.preprocess import compute_geometry

MASK_RULE = "patch_centre"
"""How the pixel mask becomes the grid mask: the pixel under each patch centre decides (see the module docstring)."""
MAX_MASK_PIXELS = 100_000_000
"""Largest mask (PNG or polygon canvas) accepted, in pixels."""
MAX_POLYGON_POINTS = 100_000
"""Most vertices a polygons mask may have, all polygons together (a larger outline belongs in a PNG mask)."""
INSIDE_RULE = "inspected where luminance >= 128 and, in a PNG with transparency, alpha >= 128"
"""How every mask picture is read, in words (see the module docstring)."""

log = logging.getLogger(__name__)


class MaskError(ExpertError, ValueError):
    """An inspection mask cannot be read or is not valid (one-line message)."""

    code = "invalid_mask"


def read_mask_png(source: bytes | str | Path, *, name: str = "mask") -> np.ndarray:
    """Read a binary mask PNG into a bool ``H × W`` array (True = inspected; the rule: :data:`INSIDE_RULE`).

    Raises:
        MaskError: empty or unreadable file, or nothing inside.
    """
    return pixels_from_rgba(read_mask_rgba(source, name=name), name=name)


def read_mask_rgba(source: bytes | str | Path, *, name: str = "mask") -> np.ndarray:
    """The mask picture as RGBA uint8 ``H × W × 4``, before the inside rule is applied.

    Raises:
        MaskError: the file cannot be read, is empty, is not an image, or has more than :data:`MAX_MASK_PIXELS`.
    """
    try:
        data = Path(source).read_bytes() if isinstance(source, str | Path) else bytes(source)
    except OSError as err:
        raise MaskError(f"{name}: cannot read mask file ({err.strerror or type(err).__name__})") from None
    if not data:
        raise MaskError(f"{name}: the mask file is empty (0 bytes); expected a PNG, white = inspected, black = ignored")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_MASK_PIXELS:
                raise MaskError(
                    f"{name}: mask of {image.width}×{image.height} pixels is too large "
                    f"(at most {MAX_MASK_PIXELS:,} pixels)"
                )
            return np.asarray(image.convert("RGBA"))
    except Image.DecompressionBombError:
        raise MaskError(f"{name}: the mask image is too large (at most {MAX_MASK_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise MaskError(
            f"{name}: not a readable image (not a PNG or another image format); {len(data)} bytes"
        ) from None
    except OSError:  # truncated or damaged image data
        raise MaskError(f"{name}: not a readable image (the image data is truncated or damaged)") from None


def png_reading_note(rgba: np.ndarray) -> str | None:
    """How a mask picture that is not black-and-white was read, in one phrase; ``None`` for a black-and-white one.

    Black-and-white: every pixel is pure black or pure white (0 or 255 in all three channels) and fully opaque, or
    fully transparent. Anything else (anti-aliased edges, a grey-level or colour picture, half-transparent
    strokes) is read by :data:`INSIDE_RULE` and this note says so.
    """
    array = np.asarray(rgba)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    colours = array[..., :3]
    odd = ~(((colours == 0) | (colours == 255)).all(axis=2) & (colours == colours[..., :1]).all(axis=2))
    if array.shape[2] == 4:  # a fully transparent pixel is ignored whatever its colour
        odd = (odd & (array[..., 3] > 0)) | ((array[..., 3] > 0) & (array[..., 3] < 255))
    count = int(odd.sum())
    if count == 0:
        return None
    share = 100.0 * count / odd.size
    kinds = "grey, coloured or half-transparent"
    return f"not black-and-white: {share:.3g} % of its pixels are {kinds}; read as {INSIDE_RULE}"


def pixels_from_rgba(rgba: np.ndarray, *, name: str = "mask") -> np.ndarray:
    """Inside pixels of an RGBA (or RGB / grey) uint8 picture: opaque and bright (module docstring)."""
    array = np.asarray(rgba)
    if array.ndim == 2:
        inside = array >= 128
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        grey = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        inside = grey >= 128
        if array.shape[2] == 4 and (array[..., 3] < 255).any():
            inside &= array[..., 3] >= 128
    else:
        raise MaskError(f"{name}: expected a grey, RGB or RGBA picture, got shape {array.shape}")
    if not inside.any():
        raise MaskError(f"{name}: the mask is empty (no white pixel: white = inspected, black = ignored)")
    return inside


def parse_polygons(
    spec: str | bytes | dict[str, Any] | list[Any], *, default_size: tuple[int, int] | None = None
) -> tuple[list[list[tuple[float, float]]], tuple[int, int]]:
    """Validate a polygons spec: ``(polygons, (width, height))``.

    Args:
        spec: JSON text or the decoded object: ``{"width", "height", "polygons"}`` or a bare list of polygons.
        default_size: ``(width, height)`` used when the spec gives none (the first reference image's size).

    Raises:
        MaskError: malformed JSON, a polygon with fewer than 3 points, non-numeric coordinates, no size, or more
            than :data:`MAX_POLYGON_POINTS` points.
    """
    if isinstance(spec, str | bytes):
        if not spec.strip():
            raise MaskError("mask polygons: the polygons JSON is empty")
        try:
            spec = json.loads(spec)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MaskError(f"mask polygons: not valid JSON ({err})") from None
    if isinstance(spec, list):
        spec = {"polygons": spec}
    if not isinstance(spec, dict) or "polygons" not in spec:
        raise MaskError('mask polygons: expected {"width": W, "height": H, "polygons": [[[x, y], ...], ...]}')
    unknown = set(spec) - {"width", "height", "polygons"}
    if unknown:
        count = f"{len(unknown)} unknown key" + ("s" if len(unknown) > 1 else "")
        raise MaskError(f"mask polygons: {count}; the accepted keys are width, height and polygons")
    if ("width" in spec) != ("height" in spec):
        raise MaskError("mask polygons: give both width and height, or neither")
    if "width" in spec:
        size = (spec["width"], spec["height"])
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
            got = ", ".join(_kind_of(v) for v in size)
            raise MaskError(f"mask polygons: width and height must be positive integers (got {got})")
    elif default_size is not None:
        size = default_size
    else:
        raise MaskError("mask polygons: width and height are required (the image size the polygons are drawn on)")
    if size[0] * size[1] > MAX_MASK_PIXELS:
        raise MaskError(f"mask polygons: canvas of {size[0]}×{size[1]} pixels is too large")
    raw = spec["polygons"]
    if not isinstance(raw, list) or not raw:
        raise MaskError("mask polygons: 'polygons' must be a non-empty list of polygons")
    points_given = sum(len(polygon) for polygon in raw if isinstance(polygon, list))
    if points_given > MAX_POLYGON_POINTS:
        raise MaskError(
            f"mask polygons: {points_given:,} points, more than the {MAX_POLYGON_POINTS:,} accepted; "
            "simplify the outline (a few hundred points draw any region at patch precision) or send the mask as a PNG"
        )
    polygons = []
    for i, polygon in enumerate(raw):
        if not isinstance(polygon, list) or len(polygon) < 3:
            raise MaskError(f"mask polygons: polygon {i} needs at least 3 [x, y] points")
        points = []
        for j, point in enumerate(polygon):
            ok = isinstance(point, list | tuple) and len(point) == 2
            ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in point)
            if not ok:
                raise MaskError(
                    f"mask polygons: polygon {i}, point {j} is not [x, y] finite numbers (got {_kind_of(point)})"
                )
            points.append((float(point[0]), float(point[1])))
        polygons.append(points)
    return polygons, (int(size[0]), int(size[1]))


def _kind_of(value: Any) -> str:
    """What kind of JSON value ``value`` is, in words, never the value itself (messages must not echo input)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        if not np.isfinite(value):
            return "a non-finite number"
        if value < 0:
            return "a negative number"
        if value == 0:
            return "zero"
        return "a number" if float(value).is_integer() else "a fractional number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        if len(value) == 2 and not any(isinstance(v, list | tuple | dict) for v in value):
            return f"[{_kind_of(value[0])}, {_kind_of(value[1])}]"
        return f"a list of {len(value)} item" + ("" if len(value) == 1 else "s")
    if isinstance(value, dict):
        return "an object"
    return "a value of another kind"


def rasterise_polygons(polygons: Sequence[Sequence[tuple[float, float]]], width: int, height: int) -> np.ndarray:
    """Bool ``height × width`` mask: the union of the filled polygons (PIL ``ImageDraw.polygon``, outline included).

    Raises:
        MaskError: the polygons cover no pixel of the image.
    """
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        draw.polygon([tuple(p) for p in polygon], fill=255, outline=255)
    inside = np.asarray(canvas) > 0
    if not inside.any():
        raise MaskError(f"mask polygons: the polygons cover no pixel of the {width}×{height} image")
    return inside


def to_grid(pixels: np.ndarray, *, resize: int, crop: int, center_crop: bool, grid: tuple[int, int]) -> np.ndarray:
    """Map an ORIGINAL-size pixel mask to the patch grid: a patch counts iff the pixel under its centre is inside.

    Args:
        pixels: bool ``H × W`` mask in original image pixels.
        resize: the expert's ``resize``.
        crop: the expert's ``crop``.
        center_crop: the expert's ``center_crop``.
        grid: ``(grid_h, grid_w)`` of the patch grid.

    Returns:
        bool ``grid_h × grid_w`` mask.

    Raises:
        MaskError: the pixel mask is not 2-D, or no patch centre falls inside it.
    """
    pixels = np.asarray(pixels, dtype=bool)
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise MaskError(f"mask must be a non-empty 2-D picture, got shape {pixels.shape}")
    height, width = pixels.shape
    geometry = compute_geometry(height, width, resize=resize, crop=crop, center_crop=center_crop)
    stride_y, stride_x = geometry.crop_h / grid[0], geometry.crop_w / grid[1]
    out = np.zeros(grid, dtype=bool)
    for r in range(grid[0]):
        for c in range(grid[1]):
            ox, oy = geometry.crop_to_original_xy(c * stride_x, r * stride_y)
            px = min(max(int(np.floor(ox + 0.5)), 0), width - 1)
            py = min(max(int(np.floor(oy + 0.5)), 0), height - 1)
            out[r, c] = pixels[py, px]
    if not out.any():
        raise MaskError(
            f"the inspection mask covers no patch centre of the {grid[0]}×{grid[1]} grid "
            "(too small, or outside the inspected crop): draw a larger region"
        )
    return out


def check_grid_mask(mask: np.ndarray, grid: tuple[int, int], *, where: str = "inspection mask") -> np.ndarray:
    """Validate a grid mask (shape = grid, 0/1 or bool values, not empty); return it as bool.

    Raises:
        MaskError: wrong shape, values other than 0/1, or empty.
    """
    array = np.asarray(mask)
    if array.shape != tuple(grid):
        raise MaskError(f"{where}: shape {array.shape} differs from the patch grid {tuple(grid)}")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise MaskError(f"{where}: values must be 0 or 1")
    array = array.astype(bool)
    if not array.any():
        raise MaskError(f"{where}: the mask is empty (no patch is inspected)")
    return array


def crop_mask(grid_mask: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
    """The grid mask at crop resolution: each crop pixel takes the patch whose centre (``stride·j``) is nearest."""
    grid = np.asarray(grid_mask, dtype=bool)
    rows = np.clip(np.floor(np.arange(crop_size[0]) * grid.shape[0] / crop_size[0] + 0.5), 0, grid.shape[0] - 1)
    cols = np.clip(np.floor(np.arange(crop_size[1]) * grid.shape[1] / crop_size[1] + 0.5), 0, grid.shape[1] - 1)
    result: np.ndarray = grid[rows.astype(int)[:, None], cols.astype(int)[None, :]]
    return result


def grid_mask_from_source(
    source: Any,
    *,
    resize: int,
    crop: int,
    center_crop: bool,
    grid: tuple[int, int],
    default_size: tuple[int, int] | None = None,
    name: str = "mask",
) -> tuple[np.ndarray, str]:
    """Any supported mask source → ``(grid mask, description)``.

    ``source``: a path (``.png`` image or ``.json`` polygons), PNG bytes, a bool/0-1 ``H × W`` array of original
    pixels, or a polygons dict / list. ``default_size`` (``(width, height)``) sizes polygons that give no size.

    Raises:
        MaskError: unreadable or invalid mask.
    """
    note: str | None = None  # how a picture that is not black-and-white was read
    if isinstance(source, str | Path):
        path = Path(source)
        if path.suffix.lower() == ".json":
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as err:
                raise MaskError(
                    f"{path.name}: cannot read mask polygons ({err.strerror or type(err).__name__})"
                ) from None
            except UnicodeDecodeError:
                raise MaskError(f"{path.name}: the mask polygons file is not UTF-8 text") from None
            polygons, (width, height) = parse_polygons(text, default_size=default_size)
            pixels, description = rasterise_polygons(polygons, width, height), f"polygons:{path.name}"
        else:
            rgba = read_mask_rgba(path, name=path.name)
            pixels, note, description = (
                pixels_from_rgba(rgba, name=path.name),
                png_reading_note(rgba),
                f"png:{path.name}",
            )
    elif isinstance(source, bytes | bytearray):
        rgba = read_mask_rgba(bytes(source), name=name)
        pixels, note, description = pixels_from_rgba(rgba, name=name), png_reading_note(rgba), f"png:{name}"
    elif isinstance(source, dict | list):
        polygons, (width, height) = parse_polygons(source, default_size=default_size)
        pixels = rasterise_polygons(polygons, width, height)
        description = f"polygons:{len(polygons)}"
    elif isinstance(source, np.ndarray):
        if source.ndim == 3:
            pixels, note = pixels_from_rgba(source, name=name), png_reading_note(source)
        else:
            pixels = np.asarray(source).astype(bool)
            if not pixels.any():
                raise MaskError(f"{name}: the mask is empty")
        description = f"array:{name}"
    else:
        raise MaskError(f"{name}: unsupported mask source {type(source).__name__}")
    grid_mask = to_grid(pixels, resize=resize, crop=crop, center_crop=center_crop, grid=grid)
    description = f"{description} {pixels.shape[1]}x{pixels.shape[0]}"
    if note is not None:
        log.warning("inspection mask %s is %s", description, note)
        description = f"{description}; {note}"
    return grid_mask, description
