"""Preprocessing equals the reference torchvision pipeline; the geometry maps back to the original exactly."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from expert.preprocess import Geometry, compute_geometry, preprocess

SIZES = [(224, 224), (240, 320), (300, 200), (1000, 333), (100, 150), (257, 256)]


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("height,width", SIZES)
def test_matches_torchvision_resize_centercrop_normalize(height, width):
    from torchvision import transforms

    image = random_image(height, width)
    reference = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )(Image.fromarray(image)).numpy()
    tensor, geometry = preprocess(image)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor, reference, rtol=0, atol=2e-6)
    assert (geometry.orig_h, geometry.orig_w) == (height, width)


def test_no_crop_matches_torchvision_resize_to_square():
    from torchvision import transforms

    image = random_image(240, 320, seed=1)
    reference = transforms.Compose(
        [
            transforms.Resize((224, 224)),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )(Image.fromarray(image)).numpy()
    tensor, geometry = preprocess(image, center_crop=False)
    np.testing.assert_allclose(tensor, reference, rtol=0, atol=2e-6)
    assert geometry == Geometry(240, 320, 224, 224, 0, 0, 224, 224)
    assert geometry.inspected_region() == (0, 0, 320, 240)
    assert geometry.inspected_mask().all()


@pytest.mark.parametrize(
    "height,width,expected",
    [
        ((240, 320, (256, 341, 16, 58))),
        ((300, 200, (384, 256, 80, 16))),
        ((224, 224, (256, 256, 16, 16))),
        ((100, 150, (256, 384, 16, 80))),
    ],
)
def test_geometry_numbers(height, width, expected):
    geometry = compute_geometry(height, width)
    assert (geometry.resized_h, geometry.resized_w, geometry.crop_top, geometry.crop_left) == expected
    assert (geometry.crop_h, geometry.crop_w) == (224, 224)


def brute_force_inspected(orig: int, resized: int, start: int, size: int) -> list[int]:
    """Original pixels whose centre maps into [start, start + size) of the resized axis (exact fractions)."""
    return [p for p in range(orig) if start <= Fraction(2 * p + 1, 2) * Fraction(resized, orig) < start + size]


@pytest.mark.parametrize("height,width", SIZES + [(333, 1000), (999, 1001)])
def test_inspected_region_equals_brute_force(height, width):
    geometry = compute_geometry(height, width)
    xs = brute_force_inspected(width, geometry.resized_w, geometry.crop_left, geometry.crop_w)
    ys = brute_force_inspected(height, geometry.resized_h, geometry.crop_top, geometry.crop_h)
    assert geometry.inspected_region() == (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    mask = geometry.inspected_mask()
    rows, cols = np.nonzero(mask)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == geometry.inspected_region()
    assert mask.sum() == len(xs) * len(ys)


@pytest.mark.parametrize("height,width", [(240, 320), (300, 200), (100, 150)])
def test_point_mappings_are_inverse(height, width):
    geometry = compute_geometry(height, width)
    for x, y in [(0.0, 0.0), (111.5, 37.25), (223.0, 223.0)]:
        ox, oy = geometry.crop_to_original_xy(x, y)
        back = geometry.original_to_crop_xy(ox, oy)
        assert back == pytest.approx((x, y), abs=1e-9)


@pytest.mark.parametrize("height,width", [(240, 320), (300, 200), (224, 224), (100, 150), (1000, 333)])
def test_crop_to_original_reproduces_linear_ramps_exactly(height, width):
    # Bilinear resampling reproduces a linear function: the map value at an inspected original pixel must equal
    # that pixel's crop coordinate (clamped to the crop, where the edge is replicated).
    geometry = compute_geometry(height, width)
    ys, xs = np.mgrid[0:224, 0:224].astype(np.float32)
    for ramp, axis in ((xs, 0), (ys, 1)):
        values, inspected = geometry.crop_to_original(ramp)
        assert values.shape == (height, width) and inspected.dtype == bool
        rows, cols = np.nonzero(inspected)
        cx, cy = geometry.original_to_crop_xy(cols.astype(np.float64), rows.astype(np.float64))
        expected = np.clip(cx if axis == 0 else cy, 0, 223)
        np.testing.assert_allclose(values[rows, cols], expected, atol=2e-3)
        assert (values[~inspected] == 0).all()


@pytest.mark.parametrize("height,width,crop_xy", [(240, 320, (30, 200)), (300, 200, (190, 15)), (600, 450, (100, 100))])
def test_marker_in_the_crop_lands_at_the_expected_original_pixel(height, width, crop_xy):
    geometry = compute_geometry(height, width)
    ys, xs = np.mgrid[0:224, 0:224]
    marker = np.exp(-((xs - crop_xy[0]) ** 2 + (ys - crop_xy[1]) ** 2) / (2 * 3.0**2)).astype(np.float32)
    values, _ = geometry.crop_to_original(marker)
    peak_y, peak_x = np.unravel_index(np.argmax(values), values.shape)
    ex, ey = geometry.crop_to_original_xy(*crop_xy)
    assert abs(peak_x - ex) <= 1.0 and abs(peak_y - ey) <= 1.0


def test_constant_map_fills_exactly_the_inspected_region():
    geometry = compute_geometry(300, 200)
    values, inspected = geometry.crop_to_original(np.full((224, 224), 2.0, np.float32))
    x0, y0, x1, y1 = geometry.inspected_region()
    assert np.array_equal(inspected, values > 0)
    assert (values[y0:y1, x0:x1] == 2.0).all() and values.sum() == 2.0 * (x1 - x0) * (y1 - y0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        preprocess(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        preprocess(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="crop size"):
        compute_geometry(240, 320).crop_to_original(np.zeros((28, 28), np.float32))
    with pytest.raises(ValueError, match="must not exceed"):
        compute_geometry(240, 320, resize=200, crop=224)
