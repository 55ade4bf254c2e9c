"""The independent recomputation of the expert's embedding (``bench/reference_embedding.py``).

Its NumPy building blocks are checked against values worked out by hand, then the whole comparison runs on a
small input (one reference, one query, random backbone weights) and must agree with the product to the
tolerances docs/fidelity.md states.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recompute():
    spec = importlib.util.spec_from_file_location("reference_embedding", REPO / "bench" / "reference_embedding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adaptive_pooling_uses_overlapping_floor_ceil_bins(recompute):
    rows = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    # 5 -> 2: bins [0, 3) and [2, 5); 5 -> 3: [0, 2), [1, 4), [3, 5)
    assert recompute.adaptive_avg_pool_1d(rows, 2).tolist() == [[2.0, 4.0]]
    assert recompute.adaptive_avg_pool_1d(rows, 3).tolist() == [[1.5, 3.0, 4.5]]


def test_bilinear_resize_uses_half_pixel_centres_and_clamps_edges(recompute):
    maps = np.array([[[0.0, 4.0], [8.0, 12.0]]])
    # positions -0.25 (clamped to 0), 0.25, 0.75, 1.25 (high tap clamped) along each axis
    row = [0.0, 1.0, 3.0, 4.0]
    expected = [[v + 8.0 * w for v in row] for w in (0.0, 0.25, 0.75, 1.0)]
    assert np.allclose(recompute.bilinear_resize(maps, 4, 4)[0], expected)


def test_patch_blocks_are_zero_padded_3x3_neighbourhoods(recompute):
    feature = np.arange(9.0).reshape(1, 3, 3)
    blocks = recompute.patch_blocks(feature)
    assert blocks.shape == (1, 3, 3, 3, 3)
    assert blocks[0, :, :, 1, 1].tolist() == feature[0].tolist()  # the centre sees the whole map
    assert blocks[0, :, :, 0, 0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 3, 4]]


def test_reference_embedding_of_constant_maps_by_hand(recompute):
    layer2 = np.ones((4, 2, 2))
    layer3 = np.full((8, 1, 1), 3.0)
    features = recompute.reference_embedding(layer2, layer3, embed_dim=4)
    assert features.shape == (4, 4)
    # every 3x3 block of a 2x2 map of ones holds 4 ones and 5 zeros; of a 1x1 map of threes, one 3 and 8 zeros
    # layer2: 36 values -> 4 bins of 9 (each bin one full block: mean 4/9); layer3: 72 -> 4 bins of 18 (3/9);
    # stacked [4/9 x4, 3/9 x4] -> 4 bins of 2 consecutive values: the layers do not mix
    assert np.allclose(features, [[4 / 9, 4 / 9, 3 / 9, 3 / 9]] * 4)


def test_the_product_matches_the_recomputation_on_a_small_input(recompute, tmp_path):
    out = tmp_path / "result.json"
    assert recompute.main(["--references", "1", "--queries", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["within_tolerance"] is True
    assert result["features_shape"] == [2, 784, 1024]
    assert result["input_max_abs_diff"] == 0.0
    assert result["embedding_relative_error"] <= 1e-6
    assert result["image_scores_relative_error"] <= 1e-5
    assert result["image_scores_ours"][0] == pytest.approx(result["image_scores_reference"][0], rel=1e-5)
