"""The app's downloads stay bounded on disk: one scratch folder per process, the newest few files kept."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

import app.downloads as downloads
from app import handlers
from app.downloads import DownloadFolder
from eagle.settings import Settings
from tests.fake_pipeline import FakePipeline
from tests.fixtures_pipeline import BANK


def test_the_folder_keeps_only_the_newest_downloads(tmp_path):
    folder = DownloadFolder(keep=3, parent=tmp_path)
    paths = []
    for i in range(5):
        path = folder.new_file("line-stats.csv")  # one name, five downloads: no collision
        path.write_text(f"run {i}")
        paths.append(path)
    assert [p.exists() for p in paths] == [False, False, True, True, True]
    assert [p.read_text() for p in paths[2:]] == ["run 2", "run 3", "run 4"]
    assert {p.name for p in paths} == {"line-stats.csv"} and len({p.parent for p in paths}) == 5
    assert folder.new_file("../../escape.zip").parent.parent == folder.directory  # only the last component counts
    directory = folder.directory
    folder.remove()
    assert not directory.exists()


def test_a_folder_removed_under_it_is_made_again(tmp_path):
    folder = DownloadFolder(keep=1, parent=tmp_path)
    first = folder.new_file("a.zip")
    folder.remove()
    second = folder.new_file("a.zip")
    assert second.parent.is_dir() and second.parent.parent != first.parent.parent


def test_keep_must_be_positive():
    with pytest.raises(ValueError, match="keep must be at least 1"):
        DownloadFolder(keep=0)


def test_bank_downloads_do_not_pile_up(built_pipeline, tmp_path, monkeypatch):
    """Every "Download bank" click used to leave a zip (with its ~100 MB graph) in /tmp for good."""
    monkeypatch.setattr(downloads, "_FOLDER", DownloadFolder(keep=2, parent=tmp_path))
    zips = [Path(handlers.export_bank(built_pipeline.pipeline, BANK)) for _ in range(3)]
    assert [z.name for z in zips] == [f"{BANK}.zip"] * 3
    assert [z.exists() for z in zips] == [False, True, True]
    with zipfile.ZipFile(zips[-1]) as archive:
        assert "meta.json" in {Path(n).name for n in archive.namelist()}
    assert sorted(tmp_path.rglob("*.zip")) == sorted(zips[1:])


def test_line_statistics_csvs_go_to_the_download_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "_FOLDER", DownloadFolder(keep=1, parent=tmp_path))
    pipeline = FakePipeline(tmp_path / "data")
    pipeline.settings = Settings(data_dir=tmp_path / "data", mllm={"enabled": False})
    first = Path(handlers.line_stats(pipeline, None, None, "all")[1])
    second = Path(handlers.line_stats(pipeline, None, None, "all")[1])
    assert second.is_file() and not first.exists() and tmp_path in second.parents


def test_the_app_asks_gradio_to_clean_its_own_cache(built_pipeline):
    from app.ui import GRADIO_CACHE_CLEANUP, build_ui

    demo = build_ui(built_pipeline.pipeline)
    assert demo.delete_cache == GRADIO_CACHE_CLEANUP == (3600, 86400)
