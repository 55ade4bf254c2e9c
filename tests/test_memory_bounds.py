"""Memory and time of one inspection must not depend on the image's pixel count.

Before the fix, a full-resolution float32 anomaly map, its mask and a float64 heatmap overlay were built for
every request (a 7900×7900 PNG raised the service's peak from 1.9 to 12.6 GB). These tests pin the behaviour
that scales: the expert keeps its map at crop resolution, boxes are found on a bounded grid and scaled back to
ORIGINAL pixels, large images are decoded reduced, pictures are rendered at a bounded view — and the numbers
that show it (numpy/Python allocations traced while inspecting a 36 MP JPEG, box coordinates of an image and of
the same image ×k). Peak RSS and time goals are measured by ``bench/inspect_memory.py``, not here.
"""

from __future__ import annotations

import io
import tracemalloc

import cv2
import numpy as np
import pytest
from PIL import Image

from eagle.images import VIEW_MAX_SIDE, DecodedImage, ImageError, decode_image, load_image, view_size
from expert.anomaly_map import anomaly_map, crop_anomaly_map, render_map
from expert.boxes import Box, box_grid_size, find_boxes, find_boxes_in_original
from expert.preprocess import compute_geometry
from tests.fixtures_pipeline import split_test_images
from tests.synthetic import add_defect, make_good_image

LIMIT = 64_000_000


def _defect_scores(height: int, width: int, kind: str, seed: int) -> tuple[np.ndarray, Box]:
    """Ideal patch scores of a synthetic defect (its share of each 8×8 cell of the crop) and its mask's box."""
    rng = np.random.default_rng(seed)
    _, mask = add_defect(make_good_image(height, width, rng), kind, rng)
    geometry = compute_geometry(height, width)
    resized = np.asarray(Image.fromarray(mask).resize((geometry.resized_w, geometry.resized_h), Image.BILINEAR))
    crop = resized[geometry.crop_top : geometry.crop_top + 224, geometry.crop_left : geometry.crop_left + 224]
    rows, cols = np.nonzero(mask)
    truth = Box(int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1, 0.0)
    return crop.astype(np.float32).reshape(28, 8, 28, 8).mean(axis=(1, 3)) / 255.0, truth


def _encode(image: np.ndarray | Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _scaled_iou(big: Box, small: Box, k: float) -> float:
    return big.iou(Box(round(small.x0 * k), round(small.y0 * k), round(small.x1 * k), round(small.y1 * k), 0.0))


# ------------------------------------------------------------------------------------------ maps and boxes
@pytest.mark.parametrize("height,width", [(224, 224), (240, 320), (300, 200), (480, 640), (1024, 768)])
def test_render_map_at_the_original_size_is_crop_to_original(height, width):
    geometry = compute_geometry(height, width)
    crop_map = np.random.default_rng(height).random((224, 224)).astype(np.float32)
    values, inspected = render_map(crop_map, geometry, height, width)
    expected, expected_mask = geometry.crop_to_original(crop_map)
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(inspected, expected_mask)


def test_render_map_on_a_reduced_grid_samples_the_same_map():
    geometry = compute_geometry(3000, 4000)
    crop_map = crop_anomaly_map(np.random.default_rng(0).random((28, 28)).astype(np.float32), (224, 224))
    small, small_mask = render_map(crop_map, geometry, 300, 400)
    # Cell (v, u) of the ×0.1 grid stands for original pixel (10v + 4.5, 10u + 4.5): compare with the exact
    # value there (the full map's bilinear interpolation between its pixels 10v+4 and 10v+5).
    full, full_mask = anomaly_map(np.zeros((28, 28), np.float32), geometry)  # only for the mask
    del full
    np.testing.assert_array_equal(small_mask, full_mask[5::10, 5::10])
    ys, xs = np.nonzero(small_mask)
    cx, cy = geometry.original_to_crop_xy(xs * 10 + 4.5, ys * 10 + 4.5)
    from scipy import ndimage

    exact = ndimage.map_coordinates(crop_map, [np.clip(cy, 0, 223), np.clip(cx, 0, 223)], order=1)
    np.testing.assert_allclose(small[ys, xs], exact, atol=1e-5)


@pytest.mark.parametrize(
    "height,width,kind,seed",
    [
        (224, 224, "hole", 0),
        (240, 320, "stain", 1),
        (300, 200, "scratch", 2),
        (480, 640, "hole", 3),
        (600, 800, "scratch", 5),
        (1024, 768, "stain", 6),
    ],  # fmt: skip
)
def test_boxes_from_the_crop_map_equal_full_resolution_boxes_up_to_1024_px(height, width, kind, seed):
    scores, truth = _defect_scores(height, width, kind, seed)
    geometry = compute_geometry(height, width)
    crop_map = crop_anomaly_map(scores, (224, 224))
    assert box_grid_size(height, width) == (height, width)
    assert find_boxes_in_original(crop_map, geometry) == find_boxes(*anomaly_map(scores, geometry))
    assert find_boxes_in_original(crop_map, geometry)[0].iou(truth) >= 0.5


@pytest.mark.parametrize("height,width,kind,seed", [(3000, 4000, "scratch", 2), (2400, 1800, "hole", 4)])
def test_boxes_on_a_large_image_stay_within_one_grid_cell_of_full_resolution_boxes(height, width, kind, seed):
    scores, truth = _defect_scores(height, width, kind, seed)
    geometry = compute_geometry(height, width)
    exact = find_boxes(*anomaly_map(scores, geometry))  # the old way: full-size float maps (48 MB here)
    bounded = find_boxes_in_original(crop_anomaly_map(scores, (224, 224)), geometry)
    cell = max(height, width) / box_grid_size(height, width)[1 if width >= height else 0]
    assert len(bounded) == len(exact) >= 1
    for got, want in zip(bounded, exact, strict=True):
        for a, b in ((got.x0, want.x0), (got.y0, want.y0), (got.x1, want.x1), (got.y1, want.y1)):
            assert abs(a - b) <= cell + 1, (got, want)
        assert got.peak == pytest.approx(want.peak, rel=1e-2)  # the peak of a sampled smooth map
    assert bounded[0].iou(truth) >= 0.5  # the thin scratch is still boxed


@pytest.mark.parametrize("k", [4, 10])
def test_box_coordinates_of_an_image_times_k_are_its_boxes_times_k(k):
    scores, _ = _defect_scores(300, 400, "scratch", 2)
    crop_map = crop_anomaly_map(scores, (224, 224))
    small = find_boxes_in_original(crop_map, compute_geometry(300, 400))
    big = find_boxes_in_original(crop_map, compute_geometry(300 * k, 400 * k))
    assert len(small) == len(big) >= 1
    for b, s in zip(big, small, strict=True):
        for a, expected in ((b.x0, s.x0 * k), (b.y0, s.y0 * k), (b.x1, s.x1 * k), (b.y1, s.y1 * k)):
            assert abs(a - expected) <= k + 1, (b, s)


# ------------------------------------------------------------------------------------------------ decoding
def test_small_images_decode_exactly_as_load_image():
    rgb = make_good_image(240, 320, np.random.default_rng(0))
    data = _encode(rgb, "PNG")
    decoded = decode_image(data, max_pixels=LIMIT, min_short_side=256)
    assert not decoded.reduced and decoded.original_size == (320, 240)
    np.testing.assert_array_equal(decoded.pixels, load_image(data, max_pixels=LIMIT))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_images_decode_reduced_with_their_original_size(fmt):
    rgb = cv2.resize(make_good_image(300, 400, np.random.default_rng(1)), (4000, 3000), interpolation=cv2.INTER_LINEAR)
    data = _encode(rgb, fmt, **({"quality": 95} if fmt == "JPEG" else {"compress_level": 1}))
    decoded = decode_image(data, max_pixels=LIMIT, min_short_side=256)
    assert decoded.reduced and decoded.original_size == (4000, 3000)
    assert decoded.pixels.shape == (768, 1024, 3) and decoded.pixels.dtype == np.uint8
    reference = cv2.resize(rgb, (1024, 768), interpolation=cv2.INTER_AREA)
    assert np.abs(decoded.pixels.astype(int) - reference).mean() < 2.0


def test_exif_orientation_is_applied_and_the_original_size_is_the_upright_one():
    rgb = np.zeros((3000, 4000, 3), np.uint8)
    rgb[:1500, :2000] = (255, 0, 0)  # stored: top-left quarter red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = _encode(rgb, "JPEG", quality=90, exif=exif)
    decoded = decode_image(data, max_pixels=LIMIT)
    assert decoded.original_size == (3000, 4000) and decoded.pixels.shape == (1024, 768, 3)
    full = load_image(data, max_pixels=LIMIT)  # the upright original
    reference = cv2.resize(full, (768, 1024), interpolation=cv2.INTER_AREA)
    assert np.abs(decoded.pixels.astype(int) - reference).mean() < 2.0


def test_transparent_palette_and_extreme_aspect_images_decode_reduced():
    rgba = np.zeros((2000, 3000, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :1500, 3] = 255  # left half opaque red, right half transparent → white
    decoded = decode_image(_encode(rgba, "PNG"), max_pixels=LIMIT)
    assert decoded.pixels.shape == (683, 1024, 3)
    assert (decoded.pixels[:, :500] == (200, 0, 0)).all() and (decoded.pixels[:, -500:] == 255).all()
    palette = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.ADAPTIVE, colors=4)
    assert palette.mode == "P"
    assert decode_image(_encode(palette, "PNG"), max_pixels=LIMIT).pixels.shape == (683, 1024, 3)
    strip = decode_image(_encode(np.full((300, 8000, 3), 90, np.uint8), "PNG"), max_pixels=LIMIT, min_short_side=256)
    assert strip.pixels.shape == (256, 6827, 3) and strip.original_size == (8000, 300)
    assert (strip.pixels == 90).all()
    # Extreme aspect ratios stay bounded in pixels too.
    assert view_size(2, 32_000_000) == (2, 1024)
    assert np.prod(view_size(2, 32_000_000, min_short_side=256)) <= 4_194_304


def test_reduced_decoding_keeps_the_errors_of_load_image():
    data = _encode(np.full((3000, 4000, 3), 128, np.uint8), "JPEG")
    with pytest.raises(ImageError, match="more than the limit"):
        decode_image(data, max_pixels=1_000_000, name="big.jpg")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 3] + b"\0" * 16, max_pixels=LIMIT, name="cut.jpg")


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def defect_image(built_pipeline, synthetic_root) -> np.ndarray:
    """The synthetic defective test image the expert scores highest (clearly anomalous, boxes expected)."""
    pipeline = built_pipeline.pipeline
    _, bad = split_test_images(synthetic_root)
    scored = [(pipeline.inspect(p, "widget").score, p) for p in bad]
    best = max(scored)[1]
    return load_image(best, max_pixels=LIMIT)


@pytest.mark.slow
def test_boxes_of_a_large_image_are_its_downscaled_boxes_times_k(built_pipeline, defect_image):
    pipeline = built_pipeline.pipeline
    k = 10
    height, width = defect_image.shape[:2]
    small = pipeline.inspect(_encode(defect_image, "PNG"), "widget", image_name="small.png")
    big_pixels = np.asarray(Image.fromarray(defect_image).resize((width * k, height * k), Image.BILINEAR))
    big = pipeline.inspect(_encode(big_pixels, "JPEG", quality=95), "widget", image_name="big.jpg")
    del big_pixels
    assert small.expert_decision == big.expert_decision == "anomalous"
    assert big.image_size == (width * k, height * k)
    assert big.inspected_region == tuple(v * k for v in small.inspected_region)
    assert len(big.boxes) >= 1 and len(small.boxes) >= 1
    box = lambda b: Box(b.x0, b.y0, b.x1, b.y1, b.peak)  # noqa: E731
    assert _scaled_iou(box(big.boxes[0]), box(small.boxes[0]), k) >= 0.7
    for b in big.boxes:
        assert 0 <= b.x0 < b.x1 <= width * k and 0 <= b.y0 < b.y1 <= height * k
    assert big.score == pytest.approx(small.score, rel=0.15)
    overlay, boxed = big.images.heatmap_overlay, big.images.boxed
    assert max(overlay.shape[:2]) == VIEW_MAX_SIDE and boxed.shape == overlay.shape
    assert np.all(boxed == (255, 0, 0), axis=2).any()  # the boxes are drawn on the bounded view


@pytest.mark.slow
def test_inspecting_a_36_megapixel_jpeg_allocates_bounded_memory(built_pipeline, defect_image):
    """Traced (numpy and Python) allocations of one inspection + annotated PNG stay far below ONE RGB copy."""
    from eagle.annotate import annotated_png_base64
    from expert.scorer import load_expert

    pipeline = built_pipeline.pipeline
    side = 6000
    big = cv2.resize(defect_image, (side, side), interpolation=cv2.INTER_LINEAR)
    data = _encode(big, "JPEG", quality=90)
    del big
    one_rgb_copy_mb = side * side * 3 / 2**20  # 103 MB; the old float64 overlay alone was 8× that
    pipeline.inspect(_encode(defect_image, "PNG"), "widget")  # warm: bank, ONNX session, faiss
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        result = pipeline.inspect(data, "widget", image_name="big.jpg")
        png = annotated_png_base64(result)
        peak_mb = (tracemalloc.get_traced_memory()[1] - baseline) / 2**20
    finally:
        tracemalloc.stop()
    assert result.image_size == (side, side) and png
    assert result.boxes and all(b.x1 <= side and b.y1 <= side for b in result.boxes)
    assert peak_mb < 64, f"one inspection of a {side}×{side} JPEG traced {peak_mb:.0f} MB (one RGB copy: 103 MB)"
    assert peak_mb < one_rgb_copy_mb / 1.5

    # `eagle score`'s path: decode reduced, score with the original size.
    scorer = load_expert(pipeline.banks.path("widget"), pipeline.settings.expert)
    tracemalloc.start()
    try:
        decoded = decode_image(data, max_pixels=LIMIT, min_short_side=256)
        scored = scorer.score(decoded.pixels, original_size=decoded.original_size)
        score_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert scored.original_size == (side, side) and scored.crop_map.shape == (224, 224)
    assert score_peak_mb < 48
    assert [(b.x0, b.y0, b.x1, b.y1) for b in scored.boxes] == [(b.x0, b.y0, b.x1, b.y1) for b in result.boxes]


def test_decoded_image_of_an_array_is_not_reduced():
    pixels = np.zeros((5, 7, 3), np.uint8)
    assert DecodedImage.of(pixels).original_size == (7, 5) and not DecodedImage.of(pixels).reduced
