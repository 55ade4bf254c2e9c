"""Greedy k-center coreset: against a float64 brute-force reference, covering radius, determinism, edges."""

from __future__ import annotations

import numpy as np
import pytest

from expert import coreset as cs
from expert.coreset import CoresetError, greedy_coreset, random_projection


def _gaussian(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _clustered(n: int, d: int, clusters: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)) * 4.0
    scales = np.geomspace(2.0, 0.05, d)
    points = centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)) * scales
    return points.astype(np.float32)


def _reference_replay(features: np.ndarray, selected: np.ndarray, k: int, starts: int, method: str, seed: int):
    """Replay PatchCore's loop literally in float64 (Euclidean distances, mean over the starts as the seed).

    At every step the selected row must be the argmax of the float64 distances up to float32 rounding
    (1e-5 relative), else the step number is returned; the float64 argmax is also counted, to prove
    that ties are the only freedom.
    """
    n, d = features.shape
    z = features.astype(np.float64)
    if k < d:
        z = z @ random_projection(d, k, seed).astype(np.float64)
    if method == "random":
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        start_idx = np.sort(rng.choice(n, size=min(starts, n), replace=False))
    else:
        start_idx = _reference_starts(z, min(starts, n), method)
    dist = np.linalg.norm(z[:, None, :] - z[None, start_idx, :], axis=2).mean(axis=1)
    exact = 0
    for step, idx in enumerate(selected):
        best = dist.max()
        if dist[idx] < best * (1 - 1e-5):
            return step, exact
        exact += int(np.argmax(dist) == idx)
        dist = np.minimum(dist, np.linalg.norm(z - z[idx], axis=1))
        dist[idx] = -np.inf
    return None, exact


def _reference_starts(z: np.ndarray, count: int, method: str) -> np.ndarray:
    """The start rule recomputed by brute force in float64 on the projected features ``z``.

    ``center_farthest`` (EAGLE's reference ``_pick_start_points``): c = argmin of the Euclidean distance to
    the mean, then the ``count - 1`` rows farthest from the patch c. ``mean_farthest``: farthest from the mean.
    """
    to_mean = np.linalg.norm(z - z.mean(axis=0), axis=1)
    c = int(np.argmin(to_mean))
    reach = np.linalg.norm(z - z[c], axis=1) if method == "center_farthest" else to_mean
    farthest = [i for i in np.argsort(-reach, kind="stable") if i != c][: count - 1]
    return np.array([c, *farthest], dtype=np.int64)


def _low_dimensional(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Points near a 3-d linear subspace of R^d (patch features have a low intrinsic dimension too)."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 3)) * np.array([3.0, 1.5, 0.7])
    return (latent @ rng.standard_normal((3, d)) + 0.05 * rng.standard_normal((n, d))).astype(np.float32)


def _covering_radius(features: np.ndarray, selected: np.ndarray) -> float:
    """max over points of the distance to the nearest selected point, in the ORIGINAL space."""
    x = features.astype(np.float64)
    c = x[selected]
    d2 = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None, :]
    return float(np.sqrt(np.maximum(d2.min(axis=1), 0)).max())


@pytest.mark.parametrize("method", ["center_farthest", "mean_farthest", "random"])
@pytest.mark.parametrize(("d", "k"), [(48, 16), (200, 64), (300, 128)])
def test_every_step_is_the_greedy_argmax_of_a_float64_reference(method, d, k):
    feats = _clustered(600, d, seed=3) if k == 128 else _gaussian(600, d, seed=3)
    got = greedy_coreset(feats, ratio=0.1, projection_dim=k, start_method=method, seed=5)
    failed_step, exact = _reference_replay(feats, got, k, 10, method, 5)
    assert failed_step is None, f"step {failed_step} did not take the farthest point"
    assert exact >= len(got) - 4  # only float32 near-ties may pick another argmax


def test_center_farthest_starts_are_nearest_the_mean_and_farthest_from_that_patch():
    feats = _gaussian(300, 8, seed=1)
    space = cs._ProjectedSpace.build(feats, 128, seed=0)  # 128 >= 8: no projection
    starts = cs._starting_points(space, 10, "center_farthest", 0)
    c = int(np.argmin(np.linalg.norm(feats - feats.mean(axis=0), axis=1)))
    assert starts[0] == c
    to_c = np.linalg.norm(feats - feats[c], axis=1)
    np.testing.assert_array_equal(starts[1:], np.argsort(-to_c)[:9])  # farthest first, c itself excluded


def test_mean_farthest_starts_are_nearest_and_farthest_from_the_mean():
    feats = _gaussian(300, 8, seed=1)
    space = cs._ProjectedSpace.build(feats, 128, seed=0)
    starts = cs._starting_points(space, 10, "mean_farthest", 0)
    to_mean = np.linalg.norm(feats - feats.mean(axis=0), axis=1)
    assert starts[0] == np.argmin(to_mean)
    np.testing.assert_array_equal(starts[1:], np.argsort(-to_mean)[:9])


@pytest.mark.parametrize("method", ["center_farthest", "mean_farthest"])
@pytest.mark.parametrize(("n", "d", "k", "seed"), [(500, 256, 128, 0), (400, 64, 16, 3), (60, 300, 128, 7)])
def test_start_points_match_a_float64_brute_force_of_the_rule_in_the_projected_space(method, n, d, k, seed):
    """Distances are measured after the random projection, as the reference picks its starts on the
    projected features; the centring and principal-axis rotation of our space change no distance."""
    feats = _clustered(n, d, seed=seed)
    space = cs._ProjectedSpace.build(feats, k, seed=seed)
    got = cs._starting_points(space, 10, method, seed)
    z = feats.astype(np.float64) @ random_projection(d, k, seed).astype(np.float64)
    np.testing.assert_array_equal(got, _reference_starts(z, 10, method))


def test_the_two_start_rules_differ_on_clustered_data():
    """Farthest from the central PATCH is not farthest from the MEAN: the rules pick different starts."""
    feats = _clustered(600, 32, clusters=5, seed=2)
    space = cs._ProjectedSpace.build(feats, 16, seed=0)
    center = cs._starting_points(space, 10, "center_farthest", 0)
    mean = cs._starting_points(space, 10, "mean_farthest", 0)
    assert center[0] == mean[0]
    assert set(center[1:].tolist()) != set(mean[1:].tolist())


def test_start_points_edge_counts():
    feats = _gaussian(5, 4, seed=9)
    space = cs._ProjectedSpace.build(feats, 128, seed=0)
    for method in ("center_farthest", "mean_farthest"):
        one = cs._starting_points(space, 1, method, 0)
        assert one.tolist() == [int(np.argmin(np.linalg.norm(feats - feats.mean(axis=0), axis=1)))]
        every = cs._starting_points(space, 5, method, 0)
        assert sorted(every.tolist()) == [0, 1, 2, 3, 4]


def test_default_start_method_is_the_reference_rule():
    import inspect

    assert inspect.signature(greedy_coreset).parameters["start_method"].default == "center_farthest"


@pytest.mark.parametrize("n, ratio", [(1000, 0.1), (997, 0.25), (50, 0.01), (7, 1.0), (1, 0.1)])
def test_size_and_uniqueness(n, ratio):
    idx = greedy_coreset(_gaussian(n, 16), ratio=ratio, projection_dim=8)
    assert idx.dtype == np.int64
    assert len(idx) == max(1, int(n * ratio))
    assert len(np.unique(idx)) == len(idx)
    assert idx.min() >= 0 and idx.max() < n


def test_ratio_one_selects_every_row_and_duplicates_stay_unique():
    feats = np.repeat(_gaussian(5, 4), 6, axis=0)  # 30 rows, only 5 distinct
    idx = greedy_coreset(feats, ratio=1.0)
    np.testing.assert_array_equal(np.sort(idx), np.arange(30))
    first5 = greedy_coreset(feats, ratio=5 / 30)
    assert len({tuple(feats[i]) for i in first5}) == 5  # the 5 distinct rows come first


def test_single_row_and_tiny_ratio():
    np.testing.assert_array_equal(greedy_coreset(_gaussian(1, 3), ratio=0.1), [0])
    assert len(greedy_coreset(_gaussian(9, 3), ratio=0.1)) == 1  # int(0.9) == 0 -> 1 row


def test_deterministic_for_a_seed():
    feats = _clustered(800, 64)
    for method in ("center_farthest", "mean_farthest", "random"):
        a = greedy_coreset(feats, ratio=0.1, start_method=method, seed=11)
        b = greedy_coreset(feats.copy(), ratio=0.1, start_method=method, seed=11)
        np.testing.assert_array_equal(a, b)


def test_random_starts_depend_on_the_seed():
    feats = _gaussian(500, 32)
    a = greedy_coreset(feats, ratio=0.1, projection_dim=16, start_method="random", seed=0)
    b = greedy_coreset(feats, ratio=0.1, projection_dim=16, start_method="random", seed=1)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("method", ["center_farthest", "random"])
def test_covering_radius_beats_random_subsets(method):
    feats = _low_dimensional(1500, 96, seed=2)
    radii_coreset, radii_random = [], []
    for seed in range(3):
        idx = greedy_coreset(feats, ratio=0.05, projection_dim=64, start_method=method, seed=seed)
        rnd = np.random.default_rng(100 + seed).choice(len(feats), size=len(idx), replace=False)
        radii_coreset.append(_covering_radius(feats, idx))
        radii_random.append(_covering_radius(feats, rnd))
    assert np.mean(radii_coreset) < 0.5 * np.mean(radii_random)


@pytest.mark.parametrize("chunk", [1, 64, 100, 1000])
def test_chunk_size_does_not_change_the_result(chunk):
    feats = _clustered(2000, 160, seed=4)
    full = greedy_coreset(feats, ratio=0.1, chunk_size=1 << 20)
    np.testing.assert_array_equal(greedy_coreset(feats, ratio=0.1, chunk_size=chunk), full)


def test_lower_bound_pruning_is_exact(monkeypatch):
    """The pruned loop selects exactly what the dense loop selects, and pruning really happens."""
    feats = _clustered(3000, 256, clusters=30, seed=5)
    space = cs._ProjectedSpace.build(feats, 128, seed=0)
    dense = cs._ProjectedSpace(space.n, space.neg2, space.sq, None, None, None)
    starts = cs._starting_points(space, 10, "center_farthest", 0)
    gathered = []
    original = cs._update_rows
    monkeypatch.setattr(cs, "_update_rows", lambda *a: (gathered.append(len(a[-1])), original(*a)))
    pruned = cs._greedy_select(space, cs._seed_distances(space, starts, 1024), 300, 1024, None)
    plain = cs._greedy_select(dense, cs._seed_distances(dense, starts, 1024), 300, 1024, None)
    np.testing.assert_array_equal(pruned, plain)
    assert len(gathered) > 100 and np.mean(gathered) < 0.25 * len(feats)


def test_projection_is_seeded_gaussian_jl():
    a, b = random_projection(512, 128, 0), random_projection(512, 128, 0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, random_projection(512, 128, 1))
    assert a.dtype == np.float32 and a.shape == (512, 128)
    assert abs(a.std() - 1 / np.sqrt(128)) < 0.002  # N(0, 1/k): squared norms preserved in expectation
    x = _gaussian(200, 512)
    ratio = (np.linalg.norm(x @ a, axis=1) / np.linalg.norm(x, axis=1)) ** 2
    assert abs(ratio.mean() - 1) < 0.05


def test_float64_input_accepted():
    feats = _gaussian(300, 20)
    np.testing.assert_array_equal(greedy_coreset(feats.astype(np.float64), ratio=0.1), greedy_coreset(feats, ratio=0.1))


def test_progress_is_reported_through_the_callback_and_never_printed(capfd):
    calls = []
    greedy_coreset(_gaussian(200, 8), ratio=0.1, progress=lambda stage, fraction: calls.append((stage, fraction)))
    assert calls and {stage for stage, _ in calls} == {"coreset"}
    fractions = [fraction for _, fraction in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert capfd.readouterr() == ("", "")  # library code draws no bar


@pytest.mark.parametrize(
    ("features", "kwargs", "message"),
    [
        (np.zeros(5, np.float32), {}, "2-D"),
        (np.zeros((0, 4), np.float32), {}, "at least one row"),
        (np.zeros((5, 4), np.int32), {}, "floating point"),
        (np.full((5, 4), np.nan, np.float32), {}, "NaN"),
        (np.zeros((5, 4), np.float32), {"ratio": 0.0}, "ratio"),
        (np.zeros((5, 4), np.float32), {"ratio": 1.5}, "ratio"),
        (np.zeros((5, 4), np.float32), {"start_method": "kmeans"}, "start_method"),
        (np.zeros((5, 4), np.float32), {"num_starts": 0}, "num_starts"),
        (np.zeros((5, 4), np.float32), {"projection_dim": 0}, "projection_dim"),
        (np.zeros((5, 4), np.float32), {"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_input_errors(features, kwargs, message):
    with pytest.raises(CoresetError, match=message):
        greedy_coreset(features, **kwargs)
