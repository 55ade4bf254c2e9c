"""DBT: leave-own-out and whole-bank scores against brute force, each tau method against its formula, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from eagle.settings import ExpertSettings
from expert.coreset import greedy_coreset
from expert.dbt import (
    DBT_SEARCHES,
    DEFAULT_MIN_UNSAMPLED,
    EVT_MIN_SCORES,
    THRESHOLD_METHODS,
    DBTError,
    Threshold,
    check_reference_count,
    compute_threshold,
    empty_band_warning,
    fit_gev,
    leave_own_out_scores,
    skip_reasons,
    threshold_params,
    training_scores,
)


def _brute_force_scores(
    features: np.ndarray, coreset_idx: np.ndarray, distance: str, min_unsampled: int, search: str = "leave_own_out"
):
    """The definition, literally: per image, unsampled patches vs the coreset minus that image's entries
    (``leave_own_out``, the reference code) or vs the whole coreset (``whole_bank``, paper Algorithm 1)."""
    n, p, d = features.shape
    flat = features.reshape(n * p, d).astype(np.float64)
    owner = np.arange(n * p) // p
    in_coreset = np.zeros(n * p, bool)
    in_coreset[coreset_idx] = True
    scores, used = [], []
    for i in range(n):
        queries = flat[(owner == i) & ~in_coreset]
        bank = flat[coreset_idx[owner[coreset_idx] != i]] if search == "leave_own_out" else flat[coreset_idx]
        if len(queries) < min_unsampled or len(bank) == 0:
            used.append(False)
            continue
        d2 = ((queries[:, None, :] - bank[None, :, :]) ** 2).sum(axis=2).min(axis=1)
        scores.append((d2 if distance == "sqeuclidean" else np.sqrt(d2)).max())
        used.append(True)
    return np.array(scores), np.array(used)


@pytest.fixture
def small_case():
    """4 images x 49 patches x 16 dims, with image 2 brighter than the rest."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((4, 49, 16)).astype(np.float32)
    feats[2] += 0.5
    return feats


@pytest.mark.parametrize("distance", ["sqeuclidean", "euclidean"])
def test_leave_own_out_matches_brute_force(small_case, distance):
    coreset = greedy_coreset(small_case.reshape(-1, 16), ratio=0.25, projection_dim=8)
    scores, used = leave_own_out_scores(small_case, coreset, distance=distance, min_unsampled=1)
    want_scores, want_used = _brute_force_scores(small_case, coreset, distance, 1)
    np.testing.assert_array_equal(used, want_used)
    assert scores.dtype == np.float32 and used.all()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


@pytest.mark.parametrize("distance", ["sqeuclidean", "euclidean"])
def test_whole_bank_matches_brute_force(small_case, distance):
    coreset = greedy_coreset(small_case.reshape(-1, 16), ratio=0.25, projection_dim=8)
    scores, used = training_scores(small_case, coreset, search="whole_bank", distance=distance, min_unsampled=1)
    want_scores, want_used = _brute_force_scores(small_case, coreset, distance, 1, "whole_bank")
    np.testing.assert_array_equal(used, want_used)
    assert scores.dtype == np.float32 and used.all()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    # The whole bank holds the leave-own-out bank, so no score can be larger, and with the own entries
    # near by some are strictly smaller.
    own_out, _ = training_scores(small_case, coreset, search="leave_own_out", distance=distance, min_unsampled=1)
    assert (scores <= own_out * (1 + 1e-6)).all() and (scores < own_out * (1 - 1e-3)).any()


def test_leave_own_out_scores_is_training_scores_with_the_reference_search(small_case):
    coreset = greedy_coreset(small_case.reshape(-1, 16), ratio=0.25, projection_dim=8)
    a = leave_own_out_scores(small_case, coreset, min_unsampled=1)
    b = training_scores(small_case, coreset, min_unsampled=1)  # default search: leave_own_out
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_default_min_unsampled_is_the_reference_value_32():
    import inspect

    assert DEFAULT_MIN_UNSAMPLED == 32 == ExpertSettings().min_unsampled_patches
    for function in (training_scores, leave_own_out_scores):
        assert inspect.signature(function).parameters["min_unsampled"].default == 32
    assert ExpertSettings().dbt_search == "leave_own_out"


def test_unknown_search_is_a_clear_error(small_case):
    with pytest.raises(DBTError, match="unknown DBT search 'paper'"):
        training_scores(small_case, np.arange(10), search="paper", min_unsampled=1)


@pytest.mark.parametrize("search", DBT_SEARCHES)
def test_upper_bound_pruning_is_exact_and_prunes(monkeypatch, search):
    """D > 128 (projected candidate search): exact scores while only a few patches are searched exactly."""
    from expert import dbt

    rng = np.random.default_rng(3)
    base = rng.standard_normal((49, 160)).astype(np.float32)
    feats = (base[None] + 0.3 * rng.standard_normal((8, 49, 160))).astype(np.float32)
    coreset = greedy_coreset(feats.reshape(-1, 160), ratio=0.1)
    searched = []
    original = dbt._TrainingScorer._exact
    monkeypatch.setattr(
        dbt._TrainingScorer,
        "_exact",
        lambda self, q, i, own: (searched.append(len(q)), original(self, q, i, own))[1],
    )
    monkeypatch.setattr(dbt, "_FIRST_BATCH", 8)
    scores, used = training_scores(feats, coreset, search=search, min_unsampled=1)
    want, want_used = _brute_force_scores(feats, coreset, "sqeuclidean", 1, search)
    np.testing.assert_array_equal(used, want_used)
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    assert sum(searched) < 0.5 * (feats.shape[0] * feats.shape[1] - len(coreset))


def test_own_entries_are_excluded_even_when_they_are_nearest(small_case):
    """Unsampled patches that are near-copies of their own image's coreset entries must not score ~0."""
    feats = small_case.copy()
    feats[1, 1::2] = feats[1, 0:-1:2] + 1e-3  # odd patches of image 1 are near-copies of even ones
    coreset = np.arange(49, 49 + 49, 2)  # image 1's even patches, plus one patch of every other image
    coreset = np.concatenate([coreset, [0, 2 * 49, 3 * 49]])
    scores, used = leave_own_out_scores(feats, coreset, min_unsampled=1)
    want, _ = _brute_force_scores(feats, coreset, "sqeuclidean", 1)
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    assert scores[1] > 1.0  # scored against the other images' 3 entries, not its own copies


def test_images_with_too_few_unsampled_patches_are_skipped(small_case):
    coreset = np.concatenate([np.arange(0, 40), [60, 110, 160]])  # image 0 keeps 9 unsampled patches
    scores, used = leave_own_out_scores(small_case, coreset, min_unsampled=16)
    np.testing.assert_array_equal(used, [False, True, True, True])
    want, _ = _brute_force_scores(small_case, coreset, "sqeuclidean", 16)
    assert len(scores) == 3 and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    assert skip_reasons(4, 49, coreset, min_unsampled=16) == {0: "too_few_unsampled"}


def test_image_owning_the_whole_coreset_is_skipped(small_case):
    coreset = np.arange(49, 49 + 10)  # every entry comes from image 1
    scores, used = leave_own_out_scores(small_case, coreset, min_unsampled=1)
    np.testing.assert_array_equal(used, [True, False, True, True])
    assert skip_reasons(4, 49, coreset, min_unsampled=1) == {1: "no_other_coreset"}
    np.testing.assert_allclose(scores, _brute_force_scores(small_case, coreset, "sqeuclidean", 1)[0], rtol=1e-5)


def test_whole_bank_never_skips_for_owning_the_coreset(small_case):
    """The paper's whole-bank search always has something to compare with: only too few patches skip."""
    coreset = np.arange(49, 49 + 10)  # every entry comes from image 1
    assert skip_reasons(4, 49, coreset, min_unsampled=1, search="whole_bank") == {}
    scores, used = training_scores(small_case, coreset, search="whole_bank", min_unsampled=1)
    assert used.all()
    want, _ = _brute_force_scores(small_case, coreset, "sqeuclidean", 1, "whole_bank")
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    assert skip_reasons(4, 49, coreset, min_unsampled=40, search="whole_bank") == {1: "too_few_unsampled"}


def test_single_reference_image_is_a_clear_error():
    feats = np.random.default_rng(0).standard_normal((1, 49, 8)).astype(np.float32)
    with pytest.raises(DBTError, match=r"all 1 were skipped.*contributed every one"):
        leave_own_out_scores(feats, greedy_coreset(feats[0], ratio=0.1), min_unsampled=1)


def test_all_skipped_message_counts_the_reasons(small_case):
    coreset = np.arange(4 * 49)[np.arange(4 * 49) % 49 < 45]  # every image keeps 4 unsampled patches
    with pytest.raises(DBTError, match=r"all 4 were skipped \(4 have fewer than 16 of 49"):
        leave_own_out_scores(small_case, coreset, min_unsampled=16)


def test_identical_images_give_identical_scores_and_tau_equal_to_the_mean():
    one = np.random.default_rng(1).standard_normal((49, 8)).astype(np.float32)
    feats = np.stack([one] * 5)
    coreset = greedy_coreset(feats.reshape(-1, 8), ratio=0.1)
    scores, used = leave_own_out_scores(feats, coreset, min_unsampled=1)
    # Greedy takes the first copy of each distinct patch, so image 0 owns the whole coreset (skipped) and
    # images 1-4 score identically against it: sigma = 0, tau = mean = s_max for every method.
    np.testing.assert_array_equal(used, [False, True, True, True, True])
    assert len(np.unique(scores)) == 1 and scores[0] > 0
    np.testing.assert_allclose(scores, _brute_force_scores(feats, coreset, "sqeuclidean", 1)[0], rtol=1e-5)
    for method in THRESHOLD_METHODS:
        threshold = compute_threshold(scores, method)
        assert threshold.tau == threshold.s_max == pytest.approx(float(scores[0]))


@pytest.mark.parametrize(
    ("coreset", "message"),
    [
        (np.array([], np.int64), "non-empty"),
        (np.array([0.5]), "integer"),
        (np.array([0, 196]), "out of range"),
        (np.array([3, 3]), "duplicate"),
    ],
)
def test_bad_coreset_indices(small_case, coreset, message):
    with pytest.raises(DBTError, match=message):
        leave_own_out_scores(small_case, coreset)


# ------------------------------------------------------------------------------------------- thresholds

SCORES = np.array([3.1, 2.7, 4.0, 3.3, 2.9, 3.8, 3.0, 5.2, 3.4, 3.6, 2.8, 3.2])


def test_k_sigma_formula():
    t = compute_threshold(SCORES, "k_sigma", kappa=2.5)
    assert t.tau == pytest.approx(SCORES.mean() + 2.5 * SCORES.std(ddof=0), rel=1e-12)
    assert t.s_max == 5.2 and t.n_scores == 12 and t.params == {"kappa": 2.5}
    assert t.stats["std"] == pytest.approx(np.std(SCORES))


def test_quantile_formula_uses_linear_interpolation():
    t = compute_threshold(SCORES, "quantile", quantile=0.9)
    assert t.tau == pytest.approx(np.quantile(SCORES, 0.9, method="linear"), rel=1e-12)
    s = np.sort(SCORES)  # by hand: position 0.9 * 11 = 9.9 between s[9] and s[10]
    assert t.tau == pytest.approx(s[9] + 0.9 * (s[10] - s[9]))


def test_mad_formula_is_unscaled():
    t = compute_threshold(SCORES, "mad", mad_k=3.0)
    median = np.median(SCORES)
    mad = stats.median_abs_deviation(SCORES, scale=1.0)
    assert t.tau == pytest.approx(median + 3.0 * mad, rel=1e-12)
    assert t.stats == pytest.approx({"median": median, "mad": mad})


def test_defaults_are_the_paper_values():
    assert compute_threshold(SCORES, "k_sigma").tau == pytest.approx(SCORES.mean() + 3 * SCORES.std())
    assert THRESHOLD_METHODS["quantile"] == {"quantile": 0.99}


@pytest.mark.parametrize("xi", [0.25, -0.25])
def test_evt_recovers_the_gev_shape_sign_and_quantile(xi):
    """scipy's genextreme shape is c = -xi: a Frechet (xi > 0) sample must come back with xi > 0."""
    truth = stats.genextreme(-xi, loc=10.0, scale=2.0)
    sample = truth.rvs(size=3000, random_state=np.random.default_rng(7))
    fit = fit_gev(sample)
    assert np.sign(fit["xi"]) == np.sign(xi) and abs(fit["xi"] - xi) < 0.06
    assert fit["loc"] == pytest.approx(10.0, abs=0.15) and fit["scale"] == pytest.approx(2.0, abs=0.1)
    t = compute_threshold(sample, "evt", evt_quantile=0.99)
    assert t.tau == pytest.approx(truth.ppf(0.99), rel=0.05)
    assert t.stats["xi"] == pytest.approx(fit["xi"])
    fitted = stats.genextreme(-t.stats["xi"], loc=t.stats["loc"], scale=t.stats["scale"])
    assert t.tau == pytest.approx(fitted.ppf(0.99), rel=1e-9)


def test_evt_near_constant_sample_is_finite_or_a_clear_error():
    sample = np.full(40, 3.0)
    sample[::7] += 1e-9
    with pytest.raises(DBTError, match=r"GEV fit failed.*k_sigma"):  # two-valued: no GEV
        compute_threshold(sample, "evt")
    jitter = 3.0 + 1e-9 * stats.genextreme(-0.1).rvs(size=200, random_state=np.random.default_rng(1))
    t = compute_threshold(jitter, "evt")  # tiny but continuous spread: a proper, finite fit
    assert np.isfinite(t.tau) and jitter.min() < t.tau < 3.0 + 1e-7


def test_evt_needs_enough_scores():
    with pytest.raises(DBTError, match=rf"at least {EVT_MIN_SCORES}.*k_sigma"):
        compute_threshold(SCORES[:5], "evt")


@pytest.mark.parametrize("method", list(THRESHOLD_METHODS))
def test_one_score_gives_tau_equal_to_s_max(method):
    t = compute_threshold([4.2], method)
    assert t.tau == t.s_max == 4.2 and t.n_scores == 1


@pytest.mark.parametrize("method", list(THRESHOLD_METHODS))
def test_identical_scores_give_tau_equal_to_the_mean(method):
    t = compute_threshold(np.full(30, 7.5), method)
    assert t.tau == 7.5 and t.s_max == 7.5


@pytest.mark.parametrize(
    ("scores", "method", "params", "message"),
    [
        ([], "k_sigma", {}, "no training scores"),
        ([1.0, np.nan], "k_sigma", {}, "NaN"),
        ([[1.0, 2.0]], "k_sigma", {}, "1-D"),
        ([1.0, 2.0], "p99", {}, "unknown threshold method 'p99'"),
        ([1.0, 2.0], "k_sigma", {"quantile": 0.9}, "unknown parameter"),
        ([1.0, 2.0], "quantile", {"quantile": 1.0}, r"in \(0, 1\)"),
        ([1.0, 2.0], "evt", {"evt_quantile": 0.0}, r"in \(0, 1\)"),
        ([1.0, 2.0], "k_sigma", {"kappa": np.inf}, "finite"),
    ],
)
def test_threshold_errors(scores, method, params, message):
    with pytest.raises(DBTError, match=message):
        compute_threshold(scores, method, **params)


def test_threshold_params_from_settings():
    s = ExpertSettings(threshold_method="mad", mad_k=2.0, kappa=4.0)
    assert threshold_params("mad", s) == {"mad_k": 2.0}
    assert threshold_params("k_sigma", s) == {"kappa": 4.0}
    with pytest.raises(DBTError, match="unknown threshold method"):
        threshold_params("bogus", s)


def test_reference_count_rules():
    with pytest.raises(DBTError, match="at least 2"):
        check_reference_count(1, minimum=2, recommended=20)
    assert "20 or more" in check_reference_count(5, minimum=2, recommended=20)
    assert check_reference_count(20, minimum=2, recommended=20) is None


# ------------------------------------------------------------------------------------------- CAAS band


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_k_sigma_with_at_most_ten_scores_always_empties_the_caas_band(n):
    """max of n scores <= mean + sigma * sqrt(n - 1) <= mean + 3 sigma = tau: the band [tau, s_max] is empty."""
    rng = np.random.default_rng(n)
    for _ in range(50):
        threshold = compute_threshold(rng.gamma(2.0, size=n), "k_sigma", kappa=3.0)
        assert threshold.tau > threshold.s_max
        warning = empty_band_warning(threshold)
        assert warning.startswith(f"CAAS band empty (tau {threshold.tau:.3g} > s_max {threshold.s_max:.3g})")
        assert "CAAS never turns on" in warning
        assert f"with {n} DBT training scores this is certain at kappa = 3" in warning
        assert f"at most mean + {np.sqrt(n - 1):.3g} sigma" in warning and "use 11 or more reference" in warning
        assert "\n" not in warning


def test_band_warning_is_absent_when_the_band_exists_and_generic_for_other_causes():
    assert empty_band_warning(compute_threshold(SCORES, "quantile")) is None  # a quantile never exceeds the max
    many = np.random.default_rng(0).standard_normal(400)
    many[0] = 10.0  # one far outlier: tau = mean + 3 sigma < s_max
    assert empty_band_warning(compute_threshold(many, "k_sigma")) is None
    above = Threshold(tau=5.0, s_max=4.0, method="mad", params={"mad_k": 3.0}, n_scores=30)
    assert empty_band_warning(above).endswith("the mad threshold lies above every DBT training score")
    more = Threshold(tau=5.0, s_max=4.0, method="k_sigma", params={"kappa": 3.0}, n_scores=11)
    assert "certain" not in empty_band_warning(more)  # sqrt(10) > 3: not forced by the bound
    equal = Threshold(tau=4.0, s_max=4.0, method="k_sigma", params={"kappa": 3.0}, n_scores=10)
    assert empty_band_warning(equal) is None  # tau == s_max: a one-point band, CAAS still possible
