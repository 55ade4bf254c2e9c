"""Anomaly map: feature-centred bilinear upsampling, gaussian σ=4 with the reference's 33-tap kernel, geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from expert.anomaly_map import anomaly_map, smooth, upsample_patch_scores
from expert.preprocess import compute_geometry


def np_bilinear_upsample(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with patch j centred at pixel stride*j (edge clamped), written out."""
    in_h, in_w = grid.shape

    def axis(out_size: int, in_size: int):
        src = np.minimum(np.arange(out_size) * in_size / out_size, in_size - 1.0)
        i0 = np.minimum(np.floor(src).astype(int), in_size - 1)
        i1 = np.minimum(i0 + 1, in_size - 1)
        return i0, i1, src - i0

    y0, y1, fy = axis(out_h, in_h)
    x0, x1, fx = axis(out_w, in_w)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def np_gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian with 2·int(4σ+0.5)+1 taps and half-sample symmetric ('reflect') borders."""
    radius = int(4 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image.astype(np.float64), radius, mode="symmetric")
    rows = sum(taps[k] * padded[k : k + image.shape[0], :] for k in range(2 * radius + 1))
    return sum(taps[k] * rows[:, k : k + image.shape[1]] for k in range(2 * radius + 1))


def test_upsampling_matches_the_bilinear_formula():
    grid = np.random.default_rng(0).random((28, 28)).astype(np.float32)
    np.testing.assert_allclose(upsample_patch_scores(grid, (224, 224)), np_bilinear_upsample(grid, 224, 224), atol=1e-6)


@pytest.mark.parametrize("sigma", [4.0, 2.0, 1.3])
def test_smoothing_matches_an_explicit_kernel(sigma):
    image = np.random.default_rng(1).random((60, 45)).astype(np.float32)
    np.testing.assert_allclose(smooth(image, sigma), np_gaussian_blur(image, sigma), atol=1e-6)


def test_kernel_has_33_taps_for_sigma_4():
    impulse = np.zeros((101, 101), np.float32)
    impulse[50, 50] = 1.0
    support = np.nonzero(smooth(impulse, 4.0) > 0)
    assert support[0].min() == 50 - 16 and support[0].max() == 50 + 16
    assert support[1].min() == 50 - 16 and support[1].max() == 50 + 16
    assert 2 * int(4 * 4.0 + 0.5) + 1 == 33
    assert float(smooth(impulse, 4.0).sum()) == pytest.approx(1.0, abs=1e-6)


def test_sigma_zero_is_identity():
    image = np.random.default_rng(2).random((10, 10)).astype(np.float32)
    assert np.array_equal(smooth(image, 0.0), image)


@pytest.mark.parametrize("height,width", [(224, 224), (240, 320), (300, 200)])
def test_constant_scores_fill_the_inspected_region(height, width):
    geometry = compute_geometry(height, width)
    amap, inspected = anomaly_map(np.full((28, 28), 3.0, np.float32), geometry)
    assert amap.shape == (height, width) and amap.dtype == np.float32
    assert np.array_equal(inspected, geometry.inspected_mask())
    np.testing.assert_allclose(amap[inspected], 3.0, rtol=1e-6)
    assert (amap[~inspected] == 0).all()


@pytest.mark.parametrize("height,width,patch", [(240, 320, (5, 20)), (300, 200, (22, 3)), (224, 224, (14, 14))])
def test_hot_patch_peaks_at_its_centre_in_original_pixels(height, width, patch):
    geometry = compute_geometry(height, width)
    scores = np.zeros((28, 28), np.float32)
    scores[patch] = 1.0
    amap, _ = anomaly_map(scores, geometry)
    peak_y, peak_x = np.unravel_index(np.argmax(amap), amap.shape)
    # Patch (i, j) of a 28-grid over 224 pixels (stride-8 features) is centred at crop pixel 8j, 8i.
    ex, ey = geometry.crop_to_original_xy(8 * patch[1], 8 * patch[0])
    scale = max(geometry.orig_w / geometry.resized_w, geometry.orig_h / geometry.resized_h)
    assert math.hypot(peak_x - ex, peak_y - ey) <= 1.0 + scale


def test_anomaly_map_is_the_composition_on_a_random_grid():
    geometry = compute_geometry(300, 200)
    scores = np.random.default_rng(3).random((28, 28)).astype(np.float32)
    amap, inspected = anomaly_map(scores, geometry, sigma=4.0)
    crop = np_gaussian_blur(np_bilinear_upsample(scores, 224, 224), 4.0)
    expected, _ = geometry.crop_to_original(crop.astype(np.float32))
    np.testing.assert_allclose(amap, expected, atol=1e-5)


def test_rejects_non_grid_scores():
    with pytest.raises(ValueError, match="2-D"):
        anomaly_map(np.zeros(784, np.float32), compute_geometry(224, 224))


def test_reference_placement_is_3_5_crop_pixels_right_and_below_the_feature_centre():
    # The reference code upsamples with F.interpolate(bilinear, align_corners=False): a hot patch's mass is centred
    # at 8j + 3.5; ours at 8j (docs/fidelity.md, "anomaly map placement").
    import torch
    import torch.nn.functional as F

    scores = np.zeros((28, 28), np.float32)
    scores[10, 17] = 1.0
    theirs = F.interpolate(torch.from_numpy(scores)[None, None], size=(224, 224), mode="bilinear", align_corners=False)
    ours = upsample_patch_scores(scores, (224, 224))

    def centre(grid: np.ndarray) -> tuple[float, float]:
        yy, xx = np.mgrid[0 : grid.shape[0], 0 : grid.shape[1]]
        return float((yy * grid).sum() / grid.sum()), float((xx * grid).sum() / grid.sum())

    assert centre(ours) == pytest.approx((8 * 10, 8 * 17), abs=1e-4)
    assert centre(theirs[0, 0].numpy()) == pytest.approx((8 * 10 + 3.5, 8 * 17 + 3.5), abs=1e-4)
