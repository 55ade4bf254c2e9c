"""`eagle eval` / `eagle eval-merge` end to end: the real pipeline (random-weight expert) and a tiny offline MLLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eagle.cli import main
from eagle.evaluation.records import RECORDS_FILE, read_records
from eagle.pipeline import Pipeline
from tests.fixtures_mllm import tiny_qwen_dir  # noqa: F401  (session fixture)
from tests.synthetic import make_mvtec_like

SETTINGS = "baseline,full+caas"
pytestmark = pytest.mark.slow  # builds a real (random-weight) bank with its ONNX export: ~20 s idle, minutes loaded


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mvtec_like(
        tmp_path_factory.mktemp("eval-real"), n_train=4, n_test_good=2, n_test_bad_per_type=1, seed=3
    )


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tiny_qwen_dir: Path) -> dict[str, list]:  # noqa: F811
    """Random-weight expert + tiny Qwen2.5-VL through the environment, as a user would configure it.

    Returns call logs of the real pipeline's build_bank and run_expert.
    """
    monkeypatch.setenv("EAGLE_EXPERT__WEIGHTS", "random")
    monkeypatch.setenv("EAGLE_EXPERT__MIN_REFERENCES", "2")
    monkeypatch.setenv("EAGLE_EXPERT__RECOMMENDED_REFERENCES", "2")
    monkeypatch.setenv("EAGLE_MLLM__MODEL_ID", str(tiny_qwen_dir))
    monkeypatch.setenv("EAGLE_MLLM__MAX_NEW_TOKENS", "4")
    calls: dict[str, list] = {"build": [], "expert": []}
    build, run_expert = Pipeline.build_bank, Pipeline.run_expert

    def counting_build(self, images, name, **kwargs):
        calls["build"].append(name)
        return build(self, images, name, **kwargs)

    def counting_expert(self, image, bank):
        calls["expert"].append(bank)
        return run_expert(self, image, bank)

    monkeypatch.setattr(Pipeline, "build_bank", counting_build)
    monkeypatch.setattr(Pipeline, "run_expert", counting_expert)
    return calls


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bank cache for the whole module (as shards on one machine share one): the bank is built once."""
    return tmp_path_factory.mktemp("eval-banks")


def _eval(data_root: Path, out: Path, *extra: str) -> int:
    argv = ["eval", "--dataset", "mvtec", "--root", str(data_root), "--out", str(out), "--no-progress", *extra]
    return main(argv)


def test_eval_with_tiny_mllm_then_resume_reuses_everything(data_root, tmp_path, env, bank_dir, capsys) -> None:
    out = tmp_path / "run"
    assert _eval(data_root, out, "--settings", SETTINGS, "--bank-dir", str(bank_dir)) == 0
    assert len(env["build"]) <= 1 and len(env["expert"]) == 5  # at most one bank; the expert once per image
    records = read_records(out / RECORDS_FILE)
    experts = [r for r in records if r.kind == "expert"]
    answers = [r for r in records if r.kind == "answer"]
    assert len(experts) == 5 and sorted({a.setting for a in answers}) == ["baseline", "full+caas"]
    assert len(answers) == 10 and all(a.verdict in ("defect", "no_defect", "unknown") for a in answers)
    for record in experts:  # maps at the mask's geometry, longest side at most 256
        with np.load(out / record.map_file, allow_pickle=False) as data:
            width, height = record.image_size
            scale = min(1.0, 256 / max(width, height))
            assert data["map"].shape == data["mask"].shape == (round(height * scale), round(width * scale))
            assert bool(data["mask"].any()) == bool(record.label)
    report = json.loads((out / "report.json").read_text())
    meta = report["meta"]["datasets"]["mvtec"]
    assert meta["complete"] and meta["mllm_enabled"] and meta["settings"] == ["baseline", "full+caas"]
    widget = report["metrics"]["mvtec"]["classes"]["widget"]
    assert widget["image_auroc"] is not None and 0.0 <= widget["aupro"] <= 1.0
    printed = capsys.readouterr().out
    assert "full+caas" in printed and "report:" in printed

    env["build"].clear()
    env["expert"].clear()
    assert _eval(data_root, out, "--settings", SETTINGS, "--bank-dir", str(bank_dir)) == 0  # resume: all done
    assert env["build"] == [] and env["expert"] == []
    assert json.loads((out / "report.json").read_text())["metrics"] == report["metrics"]


def test_expert_only_shards_changed_setting_refused_and_merge(
    data_root, tmp_path, env, bank_dir, monkeypatch, capsys
) -> None:
    out, out1 = tmp_path / "expert-only", tmp_path / "expert-only-1"
    shared = ("--no-mllm", "--no-plots", "--bank-dir", str(bank_dir))
    assert _eval(data_root, out, "--shard", "0/2", *shared) == 0
    assert _eval(data_root, out1, "--shard", "1/2", *shared) == 0
    assert len(env["build"]) <= 1 and len(env["expert"]) == 5  # shards share the bank cache
    banks = [json.loads((d / "banks.json").read_text())["widget"]["bank"] for d in (out, out1)]
    assert banks[0] == banks[1]
    capsys.readouterr()

    monkeypatch.setenv("EAGLE_EXPERT__KAPPA", "2.0")
    assert _eval(data_root, out, "--shard", "0/2", *shared) == 2
    assert "different expert" in capsys.readouterr().err

    merged = tmp_path / "merged"
    assert main(["eval-merge", str(out), str(out1), "--out", str(merged)]) == 0
    report = json.loads((merged / "report.json").read_text())
    meta = report["meta"]["datasets"]["mvtec"]
    assert meta["complete"] and meta["n_images"] == 5 and not meta["mllm_enabled"]
    assert "MLLM disabled" in (merged / "report.md").read_text()
    assert (merged / "plots" / "scores_mvtec_widget.png").is_file()
    assert "MLLM disabled: expert metrics only" in capsys.readouterr().out


def test_cli_usage_errors(tmp_path, env, capsys) -> None:
    assert _eval(tmp_path / "nowhere", tmp_path / "out") == 2
    assert "is not a directory" in capsys.readouterr().err
    assert _eval(tmp_path, tmp_path / "out", "--settings", "full+magic") == 2
    assert "unknown setting 'full+magic'" in capsys.readouterr().err
    assert main(["eval-merge", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "not an evaluation output folder" in capsys.readouterr().err
