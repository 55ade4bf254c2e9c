import zipfile

import numpy as np
import pytest

from eagle.archives import ArchiveError
from eagle.banks import BankError, BankNameError, BankStore, validate_bank_name
from eagle.settings import ExpertSettings


@pytest.mark.parametrize("name", ["line-3", "A", "bottle_v2.1", "x" * 64])
def test_valid_names(name):
    assert validate_bank_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "a..b", "x" * 65, "sp ace", "ü", "-lead"])
def test_invalid_names(name):
    with pytest.raises(BankNameError):
        validate_bank_name(name)


def test_export_import_round_trip_gives_identical_scores(built_pipeline, tmp_path):
    store = built_pipeline.pipeline.banks
    archive = store.export_zip("widget", tmp_path / "widget.zip")
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
    assert {"widget/bank.safetensors", "widget/meta.json", "widget/backbone.onnx"} <= names

    summary = store.import_zip(archive, "widget-copy")
    assert summary.bank_id == built_pipeline.summary.bank_id
    query = np.asarray(store.template_image("widget", 0))
    assert store.load("widget-copy").score(query).score == pytest.approx(store.load("widget").score(query).score)
    assert {s.name for s in store.list()} >= {"widget", "widget-copy"}

    store.delete("widget-copy")
    assert not store.exists("widget-copy")
    with pytest.raises(FileNotFoundError, match="widget-copy"):
        store.load("widget-copy")


def test_import_refuses_what_is_not_a_bank(built_pipeline, tmp_path):
    store = built_pipeline.pipeline.banks
    not_a_bank = tmp_path / "junk.zip"
    with zipfile.ZipFile(not_a_bank, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(BankError, match="exactly one bank"):
        store.import_zip(not_a_bank, "junk")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../meta.json", "{}")
    with pytest.raises(ArchiveError):
        store.import_zip(evil, "evil")
    assert not store.exists("junk") and not store.exists("evil")


def test_import_refuses_a_bank_built_with_other_settings(built_pipeline, tmp_path):
    archive = built_pipeline.pipeline.banks.export_zip("widget", tmp_path / "w.zip")
    other = BankStore(tmp_path / "banks", ExpertSettings(weights="random", crop=192, resize=220))
    with pytest.raises(BankError, match=r"setting (resize|crop)"):
        other.import_zip(archive, "widget")
    assert not other.exists("widget")


def test_corrupt_bank_tensor_file_is_refused(built_pipeline, tmp_path):
    archive = built_pipeline.pipeline.banks.export_zip("widget", tmp_path / "w.zip")
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[: len(data) // 2] if item.filename.endswith(".safetensors") else data)
    with pytest.raises(BankError):
        built_pipeline.pipeline.banks.import_zip(broken, "broken")
