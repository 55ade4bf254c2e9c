"""The per-class bank cache: reused when nothing changed, rebuilt when a setting or a reference changes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from eagle.evaluation.bankcache import BankCache, bank_name, cache_key
from eagle.settings import ExpertSettings
from tests.fake_pipeline import FakePipeline
from tests.synthetic import make_mvtec_like


@pytest.fixture
def references(tmp_path: Path) -> list[Path]:
    root = make_mvtec_like(tmp_path / "data", n_train=3, n_test_good=0, n_test_bad_per_type=0, sizes=((32, 32),))
    return sorted((root / "widget" / "train" / "good").glob("*.png"))


def _get(tmp_path: Path, expert: ExpertSettings, references: list[Path]) -> tuple[str, FakePipeline]:
    pipeline = FakePipeline(tmp_path / "cache")  # a fresh pipeline each time: only the disk is shared
    cache = BankCache(pipeline, expert, manifest=tmp_path / "banks.json", progress=False)
    return cache.get("widget", references, root=references[0].parents[3]), pipeline


def test_reused_when_nothing_changed(tmp_path: Path, references: list[Path]) -> None:
    first, p1 = _get(tmp_path, ExpertSettings(weights="random"), references)
    second, p2 = _get(tmp_path, ExpertSettings(weights="random"), references)
    assert first == second and p1.builds == [first] and p2.builds == []
    manifest = json.loads((tmp_path / "banks.json").read_text())
    assert manifest["widget"]["bank"] == first and manifest["widget"]["reused"] is True
    assert manifest["widget"]["settings"]["kappa"] == 3.0


def test_rebuilt_when_a_bank_setting_changes_and_old_one_pruned(tmp_path: Path, references: list[Path]) -> None:
    first, _ = _get(tmp_path, ExpertSettings(weights="random"), references)
    second, p2 = _get(tmp_path, ExpertSettings(weights="random", kappa=2.0), references)
    assert second != first and p2.builds == [second]
    assert [s.name for s in p2.banks.list()] == [second]  # the superseded bank is deleted
    third, p3 = _get(tmp_path, ExpertSettings(weights="random", kappa=2.0, coreset_ratio=0.2), references)
    assert third not in (first, second) and p3.builds == [third]


def test_scoring_only_settings_do_not_rebuild(tmp_path: Path, references: list[Path]) -> None:
    first, _ = _get(tmp_path, ExpertSettings(weights="random"), references)
    second, p2 = _get(
        tmp_path, ExpertSettings(weights="random", max_boxes=1, gaussian_sigma=2.0, batch_size=2), references
    )
    assert second == first and p2.builds == []


def test_rebuilt_when_a_reference_file_changes(tmp_path: Path, references: list[Path]) -> None:
    first, _ = _get(tmp_path, ExpertSettings(weights="random"), references)
    stat = references[0].stat()
    os.utime(references[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second, p2 = _get(tmp_path, ExpertSettings(weights="random"), references)
    assert second != first and p2.builds == [second]
    third, p3 = _get(tmp_path, ExpertSettings(weights="random"), references[:2])  # one reference fewer
    assert third != second and p3.builds == [third]


def test_rebuilt_when_the_cached_bank_is_unreadable(tmp_path: Path, references: list[Path]) -> None:
    first, p1 = _get(tmp_path, ExpertSettings(weights="random"), references)
    (p1.banks.path(first) / "meta.json").write_text("{corrupt")
    second, p2 = _get(tmp_path, ExpertSettings(weights="random"), references)
    assert second == first and p2.builds == [first]


def test_key_and_name() -> None:
    key = cache_key(ExpertSettings(weights="random"), [])
    assert len(key) == 64 and key != cache_key(ExpertSettings(weights="random", seed=1), [])
    assert bank_name("MVTec-AD/bottle", key) == f"MVTec-AD_bottle-{key[:16]}"
    assert len(bank_name("x" * 100, key)) <= 64


def test_shared_bank_folder_is_not_pruned(tmp_path: Path, references: list[Path]) -> None:
    pipeline = FakePipeline(tmp_path / "shared")
    root = references[0].parents[3]
    first = BankCache(pipeline, ExpertSettings(weights="random"), progress=False, prune=False).get(
        "widget", references, root=root
    )
    second = BankCache(pipeline, ExpertSettings(weights="random", kappa=2.0), progress=False, prune=False).get(
        "widget", references, root=root
    )
    assert sorted(s.name for s in pipeline.banks.list()) == sorted([first, second])
