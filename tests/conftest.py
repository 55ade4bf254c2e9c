"""Shared test fixtures: a synthetic MVTec-like data set and a seeded random-weight backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the two cores: one OpenMP thread each, in every thread (torch.set_num_threads binds only the
    # calling thread under OpenMP, so a front end's worker thread would otherwise use two and round differently
    # from the main thread) and in the subprocesses the tests start.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from tests.synthetic import make_mvtec_like


@pytest.fixture(scope="session", autouse=True)
def _limit_threads():
    """The CI box has 2 shared cores: keep torch from oversubscribing them.

    Under pytest-xdist (``-n 2``, the README's test command) each worker process gets one thread, so the two workers
    together use the two cores; a serial run uses both.
    """
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
    yield


@pytest.fixture(scope="session", autouse=True)
def _shared_onnx_cache(tmp_path_factory):
    """One ONNX graph cache for the whole run (``EAGLE_ONNX_CACHE_DIR``), whatever data dir a test builds banks in.

    Without it every bank built under a fresh data dir exports the ~100 MB graph again (10-20 s on 2 cores). The
    variable is in ``os.environ``, so :class:`~eagle.settings.Settings` built in a test and ``eagle`` subprocesses
    that inherit the environment see it. Entries are keyed by everything the graph depends on and written
    atomically under a per-key lock (:mod:`expert.onnx_cache`), so different configurations never collide. Tests
    of the cache itself use folders of their own.
    """
    base = tmp_path_factory.getbasetemp()
    # xdist workers each have a base folder of their own under one shared parent: share the cache across them too.
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "onnx-cache"
    cache.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EAGLE_ONNX_CACHE_DIR", str(cache))
        yield


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Root of a synthetic MVTec-AD folder (category ``widget``); see :func:`synthetic.make_mvtec_like`."""
    return make_mvtec_like(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="session")
def random_backbone_loaded():
    """``(module, WeightsInfo)`` from :func:`expert.weights.load_backbone` with ``weights="random", seed=0``."""
    from eagle.settings import ExpertSettings
    from expert.weights import load_backbone

    return load_backbone(ExpertSettings(weights="random", seed=0))


@pytest.fixture(scope="session")
def random_backbone(random_backbone_loaded):
    """Seeded random-weight WideResNet-50-2 feature extractor (layer2+layer3), eval mode."""
    return random_backbone_loaded[0]


@pytest.fixture(scope="session")
def random_weights_info(random_backbone_loaded):
    """The :class:`expert.weights.WeightsInfo` of :func:`random_backbone` (source ``random:seed=0``)."""
    return random_backbone_loaded[1]


@pytest.fixture(scope="session")
def patch_embedder(random_backbone):
    """:class:`expert.backbone.PatchEmbedder` over the random backbone, eval mode."""
    from expert.backbone import build_patch_embedder

    return build_patch_embedder(random_backbone)


# Fixture plugins shared across test files (tiny offline MLLMs; a pipeline with the synthetic bank built once).
from tests.fixtures_mllm import tiny_llava_dir, tiny_qwen_dir  # noqa: E402, F401
from tests.fixtures_pipeline import built_pipeline  # noqa: E402, F401
