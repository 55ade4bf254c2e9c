"""The ``eagle`` command line: build-bank and score, in-process (``main(argv)``) and once as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from eagle.images import load_image
from eagle.settings import load_settings
from expert.bank import load_bank
from expert.scorer import load_expert
from tests.cli_helpers import eagle_env, small_dataset
from tests.cli_helpers import run_cli as _run
from tests.synthetic import make_good_image

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """EAGLE_* environment for the module: random weights, data under a temporary directory."""
    yield from eagle_env(tmp_path_factory, "eagle-home", "INFO")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_dataset(tmp_path_factory, "cli-data")


@pytest.fixture(scope="module")
def built(env, data, tmp_path_factory):
    """build-bank over 4 good images plus one zero-byte file, with --skip-unreadable."""
    normals = tmp_path_factory.mktemp("normals")
    for path in sorted((data / "widget" / "train" / "good").glob("*.png")):
        shutil.copy(path, normals / path.name)
    (normals / "broken.png").write_bytes(b"")
    code, out, err = _run(["build-bank", "--normals", str(normals), "--name", "widget", "--skip-unreadable", "--json"])
    return code, json.loads(out), err


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("eagle ")]


# ------------------------------------------------------------------------------------------- build-bank
def test_build_bank_skips_unreadable_files_and_says_how_many_it_used(built, env):
    code, summary, err = built
    assert code == 0
    assert summary["files"] == 5 and summary["references"] == 4 and summary["skipped_files"] == 1
    assert _error_lines(err) == ["eagle build-bank: skipped: broken.png: empty file (0 bytes)"]
    assert Path(summary["path"]) == Path(env["EAGLE_DATA_DIR"]) / "banks" / "widget"
    assert "Traceback" not in err
    assert "bank widget" in err and "100%" in err  # the command line draws the progress bar (stderr)


def test_build_bank_no_progress_draws_no_bar(env, data, tmp_path):
    """Only the command line renders progress, and ``--no-progress`` silences it."""
    argv = ["build-bank", "--normals", str(data / "widget" / "train" / "good"), "--name", "quiet"]
    code, out, err = _run([*argv, "--out", str(tmp_path / "quiet"), "--json", "--no-progress"])
    assert code == 0 and json.loads(out)["references"] == 4
    assert "%|" not in err and "\r" not in err, err  # logged warnings may remain; no bar


def test_build_bank_summary_matches_the_saved_bank(built):
    summary = built[1]
    bank = load_bank(summary["path"], load_settings().expert)
    assert summary["coreset_size"] == len(bank.memory_bank) == int(4 * 784 * 0.1)
    assert summary["patches"] == 4 * 784
    assert (summary["tau"], summary["s_max"]) == (bank.meta.threshold.tau, bank.meta.threshold.s_max)
    assert summary["threshold_method"] == "k_sigma" and summary["weights"] == "random:seed=0"
    assert [r.name for r in bank.meta.references] == ["000.png", "001.png", "002.png", "003.png"]
    assert set(summary["seconds"]) == {"read", "embed", "coreset", "dbt", "save"}
    assert summary["warnings"] == bank.meta.warnings and "only 4 reference images" in summary["warnings"][0]
    # 4 references at kappa = 3: tau > s_max by construction, and the build says so with the reason.
    assert any(w.startswith("CAAS band empty") and "is certain at kappa = 3" in w for w in summary["warnings"])


def test_build_bank_aborts_on_unreadable_files_by_default_and_builds_nothing(env, data, tmp_path):
    normals = tmp_path / "normals"
    shutil.copytree(data / "widget" / "train" / "good", normals)
    (normals / "notes.png").write_text("not a picture")
    (normals / "half.png").write_bytes((normals / "000.png").read_bytes()[:300])
    out_dir = tmp_path / "bank"
    code, out, err = _run(["build-bank", "--normals", str(normals), "--name", "x", "--out", str(out_dir)])
    assert code == 1 and out == ""
    lines = _error_lines(err)
    assert len(lines) == 3
    assert lines[0].startswith("eagle build-bank: unreadable: half.png")
    assert lines[1].startswith("eagle build-bank: unreadable: notes.png")
    assert "2 of 6 reference files could not be read; nothing was built" in lines[2]
    assert not out_dir.exists() and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "../escape"], "invalid bank name '../escape'"),
        (["--normals", "/no/such/dir"], "is not a directory"),
    ],
)
def test_build_bank_refuses_bad_arguments_with_one_line(env, data, args, message):
    argv = ["build-bank", "--normals", str(data / "widget" / "train" / "good"), "--name", "ok", *args]
    code, _, err = _run(argv)
    assert code == 2 and len(_error_lines(err)) == 1 and message in err


def test_build_bank_with_one_reference_explains_the_minimum(env, data, tmp_path):
    normals = tmp_path / "one"
    normals.mkdir()
    shutil.copy(data / "widget" / "train" / "good" / "000.png", normals / "000.png")
    code, _, err = _run(["build-bank", "--normals", str(normals), "--name", "one"])
    assert code == 2
    assert _error_lines(err) == [_error_lines(err)[0]] and "a bank needs at least 2" in err


# ------------------------------------------------------------------------------------------- score
def _api_results(bank_dir: str, paths: list[Path]) -> list:
    settings = load_settings()
    scorer = load_expert(bank_dir, settings.expert)
    return [scorer.score(load_image(p, max_pixels=settings.max_image_pixels)) for p in paths]


def _test_images(data: Path) -> list[Path]:
    return sorted((data / "widget" / "test").rglob("*.png"))


def test_score_json_lines_match_the_python_api(built, data):
    bank_dir, paths = built[1]["path"], _test_images(data)
    code, out, err = _run(["score", "--bank", bank_dir, *map(str, paths), "--json"])
    assert code == 0 and _error_lines(err) == []
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == [str(p) for p in paths]
    for record, expected in zip(records, _api_results(bank_dir, paths), strict=True):
        assert record["score"] == expected.score
        assert (record["tau"], record["s_max"]) == (expected.tau, expected.s_max)
        assert record["decision"] == ("anomalous" if expected.anomalous else "normal")
        assert record["low_confidence"] == expected.low_confidence
        assert [(b["x0"], b["y0"], b["x1"], b["y1"]) for b in record["boxes"]] == [
            (b.x0, b.y0, b.x1, b.y1) for b in expected.boxes
        ]
        assert (record["template_index"], record["template"]) == (expected.template_index, expected.template_name)
        assert record["inspected_region"] == list(expected.geometry.inspected_region())
    decisions = {Path(r["image"]).parent.name: r["decision"] for r in records}
    assert decisions == {"good": "normal", "hole": "anomalous", "scratch": "anomalous", "stain": "anomalous"}


def test_score_prints_a_table_by_default(built, data):
    paths = _test_images(data)
    code, out, _ = _run(["score", "--bank", built[1]["path"], *map(str, paths)])
    lines = out.splitlines()
    assert code == 0 and len(lines) == 1 + len(paths)
    assert lines[0].split()[:6] == ["image", "score", "tau", "s_max", "decision", "unsure"]
    for line, path in zip(lines[1:], paths, strict=True):
        assert line.startswith(str(path))
        assert (" normal " in line) == (path.parent.name == "good")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` (a decompression bomb as far as the header goes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    """Files that must be refused (each with its one line) and files that must be converted and scored."""
    root = tmp_path_factory.mktemp("odd")
    rgb = make_good_image(224, 224, np.random.default_rng(7))
    good = root / "good.png"
    Image.fromarray(rgb).save(good)
    refused = {
        "truncated.png": good.read_bytes()[: len(good.read_bytes()) // 2],
        "zero.png": b"",
        "text.png": b"hello, I am not a picture\n",
        "bomb.png": _png_header_only(100_000, 100_000),
    }
    for name, payload in refused.items():
        (root / name).write_bytes(payload)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(root / "one_pixel.png")
    cv2.imwrite(str(root / "sixteen_bit.png"), (rgb[..., ::-1].astype(np.uint16) * 257))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA").save(root / "rgba.png")
    Image.fromarray(rgb).convert("L").save(root / "gray.png")
    bad = [root / n for n in ("truncated.png", "zero.png", "text.png", "bomb.png", "one_pixel.png")]
    converted = [root / n for n in ("sixteen_bit.png", "rgba.png", "gray.png")]
    return good, bad, converted


def test_bad_files_get_one_line_each_and_the_others_are_still_scored(built, odd_files):
    good, bad, converted = odd_files
    argv = ["score", "--bank", built[1]["path"], str(bad[0]), str(good), *map(str, bad[1:]), *map(str, converted)]
    code, out, err = _run([*argv, "--json"])
    assert code == 1 and "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == len(bad) + 1
    for line, path in zip(lines, bad, strict=False):
        assert line.startswith(f"eagle score: error: {path}: ")
    assert lines[-1] == f"eagle score: {len(bad)} of {len(bad) + 1 + len(converted)} images failed"
    scored = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in scored] == [str(good), *map(str, converted)]
    # 16-bit (x257, scaled back) and opaque RGBA hold the good image's pixels: same score. Grayscale lost the
    # colour, which the expert rightly notices, but it is decoded and scored like any other image.
    assert scored[1]["score"] == scored[2]["score"] == scored[0]["score"]
    assert scored[0]["decision"] == "normal" and np.isfinite(scored[3]["score"])


@pytest.mark.parametrize("bank", ["missing", "not-a-bank", "corrupt"])
def test_a_missing_or_invalid_bank_is_one_line_and_exit_2(built, tmp_path, odd_files, bank):
    if bank == "missing":
        bank_dir = tmp_path / "nothing-here"
    elif bank == "not-a-bank":
        bank_dir = tmp_path
    else:
        bank_dir = tmp_path / "corrupt"
        shutil.copytree(built[1]["path"], bank_dir)
        (bank_dir / "bank.safetensors").write_bytes(b"garbage")
    code, out, err = _run(["score", "--bank", str(bank_dir), str(odd_files[0])])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("eagle score: error: ") and str(bank_dir) in err


def test_a_bank_built_with_other_settings_is_refused(built, odd_files, monkeypatch):
    monkeypatch.setenv("EAGLE_EXPERT__DISTANCE", "euclidean")
    code, _, err = _run(["score", "--bank", built[1]["path"], str(odd_files[0])])
    assert code == 2 and "setting distance" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- the entry point
def test_invalid_settings_are_one_line_and_exit_2(env, monkeypatch, odd_files):
    monkeypatch.setenv("EAGLE_EXPERT__KAPPA", "three")
    code, out, err = _run(["score", "--bank", "/x", str(odd_files[0])])
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "EAGLE_EXPERT__KAPPA" in err


def test_an_unknown_command_is_a_usage_error(env):
    # Subcommand modules are imported explicitly; a broken one fails loudly (tests/test_packaging.py).
    code, _, err = _run(["frobnicate"])
    assert code == 2 and "frobnicate" in err


def test_no_command_prints_help_and_exits_2(env):
    code, _, err = _run([])
    assert code == 2 and "build-bank" in err and "score" in err


def test_the_installed_command_runs_as_a_subprocess(built, data, odd_files, env):
    script = Path(sys.executable).parent / "eagle"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "eagle"]
    paths = [_test_images(data)[0], _test_images(data)[-1]]
    run = subprocess.run(
        [*command, "score", "--bank", built[1]["path"], *map(str, paths), str(odd_files[1][2]), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert _error_lines(run.stderr)[0].startswith(f"eagle score: error: {odd_files[1][2]}: ")
    records = [json.loads(line) for line in run.stdout.splitlines()]
    for record, expected in zip(records, _api_results(built[1]["path"], paths), strict=True):
        assert record["score"] == expected.score and record["template_index"] == expected.template_index
