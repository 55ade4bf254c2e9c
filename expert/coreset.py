"""Approximate greedy k-center coreset (PatchCore's memory-bank subsampling, EAGLE's start points).

The algorithm:

1. Project every patch feature with a seeded Gaussian random matrix to ``projection_dim`` dimensions
   (Johnson-Lindenstrauss: entries drawn from N(0, 1/projection_dim), so squared distances are preserved
   in expectation). When ``projection_dim >= D`` the features are used as they are.
2. Pick ``num_starts`` starting points, all distances Euclidean in the projected space (as the reference
   code, which picks them on the projected features):

   * ``center_farthest`` (EAGLE's reference code, the default): c = the patch nearest the mean of all
     projected patches, plus the ``num_starts - 1`` patches farthest from c (from that PATCH, not from
     the mean);
   * ``mean_farthest`` (this project's earlier rule, kept as a named option): c plus the
     ``num_starts - 1`` patches farthest from the mean;
   * ``random`` (PatchCore) draws them uniformly without replacement.

   Ties are broken towards the lower row index.
3. Seed every patch's "distance to the coreset" with its MEAN Euclidean distance to the start points.
   The start points themselves are not put in the coreset (as in the reference code).
4. Repeat ``max(1, int(N * ratio))`` times: take the patch with the largest distance, add it to the
   coreset, and lower every patch's distance to its distance from the new member.

Everything runs in float32 numpy. The loop is bound by memory bandwidth (one pass over the projected
features per step), so two exact accelerations are used:

* the projected features are centred and rotated onto their principal axes (an orthogonal map, so
  distances do not change). The squared distance over the first 16 axes is a lower bound of the full
  squared distance; a patch whose lower bound already exceeds its current distance cannot change, so
  only the remaining candidates are gathered and updated. Late in the loop this skips most patches.
  A small relative tolerance keeps the skip decision safe against float32 rounding: row x is skipped
  only when ``||y_x[:16] - c[:16]||^2 - tol·(||y_x||^2 + ||c||^2) > d_x`` (d_x its current distance,
  tol = 1e-4). The full squared distance is at least its head part, and the float32 value the dense
  update would compute is within about k·2^-24·(||y_x||^2 + ||c||^2) of the exact one (8e-6 of that
  scale for k = 128), as is the float32 evaluation of the test itself; together they stay below the
  tolerance, so the dense value would be >= d_x and ``min`` would keep d_x bit for bit. Every path
  (dense, pruned, any ``chunk_size``) therefore stores the same distances and takes the same argmax.
  The test is evaluated in one pass per step: the 16 head axes are stored transposed with a row of
  ones (a vector-matrix product streams them, with ``||c[:16]||^2 - tol·||c||^2`` added by that row),
  and the right side ``d_x - ||y_x[:16]||^2 + tol·||y_x||^2`` is kept per row and refreshed only for
  the rows whose distance changed.
* matrix-vector products always run over row blocks that are multiples of 64 rows; with OpenBLAS this
  makes each row's dot product bitwise independent of how rows are grouped, so the pruned path, the
  dense path and every ``chunk_size`` give exactly the same selection.

Memory: besides the input, one float32 array of N x projection_dim (plus a 17 x N copy of its 16
leading axes, transposed, and a row of ones) and a few length-N vectors (distances, squared norms, the
row test's right side); temporaries are bounded by ``chunk_size`` rows (distance updates) or a
fixed 4096-row block (projection; fixed so that the result does not depend on ``chunk_size``).

Determinism: the same features, arguments and seed give the same indices on the same machine and BLAS
thread count (BLAS matrix products may round differently with another thread count).

Example:
    >>> import numpy as np
    >>> feats = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
    >>> idx = greedy_coreset(feats, ratio=0.05, projection_dim=32)
    >>> len(idx), len(set(idx.tolist()))
    (100, 100)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from common.progress import ProgressCallback, report
from expert.errors import ExpertError

StartMethod = Literal["center_farthest", "mean_farthest", "random"]
START_METHODS: tuple[StartMethod, ...] = get_args(StartMethod)

_ROW_BLOCK = 64  # every gemv runs over a multiple of this many rows (bitwise-stable dot products)
_FIXED_BLOCK = 4096  # rows per block for the one-time projection and rotation
_HEAD_DIMS = 16  # principal axes used for the lower bound
_MIN_DIMS_FOR_PRUNING = 48  # below this the bound is not worth its extra pass
_DENSE_FRACTION = 0.12  # more candidates than this share of rows: a dense update is cheaper than gathering
_ROUNDING_TOLERANCE = 1e-4  # relative slack on the lower-bound test (float32 rounding is far below it)


class CoresetError(ExpertError, ValueError):
    """The features or coreset settings are unusable (the message says which and why)."""

    code = "coreset_failed"


def coreset_size(num_rows: int, ratio: float) -> int:
    """Number of rows a coreset keeps: ``max(1, int(num_rows * ratio))``.

    Example:
        >>> coreset_size(156_800, 0.1), coreset_size(5, 0.1)
        (15680, 1)
    """
    if num_rows < 1:
        raise CoresetError(f"cannot build a coreset of {num_rows} rows")
    if not 0.0 < ratio <= 1.0:
        raise CoresetError(f"coreset ratio must be in (0, 1], got {ratio}")
    return max(1, int(num_rows * ratio))


def random_projection(input_dim: int, output_dim: int, seed: int) -> np.ndarray:
    """Seeded Gaussian Johnson-Lindenstrauss matrix [input_dim, output_dim] float32, entries N(0, 1/output_dim)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    matrix = rng.standard_normal((input_dim, output_dim), dtype=np.float64) / np.sqrt(output_dim)
    result: np.ndarray = matrix.astype(np.float32)
    return result


def greedy_coreset(
    features: np.ndarray,
    *,
    ratio: float = 0.1,
    projection_dim: int = 128,
    num_starts: int = 10,
    start_method: StartMethod = "center_farthest",
    seed: int = 0,
    chunk_size: int = 65536,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Select a coreset of patch features by approximate greedy k-center.

    Args:
        features: [N, D] patch features (float32; other float dtypes are converted block by block).
        ratio: share of rows to keep; ``max(1, int(N * ratio))`` rows are selected.
        projection_dim: dimension of the seeded random projection the distances are measured in.
        num_starts: number of starting points (at most N are used).
        start_method: ``"center_farthest"`` (EAGLE's reference code: the patch nearest the mean and the
            patches farthest from THAT patch), ``"mean_farthest"`` (the patch nearest the mean and the
            patches farthest from the mean) or ``"random"`` (PatchCore).
        seed: seeds the projection and, for ``"random"``, the start points.
        chunk_size: rows per block of the distance updates (bounds temporary memory); rounded up to 64.
        progress: ``progress("coreset", fraction)`` as the selection steps advance (nothing is printed).

    Returns:
        int64 array of unique row indices in the order they were selected.

    Raises:
        CoresetError: bad shape, non-finite values or an invalid setting.
    """
    _check_arguments(features, ratio, projection_dim, num_starts, start_method, chunk_size)
    n_rows = features.shape[0]
    n_select = coreset_size(n_rows, ratio)
    chunk = -(-int(chunk_size) // _ROW_BLOCK) * _ROW_BLOCK
    space = _ProjectedSpace.build(features, projection_dim, seed)
    starts = _starting_points(space, min(num_starts, n_rows), start_method, seed, chunk)
    min_dist = _seed_distances(space, starts, chunk)
    return _greedy_select(space, min_dist, n_select, chunk, progress)


def _check_arguments(
    features: np.ndarray, ratio: float, projection_dim: int, num_starts: int, start_method: str, chunk_size: int
) -> None:
    if not isinstance(features, np.ndarray) or features.ndim != 2:
        shape = getattr(features, "shape", None)
        raise CoresetError(f"features must be a 2-D numpy array [N, D], got shape {shape}")
    if features.shape[0] < 1 or features.shape[1] < 1:
        raise CoresetError(f"features must have at least one row and one column, got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise CoresetError(f"features must be floating point, got dtype {features.dtype}")
    coreset_size(features.shape[0], ratio)
    if projection_dim < 1:
        raise CoresetError(f"projection_dim must be >= 1, got {projection_dim}")
    if num_starts < 1:
        raise CoresetError(f"num_starts must be >= 1, got {num_starts}")
    if start_method not in START_METHODS:
        raise CoresetError(f"unknown start_method {start_method!r}; expected one of {', '.join(START_METHODS)}")
    if chunk_size < 1:
        raise CoresetError(f"chunk_size must be >= 1, got {chunk_size}")


@dataclass
class _ProjectedSpace:
    """Projected, centred, principal-axis-rotated features, padded to a multiple of 64 rows.

    ``neg2`` holds -2·y (scaling by a power of two is exact), so ``neg2[x] @ y_c + sq[x] + sq[c]`` is the
    squared distance between rows x and c with one gemv and two additions.
    """

    n: int  # real rows; rows n.. are zero padding
    neg2: np.ndarray  # [Np, k] float32, -2 * y
    sq: np.ndarray  # [Np] float32, ||y||^2
    head_t: np.ndarray | None  # [h + 1, Np] float32: neg2's first h columns transposed, then a row of ones
    head_sq: np.ndarray | None  # [Np] float32, ||y[:h]||^2
    slack: np.ndarray | None  # [Np] float32, tolerance * ||y||^2

    @classmethod
    def build(cls, features: np.ndarray, projection_dim: int, seed: int) -> _ProjectedSpace:
        n, d = features.shape
        padded = -(-n // _ROW_BLOCK) * _ROW_BLOCK
        matrix = random_projection(d, projection_dim, seed) if projection_dim < d else None
        k = projection_dim if matrix is not None else d
        y = np.zeros((padded, k), dtype=np.float32)
        for s in range(0, n, _FIXED_BLOCK):
            block = np.asarray(features[s : s + _FIXED_BLOCK], dtype=np.float32)
            if matrix is not None:
                np.matmul(block, matrix, out=y[s : s + len(block)])
            else:
                y[s : s + len(block)] = block
        if not np.isfinite(y[:n]).all():
            raise CoresetError("features contain NaN or infinite values")
        mean = y[:n].mean(axis=0, dtype=np.float64)
        rotation = _principal_axes(y[:n], mean)
        mean32 = mean.astype(np.float32)
        for s in range(0, n, _FIXED_BLOCK):
            e = min(n, s + _FIXED_BLOCK)
            y[s:e] = (y[s:e] - mean32) @ rotation
        sq = np.einsum("ij,ij->i", y, y, dtype=np.float32)
        y *= np.float32(-2.0)
        head_t = head_sq = slack = None
        if k >= _MIN_DIMS_FOR_PRUNING:
            head = y[:, :_HEAD_DIMS]
            head_sq = np.ascontiguousarray(np.einsum("ij,ij->i", head, head, dtype=np.float32) * np.float32(0.25))
            slack = (sq * np.float32(_ROUNDING_TOLERANCE)).astype(np.float32)
            head_t = np.ones((_HEAD_DIMS + 1, padded), dtype=np.float32)
            head_t[:_HEAD_DIMS] = head.T
        return cls(n=n, neg2=y, sq=sq, head_t=head_t, head_sq=head_sq, slack=slack)

    def row(self, index: int) -> np.ndarray:
        """The projected row ``y[index]`` (undoing the exact -2 scaling)."""
        result: np.ndarray = self.neg2[index] * np.float32(-0.5)
        return result


def _principal_axes(y: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Orthonormal [k, k] float32 rotation onto the principal axes, largest variance first."""
    k = y.shape[1]
    cov = np.zeros((k, k), dtype=np.float64)
    for s in range(0, y.shape[0], _FIXED_BLOCK):
        block = y[s : s + _FIXED_BLOCK].astype(np.float64) - mean
        cov += block.T @ block
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1]
    return np.ascontiguousarray(eigenvectors[:, order]).astype(np.float32)


def _starting_points(space: _ProjectedSpace, count: int, method: str, seed: int, chunk: int = 65536) -> np.ndarray:
    """Start rows: ``center_farthest``, ``mean_farthest`` (see the module docstring) or ``random``.

    The nearest-to-the-mean row comes first, then the farthest rows in decreasing distance.
    """
    n = space.n
    if method == "random":
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        return np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)
    # The space is centred, so the squared distance to the mean is the squared norm.
    nearest = int(np.argmin(space.sq[:n]))
    if count == 1:
        return np.array([nearest], dtype=np.int64)
    if method == "center_farthest":
        reach = _squared_distances_to(space, nearest, chunk)[:n]
    else:
        reach = space.sq[:n]
    order = np.argsort(-reach, kind="stable")
    farthest = order[order != nearest][: count - 1]
    return np.concatenate([[nearest], farthest]).astype(np.int64)


def _squared_distances_to(space: _ProjectedSpace, index: int, chunk: int) -> np.ndarray:
    """Squared Euclidean distance of every (padded) row to row ``index``, clamped at 0, float32."""
    padded = space.neg2.shape[0]
    c = space.row(index)
    cc = space.sq[index]
    out = np.empty(padded, dtype=np.float32)
    for s in range(0, padded, chunk):
        e = min(padded, s + chunk)
        dist = out[s:e]
        np.matmul(space.neg2[s:e], c, out=dist)
        dist += space.sq[s:e]
        dist += cc
        np.maximum(dist, 0.0, out=dist)
    return out


def _seed_distances(space: _ProjectedSpace, starts: np.ndarray, chunk: int) -> np.ndarray:
    """Squared mean Euclidean distance of every row to the start rows (-inf on padding rows)."""
    n, padded = space.n, space.neg2.shape[0]
    total = np.zeros(padded, dtype=np.float32)
    buf = np.empty(min(chunk, padded), dtype=np.float32)
    for start in starts:
        c = space.row(start)
        cc = space.sq[start]
        for s in range(0, padded, chunk):
            e = min(padded, s + chunk)
            dist = buf[: e - s]
            np.matmul(space.neg2[s:e], c, out=dist)
            dist += space.sq[s:e]
            dist += cc
            np.maximum(dist, 0.0, out=dist)
            np.sqrt(dist, out=dist)
            total[s:e] += dist
    total /= np.float32(len(starts))
    total *= total
    total[n:] = -np.inf
    return total


def _greedy_select(
    space: _ProjectedSpace, min_dist: np.ndarray, n_select: int, chunk: int, progress: ProgressCallback | None
) -> np.ndarray:
    """The greedy loop: take the argmax, lower the distances; selected rows are pinned at -inf."""
    selected = np.empty(n_select, dtype=np.int64)
    buffer = np.empty(min(chunk, len(min_dist)), dtype=np.float32)
    pruning = _PruningSchedule(enabled=space.head_t is not None)
    room = _headroom(space, min_dist) if space.head_t is not None else None
    every = max(1, n_select // 100)  # about 100 reports, whatever the coreset size
    for step in range(n_select):
        index = int(np.argmax(min_dist))
        selected[step] = index
        min_dist[index] = -np.inf
        if room is not None:
            room[index] = -np.inf
        if step + 1 < n_select:
            _lower_distances(space, min_dist, room, index, chunk, buffer, pruning)
        if progress is not None and ((step + 1) % every == 0 or step + 1 == n_select):
            report(progress, "coreset", (step + 1) / n_select)
    return selected


def _headroom(space: _ProjectedSpace, min_dist: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """``min_dist - ||y[:h]||^2 + tol·||y||^2`` for every row (or only ``rows``): the right side of the row test."""
    head_sq, slack = space.head_sq, space.slack
    if head_sq is None or slack is None:
        raise CoresetError("internal: candidate pruning asked for on a space built without it")
    if rows is None:
        room: np.ndarray = min_dist - head_sq
        room += slack
        return room
    part: np.ndarray = min_dist[rows] - head_sq[rows]
    part += slack[rows]
    return part


@dataclass
class _PruningSchedule:
    """When the lower bound keeps too many rows, stop testing it for a while (doubling pause, at most 64 steps)."""

    enabled: bool
    pause: int = 0
    backoff: int = 1

    def should_try(self) -> bool:
        if not self.enabled:
            return False
        if self.pause > 0:
            self.pause -= 1
            return False
        return True

    def record(self, pruned: bool) -> None:
        if pruned:
            self.backoff = 1
        else:
            self.pause = self.backoff
            self.backoff = min(64, 2 * self.backoff)


def _lower_distances(
    space: _ProjectedSpace,
    min_dist: np.ndarray,
    room: np.ndarray | None,
    index: int,
    chunk: int,
    buf: np.ndarray,
    pruning: _PruningSchedule,
) -> None:
    """min_dist = min(min_dist, ||y - y_index||^2), skipping rows the lower bound proves unchanged.

    ``room`` (the row test's right side, see :func:`_headroom`) is kept in step with ``min_dist``.
    """
    c = space.row(index)
    cc = space.sq[index]
    candidates = None
    if room is not None and pruning.should_try():
        candidates = _candidates(space, room, index, c, chunk, buf)
        pruning.record(candidates is not None)
    if candidates is None:
        _update_dense(space, min_dist, c, cc, chunk, buf)
        if room is not None:
            room[:] = _headroom(space, min_dist)
    elif len(candidates):
        _update_rows(space, min_dist, c, cc, candidates)
        if room is not None:
            room[candidates] = _headroom(space, min_dist, candidates)


def _candidates(
    space: _ProjectedSpace, room: np.ndarray, index: int, c: np.ndarray, chunk: int, buf: np.ndarray
) -> np.ndarray | None:
    """Rows whose head-axes lower bound does not exceed their distance (None: too many, go dense).

    Lower bound test, per row x: ||y_x[:h] - c[:h]||^2 - tol·(||y_x||^2 + ||c||^2) <= min_dist[x], evaluated
    as ``-2·y_x[:h]·c[:h] + (||c[:h]||^2 - tol·||c||^2) <= room[x]`` with one vector-matrix product over the
    transposed head axes (its row of ones adds the bracket) and one comparison.
    """
    head_t, head_sq = space.head_t, space.head_sq
    if head_t is None or head_sq is None:
        raise CoresetError("internal: candidate pruning asked for on a space built without it")
    probe = np.empty(_HEAD_DIMS + 1, dtype=np.float32)
    probe[:_HEAD_DIMS] = c[:_HEAD_DIMS]
    probe[_HEAD_DIMS] = head_sq[index] - np.float32(_ROUNDING_TOLERANCE) * space.sq[index]
    padded = len(room)
    limit = int(_DENSE_FRACTION * space.n)
    found: list[np.ndarray] = []
    count = 0
    mask = np.empty(len(buf), dtype=bool)
    for s in range(0, padded, chunk):
        e = min(padded, s + chunk)
        bound = buf[: e - s]
        np.matmul(probe, head_t[:, s:e], out=bound)
        rows = np.less_equal(bound, room[s:e], out=mask[: e - s]).nonzero()[0]
        count += len(rows)
        if count > limit:
            return None
        if len(rows):
            found.append(rows + s)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def _update_dense(
    space: _ProjectedSpace, min_dist: np.ndarray, c: np.ndarray, cc: np.float32, chunk: int, buf: np.ndarray
) -> None:
    for s in range(0, len(min_dist), chunk):
        e = min(len(min_dist), s + chunk)
        dist = buf[: e - s]
        np.matmul(space.neg2[s:e], c, out=dist)
        dist += space.sq[s:e]
        dist += cc
        np.minimum(min_dist[s:e], dist, out=min_dist[s:e])


def _update_rows(space: _ProjectedSpace, min_dist: np.ndarray, c: np.ndarray, cc: np.float32, rows: np.ndarray) -> None:
    """Gathered update; the row count is padded to a multiple of 64 (with a padding row, or row 0 repeated)."""
    count = len(rows)
    padded_count = -(-count // _ROW_BLOCK) * _ROW_BLOCK
    if padded_count != count:
        filler = len(min_dist) - 1  # a padding row when there is one; otherwise a harmless repeat
        rows = np.concatenate([rows, np.full(padded_count - count, filler, dtype=rows.dtype)])
    dist = space.neg2[rows] @ c
    dist += space.sq[rows]
    dist += cc
    rows, dist = rows[:count], dist[:count]
    min_dist[rows] = np.minimum(min_dist[rows], dist)
