"""Boxes from anomaly maps (the visual prompt, expert/boxes.py), drawing in pure red, and the heatmap overlay."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from expert.anomaly_map import anomaly_map
from expert.boxes import Box, binarise, draw_boxes, find_boxes, heatmap_overlay, line_width, merge_boxes, should_merge
from expert.preprocess import compute_geometry
from tests.synthetic import add_defect, make_good_image


def gaussian_blob(shape, centre_xy, sigma, peak=1.0):
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (peak * np.exp(-((xs - centre_xy[0]) ** 2 + (ys - centre_xy[1]) ** 2) / (2 * sigma**2))).astype(np.float32)


def mask_box(mask: np.ndarray) -> Box:
    rows, cols = np.nonzero(mask)
    return Box(int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1, 0.0)


# ----------------------------------------------------------------------------- finding


def test_two_blobs_give_two_boxes_at_the_two_thirds_level_set():
    shape = (200, 300)
    amap = gaussian_blob(shape, (70, 60), 8.0, peak=2.0) + gaussian_blob(shape, (220, 140), 10.0, peak=1.8)
    boxes = find_boxes(amap)
    assert len(boxes) == 2
    first, second = boxes
    assert first.peak == pytest.approx(2.0, rel=1e-4) and second.peak == pytest.approx(1.8, rel=1e-3)
    # Threshold 2/3 of the global max (2.0): blob 1 passes where 2 exp(-r²/2σ²) >= 4/3.
    for box, (cx, cy), sigma, peak in ((first, (70, 60), 8.0, 2.0), (second, (220, 140), 10.0, 1.8)):
        radius = sigma * np.sqrt(2 * np.log(peak / (2.0 * 2 / 3)))
        assert box.centre == pytest.approx((cx + 0.5, cy + 0.5), abs=1.0)
        assert box.x1 - box.x0 == pytest.approx(2 * radius, abs=2.0)
        assert box.y1 - box.y0 == pytest.approx(2 * radius, abs=2.0)


def test_box_is_exclusive_and_exact_for_a_rectangle():
    amap = np.zeros((100, 150), np.float32)
    amap[20:40, 30:60] = 1.0
    assert find_boxes(amap) == [Box(30, 20, 60, 40, 1.0)]


def test_diffuse_map_is_binarised_at_the_median():
    amap = np.tile(np.linspace(0.7, 1.0, 100, dtype=np.float32), (50, 1))  # every pixel >= 2/3 of the max
    binary = binarise(amap, np.ones(amap.shape, bool))
    median = np.median(amap / amap.max())
    assert np.array_equal(binary > 0, amap / amap.max() > median)
    assert (binary > 0).sum() == 50 * 50
    assert find_boxes(amap) == [Box(50, 0, 100, 50, 1.0)]


def test_flat_or_empty_maps_give_no_boxes():
    assert find_boxes(np.zeros((40, 40), np.float32)) == []
    assert find_boxes(np.full((40, 40), 3.0, np.float32)) == []  # median rule: nothing strictly above
    assert find_boxes(np.ones((40, 40), np.float32), np.zeros((40, 40), bool)) == []


def test_small_regions_are_dropped_at_one_permille_of_the_image_area():
    amap = np.zeros((100, 100), np.float32)  # 0.1 % of the area = 10 pixels
    amap[10:13, 10:15] = 1.0  # contour area (polygon) 2×4 = 8 <= 10: dropped
    amap[50:54, 50:55] = 1.0  # contour area 3×4 = 12 > 10: kept
    assert find_boxes(amap) == [Box(50, 50, 55, 54, 1.0)]


def test_uninspected_pixels_are_ignored():
    amap = gaussian_blob((100, 200), (20, 50), 6.0, peak=5.0) + gaussian_blob((100, 200), (120, 50), 6.0)
    valid = np.zeros(amap.shape, bool)
    valid[:, 60:] = True
    boxes = find_boxes(amap, valid)
    assert len(boxes) == 1 and boxes[0].x0 >= 60
    assert boxes[0].peak == pytest.approx(float(amap[valid].max()))


def test_keeps_the_top_boxes_by_peak():
    shape = (100, 400)
    peaks = [1.0, 0.9, 0.95, 0.8, 0.85]
    amap = sum(gaussian_blob(shape, (40 + 80 * i, 50), 8.0, peak=p) for i, p in enumerate(peaks))
    boxes = find_boxes(amap, max_boxes=3)
    assert [round(b.peak, 2) for b in boxes] == [1.0, 0.95, 0.9]
    assert [b.centre[0] for b in boxes] == [40.5, 200.5, 120.5]
    assert len(find_boxes(amap, max_boxes=5)) == 5


def test_merge_rules():
    a = Box(0, 0, 10, 10, 1.0)
    assert a.iou(Box(0, 0, 10, 10, 0.5)) == 1.0
    assert a.iou(Box(20, 20, 30, 30, 0.5)) == 0.0
    assert should_merge(a, Box(3, 0, 13, 10, 0.5))  # IoU 7/13 > 0.3
    assert not should_merge(a, Box(8, 0, 18, 10, 0.5))  # IoU 2/18, centres 8 apart >= 0.5·√200 ≈ 7.07
    assert should_merge(a, Box(6, 0, 16, 10, 0.5))  # IoU 4/16 = 0.25 but centres 6 apart < 7.07
    assert should_merge(a, Box(5, 0, 15, 10, 0.5))  # IoU 1/3 > 0.3
    assert should_merge(Box(0, 0, 40, 40, 1.0), Box(15, 15, 21, 21, 0.2))  # contained: IoU 36/1600 but centres 2 apart
    assert not should_merge(Box(0, 0, 40, 40, 1.0), Box(41, 0, 45, 4, 0.2))
    merged = merge_boxes([Box(0, 0, 10, 10, 0.5), Box(3, 0, 13, 10, 0.9), Box(50, 50, 60, 60, 0.7)])
    assert merged == [Box(0, 0, 13, 10, 0.9), Box(50, 50, 60, 60, 0.7)]


def test_merging_repeats_until_stable():
    # c only touches the union of a and b, not a or b alone.
    boxes = [Box(0, 0, 10, 10, 1.0), Box(6, 0, 16, 10, 0.9), Box(9, 0, 19, 10, 0.8)]
    assert merge_boxes(boxes) == [Box(0, 0, 19, 10, 1.0)]


@pytest.mark.parametrize(
    "height,width,kind,seed",
    [
        (224, 224, "hole", 0),
        (240, 320, "stain", 1),
        (300, 200, "scratch", 2),
        (480, 640, "hole", 3),
        (300, 200, "hole", 4),
    ],
)
def test_boxes_overlap_a_known_defect_in_original_coordinates(height, width, kind, seed):
    # Ideal patch scores (the defect's share of each 8×8 cell of the crop) through the full geometry chain.
    rng = np.random.default_rng(seed)
    _, mask = add_defect(make_good_image(height, width, rng), kind, rng)
    geometry = compute_geometry(height, width)
    resized = np.asarray(Image.fromarray(mask).resize((geometry.resized_w, geometry.resized_h), Image.BILINEAR))
    crop = resized[geometry.crop_top : geometry.crop_top + 224, geometry.crop_left : geometry.crop_left + 224]
    scores = crop.astype(np.float32).reshape(28, 8, 28, 8).mean(axis=(1, 3)) / 255.0
    amap, valid = anomaly_map(scores, geometry)
    boxes = find_boxes(amap, valid)
    assert len(boxes) >= 1
    assert boxes[0].iou(mask_box(mask)) >= 0.5


@pytest.mark.slow
def test_real_random_backbone_boxes_find_the_synthetic_defects(synthetic_root, patch_embedder):
    """A few synthetic images through the real embedder and a brute-force nearest-neighbour search."""
    from expert.embedder import TorchEmbedder, embed_images

    category = synthetic_root / "widget"
    load = lambda path: np.asarray(Image.open(path).convert("RGB"))  # noqa: E731
    embedder = TorchEmbedder(patch_embedder)
    train, _ = embed_images(embedder, [load(p) for p in sorted((category / "train" / "good").glob("*.png"))[:4]])
    bank = train.reshape(-1, train.shape[-1]).astype(np.float64)
    tests = [("hole", "000"), ("stain", "001"), ("scratch", "002")]  # 224×224, 240×320, 300×200
    features, geometries = embed_images(embedder, [load(category / "test" / k / f"{n}.png") for k, n in tests])
    for (kind, name), patches, geometry in zip(tests, features, geometries, strict=True):
        p = patches.astype(np.float64)
        distances = (p**2).sum(1)[:, None] - 2 * p @ bank.T + (bank**2).sum(1)[None, :]
        amap, valid = anomaly_map(distances.min(axis=1).reshape(28, 28).astype(np.float32), geometry)
        truth = mask_box(np.asarray(Image.open(category / "ground_truth" / kind / f"{name}_mask.png")) > 0)
        box = find_boxes(amap, valid)[0]
        cx, cy = box.centre
        assert truth.x0 <= cx <= truth.x1 and truth.y0 <= cy <= truth.y1, (kind, box, truth)
        # Measured 0.41-0.66 with random weights (PatchCore's map is blurred and sits ~3.5 crop px right/down).
        assert box.iou(truth) >= 0.35, (kind, box, truth)


# ----------------------------------------------------------------------------- drawing


@pytest.mark.parametrize("height,width", [(224, 224), (768, 1024), (3000, 2000)])
def test_line_width_scales_with_the_image(height, width):
    assert line_width(height, width) == max(2, round(0.006 * max(height, width)))


@pytest.mark.parametrize("height,width", [(224, 224), (480, 640), (1200, 900)])
def test_boxes_are_drawn_pure_red_just_outside_the_box(height, width):
    image = np.full((height, width, 3), 100, np.uint8)
    box = Box(width // 4, height // 3, width // 2, height // 2, 1.0)
    drawn = draw_boxes(image, [box])
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert np.array_equal(image, np.full((height, width, 3), 100, np.uint8))  # input untouched
    t = line_width(height, width)
    red = np.all(drawn == (255, 0, 0), axis=2)
    changed = np.any(drawn != image, axis=2)
    assert np.array_equal(red, changed)  # every changed pixel is exactly pure red
    expected = np.zeros((height, width), bool)
    expected[box.y0 - t : box.y1 + t, box.x0 - t : box.x1 + t] = True
    expected[box.y0 : box.y1, box.x0 : box.x1] = False
    assert np.array_equal(red, expected)


def test_frame_moves_inside_at_the_image_border():
    image = np.zeros((100, 100, 3), np.uint8)
    drawn = draw_boxes(image, [Box(0, 0, 30, 30, 1.0)])
    red = np.all(drawn == (255, 0, 0), axis=2)
    t = line_width(100, 100)
    assert red[0, : 30 + t].all() and red[: 30 + t, 0].all()  # top and left edges visible inside the image
    assert red[t:30, t:30].sum() == 0 and red[30 + t :, :].sum() == 0


# ----------------------------------------------------------------------------- heatmap


def test_heatmap_overlay_blends_jet_and_hatches_the_uninspected_border():
    geometry = compute_geometry(240, 320)
    scores = np.zeros((28, 28), np.float32)
    scores[14, 14] = 1.0
    amap, valid = anomaly_map(scores, geometry)
    image = make_good_image(240, 320, np.random.default_rng(0))
    overlay = heatmap_overlay(image, amap, valid)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    y, x = np.unravel_index(np.argmax(amap), amap.shape)
    jet_max = cv2.applyColorMap(np.array([[255]], np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1]  # RGB (128, 0, 0)
    np.testing.assert_allclose(overlay[y, x], np.rint(0.5 * image[y, x] + 0.5 * jet_max), atol=1)
    border = overlay[~valid].astype(int)
    assert (np.abs(border[:, 0] - border[:, 1]) <= 1).all() and (np.abs(border[:, 1] - border[:, 2]) <= 1).all()
    assert (border[:, 0] == 200).any()  # hatch lines
    # A fixed scale: values at vmax are red-end, at vmin blue-end.
    low = heatmap_overlay(image, amap, valid, vmin=10.0, vmax=20.0)
    jet_min = cv2.applyColorMap(np.array([[0]], np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1]
    np.testing.assert_allclose(low[y, x], np.rint(0.5 * image[y, x] + 0.5 * jet_min), atol=1)


def test_heatmap_overlay_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must match"):
        heatmap_overlay(np.zeros((10, 10, 3), np.uint8), np.zeros((5, 5), np.float32), np.ones((5, 5), bool))
