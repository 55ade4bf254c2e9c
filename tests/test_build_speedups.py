"""DBT's cheaper leave-own-out search gives bitwise the scores of the k = own + 1 search it replaces.

The previous implementation is kept here as the slow reference: every batch searched for own + 1 neighbours,
and the upper bounds computed with a separate ``-2`` pass. Both run on the same machine and thread count, so
the scores, τ and s_max must be identical (faiss's float32 distances are compared as they are).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import expert.build as build_module
from eagle.images import list_images, load_image
from eagle.settings import ExpertSettings
from expert import dbt
from expert.bank import file_sha256, load_bank, load_embeddings
from expert.bank_schema import (
    EMBEDDINGS_FILE,
    EMBEDDINGS_TENSOR,
    META_FILE,
    TENSORS_FILE,
    BankError,
    BankMeta,
    compute_bank_id,
)
from expert.build import build_bank, stored_embeddings
from expert.coreset import greedy_coreset, random_projection
from expert.dbt import compute_threshold, training_scores
from expert.onnx_cache import OnnxCache
from expert.search import PatchIndex, to_distance
from tests.bank_tamper import overwrite, tamper


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


# ------------------------------------------------------------------------------ stored embeddings (teach)
# A teach rebuilds the bank from its references plus the new images; with the references' patch embeddings stored
# in the bank (embeddings.safetensors) only the new images are embedded, and the bank must be the full rebuild's.

STORE_FP32 = ExpertSettings(weights="random", seed=0)
STORE_INT8 = ExpertSettings(weights="random", seed=0, precision="int8")


@pytest.fixture(scope="module")
def teach_images(synthetic_root):
    paths = list_images(synthetic_root / "widget" / "train" / "good")[:6]
    return [load_image(p, max_pixels=10_000_000) for p in paths], [p.name for p in paths]


@pytest.fixture
def embedded(monkeypatch):
    """Images embedded by builds, counted at expert.build's embed call."""
    counted: list[int] = []
    real = build_module.embed_images

    def counting(embedder, images, **kwargs):
        counted.append(len(images))
        return real(embedder, images, **kwargs)

    monkeypatch.setattr(build_module, "embed_images", counting)
    return counted


def _build(images, names, out, settings, backbone, info, stored=None):
    return build_bank(
        images,
        names,
        settings=settings,
        backbone=backbone,
        weights_info=info,
        out_dir=out,
        name="teach",
        onnx_cache=OnnxCache(os.environ["EAGLE_ONNX_CACHE_DIR"]),
        stored=stored,
    )


def _assert_same_bank(taught: Path, rebuilt: Path, settings: ExpertSettings) -> None:
    a, b = load_bank(taught, settings), load_bank(rebuilt, settings)
    np.testing.assert_array_equal(a.coreset_image_ids, b.coreset_image_ids)
    np.testing.assert_allclose(a.memory_bank, b.memory_bank, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.train_scores, b.train_scores, rtol=1e-6)
    assert a.tau == pytest.approx(b.tau, rel=1e-6) and a.s_max == pytest.approx(b.s_max, rel=1e-6)
    np.testing.assert_allclose(load_embeddings(a), load_embeddings(b), rtol=0, atol=1e-6)


def test_a_teach_reusing_stored_embeddings_embeds_only_the_new_image_and_equals_a_rebuild(
    tmp_path, teach_images, random_backbone, random_weights_info, embedded
):
    images, names = teach_images
    old = _build(images[:-1], names[:-1], tmp_path / "old", STORE_FP32, random_backbone, random_weights_info)
    assert old.meta.embeddings is not None and (tmp_path / "old" / EMBEDDINGS_FILE).is_file()
    stored = stored_embeddings(load_bank(tmp_path / "old", STORE_FP32))
    assert stored is not None and stored.features.shape[:1] == (len(images) - 1,)
    embedded.clear()
    _build(images, names, tmp_path / "taught", STORE_FP32, random_backbone, random_weights_info, stored)
    assert sum(embedded) == 1  # only the new image
    embedded.clear()
    _build(images, names, tmp_path / "rebuilt", STORE_FP32, random_backbone, random_weights_info)
    assert sum(embedded) == len(images)
    _assert_same_bank(tmp_path / "taught", tmp_path / "rebuilt", STORE_FP32)


def test_an_old_bank_without_stored_embeddings_keeps_its_id_and_teaches_by_embedding_all(
    tmp_path, teach_images, random_backbone, random_weights_info, embedded
):
    images, names = teach_images
    _build(images[:-1], names[:-1], tmp_path / "old", STORE_FP32, random_backbone, random_weights_info)
    (tmp_path / "old" / EMBEDDINGS_FILE).unlink()
    forged = tamper(tmp_path / "old", meta=lambda raw: raw.pop("embeddings"))  # a bank saved before they existed
    meta = json.loads((forged / META_FILE).read_text())
    assert "embeddings" not in meta
    with_null = BankMeta.model_validate({**meta, "embeddings": None})
    assert compute_bank_id(load_file(str(forged / TENSORS_FILE)), with_null) == meta["bank_id"]  # id unchanged
    bank = load_bank(forged, STORE_FP32)
    assert stored_embeddings(bank) is None
    embedded.clear()
    _build(images, names, tmp_path / "taught", STORE_FP32, random_backbone, random_weights_info, None)
    assert sum(embedded) == len(images)
    assert load_bank(tmp_path / "taught", STORE_FP32).meta.embeddings is not None  # the next teach is cheap


def test_corrupted_stored_embeddings_are_refused(tmp_path, teach_images, random_backbone, random_weights_info):
    images, names = teach_images
    _build(images[:3], names[:3], tmp_path / "bank", STORE_FP32, random_backbone, random_weights_info)
    path = tmp_path / "bank" / EMBEDDINGS_FILE
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00\x00\xc0\x7f" * 2  # two NaN float32 values in the last patch
    overwrite(path, bytes(data))
    bank = load_bank(tmp_path / "bank", STORE_FP32)  # inspecting never reads them
    with pytest.raises(BankError, match="checksum differs"):
        stored_embeddings(bank)
    # A forger who also fixes the checksum and the bank id: the values themselves are refused.
    forged = tamper(tmp_path / "bank", meta=lambda raw: raw["embeddings"].update(sha256=file_sha256(path)))
    with pytest.raises(BankError, match="NaN or infinite"):
        stored_embeddings(load_bank(forged, STORE_FP32))
    # The wrong shape or dtype is refused when the bank loads (only the file's header is read).
    features = load_file(str(path))[EMBEDDINGS_TENSOR]
    for bad in (features[:2], features.astype(np.float16)):
        path.unlink()
        save_file({EMBEDDINGS_TENSOR: np.ascontiguousarray(bad)}, str(path))
        forged = tamper(tmp_path / "bank", meta=lambda raw: raw["embeddings"].update(sha256=file_sha256(path)))
        with pytest.raises(BankError, match="shape|dtype"):
            load_bank(forged, STORE_FP32)


@pytest.mark.slow
def test_an_int8_teach_recalibrates_so_the_stored_embeddings_are_not_reused(
    tmp_path, teach_images, random_backbone, random_weights_info, embedded
):
    images, names = teach_images
    _build(images[:-1], names[:-1], tmp_path / "old", STORE_INT8, random_backbone, random_weights_info)
    old = load_bank(tmp_path / "old", STORE_INT8)
    stored = stored_embeddings(old)
    assert stored is not None and stored.graph_sha256 == old.meta.backbone.onnx_sha256
    embedded.clear()
    _build(images, names, tmp_path / "taught", STORE_INT8, random_backbone, random_weights_info, stored)
    taught = load_bank(tmp_path / "taught", STORE_INT8)
    assert taught.meta.backbone.onnx_sha256 != old.meta.backbone.onnx_sha256  # re-calibrated on all references
    assert sum(embedded) == len(images)  # the stale embeddings were not used
    _build(images, names, tmp_path / "rebuilt", STORE_INT8, random_backbone, random_weights_info)
    _assert_same_bank(tmp_path / "taught", tmp_path / "rebuilt", STORE_INT8)


def test_every_bound_is_computed_before_the_first_exact_search(monkeypatch):
    """Two passes (numpy bounds, then faiss searches): alternating them per image made their threads contend."""
    features = _per_image_clusters(6, 120, 160, 1.0, 4)
    coreset = greedy_coreset(features.reshape(-1, 160), ratio=0.2, seed=4)
    calls: list[str] = []
    bounds, exact = dbt._TrainingScorer.upper_bounds, dbt._TrainingScorer._exact
    monkeypatch.setattr(dbt._TrainingScorer, "upper_bounds", lambda self, i: (calls.append("b"), bounds(self, i))[1])
    monkeypatch.setattr(
        dbt._TrainingScorer, "_exact", lambda self, q, i, own: (calls.append("e"), exact(self, q, i, own))[1]
    )
    fractions: list[float] = []
    scores, used = training_scores(
        features, coreset, min_unsampled=8, use_gpu=False, progress=lambda stage, f: fractions.append(f)
    )
    assert calls[: used.sum()] == ["b"] * int(used.sum()) and set(calls[used.sum() :]) == {"e"}
    np.testing.assert_array_equal(scores, _reference_scores(features, coreset, used, "leave_own_out"))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) == 2 * used.sum()
