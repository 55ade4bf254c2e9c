"""``eagle bank list|show|export|import|delete`` end to end, in-process (``main(argv)``), on a tiny random bank."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from eagle.banks import BankStore
from eagle.images import load_image
from eagle.settings import load_settings
from tests.cli_helpers import eagle_env, small_dataset
from tests.cli_helpers import run_cli as _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """EAGLE_* environment for the module: random weights, data under a temporary directory."""
    yield from eagle_env(tmp_path_factory, "eagle-bank-home", "WARNING")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_dataset(tmp_path_factory, "bank-cli-data")


@pytest.fixture(scope="module")
def widget(env, data):
    code, out, err = _run(["build-bank", "--normals", str(data / "widget" / "train" / "good"), "--name", "widget"])
    assert code == 0, err
    return "widget"


def _store() -> BankStore:
    settings = load_settings()
    return BankStore(settings.banks_dir, settings.expert)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("eagle ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_list_and_show_as_json(widget):
    code, out, err = _run(["bank", "list", "--json"])
    assert code == 0, err
    banks = json.loads(out)
    assert [b["name"] for b in banks] == ["widget"]
    assert banks[0]["n_references"] == 4 and len(banks[0]["bank_id"]) > 8

    code, out, err = _run(["bank", "show", "widget", "--json"])
    assert code == 0, err
    shown = json.loads(out)
    assert shown["bank_id"] == banks[0]["bank_id"] and shown["tau"] == banks[0]["tau"]
    assert len(shown["references"]) == 4 and Path(shown["path"]).name == "widget"


def test_list_and_show_as_text(widget):
    code, out, _ = _run(["bank", "list"])
    assert code == 0 and "widget" in out
    code, out, _ = _run(["bank", "show", "widget"])
    assert code == 0 and "bank_id" in out and "references" in out


def test_export_then_import_under_another_name_is_the_same_bank(widget, data, tmp_path):
    archive = tmp_path / "widget.zip"
    code, _, err = _run(["bank", "export", "widget", "--out", str(archive)])
    assert code == 0, err
    assert zipfile.is_zipfile(archive)

    code, out, err = _run(["bank", "import", str(archive), "--name", "widget-copy", "--json"])
    assert code == 0, err
    imported = json.loads(out)
    store = _store()
    original = store.summary("widget")
    assert imported["name"] == "widget-copy" and imported["bank_id"] == original.bank_id

    image = load_image(next((data / "widget" / "test").glob("*/*.png")), max_pixels=load_settings().max_image_pixels)
    a, b = store.load("widget").score(image), store.load("widget-copy").score(image)
    assert a.score == pytest.approx(b.score, abs=1e-6) and a.template_index == b.template_index

    code, _, err = _run(["bank", "import", str(archive), "--name", "widget-copy"])
    assert code == 2 and "--overwrite" in _error_line(err)
    code, _, err = _run(["bank", "import", str(archive), "--name", "widget-copy", "--overwrite"])
    assert code == 0, err

    code, _, err = _run(["bank", "delete", "widget-copy"])
    assert code == 0, err
    assert not store.exists("widget-copy") and store.exists("widget")
    code, out, _ = _run(["bank", "list", "--json"])
    assert [b["name"] for b in json.loads(out)] == ["widget"]


def test_export_refuses_to_overwrite_a_file(widget, tmp_path):
    dest = tmp_path / "there.zip"
    dest.write_bytes(b"keep")
    code, _, err = _run(["bank", "export", "widget", "--out", str(dest)])
    assert code == 2 and "--overwrite" in _error_line(err)
    assert dest.read_bytes() == b"keep"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["bank", "show", "nope"], "no bank named 'nope'"),
        (["bank", "show", "nope", "--json"], "no bank named 'nope'"),
        (["bank", "delete", "nope"], "no bank named 'nope'"),
        (["bank", "export", "nope"], "no bank named 'nope'"),
        (["bank", "show", "../etc"], "invalid bank name"),
        (["bank", "delete", "a..b"], "invalid bank name"),
        (["bank", "import", "missing.zip", "--name", "x"], "no such zip file"),
    ],
)
def test_errors_are_one_line_and_exit_2(widget, argv, needle):
    code, out, err = _run(argv)
    assert code == 2 and out == ""
    line = _error_line(err)
    assert line.startswith("eagle bank: error: ") and needle in line


def test_bad_zips_are_refused_and_nothing_is_imported(widget, tmp_path):
    not_zip = tmp_path / "broken.zip"
    not_zip.write_bytes(b"this is not a zip")
    code, _, err = _run(["bank", "import", str(not_zip), "--name", "broken"])
    assert code == 2 and _error_line(err).startswith("eagle bank: error: ")

    traversal = tmp_path / "evil.zip"
    with zipfile.ZipFile(traversal, "w") as archive:
        archive.writestr("../meta.json", "{}")
    code, _, err = _run(["bank", "import", str(traversal), "--name", "evil"])
    assert code == 2 and ".." in _error_line(err)

    no_bank = tmp_path / "images.zip"
    with zipfile.ZipFile(no_bank, "w") as archive:
        archive.writestr("a.txt", "hello")
    code, _, err = _run(["bank", "import", str(no_bank), "--name", "images"])
    assert code == 2 and "meta.json" in _error_line(err)

    store = _store()
    assert not any(store.exists(name) for name in ("broken", "evil", "images"))
    leftovers = [p.name for p in store.root.iterdir() if p.name.startswith(".import-")]
    assert leftovers == []


def test_bank_without_subcommand_prints_help(widget):
    code, _, err = _run(["bank"])
    assert code == 2 and "list" in err


def test_removed_bank_dir_is_not_listed(widget):
    store = _store()
    shutil.copytree(store.path("widget"), store.root / "twin")
    code, out, _ = _run(["bank", "list", "--json"])
    assert sorted(b["name"] for b in json.loads(out)) == ["twin", "widget"]
    code, _, err = _run(["bank", "delete", "twin"])
    assert code == 0, err
    code, out, _ = _run(["bank", "list", "--json"])
    assert [b["name"] for b in json.loads(out)] == ["widget"]
