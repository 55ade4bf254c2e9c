"""Versioned banks and "teach the bank" at the store and pipeline level, with the real expert.

A random-weight expert at 32 × 32 input (``tests.service_helpers.REAL_EXPERT``): the whole build path, fast.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eagle.bank_versions import VERSIONS_DIR
from eagle.banks import BankError, BankStore, BankVersionNotFoundError
from eagle.pipeline import Pipeline
from eagle.settings import Settings
from expert.bank import read_meta
from expert.bank_schema import META_FILE
from tests.service_helpers import REAL_EXPERT
from tests.synthetic import train_and_good_images

BANK = "widget"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    return train_and_good_images(tmp_path_factory.mktemp("versions-data"))


def make_pipeline(data_dir: Path, **overrides) -> Pipeline:
    return Pipeline(Settings(data_dir=data_dir, expert=REAL_EXPERT, mllm={"enabled": False}, **overrides))


def relit(path: Path, dest: Path, gain: float = 1.6) -> Path:
    """A good part under new lighting: brighter, so a bank built without it may flag it."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
    Image.fromarray(np.clip(pixels * gain + 20, 0, 255).astype(np.uint8)).save(dest)
    return dest


def test_build_teach_history_rollback(tmp_path, images):
    pipeline = make_pipeline(tmp_path)
    store = pipeline.banks
    built = pipeline.build_bank(images["train"], BANK)
    link = store.root / BANK
    assert link.is_symlink() and os.readlink(link) == f"{VERSIONS_DIR}/{BANK}/0001"
    assert store.current_version(BANK) == 1 and built.n_references == 6

    taught_image = relit(images["good"][0], tmp_path / "relit.png")
    result = pipeline.add_references([taught_image], BANK)
    assert (result.version_before, result.version) == (1, 2)
    assert (result.references_before, result.references_after) == (6, 7)
    assert result.tau_before == pytest.approx(built.tau)
    summary = store.summary(BANK)
    assert result.tau_after == pytest.approx(summary.tau) and result.s_max_after == pytest.approx(summary.s_max)
    [taught] = result.taught
    assert taught.name == "relit.png" and taught.score_after <= taught.score_before + 1e-6
    assert taught.passes_now == (taught.score_after < summary.tau)
    meta = read_meta(link)
    assert [r.name for r in meta.references][-1] == "relit.png" and meta.counts.references == 7
    # same settings, same seed: the bank's own coreset and threshold settings
    old_meta = read_meta(store.root / VERSIONS_DIR / BANK / "0001")
    assert meta.coreset == old_meta.coreset and meta.threshold.method == old_meta.threshold.method
    assert meta.threshold.params == old_meta.threshold.params
    # the stored references are reused at their stored size
    for i in range(6):
        old_png = store.root / VERSIONS_DIR / BANK / "0001" / old_meta.references[i].file
        assert (link / meta.references[i].file).read_bytes() == old_png.read_bytes()
    # the ~100 MB backbone graph is stored once: the new version's file is a hard link to the old one's
    old_graph = store.root / VERSIONS_DIR / BANK / "0001" / "backbone.onnx"
    assert (link / "backbone.onnx").stat().st_ino == old_graph.stat().st_ino

    history = store.history(BANK)
    assert [(v.version, v.current, v.n_references, v.action) for v in history] == [
        (1, False, 6, "build"),
        (2, True, 7, "teach"),
    ]
    assert history[1].tau == pytest.approx(result.tau_after) and "relit.png" in history[1].note

    rolled = store.rollback(BANK, 1)
    assert rolled.n_references == 6 and rolled.bank_id == built.bank_id and store.current_version(BANK) == 1
    assert pipeline.banks.load(BANK).bank.meta.bank_id == built.bank_id
    # the next change is numbered above the highest kept version: a rollback is never overwritten
    again = pipeline.add_references([taught_image], BANK)
    assert (again.version_before, again.version) == (1, 3)
    with pytest.raises(BankVersionNotFoundError, match="no version 9"):
        store.rollback(BANK, 9)


def test_old_versions_are_pruned_and_the_current_one_is_kept(tmp_path, images):
    pipeline = make_pipeline(tmp_path, bank_versions_kept=2)
    pipeline.build_bank(images["train"], BANK)
    pipeline.add_references([images["good"][0]], BANK)
    pipeline.add_references([images["good"][1]], BANK)
    assert [v.version for v in pipeline.banks.history(BANK)] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "banks" / VERSIONS_DIR / BANK).iterdir()) == [
        "0002",
        "0002.json",
        "0003",
        "0003.json",
    ]
    pipeline.banks.rollback(BANK, 2)
    pipeline.add_references([images["good"][2]], BANK)  # version 4; 3 pruned, 2 kept (oldest beyond 2) ...
    assert [v.version for v in pipeline.banks.history(BANK)] == [3, 4]


def test_a_format1_bank_without_versions_loads_and_becomes_version_1(tmp_path, images):
    pipeline = make_pipeline(tmp_path)
    legacy = tmp_path / "banks" / BANK
    summary = pipeline.build_bank(images["train"], BANK, out_dir=legacy)  # a plain bank directory, as before
    assert legacy.is_dir() and not legacy.is_symlink()
    assert pipeline.banks.load(BANK).bank.meta.bank_id == summary.bank_id
    [only] = pipeline.banks.history(BANK)
    assert (only.version, only.current, only.action) == (0, True, "unversioned")
    assert pipeline.banks.current_version(BANK) is None
    result = pipeline.add_references([images["good"][0]], BANK)
    assert (result.version_before, result.version) == (1, 2)  # adopted as version 1 first
    history = pipeline.banks.history(BANK)
    assert [(v.version, v.action) for v in history] == [(1, "adopted"), (2, "teach")]
    assert history[0].bank_id == summary.bank_id
    pipeline.banks.rollback(BANK, 1)
    assert pipeline.banks.summary(BANK).bank_id == summary.bank_id


def test_a_running_store_picks_up_a_version_written_elsewhere(tmp_path, images):
    """The service's store (one process) sees a change made by another (``eagle bank add``) on its next request."""
    writer = make_pipeline(tmp_path)
    writer.build_bank(images["train"], BANK)
    service = BankStore(tmp_path / "banks", writer.settings.expert)
    old = service.load(BANK)
    assert service.load(BANK) is old  # cached while nothing changes
    writer.add_references([images["good"][0]], BANK)
    new = service.load(BANK)
    assert new is not old and len(new.bank.meta.references) == 7
    assert service.template_image(BANK, 6).shape[2] == 3
    # the old expert is pinned to its own version directory: an inspection in flight keeps working
    assert old.bank.directory.name == "0001" and new.bank.directory.name == "0002"
    assert old.bank.load_reference(0).shape == new.bank.load_reference(0).shape
    writer.banks.rollback(BANK, 1)
    assert service.load(BANK).bank.meta.counts.references == 6


def test_readers_never_see_a_half_written_bank(tmp_path, images):
    """Inspections keep running while versions are written and swapped: every one scores with a complete bank."""
    pipeline = make_pipeline(tmp_path)
    pipeline.build_bank(images["train"], BANK)
    reader = BankStore(tmp_path / "banks", pipeline.settings.expert)
    query = np.asarray(Image.open(images["good"][0]).convert("RGB"))
    errors: list[BaseException] = []
    seen: set[int] = set()
    stop = threading.Event()

    def inspect_forever() -> None:
        while not stop.is_set():
            try:
                scorer = reader.load(BANK)
                seen.add(len(scorer.bank.meta.references))
                assert np.isfinite(scorer.score(query).score)
            except BaseException as err:  # noqa: BLE001 - collected for the assertion below
                errors.append(err)
                return

    thread = threading.Thread(target=inspect_forever)
    thread.start()
    try:
        pipeline.add_references([images["good"][1]], BANK)
        pipeline.add_references([images["good"][2]], BANK)
        pipeline.banks.rollback(BANK, 1)
    finally:
        stop.set()
        thread.join(60)
    assert errors == []
    assert seen <= {6, 7, 8} and 6 in seen


def test_two_processes_teaching_at_once_lose_nothing(tmp_path, images):
    """The API and an `eagle bank add` on one data folder: two stores (as in two processes) teach at once.

    Each store has its own in-process lock, so only the per-bank file lock keeps them apart; without it both
    would build on version 1 and the later version would silently miss the other's image.
    """
    first = make_pipeline(tmp_path)
    first.build_bank(images["train"], BANK)
    second = make_pipeline(tmp_path)
    start = threading.Barrier(2)
    results, errors = {}, []

    def teach(pipeline: Pipeline, image: Path) -> None:
        try:
            start.wait(30)
            results[image.name] = pipeline.add_references([image], BANK)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    threads = [
        threading.Thread(target=teach, args=(first, images["good"][0])),
        threading.Thread(target=teach, args=(second, images["good"][1])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert sorted((r.version_before, r.version) for r in results.values()) == [(1, 2), (2, 3)]
    meta = read_meta(tmp_path / "banks" / BANK)
    assert meta.counts.references == 8
    assert {images["good"][0].name, images["good"][1].name} <= {r.name for r in meta.references}
    assert [(v.version, v.n_references) for v in first.banks.history(BANK)] == [(1, 6), (2, 7), (3, 8)]


def test_a_failed_write_changes_nothing(tmp_path, images):
    pipeline = make_pipeline(tmp_path)
    built = pipeline.build_bank(images["train"], BANK)

    def broken(directory: Path) -> None:
        (directory / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.banks.write_version(BANK, broken, action="teach")
    assert pipeline.banks.current_version(BANK) == 1 and pipeline.banks.summary(BANK).bank_id == built.bank_id
    assert sorted(p.name for p in (tmp_path / "banks" / VERSIONS_DIR / BANK).iterdir()) == ["0001", "0001.json"]
    with pytest.raises(RuntimeError):
        pipeline.banks.write_version("fresh", broken, action="build")
    assert not (tmp_path / "banks" / VERSIONS_DIR / "fresh").exists() and not pipeline.banks.exists("fresh")


def test_unreadable_taught_images_change_nothing(tmp_path, images):
    pipeline = make_pipeline(tmp_path)
    pipeline.build_bank(images["train"], BANK)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(Exception, match="bad.png"):
        pipeline.add_references([bad], BANK)
    assert pipeline.banks.current_version(BANK) == 1
    with pytest.raises(FileNotFoundError):
        pipeline.add_references([images["good"][0]], "nope")


def test_delete_and_import_with_versions(tmp_path, images):
    pipeline = make_pipeline(tmp_path)
    pipeline.build_bank(images["train"], BANK)
    pipeline.add_references([images["good"][0]], BANK)
    zipped = pipeline.banks.export_zip(BANK, tmp_path / "widget.zip")
    summary = pipeline.banks.import_zip(zipped, BANK)  # an import replaces the bank as its next version
    assert summary.n_references == 7 and pipeline.banks.current_version(BANK) == 3
    assert pipeline.banks.history(BANK)[-1].action == "import"
    copy = pipeline.banks.import_zip(zipped, "copy")
    assert copy.n_references == 7 and pipeline.banks.current_version("copy") == 1
    pipeline.banks.delete(BANK)
    assert not pipeline.banks.exists(BANK) and not (tmp_path / "banks" / VERSIONS_DIR / BANK).exists()
    assert [s.name for s in pipeline.banks.list()] == ["copy"]
    with pytest.raises(BankError):
        pipeline.banks.write_version("copy", lambda directory: None, action="teach")
    assert (tmp_path / "banks" / "copy" / META_FILE).is_file()
