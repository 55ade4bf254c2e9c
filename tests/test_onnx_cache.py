"""The ONNX export cache: reuse across builds, exact keys, corruption detected and repaired, no torn files."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import expert.onnx_cache as onnx_cache
from eagle.settings import ExpertSettings
from expert.bank import file_sha256, load_bank
from expert.onnx_cache import ExportKey, OnnxCache
from tests.synthetic import make_good_image

SETTINGS = ExpertSettings(weights="random", seed=0, min_references=2, recommended_references=2)
KEY = ExportKey.create("wide_resnet50_2.tv_in1k", "sha256:" + "ab" * 32, crop=224)


class FakeExporter:
    """Writes ``payload`` in chunks (slowly when asked) and counts its calls; never a real ONNX graph."""

    def __init__(self, payload: bytes = b"graph-v1" * 50_000, *, chunk_delay: float = 0.0) -> None:
        self.payload = payload
        self.chunk_delay = chunk_delay
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, module: torch.nn.Module, path: Path, crop: int) -> Path:
        with self._lock:
            self.calls += 1
        with open(path, "wb") as handle:
            for start in range(0, len(self.payload), 65536):
                handle.write(self.payload[start : start + 65536])
                handle.flush()
                time.sleep(self.chunk_delay)
        return path


def no_backbone() -> torch.nn.Module:
    raise AssertionError("the backbone loader must not be called on a cache hit")


# ----------------------------------------------------------------------------------------------- builds
@pytest.fixture(scope="module")
def real_graph(tmp_path_factory, patch_embedder) -> Path:
    """One real export of the random-weight patch embedder, copied by the counting exporters below."""
    from expert.embedder import export_onnx

    return export_onnx(patch_embedder, tmp_path_factory.mktemp("graph") / "backbone.onnx")


@pytest.fixture
def counted_exports(monkeypatch, real_graph) -> list[Path]:
    """Replace the export the cache calls by a copy of :func:`real_graph`; returns the list of calls."""
    calls: list[Path] = []

    def export(module, path, *, input_size, opset):
        assert isinstance(module, torch.nn.Module) and input_size == 224
        calls.append(Path(path))
        shutil.copyfile(real_graph, path)
        return Path(path)

    monkeypatch.setattr(onnx_cache, "export_onnx", export)
    return calls


def _references(n: int = 3) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(0)
    return [make_good_image(224, 240, rng) for _ in range(n)], [f"ref{i}.png" for i in range(n)]


def test_second_build_reuses_the_cached_graph(tmp_path, counted_exports, random_backbone, random_weights_info):
    from expert.build import build_bank

    images, names = _references()
    cache_dir = tmp_path / "cache" / "onnx"
    loads = []

    def loader():
        loads.append(1)
        return random_backbone

    common = dict(settings=SETTINGS, weights_info=random_weights_info, name="w", onnx_cache=cache_dir)
    first = build_bank(images, names, backbone=loader, out_dir=tmp_path / "b1", **common)
    assert len(counted_exports) == 1 and len(loads) == 1
    second = build_bank(images, names, backbone=no_backbone, out_dir=tmp_path / "b2", **common)
    assert len(counted_exports) == 1, "the second build exported again"
    # Each bank names the cached graph by a hard link of its own: one copy on disk, identical to the cache entry.
    (entry,) = OnnxCache(cache_dir).entries()
    assert first.onnx_path != entry and first.onnx_path.stat().st_ino == entry.stat().st_ino
    assert second.onnx_path.stat().st_ino == entry.stat().st_ino and entry.stat().st_nlink == 3
    assert first.meta.backbone.onnx_sha256 == second.meta.backbone.onnx_sha256 == file_sha256(entry)
    assert json.loads(entry.with_suffix(".json").read_text())["sha256"] == file_sha256(entry)
    np.testing.assert_array_equal(load_bank(first.directory).memory_bank, load_bank(second.directory).memory_bank)
    # Emptying the cache leaves both banks whole.
    OnnxCache(cache_dir).prune(keep=ExportKey.create("other", "sha256:00", crop=224))
    assert not entry.exists() and load_bank(first.directory).has_onnx and load_bank(second.directory).has_onnx


def test_banks_copy_the_graph_where_hard_links_are_impossible(
    tmp_path, monkeypatch, counted_exports, random_backbone, random_weights_info
):
    """A cache on another filesystem (EXDEV) or one without hard links: the bank gets its own copy."""
    import errno
    import os

    from expert.build import build_bank

    def no_links(source, destination):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    images, names = _references()
    cache_dir = tmp_path / "cache" / "onnx"
    bank = build_bank(
        images,
        names,
        settings=SETTINGS,
        weights_info=random_weights_info,
        name="w",
        onnx_cache=cache_dir,
        backbone=random_backbone,
        out_dir=tmp_path / "b",
    )
    (entry,) = OnnxCache(cache_dir).entries()
    assert bank.onnx_path.stat().st_ino != entry.stat().st_ino and bank.onnx_path.stat().st_nlink == 1
    assert file_sha256(bank.onnx_path) == file_sha256(entry) == bank.meta.backbone.onnx_sha256


def test_pipeline_warm_up_then_builds_never_export(tmp_path, monkeypatch, counted_exports, random_backbone_loaded):
    import expert.weights
    from eagle.pipeline import Pipeline
    from eagle.settings import Settings

    loads = []

    def load_backbone(settings):
        loads.append(1)
        return random_backbone_loaded

    monkeypatch.setattr(expert.weights, "load_backbone", load_backbone)
    monkeypatch.delenv("EAGLE_ONNX_CACHE_DIR", raising=False)  # a cache of its own: the default, under the data dir
    settings = Settings(data_dir=tmp_path, mllm={"enabled": False}, expert=SETTINGS.model_dump())
    pipeline = Pipeline(settings)
    cached = pipeline.warm_onnx_cache()  # what the app's start-up thread and `eagle warm-cache` do
    assert cached.parent == settings.onnx_cache_path == tmp_path / "cache" / "onnx"
    assert len(counted_exports) == 1 and len(loads) == 1
    images, names = _references()
    pipeline.build_bank(images, "a", names=names)
    assert len(counted_exports) == 1 and len(loads) == 1  # neither exported nor loaded the weights again
    Pipeline(settings).build_bank(images, "b", names=names)  # a new process (e.g. after the container build)
    assert len(counted_exports) == 1 and len(loads) == 2  # the weights' checksum is needed once per process
    banks = settings.banks_dir
    assert file_sha256(banks / "a" / "backbone.onnx") == file_sha256(banks / "b" / "backbone.onnx")


def test_data_dirs_share_the_configured_cache_folder(tmp_path, monkeypatch, counted_exports, random_backbone_loaded):
    """``EAGLE_ONNX_CACHE_DIR``: pipelines on different data dirs export once into that folder, none under them."""
    import expert.weights
    from eagle.pipeline import Pipeline
    from eagle.settings import Settings

    monkeypatch.setattr(expert.weights, "load_backbone", lambda settings: random_backbone_loaded)
    monkeypatch.setenv("EAGLE_ONNX_CACHE_DIR", str(tmp_path / "shared"))
    paths = []
    for name in ("one", "two"):
        settings = Settings(data_dir=tmp_path / name, mllm={"enabled": False}, expert=SETTINGS.model_dump())
        assert settings.onnx_cache_path == tmp_path / "shared"
        paths.append(Pipeline(settings).warm_onnx_cache())
    assert len(counted_exports) == 1 and paths[0] == paths[1] and paths[0].parent == tmp_path / "shared"
    assert OnnxCache(tmp_path / "shared").entries() == [paths[0]]
    assert not (tmp_path / "one" / "cache").exists() and not (tmp_path / "two" / "cache").exists()


# ----------------------------------------------------------------------------------------------- keys
def test_key_changes_with_everything_the_graph_depends_on(monkeypatch):
    base = dict(backbone="wide_resnet50_2.tv_in1k", weights_checksum="sha256:" + "00" * 32, crop=224)
    digest = ExportKey.create(**base).digest()
    assert ExportKey.create(**base).digest() == digest  # deterministic
    assert ExportKey.create(**{**base, "crop": 256}).digest() != digest
    assert ExportKey.create(**{**base, "weights_checksum": "sha256:" + "01" * 32}).digest() != digest
    assert ExportKey.create(**{**base, "backbone": "resnet18"}).digest() != digest
    assert ExportKey.create(**base, opset=18).digest() != digest
    monkeypatch.setattr(torch, "__version__", "99.0.0")
    assert ExportKey.create(**base).digest() != digest
    monkeypatch.undo()
    onnx_cache.embedding_code_fingerprint.cache_clear()
    monkeypatch.setattr(onnx_cache, "embedding_code_fingerprint", lambda: "0" * 16)
    assert ExportKey.create(**base).digest() != digest


def test_real_weights_give_different_keys(random_weights_info):
    from expert.weights import load_backbone

    _, other = load_backbone(ExpertSettings(weights="random", seed=1))
    a = ExportKey.create("wide_resnet50_2.tv_in1k", random_weights_info.checksum, crop=224)
    b = ExportKey.create("wide_resnet50_2.tv_in1k", other.checksum, crop=224)
    assert a.digest() != b.digest()


def test_an_entry_for_another_key_is_never_served(tmp_path):
    exporter = FakeExporter()
    cache = OnnxCache(tmp_path, exporter=exporter)
    cache.get(KEY, torch.nn.Identity())
    other = ExportKey.create(KEY.backbone, KEY.weights_checksum, crop=256)
    assert cache.lookup(other) is None
    cache.path(KEY).rename(cache.path(other))  # a graph filed under the wrong name (sidecar still says KEY)
    cache.sidecar(KEY).rename(cache.sidecar(other))
    assert cache.lookup(other) is None and not cache.path(other).exists()


# ----------------------------------------------------------------------------------------------- corruption
@pytest.mark.parametrize("damage", ["flip", "truncate", "sidecar_missing", "sidecar_garbage"])
def test_a_corrupted_entry_is_detected_and_rebuilt(tmp_path, caplog, damage):
    exporter = FakeExporter()
    cache = OnnxCache(tmp_path, exporter=exporter)
    path = cache.get(KEY, torch.nn.Identity())
    good = file_sha256(path)
    if damage == "flip":
        with open(path, "r+b") as handle:  # same size, one byte changed in place
            handle.seek(1000)
            byte = handle.read(1)
            handle.seek(1000)
            handle.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate":
        with open(path, "r+b") as handle:
            handle.truncate(1000)
    elif damage == "sidecar_missing":
        cache.sidecar(KEY).unlink()
    else:
        cache.sidecar(KEY).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="expert.onnx_cache"):
        again = cache.get(KEY, torch.nn.Identity())
    assert exporter.calls == 2
    assert again == path and file_sha256(again) == good
    assert any("corrupted" in r.message and str(path) in r.getMessage() for r in caplog.records)
    assert cache.lookup(KEY) == path  # repaired: verified again


def test_a_cache_hit_does_not_load_the_backbone(tmp_path):
    exporter = FakeExporter()
    cache = OnnxCache(tmp_path, exporter=exporter)
    cache.get(KEY, torch.nn.Identity())
    assert cache.get(KEY, no_backbone) == cache.path(KEY)
    assert exporter.calls == 1


# ----------------------------------------------------------------------------------------------- concurrency
def test_concurrent_writers_export_once_and_never_expose_a_torn_file(tmp_path):
    payload = bytes(range(256)) * 4096  # 1 MiB, written in 16 slow chunks
    exporter = FakeExporter(payload, chunk_delay=0.01)
    results: list[Path] = []
    errors: list[BaseException] = []
    seen_by_readers: list[str] = []
    done = threading.Event()

    def writer() -> None:
        try:
            results.append(OnnxCache(tmp_path, exporter=exporter).get(KEY, torch.nn.Identity()))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def reader() -> None:
        cache = OnnxCache(tmp_path, exporter=exporter)
        while not done.is_set():
            found = cache.lookup(KEY)  # verified or None: never a half-written graph
            if found is not None:
                seen_by_readers.append(file_sha256(found))
            time.sleep(0.005)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    done.set()
    watcher.join(timeout=60)
    assert not errors
    expected = hashlib.sha256(payload).hexdigest()
    file_sha = file_sha256(OnnxCache(tmp_path).path(KEY))
    assert exporter.calls == 1, "writers were not serialised"
    assert set(results) == {OnnxCache(tmp_path).path(KEY)} and file_sha == expected
    assert set(seen_by_readers) <= {expected}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_dead_writers_temp_file_is_cleaned_up(tmp_path):
    (tmp_path / f".{KEY.digest()}.onnx.abc123.tmp").write_bytes(b"half a graph")
    OnnxCache(tmp_path, exporter=FakeExporter()).get(KEY, torch.nn.Identity())
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_unwritable_cache_falls_back_to_an_uncached_export(tmp_path, monkeypatch, caplog):
    import errno

    from common import atomic

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    exporter = FakeExporter()
    cache = OnnxCache(tmp_path / "cache", exporter=exporter)
    monkeypatch.setattr(atomic, "atomic_path", refuse)  # the temp file next to the graph cannot be created
    with caplog.at_level(logging.WARNING, logger="expert.onnx_cache"):
        path = cache.get(KEY, torch.nn.Identity(), fallback_dir=tmp_path / "scratch")
    assert path == tmp_path / "scratch" / "backbone.onnx" and path.read_bytes() == exporter.payload
    assert "not writable" in caplog.text


def test_prune_keeps_only_the_current_key(tmp_path):
    exporter = FakeExporter()
    cache = OnnxCache(tmp_path, exporter=exporter)
    old = ExportKey.create(KEY.backbone, KEY.weights_checksum, crop=256)
    cache.get(old, torch.nn.Identity())
    cache.get(KEY, torch.nn.Identity())
    assert cache.prune(KEY) == [cache.path(old)]
    assert cache.entries() == [cache.path(KEY)] and not cache.sidecar(old).exists()


def test_warm_cache_is_a_registered_command():
    from eagle.cli import build_parser

    registry = build_parser()
    args = registry.parser.parse_args(["warm-cache", "--prune"])
    assert args.prune and args.func.__name__ == "run_warm_cache"
