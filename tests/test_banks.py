import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import eagle.banks as banks_module
from eagle.archives import ArchiveError, ArchiveTooLargeError
from eagle.bank_versions import VERSIONS_DIR
from eagle.banks import BankError, BankNameError, BankStore, validate_bank_name
from eagle.settings import ExpertSettings
from expert.bank import load_bank
from tests.bank_tamper import fake_onnx, shrink_features, tamper


@pytest.mark.parametrize("name", ["line-3", "A", "bottle_v2.1", "x" * 64])
def test_valid_names(name):
    assert validate_bank_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", ".hidden", "a..b", "x" * 65, "sp ace", "ü", "-lead", "bolts\n", "a\n", None]
)
def test_invalid_names(name):
    with pytest.raises(BankNameError) as caught:
        validate_bank_name(name)
    assert (caught.value.code, caught.value.http_status) == ("invalid_bank_name", 422)


def test_a_trailing_newline_is_not_a_valid_name(tmp_path):
    """Regression: ``re.match`` with ``$`` accepted ``"bolts\\n"``; the rule is one ``fullmatch``."""
    store = BankStore(tmp_path, ExpertSettings())
    with pytest.raises(BankNameError):
        store.path("bolts\n")
    (tmp_path / "bolts\n").mkdir()
    (tmp_path / "bolts\n" / "meta.json").write_text("{}")
    assert store.list() == []


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


# -- a bank that passes validation always scores; imports take only bank files ---------------------
def _export_dir(built_pipeline, tmp_path: Path) -> Path:
    """A copy of the session's real bank directory, to forge."""
    copy = tmp_path / "forged" / "widget"
    shutil.copytree(built_pipeline.pipeline.banks.path("widget"), copy)
    return copy


def _zip_dir(bank_dir: Path, dest: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in bank_dir.rglob("*") if p.is_file()):
            archive.write(file, Path(bank_dir.name) / file.relative_to(bank_dir))
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return dest


def _leftovers(store: BankStore) -> list[str]:
    """Hidden staging debris in the banks folder (the versions folder is not debris; its own debris is)."""
    found = [p.name for p in store.root.iterdir() if p.name.startswith(".") and p.name != VERSIONS_DIR]
    versions = store.root / VERSIONS_DIR
    if versions.is_dir():
        found += [f"{VERSIONS_DIR}/{p.parent.name}/{p.name}" for p in versions.glob("*/.*")]
    return sorted(found)


def test_import_refuses_the_issues_crafted_bank_in_one_line(built_pipeline, tmp_path):
    store = built_pipeline.pipeline.banks
    meta, tensors = shrink_features(dim=16, grid=7, tau=-1.0)
    forged = tamper(_export_dir(built_pipeline, tmp_path), meta=meta, tensors=tensors)
    with pytest.raises(BankError, match="dims.feature_dim 16 does not fit the backbone") as err:
        store.import_zip(_zip_dir(forged, tmp_path / "crafted.zip"), "crafted")
    assert "\n" not in str(err.value) and ".import-" not in str(err.value) and "crafted.zip" in str(err.value)
    assert not store.exists("crafted") and _leftovers(store) == []


def test_import_refuses_a_valid_looking_bank_that_cannot_score(built_pipeline, tmp_path):
    store = built_pipeline.pipeline.banks
    forged = tamper(_export_dir(built_pipeline, tmp_path), onnx_bytes=fake_onnx())  # right signature, wrong graph
    load_bank(forged)  # every static check passes
    with pytest.raises(BankError, match="failed its test inspection|feature extractor cannot be loaded") as err:
        store.import_zip(_zip_dir(forged, tmp_path / "identity.zip"), "identity")
    assert "\n" not in str(err.value)
    assert not store.exists("identity") and _leftovers(store) == []


def test_load_test_inspects_and_remembers_an_unusable_bank(built_pipeline, tmp_path, monkeypatch):
    store = BankStore(tmp_path / "banks", built_pipeline.pipeline.banks.settings)
    forged = tamper(_export_dir(built_pipeline, tmp_path), onnx_bytes=fake_onnx())
    shutil.copytree(forged, store.path("broken"))
    calls = []
    real_open = banks_module.open_expert
    monkeypatch.setattr(banks_module, "open_expert", lambda *a, **k: calls.append(1) or real_open(*a, **k))
    with pytest.raises(BankError, match="bank 'broken'") as first:
        store.load("broken")
    assert store.unusable() == {"broken": str(first.value)}
    with pytest.raises(BankError) as second:
        store.load("broken")
    assert str(second.value) == str(first.value) and len(calls) == 1  # remembered, not retried
    (store.path("broken") / "meta.json").touch()  # the bank changed on disk: tried again
    with pytest.raises(BankError):
        store.load("broken")
    assert len(calls) == 2
    store.delete("broken")
    assert store.unusable() == {}


def test_import_takes_only_the_files_of_the_bank_format(built_pipeline, tmp_path, caplog):
    store = built_pipeline.pipeline.banks
    extra = {
        "widget/notes.txt": b"hello",
        "widget/run.py": b"import os",
        "widget/references/9999.png": b"not listed in meta.json",
        "widget/sub/meta.txt": b"x",
        "elsewhere/evil.sh": b"rm -rf /",
    }
    archive = _zip_dir(built_pipeline.pipeline.banks.path("widget"), tmp_path / "extra.zip", extra)
    with caplog.at_level(logging.WARNING, logger="eagle.banks"):
        summary = store.import_zip(archive, "widget-extra")
    assert summary.bank_id == built_pipeline.summary.bank_id
    kept = sorted(p.relative_to(store.path("widget-extra")).as_posix() for p in store.path("widget-extra").rglob("*"))
    original = store.path("widget")
    assert kept == sorted(p.relative_to(original).as_posix() for p in original.rglob("*"))
    every_name = {p.name for p in store.root.rglob("*")}
    assert not {"notes.txt", "run.py", "9999.png", "meta.txt", "evil.sh"} & every_name
    logged = [r.getMessage() for r in caplog.records if "skipped 5 file(s)" in r.getMessage()]
    assert logged and "and 2 more" in logged[0]
    store.delete("widget-extra")


def test_import_refuses_a_bomb_before_writing_anything(built_pipeline, tmp_path):
    store = built_pipeline.pipeline.banks
    archive = tmp_path / "bomb.zip"  # 300 MiB declared in ~300 KB: each entry passes the per-entry ratio check
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("widget/meta.json", "{}")
        for i in range(300):
            z.writestr(f"widget/references/{i:04d}.png", b"\0" * (1024 * 1024))
    before = sorted(p.name for p in store.root.iterdir())
    with pytest.raises(ArchiveTooLargeError, match="ratio") as err:
        store.import_zip(archive, "bomb")
    assert "and 298 more" in str(err.value)  # a few names, then a count
    assert sorted(p.name for p in store.root.iterdir()) == before


def test_import_names_at_most_three_candidate_banks(built_pipeline, tmp_path):
    store = built_pipeline.pipeline.banks
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(5):
            z.writestr(f"b{i}/meta.json", "{}")
    with pytest.raises(BankError, match=r"found 5: 'b0/meta.json', 'b1/meta.json', 'b2/meta.json' and 2 more$"):
        store.import_zip(archive, "many")
