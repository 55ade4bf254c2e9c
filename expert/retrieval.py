"""Template retrieval for the 1-shot+ prompt: the reference image most similar to a query.

Global descriptor of an image: the MEAN of its patch embeddings (the same [P, D] features the expert
already computes, so retrieval costs one extra mean), L2-normalised. Mean pooling over the patch grid
does not depend on where things are in the image, so a shifted or slightly moved copy of a
reference still maps close to it. Similarity is the cosine, i.e. the dot product of the normalised
descriptors; ties go to the lowest index.

Example:
    >>> import numpy as np
    >>> feats = np.random.default_rng(0).random((3, 784, 16), dtype=np.float32)
    >>> bank = global_descriptors(feats)
    >>> most_similar(bank[2], bank)
    2
"""

from __future__ import annotations

import numpy as np

from expert.errors import ExpertError

_EPS = 1e-12


class RetrievalError(ExpertError, ValueError):
    """Descriptors or patch features have the wrong shape, or the bank is empty."""

    code = "retrieval_failed"


def global_descriptors(patch_features: np.ndarray) -> np.ndarray:
    """Mean-pooled, L2-normalised descriptor per image.

    Args:
        patch_features: [N, P, D] patch features (or [P, D] for a single image, giving [1, D]).

    Returns:
        [N, D] float32, each row of unit L2 norm (an all-zero image stays all zero).
    """
    feats = np.asarray(patch_features)
    if feats.ndim == 2:
        feats = feats[None]
    if feats.ndim != 3 or 0 in feats.shape:
        raise RetrievalError(f"patch features must be [N, P, D] or [P, D], got shape {np.shape(patch_features)}")
    pooled = feats.mean(axis=1, dtype=np.float64)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    result: np.ndarray = (pooled / np.maximum(norms, _EPS)).astype(np.float32)
    return result


def similarities(query_desc: np.ndarray, bank_desc: np.ndarray) -> np.ndarray:
    """Cosine similarity [N] float32 of one normalised query descriptor [D] to every bank descriptor [N, D]."""
    query = np.asarray(query_desc, dtype=np.float32).reshape(-1)
    bank = np.asarray(bank_desc, dtype=np.float32)
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise RetrievalError(f"bank descriptors must be a non-empty [N, D] array, got shape {bank.shape}")
    if bank.shape[1] != query.shape[0]:
        raise RetrievalError(f"query descriptor has dimension {query.shape[0]}, the bank has {bank.shape[1]}")
    return bank @ query


def most_similar(query_desc: np.ndarray, bank_desc: np.ndarray) -> int:
    """Index of the bank image whose descriptor has the highest cosine similarity to the query."""
    return int(np.argmax(similarities(query_desc, bank_desc)))
