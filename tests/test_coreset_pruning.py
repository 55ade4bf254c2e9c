"""The pruned greedy loop selects bit for bit what the plain dense greedy loop selects, and really prunes."""

from __future__ import annotations

import numpy as np
import pytest

from expert import coreset as cs
from expert.coreset import greedy_coreset


def _gaussian(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((25, d)) * 4.0
    scales = np.geomspace(2.0, 0.05, d)
    return (centers[rng.integers(0, 25, n)] + rng.standard_normal((n, d)) * scales).astype(np.float32)


def _duplicates(n: int, d: int, seed: int) -> np.ndarray:
    """n rows drawn from only n // 8 distinct rows, in shuffled order: exact ties everywhere."""
    rng = np.random.default_rng(seed)
    distinct = rng.standard_normal((n // 8, d)).astype(np.float32)
    return distinct[rng.integers(0, len(distinct), n)]


def _low_dimensional(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 3)) * np.array([3.0, 1.5, 0.7])
    return (latent @ rng.standard_normal((3, d)) + 0.01 * rng.standard_normal((n, d))).astype(np.float32)


def _integer_grid(n: int, d: int, seed: int) -> np.ndarray:
    """Small integer coordinates: many rows at exactly the same distance from each other."""
    return np.random.default_rng(seed).integers(0, 3, (n, d)).astype(np.float32)


def _plain_greedy(features: np.ndarray, ratio: float, k: int, method: str, seed: int) -> np.ndarray:
    """Textbook greedy k-center in the module's float32 space: every row's distance recomputed every step.

    One matrix-vector product over all (padded) rows per step, ``np.argmax`` for the farthest row (ties go
    to the lower row index), no bound and no pruning.
    """
    space = cs._ProjectedSpace.build(features, k, seed)
    everything = len(space.sq)
    starts = cs._starting_points(space, min(10, space.n), method, seed, everything)
    min_dist = cs._seed_distances(space, starts, everything)
    selected = []
    for _ in range(cs.coreset_size(space.n, ratio)):
        index = int(np.argmax(min_dist))
        selected.append(index)
        min_dist[index] = -np.inf
        c = space.row(index)
        dist = space.neg2 @ c
        dist += space.sq
        dist += space.sq[index]
        np.minimum(min_dist, dist, out=min_dist)
    return np.array(selected, dtype=np.int64)


CASES = [
    (_gaussian, 1500, 96, 64),
    (_clustered, 3000, 256, 128),
    (_duplicates, 1600, 80, 64),
    (_low_dimensional, 2000, 160, 128),
    (_integer_grid, 1200, 64, 128),  # projection_dim >= D: the features are used as they are
]


@pytest.mark.parametrize(("make", "n", "d", "k"), CASES, ids=[case[0].__name__.strip("_") for case in CASES])
@pytest.mark.parametrize("chunk", [64, 100, 1000, 1 << 20])
def test_pruned_selection_is_bitwise_the_plain_dense_greedy(make, n, d, k, chunk):
    feats = make(n, d, seed=n)
    expected = _plain_greedy(feats, 0.1, k, "center_farthest", 3)
    got = greedy_coreset(feats, ratio=0.1, projection_dim=k, seed=3, chunk_size=chunk)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("method", ["mean_farthest", "random"])
@pytest.mark.parametrize(("make", "n", "d", "k"), CASES[1:3], ids=["clustered", "duplicates"])
def test_every_start_method_matches_the_plain_dense_greedy(make, n, d, k, method):
    feats = make(n, d, seed=7)
    expected = _plain_greedy(feats, 0.25, k, method, 1)
    np.testing.assert_array_equal(
        greedy_coreset(feats, ratio=0.25, projection_dim=k, start_method=method, seed=1), expected
    )


def test_duplicate_rows_follow_the_lowest_index_rule():
    """With every row repeated, each step takes the first copy in row order that is farthest."""
    feats = _duplicates(1600, 80, seed=2)
    got = greedy_coreset(feats, ratio=0.1, projection_dim=64, seed=0)
    np.testing.assert_array_equal(got, _plain_greedy(feats, 0.1, 64, "center_farthest", 0))
    first_copy = {}
    for row in range(len(feats)):
        first_copy.setdefault(feats[row].tobytes(), row)
    distinct = len(first_copy)
    assert len(set(got.tolist())) == len(got)
    assert {int(i) for i in got[: min(len(got), distinct)]} <= set(first_copy.values())


def _loop_state(feats: np.ndarray, k: int, steps: int, chunk: int = 256):
    """Space, distances and row-test right side after ``steps`` greedy steps run by the module's own loop."""
    space = cs._ProjectedSpace.build(feats, k, seed=0)
    starts = cs._starting_points(space, 10, "center_farthest", 0, chunk)
    min_dist = cs._seed_distances(space, starts, chunk)
    room = cs._headroom(space, min_dist)
    buffer = np.empty(chunk, dtype=np.float32)
    pruning = cs._PruningSchedule(enabled=True)
    for _ in range(steps):
        index = int(np.argmax(min_dist))
        min_dist[index] = -np.inf
        room[index] = -np.inf
        cs._lower_distances(space, min_dist, room, index, chunk, buffer, pruning)
    return space, min_dist, room


def test_the_row_test_never_skips_a_row_the_dense_update_would_lower():
    feats = _clustered(3000, 256, seed=11)
    space, min_dist, room = _loop_state(feats, 128, 150)
    buffer = np.empty(256, dtype=np.float32)
    checked = 0
    for index in np.flatnonzero(np.isfinite(min_dist[: space.n]))[::37]:
        candidates = cs._candidates(space, room, int(index), space.row(int(index)), 256, buffer)
        if candidates is None:
            continue
        dist = space.neg2 @ space.row(int(index))
        dist += space.sq
        dist += space.sq[index]
        lowered = np.flatnonzero(dist < min_dist)
        assert np.isin(lowered, candidates).all()
        assert len(candidates) < 0.12 * space.n
        checked += 1
    assert checked > 50


def test_the_row_test_right_side_stays_in_step_with_the_distances():
    feats = _duplicates(1600, 80, seed=4)
    space, min_dist, room = _loop_state(feats, 64, 120)
    np.testing.assert_array_equal(room, cs._headroom(space, min_dist))


def test_head_axes_are_stored_transposed_with_a_row_of_ones():
    space = cs._ProjectedSpace.build(_gaussian(300, 96, seed=0), 64, seed=0)
    assert space.head_t is not None and space.head_t.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(space.head_t[: cs._HEAD_DIMS], space.neg2[:, : cs._HEAD_DIMS].T)
    np.testing.assert_array_equal(space.head_t[cs._HEAD_DIMS], np.ones(len(space.sq), dtype=np.float32))
    small = cs._ProjectedSpace.build(_gaussian(300, 96, seed=0), 16, seed=0)  # below 48 dims: no pruning
    assert small.head_t is None and small.head_sq is None and small.slack is None


def test_pruning_skips_most_rows_late_in_the_loop(monkeypatch):
    """Counted, not timed: rows gathered for the full update, and how often the loop fell back to dense."""
    feats = _clustered(4000, 256, seed=5)
    gathered: list[int] = []
    dense: list[int] = []
    update_rows, update_dense = cs._update_rows, cs._update_dense
    monkeypatch.setattr(cs, "_update_rows", lambda *a: (gathered.append(len(a[-1])), update_rows(*a)))
    monkeypatch.setattr(cs, "_update_dense", lambda *a: (dense.append(1), update_dense(*a)))
    got = greedy_coreset(feats, ratio=0.1, projection_dim=128, chunk_size=1024)
    steps = len(got) - 1
    assert len(dense) < 0.1 * steps
    assert len(gathered) > 0.8 * steps
    assert np.mean(gathered[len(gathered) // 2 :]) < 0.05 * len(feats)  # late steps touch < 5 % of the rows
    monkeypatch.undo()
    np.testing.assert_array_equal(got, _plain_greedy(feats, 0.1, 128, "center_farthest", 0))
