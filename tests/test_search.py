"""faiss patch search against brute-force numpy distances."""

from __future__ import annotations

import numpy as np
import pytest

from expert.search import PatchIndex, SearchError, faiss_gpu_available, to_distance


def _brute_force(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Squared L2 distance matrix [Q, M] in float64."""
    diff = queries.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None, :, :]
    return (diff**2).sum(axis=2)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((300, 32)).astype(np.float32), rng.standard_normal((50, 32)).astype(np.float32)


def test_sqeuclidean_matches_brute_force(data):
    bank, queries = data
    got = PatchIndex(bank, distance="sqeuclidean").search(queries)
    assert got.dtype == np.float32 and got.shape == (50,)
    np.testing.assert_allclose(got, _brute_force(bank, queries).min(axis=1), rtol=1e-4)


def test_euclidean_is_the_square_root(data):
    bank, queries = data
    got = PatchIndex(bank, distance="euclidean").search(queries)
    np.testing.assert_allclose(got, np.sqrt(_brute_force(bank, queries).min(axis=1)), rtol=1e-4)


def test_knn_order_and_ids(data):
    bank, queries = data
    dist, ids = PatchIndex(bank).search_knn(queries, 5)
    brute = _brute_force(bank, queries)
    np.testing.assert_array_equal(ids, np.argsort(brute, axis=1)[:, :5])
    np.testing.assert_allclose(dist, np.sort(brute, axis=1)[:, :5], rtol=1e-4)
    assert ids.dtype == np.int64


def test_k_is_capped_at_the_bank_size():
    bank = np.eye(3, 4, dtype=np.float32)
    dist, ids = PatchIndex(bank).search_knn(np.zeros((2, 4), np.float32), 10)
    assert dist.shape == ids.shape == (2, 3)


def test_bank_members_score_zero_never_negative(data):
    bank, _ = data
    got = PatchIndex(bank * 100).search(bank * 100)
    assert (got >= 0).all() and got.max() < 1e-2  # exact matches, only rounding left


def test_rounding_negatives_are_clamped():
    np.testing.assert_array_equal(to_distance(np.array([-1e-6, 4.0]), "euclidean"), [0.0, 2.0])
    np.testing.assert_array_equal(to_distance(np.array([-1e-6, 4.0]), "sqeuclidean"), [0.0, 4.0])


def test_float64_and_non_contiguous_inputs(data):
    bank, queries = data
    index = PatchIndex(bank.astype(np.float64))
    np.testing.assert_allclose(index.search(np.asfortranarray(queries)), index.search(queries), rtol=1e-6)


def test_cpu_index_without_gpu():
    index = PatchIndex(np.ones((2, 3), np.float32), use_gpu=False)
    assert not index.on_gpu and index.size == 2 and index.dim == 3


@pytest.mark.skipif(faiss_gpu_available(), reason="a GPU is present")
def test_forcing_gpu_without_one_is_an_error():
    with pytest.raises(SearchError, match="GPU"):
        PatchIndex(np.ones((2, 3), np.float32), use_gpu=True)


@pytest.mark.parametrize(
    ("bank", "queries", "distance", "message"),
    [
        (np.ones(3, np.float32), None, "sqeuclidean", "2-D"),
        (np.ones((0, 3), np.float32), None, "sqeuclidean", "non-empty"),
        (np.ones((2, 3), np.int64), None, "sqeuclidean", "floating point"),
        (np.full((2, 3), np.inf, np.float32), None, "sqeuclidean", "NaN or infinite"),
        (np.ones((2, 3), np.float32), None, "cosine", "unknown distance"),
        (np.ones((2, 3), np.float32), np.ones((4, 5), np.float32), "sqeuclidean", "dimension 5"),
        (np.ones((2, 3), np.float32), np.full((1, 3), np.nan, np.float32), "sqeuclidean", "queries contain NaN"),
    ],
)
def test_bad_inputs(bank, queries, distance, message):
    with pytest.raises(SearchError, match=message):
        PatchIndex(bank, distance=distance).search(queries)
