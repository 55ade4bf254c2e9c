"""The evaluation loop with a fast fake pipeline: expert once per image, resume, shards, reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eagle.evaluation.aggregate import build_report
from eagle.evaluation.readers import read_dataset
from eagle.evaluation.records import RECORDS_FILE, read_records
from eagle.evaluation.report import write_report
from eagle.evaluation.runner import (
    EvalConfig,
    EvalConfigError,
    EvalRunner,
    bank_root,
    parse_settings,
    pixel_pair,
)
from eagle.evaluation.shards import Shard
from eagle.settings import Settings
from tests.fake_pipeline import FakePipeline
from tests.synthetic import make_mvtec_like

SETTINGS = "baseline,visual,textual,full,full+caas"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    sizes = ((40, 40), (36, 48))
    make_mvtec_like(root, category="widget", n_train=4, n_test_good=4, n_test_bad_per_type=2, sizes=sizes, seed=1)
    make_mvtec_like(root, category="gadget", n_train=3, n_test_good=3, n_test_bad_per_type=1, sizes=sizes, seed=2)
    return root


def _run(
    data_root: Path,
    out: Path,
    *,
    settings: str = SETTINGS,
    mllm: bool = True,
    shard: str = "0/1",
    fail_after: int | None = None,
    plots: bool = False,
    **config,
) -> tuple[dict | None, FakePipeline]:
    cfg = EvalConfig(
        dataset="mvtec",
        root=data_root,
        out=out,
        settings=parse_settings(settings),
        shard=Shard.parse(shard),
        progress=False,
        plots=plots,
        **config,
    )
    # fail_after: a simulated kill (KeyboardInterrupt) once that many images were scored
    kill = {} if fail_after is None else {"fail_with": KeyboardInterrupt(), "fail_after": fail_after}
    pipeline = FakePipeline(bank_root(cfg), mllm_enabled=mllm, **kill)
    return EvalRunner(pipeline, Settings(expert={"weights": "random"}), cfg).run(), pipeline


def test_expert_runs_once_per_image_and_every_setting_reuses_it(data_root: Path, tmp_path: Path) -> None:
    report, pipeline = _run(data_root, tmp_path / "out")
    n_images = 4 + 3 * 2 + 3 + 3 * 1
    assert len(pipeline.expert_calls) == n_images
    assert len(pipeline.finish_calls) == 5 * n_images
    assert {(s, c) for _, s, c in pipeline.finish_calls} == {
        ("baseline", "off"),
        ("visual", "off"),
        ("textual", "off"),
        ("full", "off"),
        ("full", "auto"),
    }
    assert len(pipeline.builds) == 2  # one bank per class
    meta = report["meta"]["datasets"]["mvtec"]
    assert meta["complete"] and meta["n_images"] == n_images and meta["mllm_enabled"]
    assert meta["settings"] == SETTINGS.split(",")


def test_report_numbers_match_records(data_root: Path, tmp_path: Path) -> None:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    out = tmp_path / "out"
    report, _ = _run(data_root, out)
    records = read_records(out / RECORDS_FILE)
    experts = {r.key: r for r in records if r.kind == "expert"}
    answers = {r.key: r for r in records if r.kind == "answer" and r.setting == "baseline"}
    keys = sorted(experts)
    labels = [experts[k].label for k in keys]
    predicted = [{"defect": 1, "no_defect": 0}.get(answers[k].verdict, 1 - experts[k].label) for k in keys]
    pooled = report["metrics"]["mvtec"]["rules"]["wrong"]["pooled"]["baseline"]  # ours: unknown is wrong
    assert pooled["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert pooled["f1"] == pytest.approx(f1_score(labels, predicted))
    assert pooled["n_unknown"] == sum(answers[k].verdict == "unknown" for k in keys) > 0
    scored = [k for k in keys if answers[k].verdict != "unknown"]  # the paper's (default): unknown is dropped
    dropped = report["metrics"]["mvtec"]["pooled"]["settings"]["baseline"]
    assert dropped == report["metrics"]["mvtec"]["rules"]["drop"]["pooled"]["baseline"]
    assert dropped["accuracy"] == pytest.approx(
        accuracy_score([experts[k].label for k in scored], [int(answers[k].verdict == "defect") for k in scored])
    )
    assert (dropped["n_scored"], dropped["n_unknown"]) == (len(scored), pooled["n_unknown"])
    widget = [experts[k] for k in keys if experts[k].class_name == "widget"]
    cls = report["metrics"]["mvtec"]["classes"]["widget"]
    assert cls["image_auroc"] == pytest.approx(roc_auc_score([r.label for r in widget], [r.score for r in widget]))
    assert cls["pixel_auroc"] is not None and 0.0 <= cls["aupro"] <= 1.0
    assert cls["n_pixel_images"] == len(widget)
    mean = report["metrics"]["mvtec"]["mean"]["settings"]["full"]["accuracy"]
    per_class = [report["metrics"]["mvtec"]["classes"][c]["settings"]["full"]["accuracy"] for c in ("gadget", "widget")]
    assert mean == pytest.approx(np.mean(per_class))


def test_resume_after_interruption_gives_the_same_report(data_root: Path, tmp_path: Path) -> None:
    full_report, _ = _run(data_root, tmp_path / "whole")
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        _run(data_root, out, fail_after=7)
    with (out / RECORDS_FILE).open("a") as handle:
        handle.write('{"kind": "answer", "key": "widget/te')  # a write cut short by the kill
    resumed, pipeline = _run(data_root, out)
    assert len(pipeline.expert_calls) == 16 - 7  # the interrupted image is redone, finished ones are not
    assert resumed["metrics"] == full_report["metrics"]
    assert resumed["meta"]["datasets"]["mvtec"]["complete"]
    again, pipeline = _run(data_root, out)  # nothing left to do
    assert pipeline.expert_calls == [] and again["metrics"] == full_report["metrics"]


def test_added_settings_run_only_what_is_missing(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(data_root, out, settings="full")
    report, pipeline = _run(data_root, out, settings="full,full+caas")
    assert {s for _, s, c in pipeline.finish_calls} == {"full"} and {c for *_, c in pipeline.finish_calls} == {"auto"}
    assert set(report["metrics"]["mvtec"]["pooled"]["settings"]) == {"full", "full+caas"}


def test_shards_merged_equal_one_run(data_root: Path, tmp_path: Path) -> None:
    whole, _ = _run(data_root, tmp_path / "whole")
    shard_dirs = [tmp_path / f"shard{i}" for i in range(3)]
    calls = 0
    for i, directory in enumerate(shard_dirs):
        _, pipeline = _run(data_root, directory, shard=f"{i}/3")
        calls += len(pipeline.expert_calls)
    assert calls == 16
    merged = build_report(shard_dirs)
    assert merged["metrics"] == whole["metrics"]
    assert merged["meta"]["datasets"]["mvtec"]["complete"]
    partial = build_report(shard_dirs[:2])
    meta = partial["meta"]["datasets"]["mvtec"]
    assert not meta["complete"] and meta["missing_shards"] == ["2/3"]
    write_report(partial, tmp_path / "partial")
    assert "INCOMPLETE" in (tmp_path / "partial" / "report.md").read_text()


def test_limit_is_a_stable_sample_taken_before_sharding(data_root: Path, tmp_path: Path) -> None:
    whole, _ = _run(data_root, tmp_path / "whole", limit=3)
    assert whole["meta"]["datasets"]["mvtec"]["n_images"] == 6
    shard_dirs = [tmp_path / f"s{i}" for i in range(2)]
    for i, directory in enumerate(shard_dirs):
        _run(data_root, directory, shard=f"{i}/2", limit=3)
    assert build_report(shard_dirs)["metrics"] == whole["metrics"]


def test_expert_only_when_mllm_disabled(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report, pipeline = _run(data_root, out, mllm=False)
    assert pipeline.finish_calls == [] and len(pipeline.expert_calls) == 16
    meta = report["meta"]["datasets"]["mvtec"]
    assert not meta["mllm_enabled"] and meta["settings"] == []
    assert report["metrics"]["mvtec"]["pooled"]["settings"] == {}
    assert report["metrics"]["mvtec"]["pooled"]["expert"]["n"] == 16
    assert "MLLM disabled — only the expert's metrics were computed" in (out / "report.md").read_text()


def test_output_folder_of_another_configuration_is_refused(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(data_root, out, settings="full")
    cfg = EvalConfig(dataset="mvtec", root=data_root, out=out, settings=parse_settings("full"), progress=False)
    runner = EvalRunner(
        FakePipeline(bank_root(cfg), mllm_enabled=True), Settings(expert={"weights": "random", "kappa": 2.0}), cfg
    )
    with pytest.raises(EvalConfigError, match="different expert"):
        runner.run()
    with pytest.raises(EvalConfigError, match="different pixel_size"):
        _run(data_root, out, settings="full", pixel_size=64)


def test_unreadable_image_is_recorded_and_the_rest_evaluated(data_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root / "gadget", root / "gadget")
    (root / "gadget" / "test" / "good" / "000.png").write_bytes(b"this is not a png")
    out = tmp_path / "out"
    report, _ = _run(root, out, settings="full")
    meta = report["meta"]["datasets"]["mvtec"]
    assert [e["key"] for e in meta["errors"]] == ["gadget/test/good/000.png"]
    assert meta["n_images"] == 5 and not meta["complete"]


def test_report_files(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report, _ = _run(data_root, out, plots=True)
    for name in ("report.json", "per_class.csv", "summary.csv", "report.md", "run.json", "banks.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["metrics"] == report["metrics"]
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert "scores_mvtec_widget.png" in plots and "confusion_mvtec_full_caas.png" in plots
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    markdown = (out / "report.md").read_text()
    full = report["metrics"]["mvtec"]["mean"]["settings"]["full+caas"]  # Table 1: the paper's class means
    row = next(line for line in markdown.splitlines() if "· full+caas |" in line)
    expected = " | ".join(f"{100 * full[k]:.1f}" for k in ("balanced_accuracy", "precision", "recall", "f1"))
    assert expected in row
    assert "| Paper: Qwen2.5-VL-7B w/ EAGLE | 94.6 | 98.5 | 95.3 | 96.7 | – |" in markdown
    baseline = report["metrics"]["mvtec"]["mean"]["settings"]["baseline"]
    baseline_row = next(line for line in markdown.splitlines() if "· baseline |" in line)
    assert baseline_row.endswith(f" | {baseline['n_unknown']} |") and baseline["n_unknown"] > 0
    assert "## Table 3" in markdown and "## Table 4" in markdown
    per_class = (out / "per_class.csv").read_text().splitlines()
    assert per_class[0].startswith("dataset,class,setting,")
    assert len(per_class) == 1 + 2 * 6  # header + 2 classes × (expert + 5 settings)


def test_confusion_counts_agree_with_metrics(data_root: Path, tmp_path: Path) -> None:
    from eagle.evaluation.aggregate import confusion_counts
    from eagle.evaluation.records import RecordSet

    out = tmp_path / "out"
    report, _ = _run(data_root, out, settings="baseline")
    records = RecordSet().add(read_records(out / RECORDS_FILE))
    m = report["metrics"]["mvtec"]["rules"]["wrong"]["pooled"]["baseline"]
    (tn, fp_answered, unknown_normal), (fn_answered, tp, unknown_anomalous) = confusion_counts(records, "baseline")
    assert (tp, tn) == (m["tp"], m["tn"])
    assert unknown_normal + unknown_anomalous == m["n_unknown"]
    assert (fp_answered + unknown_normal, fn_answered + unknown_anomalous) == (m["fp"], m["fn"])
    d = report["metrics"]["mvtec"]["rules"]["drop"]["pooled"]["baseline"]
    assert (d["tp"], d["tn"], d["fp"], d["fn"]) == (tp, tn, fp_answered, fn_answered)
    assert d["n_unknown"] == m["n_unknown"] and d["n_scored"] == m["n_scored"] - m["n_unknown"]
    expert = confusion_counts(records, "expert")
    assert expert[:, 2].sum() == 0 and expert.sum() == 16


def test_pixel_pair_brings_map_to_mask_resolution_then_down() -> None:
    amap = np.arange(12, dtype=np.float32).reshape(3, 4)
    mask = np.zeros((6, 8), bool)
    mask[:3, :4] = True
    full_map, full_mask = pixel_pair(amap, mask, None)
    assert full_map.shape == (6, 8) and full_mask.dtype == np.uint8 and full_mask.sum() == 12
    small_map, small_mask = pixel_pair(amap, mask, 4)
    assert small_map.shape == small_mask.shape == (3, 4)


def test_settings_parsing() -> None:
    specs = parse_settings("baseline, full+caas")
    assert [(s.name, s.prompt_setting, s.caas) for s in specs] == [
        ("baseline", "baseline", "off"),
        ("full+caas", "full", "auto"),
    ]
    assert specs[1].options.explain is False
    for bad in ("", "full,full", "fancy", "full+cass"):
        with pytest.raises(EvalConfigError):
            parse_settings(bad)


def test_dataset_reader_used_by_runner(data_root: Path) -> None:
    ds = read_dataset("mvtec", data_root, ["gadget"])
    assert ds.classes == ["gadget"] and len(ds.test["gadget"]) == 6
