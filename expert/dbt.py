"""Distribution-Based Thresholding (DBT): leave-own-out training scores and the threshold τ.

Training scores (paper §3.2.2): for every training image i, its UNSAMPLED patches
(those the coreset did not keep) are scored against a search bank, and the image's score is the largest
of those patch scores. The search bank (:data:`DBT_SEARCHES`, :func:`training_scores`):

* ``leave_own_out`` (the reference code, the default): the coreset minus the entries that came from
  image i;
* ``whole_bank`` (the paper's Algorithm 1 as written): the whole coreset, image i's own entries included.

An image is skipped (it gets no score, never NaN) when it has fewer than ``min_unsampled`` unsampled
patches (the reference uses 32), or, leave-own-out only, when every coreset entry came from it (nothing
is left to compare against).

With an inspection mask (:mod:`expert.mask`) the features passed in are only the patches inside it
(:func:`expert.build.fit_bank` selects them): patches outside never count for a training score, nor for the
coreset, so τ is consistent with query scores, which also ignore them; ``min_unsampled`` then counts unsampled
patches inside the mask.

Thresholds (:func:`compute_threshold`), on the scores S of the used images, s_max = max(S):

* ``k_sigma``: τ = mean(S) + kappa · std(S), population std (ddof = 0). Parameter ``kappa`` (3).
* ``quantile``: τ = ``np.quantile(S, quantile)`` with numpy's default linear interpolation. Parameter
  ``quantile`` (0.99).
* ``mad``: τ = median(S) + mad_k · MAD, MAD = median(|S - median(S)|), unscaled (no 1.4826 factor).
  Parameter ``mad_k`` (3).
* ``evt``: a generalised extreme-value distribution is fitted by maximum likelihood to the training maxima
  (:func:`fit_gev`) and τ is its ``evt_quantile`` quantile. scipy's shape is c = -ξ, where ξ is the
  extreme-value index of the paper's Eq. 11 (ξ > 0 heavy Fréchet tail, ξ < 0 bounded Weibull tail);
  :class:`Threshold` reports ξ. Parameter ``evt_quantile`` (0.99). Needs at least :data:`EVT_MIN_SCORES`
  scores (a 3-parameter fit on fewer is noise) and a plausible fit (|ξ| <= 1); otherwise it raises
  :class:`DBTError` suggesting ``k_sigma``. No silent fallback.

Degenerate cases, the same for every method: no score → :class:`DBTError`; one score → τ = s_max = that
score; all scores identical (σ = 0) → τ = mean. τ is always finite, or :class:`DBTError` is raised.

Example:
    >>> compute_threshold([1.0, 2.0, 3.0], "k_sigma", kappa=1.0).tau  # doctest: +ELLIPSIS
    2.816...
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
from scipy import optimize, stats

from common.progress import ProgressCallback, report
from expert.coreset import random_projection
from expert.errors import ExpertError
from expert.search import GPU_MAX_K, Distance, PatchIndex, check_distance, to_distance

ThresholdMethod = Literal["k_sigma", "quantile", "mad", "evt"]
"""The τ methods: the one definition of their names (settings, bank metadata and this module use it)."""
THRESHOLD_METHOD_NAMES: tuple[ThresholdMethod, ...] = get_args(ThresholdMethod)

THRESHOLD_METHODS: dict[ThresholdMethod, dict[str, float]] = {
    "k_sigma": {"kappa": 3.0},
    "quantile": {"quantile": 0.99},
    "mad": {"mad_k": 3.0},
    "evt": {"evt_quantile": 0.99},
}
"""Every τ method and its parameters with their defaults (names match ``ExpertSettings`` fields)."""

THRESHOLD_SETTINGS: dict[ThresholdMethod, str] = {method: next(iter(p)) for method, p in THRESHOLD_METHODS.items()}
"""Each τ method's one parameter, by its ``ExpertSettings`` field name (``k_sigma`` -> ``kappa``, ...)."""

THRESHOLD_PARAMETERS: tuple[str, ...] = tuple(THRESHOLD_SETTINGS.values())
"""Every τ parameter's ``ExpertSettings`` field name."""

EVT_MIN_SCORES = 10
"""Fewest training scores the ``evt`` method fits a GEV to."""

DBTSearch = Literal["leave_own_out", "whole_bank"]
DBT_SEARCHES: tuple[DBTSearch, ...] = get_args(DBTSearch)
"""Where DBT searches an image's unsampled patches: the coreset minus the image's own entries, or all of it."""

DEFAULT_MIN_UNSAMPLED = 32
"""Fewest unsampled patches an image needs to get a DBT training score (the reference code's value)."""

SKIP_TOO_FEW_UNSAMPLED = "too_few_unsampled"
SKIP_NO_OTHER_CORESET = "no_other_coreset"


class DBTError(ExpertError, ValueError):
    """DBT cannot produce a threshold (no usable scores, bad method or parameters, failed fit)."""

    code = "build_failed"


@dataclass(frozen=True)
class Threshold:
    """A DBT threshold.

    Attributes:
        tau: decision threshold (anomalous iff s_img >= tau).
        s_max: largest training score (upper end of the low-confidence region [tau, s_max]).
        method: the τ method name.
        params: the method's parameters as used (defaults filled in).
        n_scores: number of training scores it was derived from.
        stats: fitted statistics (k_sigma: mean, std; quantile: -; mad: median, mad; evt: xi, loc, scale).
    """

    tau: float
    s_max: float
    method: str
    params: dict[str, float]
    n_scores: int
    stats: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- scores


def check_search(search: str) -> DBTSearch:
    """Return ``search`` if it is one of :data:`DBT_SEARCHES`, else raise :class:`DBTError`."""
    if search not in DBT_SEARCHES:
        raise DBTError(f"unknown DBT search {search!r}; expected one of {', '.join(DBT_SEARCHES)}")
    return search


def skip_reasons(
    num_images: int,
    patches_per_image: int,
    coreset_idx: np.ndarray,
    *,
    min_unsampled: int,
    search: DBTSearch = "leave_own_out",
) -> dict[int, str]:
    """Which images DBT skips and why: {image index: ``"too_few_unsampled"`` | ``"no_other_coreset"``}.

    ``coreset_idx`` indexes the flattened [num_images * patches_per_image] patches; patch row r belongs
    to image ``r // patches_per_image``. ``"no_other_coreset"`` only exists for ``search="leave_own_out"``.
    """
    check_search(search)
    own = np.bincount(np.asarray(coreset_idx) // patches_per_image, minlength=num_images)
    total = int(own.sum())
    reasons: dict[int, str] = {}
    for i in range(num_images):
        if patches_per_image - own[i] < min_unsampled:
            reasons[i] = SKIP_TOO_FEW_UNSAMPLED
        elif search == "leave_own_out" and total - own[i] == 0:
            reasons[i] = SKIP_NO_OTHER_CORESET
    return reasons


def training_scores(
    features: np.ndarray,
    coreset_idx: np.ndarray,
    *,
    search: DBTSearch = "leave_own_out",
    distance: Distance = "sqeuclidean",
    min_unsampled: int = DEFAULT_MIN_UNSAMPLED,
    progress: ProgressCallback | None = None,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """DBT training scores (exact): per image, the largest nearest-neighbour distance of its unsampled patches.

    ``search`` picks the bank the patches are searched in (module docstring). Only the LARGEST distance
    per image is needed, so most patches need no full search:

    1. upper bounds: for every patch, the allowed coreset entry (another image's, for leave-own-out)
       nearest to it in a 128-d random projection (one small matrix product) is a real member of the
       search bank, so the exact distance to it, u(x), bounds the patch's distance from above;
    2. exact search (faiss; for leave-own-out k = own_i + 1 over the whole coreset: at most own_i
       neighbours can be image i's own, so the first other one is the leave-own-out neighbour; for the
       whole bank k = 1) for the patches in decreasing order of u, in doubling batches, until the best
       exact score exceeds every remaining bound. The maximum is therefore exact (up to faiss's float32
       rounding).

    Leaving own entries out, a batch is first searched for ``min(own_i + 1, 16)`` neighbours: the first other
    image's entry is nearly always among them, and faiss's distances do not depend on k (k >= 2: the same
    distance block feeds the selection), so the scores are bitwise those of the k = own_i + 1 search, without
    its cost of keeping own_i + 1 candidates per query. A batch in which some query has none of another image
    among the 16 is searched again, the same batch, with k = own_i + 1.

    The bounds of every image are computed first (numpy), then the exact searches (faiss): each library's
    threads keep spinning for a while after their work, so alternating the two image by image made every search
    wait for the cores (on 2 cores, a 200-reference build's DBT went from 22 s to about 11 s in two passes). The
    scores are bitwise those of the one-pass order (the same rows meet the same batches).

    Args:
        features: [N, P, D] patch features of the N training images.
        coreset_idx: [M] unique indices into the flattened [N * P] patches (the coreset).
        search: ``"leave_own_out"`` (reference code) or ``"whole_bank"`` (paper Algorithm 1).
        distance: ``"sqeuclidean"`` or ``"euclidean"`` (as :class:`expert.search.PatchIndex`).
        min_unsampled: images with fewer unsampled patches are skipped.
        progress: ``progress("dbt", fraction)`` as the images are scored (nothing is printed).
        use_gpu: passed to :class:`~expert.search.PatchIndex`.

    Returns:
        (scores [n_used] float32 of the used images in image order, NaN-free; used [N] bool).

    Raises:
        DBTError: bad shapes, indices or search, or no image usable (the message counts the reasons).
    """
    check_distance(distance)
    check_search(search)
    features, coreset_idx = _check_scoring_inputs(features, coreset_idx, min_unsampled)
    n_images, n_patches, dim = features.shape
    reasons = skip_reasons(n_images, n_patches, coreset_idx, min_unsampled=min_unsampled, search=search)
    used = np.ones(n_images, dtype=bool)
    used[list(reasons)] = False
    if not used.any():
        raise DBTError(_no_scores_message(n_images, n_patches, len(coreset_idx), min_unsampled, reasons))
    scorer = _TrainingScorer(features, coreset_idx, distance, use_gpu, leave_own_out=search == "leave_own_out")
    indices = np.flatnonzero(used)
    # Two passes, not one per image: numpy's BLAS threads (the bounds) and faiss's OpenMP threads (the exact
    # search) each keep spinning for a while after their work, so alternating them image by image made every
    # faiss search wait for the cores (measured: 96 ms per search interleaved, 30 ms in a pass of its own).
    bounds = []
    for done, i in enumerate(indices, start=1):
        bounds.append(scorer.upper_bounds(int(i)))
        report(progress, "dbt", 0.5 * done / len(indices))
    scores = []
    for done, (i, image_bounds) in enumerate(zip(indices, bounds, strict=True), start=1):
        scores.append(scorer.image_score(int(i), image_bounds))
        report(progress, "dbt", 0.5 + 0.5 * done / len(indices))
    return np.asarray(scores, dtype=np.float32), used


def leave_own_out_scores(
    features: np.ndarray,
    coreset_idx: np.ndarray,
    *,
    distance: Distance = "sqeuclidean",
    min_unsampled: int = DEFAULT_MIN_UNSAMPLED,
    progress: ProgressCallback | None = None,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`training_scores` with ``search="leave_own_out"`` (the reference code's DBT)."""
    return training_scores(
        features,
        coreset_idx,
        search="leave_own_out",
        distance=distance,
        min_unsampled=min_unsampled,
        progress=progress,
        use_gpu=use_gpu,
    )


_BOUND_DIM = 128  # random projection in which each patch's candidate neighbour is found
_BOUND_SLACK = 1e-3  # relative slack: faiss's expanded-form distances carry rounding noise well below this
_FIRST_BATCH = 128  # patches searched exactly in the first round (the batch doubles each further round)
_FIRST_K = 16  # neighbours asked for first when leaving own entries out (own + 1 only when none is another's)


class _TrainingScorer:
    """Exact DBT image scores with upper-bound pruning (see :func:`training_scores`)."""

    def __init__(
        self,
        features: np.ndarray,
        coreset_idx: np.ndarray,
        distance: Distance,
        use_gpu: bool | None,
        *,
        leave_own_out: bool = True,
    ):
        n_images, n_patches, dim = features.shape
        self.leave_own_out = leave_own_out
        self.features = features
        self.distance = distance
        self.use_gpu = use_gpu
        self.bank = np.ascontiguousarray(features.reshape(n_images * n_patches, dim)[coreset_idx], dtype=np.float32)
        self.owner = coreset_idx // n_patches
        self.own_counts = np.bincount(self.owner, minlength=n_images)
        sampled = np.zeros(n_images * n_patches, dtype=bool)
        sampled[coreset_idx] = True
        self.sampled = sampled.reshape(n_images, n_patches)
        self.index = PatchIndex(self.bank, distance="sqeuclidean", use_gpu=use_gpu)
        self.projection = random_projection(dim, _BOUND_DIM, seed=0) if dim > _BOUND_DIM else None
        coarse_bank = self._project(self.bank)
        self.coarse_sq = np.einsum("md,md->m", coarse_bank, coarse_bank)
        # -2 · bank: scaling by a power of two is exact, so q @ (-2 b) is bitwise -2 · (q @ b), one pass less.
        self.coarse_neg2 = coarse_bank * np.float32(-2.0)

    def _project(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float32)
        return np.ascontiguousarray(rows @ self.projection if self.projection is not None else rows)

    def queries(self, i: int) -> np.ndarray:
        """Image i's unsampled patches (the rows its score is the maximum over)."""
        return np.ascontiguousarray(self.features[i][~self.sampled[i]], dtype=np.float32)

    def upper_bounds(self, i: int) -> np.ndarray:
        """Per unsampled patch of image i, an upper bound of its squared distance in the search bank."""
        return self._upper_bounds(self.queries(i), i)

    def image_score(self, i: int, bounds: np.ndarray) -> float:
        """Image i's score: max over its unsampled patches of the nearest-neighbour distance in the search bank.

        Args:
            i: the image.
            bounds: :meth:`upper_bounds` of image i.
        """
        queries = self.queries(i)
        own = int(self.own_counts[i])
        order = np.argsort(-bounds, kind="stable")
        best, start, batch = -np.inf, 0, _FIRST_BATCH
        while start < len(order) and bounds[order[start]] * (1 + _BOUND_SLACK) >= best:
            rows = np.sort(order[start : start + batch])
            best = max(best, float(self._exact(queries[rows], i, own).max()))
            start += len(rows)
            batch *= 2
        return float(to_distance(np.array([best]), self.distance)[0])

    def _upper_bounds(self, queries: np.ndarray, i: int) -> np.ndarray:
        """Exact squared distance to the allowed entry nearest in the projection (>= the true distance)."""
        coarse = self._project(queries) @ self.coarse_neg2.T
        coarse += self.coarse_sq
        if self.leave_own_out:
            coarse[:, self.owner == i] = np.inf
        candidate = np.argmin(coarse, axis=1)
        diff = queries - self.bank[candidate]
        result: np.ndarray = np.einsum("qd,qd->q", diff, diff)
        return result

    def _exact(self, queries: np.ndarray, i: int, own: int) -> np.ndarray:
        """Squared nearest-neighbour distance of each query in the search bank (faiss; k = own + 1 leaving own out)."""
        if not self.leave_own_out:
            return self.index.search(queries)
        k = own + 1
        if self.index.on_gpu and k > GPU_MAX_K:
            reduced = PatchIndex(self.bank[self.owner != i], distance="sqeuclidean", use_gpu=self.use_gpu)
            return reduced.search(queries)
        # k = 1 takes another faiss path (other rounding), so own = 0 keeps k = 1 and otherwise k stays >= 2.
        trial = k if k <= 2 else min(k, _FIRST_K)
        dist, ids = self.index.search_knn(queries, trial)
        other = self.owner[ids] != i
        if trial < k and not other.any(axis=1).all():
            dist, ids = self.index.search_knn(queries, k)  # the same batch: the same distances, more of them
            other = self.owner[ids] != i
        first_other = np.argmax(other, axis=1)
        result: np.ndarray = dist[np.arange(len(queries)), first_other]
        return result


def _check_scoring_inputs(
    features: np.ndarray, coreset_idx: np.ndarray, min_unsampled: int
) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features)
    if features.ndim != 3 or 0 in features.shape:
        raise DBTError(f"features must be a non-empty [N, P, D] array, got shape {features.shape}")
    coreset_idx = np.asarray(coreset_idx)
    if coreset_idx.ndim != 1 or len(coreset_idx) == 0 or not np.issubdtype(coreset_idx.dtype, np.integer):
        raise DBTError(
            f"coreset_idx must be a non-empty 1-D integer array, got {coreset_idx.dtype} {coreset_idx.shape}"
        )
    total = features.shape[0] * features.shape[1]
    if coreset_idx.min() < 0 or coreset_idx.max() >= total:
        raise DBTError(f"coreset_idx out of range [0, {total}): min {coreset_idx.min()}, max {coreset_idx.max()}")
    if len(np.unique(coreset_idx)) != len(coreset_idx):
        raise DBTError("coreset_idx contains duplicate indices")
    if min_unsampled < 1:
        raise DBTError(f"min_unsampled must be >= 1, got {min_unsampled}")
    return features, coreset_idx.astype(np.int64)


def _no_scores_message(n_images: int, n_patches: int, m: int, min_unsampled: int, reasons: dict[int, str]) -> str:
    too_few = sum(r == SKIP_TOO_FEW_UNSAMPLED for r in reasons.values())
    no_other = sum(r == SKIP_NO_OTHER_CORESET for r in reasons.values())
    parts = []
    if too_few:
        parts.append(f"{too_few} have fewer than {min_unsampled} of {n_patches} patches outside the coreset")
    if no_other:
        parts.append(f"{no_other} contributed every one of the {m} coreset entries (nothing left to compare with)")
    return (
        f"DBT has no usable training image: all {n_images} were skipped ({'; '.join(parts)}); "
        "add reference images, lower the coreset ratio, or (with an inspection mask) enlarge the mask"
    )


def check_reference_count(count: int, *, minimum: int, recommended: int) -> str | None:
    """Enforce the minimum number of reference images; return a warning text below the recommended count.

    Raises:
        DBTError: ``count < minimum``.
    """
    if count < minimum:
        raise DBTError(f"{count} reference image(s) given; a bank needs at least {minimum} (recommended {recommended})")
    if count < recommended:
        return f"only {count} reference images; {recommended} or more give a more reliable threshold"
    return None


# ------------------------------------------------------------------------------------------- thresholds


def threshold_params(method: str, settings: Any) -> dict[str, float]:
    """The parameters of ``method`` read from an ``ExpertSettings``-like object (fields kappa, quantile, ...)."""
    return {name: float(getattr(settings, name)) for name in THRESHOLD_METHODS[_check_method(method)]}


def compute_threshold(scores: Sequence[float] | np.ndarray, method: str, **params: float) -> Threshold:
    """Derive τ and s_max from training scores with one of :data:`THRESHOLD_METHODS`.

    Args:
        scores: the used images' training scores (1-D, finite).
        method: ``k_sigma``, ``quantile``, ``mad`` or ``evt``.
        **params: the method's parameters (see :data:`THRESHOLD_METHODS`); missing ones take defaults.

    Raises:
        DBTError: unknown method or parameter, bad parameter value, empty or non-finite scores, too few
            scores for ``evt``, or a failed fit.
    """
    known = _check_method(method)
    unknown = sorted(set(params) - set(THRESHOLD_METHODS[known]))
    if unknown:
        raise DBTError(f"unknown parameter(s) {unknown} for threshold method {method!r}")
    values = {**THRESHOLD_METHODS[known], **{k: float(v) for k, v in params.items()}}
    _check_params(method, values)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise DBTError(f"training scores must be 1-D, got shape {s.shape}")
    if len(s) == 0:
        raise DBTError("no training scores: DBT needs at least one usable reference image")
    if not np.isfinite(s).all():
        raise DBTError("training scores contain NaN or infinite values")
    s_max = float(s.max())
    if len(s) == 1 or s.min() == s.max():
        fitted: dict[str, Any] = {}
        tau = float(s.mean())
        if len(s) == 1:
            tau = s_max
    else:
        tau, fitted = _METHODS[known](s, values)
    if not np.isfinite(tau):
        raise DBTError(f"threshold method {method!r} produced a non-finite tau ({tau})")
    return Threshold(tau=float(tau), s_max=s_max, method=method, params=values, n_scores=len(s), stats=fitted)


def empty_band_warning(threshold: Threshold) -> str | None:
    """A one-line warning when τ > s_max (the low-confidence band [τ, s_max] is empty, so CAAS never runs).

    For ``k_sigma`` with n scores the largest is at most mean + σ·√(n−1) (equality only when all the
    others are equal), so with √(n−1) <= κ the band is empty by construction (n ≤ 10 at κ = 3); the
    warning says so and how many references it takes. Returns None when τ <= s_max.

    Example:
        >>> t = compute_threshold([1.0, 2.0, 3.0, 2.5], "k_sigma")
        >>> empty_band_warning(t).split(":")[0]
        'CAAS band empty (tau 4.34 > s_max 3)'
    """
    if not threshold.tau > threshold.s_max:
        return None
    head = (
        f"CAAS band empty (tau {threshold.tau:.3g} > s_max {threshold.s_max:.3g}): no score is ever low-confidence, "
        "so CAAS never turns on"
    )
    n = threshold.n_scores
    kappa = threshold.params.get("kappa")
    if threshold.method == "k_sigma" and kappa is not None and n >= 2 and n - 1 <= kappa**2:
        needed = int(np.floor(kappa**2)) + 2  # smallest n with sqrt(n - 1) > kappa
        return (
            f"{head}; with {n} DBT training scores this is certain at kappa = {kappa:g}, since the largest of "
            f"{n} scores is at most mean + {np.sqrt(n - 1):.3g} sigma; use {needed} or more reference images"
        )
    return f"{head}; the {threshold.method} threshold lies above every DBT training score"


def _check_method(method: str) -> ThresholdMethod:
    if method not in THRESHOLD_METHOD_NAMES:
        raise DBTError(f"unknown threshold method {method!r}; expected one of {', '.join(THRESHOLD_METHOD_NAMES)}")
    return method


def _check_params(method: str, values: dict[str, float]) -> None:
    for name, value in values.items():
        if not np.isfinite(value):
            raise DBTError(f"{method}: {name} must be finite, got {value}")
    for name in ("quantile", "evt_quantile"):
        if name in values and not 0.0 < values[name] < 1.0:
            raise DBTError(f"{method}: {name} must be in (0, 1), got {values[name]}")


def _k_sigma(s: np.ndarray, p: dict[str, float]) -> tuple[float, dict[str, float]]:
    mean, std = float(s.mean()), float(s.std(ddof=0))
    return mean + p["kappa"] * std, {"mean": mean, "std": std}


def _quantile(s: np.ndarray, p: dict[str, float]) -> tuple[float, dict[str, float]]:
    return float(np.quantile(s, p["quantile"])), {}


def _mad(s: np.ndarray, p: dict[str, float]) -> tuple[float, dict[str, float]]:
    median = float(np.median(s))
    mad = float(np.median(np.abs(s - median)))
    return median + p["mad_k"] * mad, {"median": median, "mad": mad}


def _evt(s: np.ndarray, p: dict[str, float]) -> tuple[float, dict[str, float]]:
    if len(s) < EVT_MIN_SCORES:
        raise DBTError(
            f"evt needs at least {EVT_MIN_SCORES} training scores to fit a GEV, got {len(s)}; "
            "add reference images or use threshold_method=k_sigma"
        )
    fit = fit_gev(s)
    tau = float(stats.genextreme.ppf(p["evt_quantile"], -fit["xi"], loc=fit["loc"], scale=fit["scale"]))
    return tau, fit


def fit_gev(samples: np.ndarray) -> dict[str, float]:
    """Maximum-likelihood GEV fit; returns ξ (= -scipy's c), loc and scale in the samples' units.

    The samples are standardised (better conditioned for scores in the thousands or near-constant
    scores) and the negative log-likelihood (``scipy.stats.genextreme.nnlf``) is minimised by Nelder-Mead
    from the Gumbel fit (ξ = 0, whose support is the whole line, so the start is always feasible);
    scipy's own ``genextreme.fit`` is tried too and the better likelihood wins. Location and scale are
    mapped back to the samples' units.

    Raises:
        DBTError: identical samples, a failed optimisation, or a shape outside [-1, 1] (such fits put
            τ far outside the data and mean the scores are not a GEV sample).
    """
    s = np.asarray(samples, dtype=np.float64)
    mean, std = float(s.mean()), float(s.std(ddof=0))
    if not std > 0.0:
        raise DBTError("cannot fit a GEV to identical scores")
    z = (s - mean) / std
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        candidates = []
        try:
            gumbel_loc, gumbel_scale = stats.gumbel_r.fit(z)
            result = optimize.minimize(
                lambda theta: stats.genextreme.nnlf(theta, z),
                x0=[0.0, gumbel_loc, gumbel_scale],
                method="Nelder-Mead",
                options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 10_000},
            )
            candidates.append(tuple(result.x))
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            pass
        try:
            candidates.append(tuple(stats.genextreme.fit(z)))
        except (ValueError, FloatingPointError, RuntimeError, np.linalg.LinAlgError):
            pass
        finite = [t for t in candidates if np.isfinite(t).all() and t[2] > 0]
        if not finite:
            raise DBTError(f"GEV fit failed on {len(s)} scores; use threshold_method=k_sigma")
        c, loc, scale = min(finite, key=lambda t: stats.genextreme.nnlf(t, z))
    if not -1.0 <= -c <= 1.0:
        raise DBTError(
            f"GEV fit failed: shape xi={-c:.3g} outside [-1, 1] (the scores do not look like a GEV sample); "
            "use threshold_method=k_sigma"
        )
    return {"xi": float(-c), "loc": float(mean + std * loc), "scale": float(std * scale)}


_METHODS: dict[ThresholdMethod, Callable[[np.ndarray, dict[str, float]], tuple[float, dict[str, float]]]] = {
    "k_sigma": _k_sigma,
    "quantile": _quantile,
    "mad": _mad,
    "evt": _evt,
}
