"""The bounded cache of loaded banks: at most ``max_loaded_banks`` experts stay loaded, least recently used out."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from pydantic import ValidationError

from eagle.pipeline import Pipeline
from eagle.settings import Settings
from tests.fixtures_pipeline import pipeline_settings, split_test_images


@pytest.fixture(scope="module")
def three_banks(built_pipeline, tmp_path_factory):
    """A pipeline limited to 2 loaded banks (``EAGLE_MAX_LOADED_BANKS=2``) holding banks a, b, c (the same bank)."""
    scratch = tmp_path_factory.mktemp("bank-cache")
    archive = built_pipeline.pipeline.banks.export_zip("widget", scratch / "widget.zip")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EAGLE_MAX_LOADED_BANKS", "2")
        settings = pipeline_settings(scratch / "data")
    pipeline = Pipeline(settings)
    for name in ("a", "b", "c"):
        pipeline.banks.import_zip(archive, name)
    return pipeline


@pytest.fixture(scope="module")
def query(synthetic_root) -> np.ndarray:
    from PIL import Image

    _, bad = split_test_images(synthetic_root)
    with Image.open(bad[0]) as image:
        return np.asarray(image.convert("RGB"))


def test_the_setting_reaches_the_store(three_banks):
    assert three_banks.settings.max_loaded_banks == 2 and three_banks.banks.max_loaded == 2
    with pytest.raises(ValidationError):
        Settings(max_loaded_banks=0)


def test_at_most_n_banks_stay_loaded_least_recently_used_first(three_banks, query):
    store = three_banks.banks
    for name in ("a", "b", "c"):
        store.forget(name)
    three_banks.run_expert(query, "a")
    three_banks.run_expert(query, "b")
    assert store.loaded() == ["a", "b"]
    three_banks.run_expert(query, "a")  # a is used again: b is now the least recently used
    assert store.loaded() == ["b", "a"]
    three_banks.run_expert(query, "c")
    assert store.loaded() == ["a", "c"]  # b went, the reused a stayed
    three_banks.run_expert(query, "b")
    assert store.loaded() == ["c", "b"] and len(store.loaded()) <= store.max_loaded


def test_an_evicted_bank_reloads_with_the_same_scores(three_banks, query):
    store = three_banks.banks
    first = store.load("a")
    before = three_banks.run_expert(query, "a")
    store.load("b")
    store.load("c")  # a is the least recently used: dropped
    assert "a" not in store.loaded()
    in_flight = first.score(query)  # a request still holding the dropped expert finishes with it
    assert in_flight.score == before.score

    after = three_banks.run_expert(query, "a")  # loaded again from disk, with its test inspection
    assert store.load("a") is not first and store.loaded() == ["c", "a"]
    assert after.score == pytest.approx(before.score, rel=1e-6)
    assert after.anomalous == before.anomalous and after.template_index == before.template_index
    np.testing.assert_allclose(after.anomaly_map, before.anomaly_map, rtol=1e-5, atol=1e-6)
    assert store.load("a").tau == first.tau


def test_a_dropped_expert_is_freed_once_nothing_uses_it(three_banks):
    store = three_banks.banks
    store.load("a")
    dropped = weakref.ref(store.load("a"))
    store.load("b")
    store.load("c")
    gc.collect()
    assert dropped() is None  # nothing in the store keeps the evicted expert (its ONNX session and arrays)
