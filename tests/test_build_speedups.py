"""DBT's cheaper leave-own-out search gives bitwise the scores of the k = own + 1 search it replaces.

The previous implementation is kept here as the slow reference: every batch searched for own + 1 neighbours,
and the upper bounds computed with a separate ``-2`` pass. Both run on the same machine and thread count, so
the scores, τ and s_max must be identical (faiss's float32 distances are compared as they are).
"""

from __future__ import annotations

import numpy as np
import pytest

from expert import dbt
from expert.coreset import greedy_coreset, random_projection
from expert.dbt import compute_threshold, training_scores
from expert.search import PatchIndex, to_distance


class _ReferenceScorer:
    """The previous exact DBT scorer: k = own + 1 for every leave-own-out batch."""

    def __init__(self, features: np.ndarray, coreset_idx: np.ndarray, *, leave_own_out: bool):
        n_images, n_patches, dim = features.shape
        self.features, self.leave_own_out = features, leave_own_out
        self.bank = np.ascontiguousarray(features.reshape(n_images * n_patches, dim)[coreset_idx], dtype=np.float32)
        self.owner = coreset_idx // n_patches
        self.own_counts = np.bincount(self.owner, minlength=n_images)
        sampled = np.zeros(n_images * n_patches, dtype=bool)
        sampled[coreset_idx] = True
        self.sampled = sampled.reshape(n_images, n_patches)
        self.index = PatchIndex(self.bank, use_gpu=False)
        self.projection = random_projection(dim, 128, seed=0) if dim > 128 else None
        self.coarse_bank = self._project(self.bank)
        self.coarse_sq = np.einsum("md,md->m", self.coarse_bank, self.coarse_bank)

    def _project(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float32)
        return np.ascontiguousarray(rows @ self.projection if self.projection is not None else rows)

    def image_score(self, i: int, first_batch: int) -> float:
        queries = np.ascontiguousarray(self.features[i][~self.sampled[i]], dtype=np.float32)
        coarse = self._project(queries) @ self.coarse_bank.T
        coarse *= -2.0
        coarse += self.coarse_sq
        if self.leave_own_out:
            coarse[:, self.owner == i] = np.inf
        diff = queries - self.bank[np.argmin(coarse, axis=1)]
        bounds = np.einsum("qd,qd->q", diff, diff)
        order = np.argsort(-bounds, kind="stable")
        best, start, batch = -np.inf, 0, first_batch
        while start < len(order) and bounds[order[start]] * (1 + 1e-3) >= best:
            rows = np.sort(order[start : start + batch])
            best = max(best, float(self._exact(queries[rows], i).max()))
            start += len(rows)
            batch *= 2
        return float(to_distance(np.array([best]), "sqeuclidean")[0])

    def _exact(self, queries: np.ndarray, i: int) -> np.ndarray:
        if not self.leave_own_out:
            return self.index.search(queries)
        dist, ids = self.index.search_knn(queries, int(self.own_counts[i]) + 1)
        first_other = np.argmax(self.owner[ids] != i, axis=1)
        result: np.ndarray = dist[np.arange(len(queries)), first_other]
        return result


def _reference_scores(features: np.ndarray, coreset_idx: np.ndarray, used: np.ndarray, search: str) -> np.ndarray:
    scorer = _ReferenceScorer(features, coreset_idx, leave_own_out=search == "leave_own_out")
    return np.array([scorer.image_score(int(i), dbt._FIRST_BATCH) for i in np.flatnonzero(used)], dtype=np.float32)


def _per_image_clusters(n_images: int, n_patches: int, dim: int, spread: float, seed: int) -> np.ndarray:
    """Each image's patches around a centre of its own: the nearest coreset entries of a patch are its image's."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((n_patches, dim))
    centres = rng.standard_normal((n_images, 1, dim))
    noise = rng.standard_normal((n_images, n_patches, dim))
    return (shared[None] + spread * centres + 0.3 * noise).astype(np.float32)


@pytest.mark.parametrize(
    ("spread", "ratio", "dim", "seed"),
    [(0.0, 0.3, 160, 0), (3.0, 0.3, 160, 1), (1.0, 0.1, 64, 2), (8.0, 0.5, 160, 3)],
)
@pytest.mark.parametrize("search", ["leave_own_out", "whole_bank"])
def test_scores_tau_and_s_max_are_bitwise_those_of_the_own_plus_one(monkeypatch, spread, ratio, dim, seed, search):
    monkeypatch.setattr(dbt, "_FIRST_BATCH", 32)  # several rounds per image, as with real images' 700 patches
    features = _per_image_clusters(12, 120, dim, spread, seed)
    coreset = greedy_coreset(features.reshape(-1, dim), ratio=ratio, seed=seed)
    scores, used = training_scores(features, coreset, search=search, min_unsampled=8, use_gpu=False)
    want = _reference_scores(features, coreset, used, search)
    np.testing.assert_array_equal(scores, want)
    new, old = compute_threshold(scores, "k_sigma"), compute_threshold(want, "k_sigma")
    assert (new.tau, new.s_max) == (old.tau, old.s_max)


def test_both_the_short_search_and_the_own_plus_one_fallback_are_taken(monkeypatch):
    """Clustered images: some batches find another image's entry among 16 neighbours, others need own + 1."""
    features = _per_image_clusters(12, 120, 160, 3.0, 1)
    coreset = greedy_coreset(features.reshape(-1, 160), ratio=0.3, seed=1)
    asked: list[int] = []
    original = PatchIndex.search_knn
    monkeypatch.setattr(PatchIndex, "search_knn", lambda self, q, k: (asked.append(k), original(self, q, k))[1])
    scores, used = training_scores(features, coreset, min_unsampled=8, use_gpu=False)
    own = np.bincount(coreset // 120, minlength=12)
    assert own.min() + 1 > dbt._FIRST_K
    assert dbt._FIRST_K in asked  # the short search
    assert any(k > dbt._FIRST_K for k in asked)  # and the fallback, on the same batch
    asked.clear()
    np.testing.assert_array_equal(scores, _reference_scores(features, coreset, used, "leave_own_out"))
