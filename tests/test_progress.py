"""Progress: library code reports ``progress(stage, fraction)`` and prints nothing; only front ends draw bars.

Regression tests: tqdm bars printed from the expert's bank building, so ``eagle eval --no-progress``
and the service's logs could not silence them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import eagle.pipeline
from common.progress import report
from eagle.bank_service import BUILD_STAGES
from eagle.cli import main
from eagle.pipeline import Pipeline
from eagle.progress_bars import StageBar, fan_out
from expert.progress import BUILD_STAGES as EXPERT_BUILD_STAGES
from tests.fake_pipeline import FakePipeline
from tests.fixtures_pipeline import pipeline_settings
from tests.synthetic import make_mvtec_like


def test_one_stage_vocabulary():
    assert BUILD_STAGES == ("read", *EXPERT_BUILD_STAGES) == ("read", "embed", "coreset", "dbt", "save")


def test_report_clamps_and_ignores_a_missing_callback():
    seen: list[tuple[str, float]] = []
    report(lambda stage, fraction: seen.append((stage, fraction)), "dbt", -0.5)
    report(None, "dbt", 0.5)
    assert seen == [("dbt", 0.0)]


def test_stage_bar_draws_only_when_enabled(capfd):
    with StageBar(BUILD_STAGES, desc="bank demo", enabled=False) as bar:
        bar("coreset", 0.5)
    assert bar.percent == 50.0 and capfd.readouterr() == ("", "")
    with StageBar(BUILD_STAGES, desc="bank demo") as bar:
        bar("save", 1.0)
    assert bar.percent == 100.0 and "bank demo" in capfd.readouterr().err


def test_fan_out_reports_to_every_callback():
    first: list[str] = []
    second: list[str] = []
    fan_out(None, lambda s, f: first.append(s), lambda s, f: second.append(s))("embed", 0.1)
    assert first == second == ["embed"] and fan_out(None) is None


@pytest.mark.slow
def test_building_a_bank_through_the_pipeline_prints_nothing(tmp_path, synthetic_root, capfd):
    pipeline = Pipeline(pipeline_settings(tmp_path))
    references = sorted((synthetic_root / "widget" / "train" / "good").glob("*.png"))[:3]
    calls: list[tuple[str, float]] = []
    pipeline.build_bank(references, "quiet", progress=lambda stage, fraction: calls.append((stage, fraction)))
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no tqdm bar (nor anything else) from library code
    stages = [stage for stage, _ in calls]
    assert [s for i, s in enumerate(stages) if s not in stages[:i]] == list(BUILD_STAGES)
    assert all(0.0 <= fraction <= 1.0 for _, fraction in calls)


@pytest.fixture
def eval_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny data set, and ``eagle eval`` running on the fast fake pipeline (real runner, bank cache, CLI)."""
    root = make_mvtec_like(tmp_path / "data", n_train=3, n_test_good=1, n_test_bad_per_type=1, sizes=((40, 40),))
    monkeypatch.setattr(eagle.pipeline, "Pipeline", lambda settings: FakePipeline(settings.data_dir))
    monkeypatch.setenv("EAGLE_EXPERT__WEIGHTS", "random")
    return root


@pytest.mark.parametrize("quiet", [False, True])
def test_eval_draws_bars_unless_no_progress(eval_data, tmp_path, capfd, quiet):
    argv = ["eval", "--dataset", "mvtec", "--root", str(eval_data), "--out", str(tmp_path / "run"), "--no-mllm"]
    assert main(argv + ["--no-plots"] + (["--no-progress"] if quiet else [])) == 0
    err = capfd.readouterr().err
    bars = [line for line in err.replace("\r", "\n").splitlines() if "%|" in line or "it/s" in line]
    if quiet:
        assert bars == [], err
    else:
        assert any("bank widget" in line for line in bars) and any("eval" in line for line in bars), err
