"""Template retrieval: mean-pooled, L2-normalised descriptors and cosine nearest reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics.pairwise import cosine_similarity

from expert.retrieval import RetrievalError, global_descriptors, most_similar, similarities

GRID, DIM = 28, 64


def _image_features(seed: int) -> np.ndarray:
    """[28, 28, DIM] non-negative features: an image-specific mixture of a few 'textures' over the grid."""
    rng = np.random.default_rng(seed)
    textures = rng.random((4, DIM)) ** 3  # sparse-ish, like post-ReLU features
    weights = rng.dirichlet(np.ones(4) * 0.5, size=(GRID, GRID))
    return (weights @ textures + 0.05 * rng.random((GRID, GRID, DIM))).astype(np.float32)


@pytest.fixture
def references() -> np.ndarray:
    return np.stack([_image_features(seed) for seed in range(8)])  # [8, 28, 28, D]


def test_descriptors_are_normalised_means(references):
    flat = references.reshape(8, GRID * GRID, DIM)
    desc = global_descriptors(flat)
    assert desc.shape == (8, DIM) and desc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, rtol=1e-6)
    mean = flat.mean(axis=1)
    np.testing.assert_allclose(desc, mean / np.linalg.norm(mean, axis=1, keepdims=True), rtol=1e-5)


def test_similarities_are_sklearn_cosine(references):
    desc = global_descriptors(references.reshape(8, -1, DIM))
    query = global_descriptors(_image_features(99).reshape(-1, DIM))[0]
    np.testing.assert_allclose(similarities(query, desc), cosine_similarity(query[None], desc)[0], rtol=1e-5)


def test_each_reference_is_its_own_nearest(references):
    desc = global_descriptors(references.reshape(8, -1, DIM))
    assert [most_similar(desc[i], desc) for i in range(8)] == list(range(8))


@pytest.mark.parametrize("shift", [(3, 0), (0, -5), (4, 4)])
def test_shifted_copy_retrieves_its_original(references, shift):
    for i in range(8):
        shifted = np.roll(references[i], shift, axis=(0, 1))
        dy, dx = shift  # the rolled-in border is replaced by new content, as a real shift would do
        if dy:
            rows = slice(0, dy) if dy > 0 else slice(dy, None)
            shifted[rows] = _image_features(1000 + i)[rows]
        if dx:
            cols = slice(0, dx) if dx > 0 else slice(dx, None)
            shifted[:, cols] = _image_features(2000 + i)[:, cols]
        bank = global_descriptors(references.reshape(8, -1, DIM))
        query = global_descriptors(shifted.reshape(-1, DIM))[0]
        assert most_similar(query, bank) == i


def test_single_image_and_zero_features():
    desc = global_descriptors(np.zeros((5, 3), np.float32))
    assert desc.shape == (1, 3) and not desc.any()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: global_descriptors(np.zeros((2, 0, 4))), "must be"),
        (lambda: global_descriptors(np.zeros(4)), "must be"),
        (lambda: most_similar(np.ones(3), np.ones((2, 4))), "dimension 3"),
        (lambda: most_similar(np.ones(3), np.ones((0, 3))), "non-empty"),
    ],
)
def test_bad_shapes(call, message):
    with pytest.raises(RetrievalError, match=message):
        call()
