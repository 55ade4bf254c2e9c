"""Nearest-neighbour patch scores against a memory bank with faiss ``IndexFlatL2`` (exact search).

faiss returns SQUARED L2 distances. ``distance="sqeuclidean"`` (the default, as the reference code)
returns them as they are; ``distance="euclidean"`` (the paper's Eq. 3) returns their square root.
Tiny negative values from floating-point rounding are clamped to 0 in both cases (faiss already does
this for flat indexes, so in practice ``sqeuclidean`` values are exactly faiss's).

When the installed faiss has GPU support and a GPU is visible, the index is copied to GPU 0
(``faiss.StandardGpuResources`` + ``faiss.index_cpu_to_gpu``); otherwise it stays on the CPU.

Example:
    >>> import numpy as np
    >>> bank = np.eye(3, 4, dtype=np.float32)
    >>> PatchIndex(bank).search(np.array([[1, 0, 0, 0], [0, 0, 0, 2]], dtype=np.float32)).tolist()
    [0.0, 5.0]
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import faiss
import numpy as np

from expert.errors import ExpertError

Distance = Literal["sqeuclidean", "euclidean"]
DISTANCES: tuple[Distance, ...] = get_args(Distance)
GPU_MAX_K = 2048  # faiss GPU k-selection limit


class SearchError(ExpertError, ValueError):
    """The memory bank or the queries are unusable (wrong shape, dimension, dtype or non-finite values)."""

    code = "search_failed"


def faiss_gpu_available() -> bool:
    """True when this faiss build has GPU support and at least one GPU is visible."""
    return hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def check_distance(distance: str) -> Distance:
    """Return ``distance`` if it is a supported name, else raise :class:`SearchError`."""
    if distance not in DISTANCES:
        raise SearchError(f"unknown distance {distance!r}; expected one of {', '.join(DISTANCES)}")
    return distance


def to_distance(squared: np.ndarray, distance: Distance) -> np.ndarray:
    """Convert faiss's squared L2 values to ``distance`` (float32, negatives from rounding clamped to 0)."""
    values = np.maximum(np.asarray(squared, dtype=np.float32), np.float32(0.0))
    result: np.ndarray = np.sqrt(values) if distance == "euclidean" else values
    return result


def _as_matrix(array: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise SearchError(f"{what} must be a non-empty 2-D array [rows, dim], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise SearchError(f"{what} must be floating point, got dtype {array.dtype}")
    if dim is not None and array.shape[1] != dim:
        raise SearchError(f"{what} have dimension {array.shape[1]}, the memory bank has {dim}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise SearchError(f"{what} contain NaN or infinite values")
    return array


class PatchIndex:
    """Exact k-NN over a memory bank [M, D] float32 (faiss ``IndexFlatL2``, on GPU when available).

    Args:
        memory_bank: [M, D] patch features (converted to contiguous float32).
        distance: ``"sqeuclidean"`` (default) or ``"euclidean"``.
        use_gpu: None = GPU when :func:`faiss_gpu_available`; False = always CPU; True = GPU or error.
    """

    def __init__(self, memory_bank: np.ndarray, *, distance: Distance = "sqeuclidean", use_gpu: bool | None = None):
        self.distance: Distance = check_distance(distance)
        bank = _as_matrix(memory_bank, "memory bank")
        self.size, self.dim = bank.shape
        index: Any = faiss.IndexFlatL2(self.dim)  # a CPU index, or its GPU copy below
        index.add(bank)
        self._gpu_resources = None
        want_gpu = faiss_gpu_available() if use_gpu is None else use_gpu
        if want_gpu:
            if not faiss_gpu_available():
                raise SearchError("use_gpu=True but this faiss build has no GPU support or no GPU is visible")
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        self._index = index

    @property
    def on_gpu(self) -> bool:
        """Whether the index lives on a GPU."""
        return self._gpu_resources is not None

    def search(self, queries: np.ndarray) -> np.ndarray:
        """Distance of every query to its nearest bank entry (k = 1): [Q] float32."""
        distances, _ = self.search_knn(queries, 1)
        return distances[:, 0]

    def search_knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest bank entries of every query, nearest first.

        Returns:
            (distances [Q, k] float32 in this index's distance, bank row ids [Q, k] int64). ``k`` is capped
            at the bank size.
        """
        queries = _as_matrix(queries, "queries", self.dim)
        if k < 1:
            raise SearchError(f"k must be >= 1, got {k}")
        k = min(int(k), self.size)
        if self.on_gpu and k > GPU_MAX_K:
            raise SearchError(f"k={k} exceeds the faiss GPU limit of {GPU_MAX_K}")
        squared, ids = self._index.search(queries, k)
        return to_distance(squared, self.distance), ids.astype(np.int64, copy=False)
