"""The paper's metric definitions against hand-computed numbers: class-mean balanced accuracy and P/R/F1,
pooled metrics beside them, and both rules for unparseable answers (dropped, the paper's; wrong, ours).

The fixture: three classes of unequal size and balance, one setting (``full``), three unparseable answers.
Per image (truth, answer); TP/FP/TN/FN as the answer scores, ``?`` = unparseable:

* alpha — 2 normal, 4 anomalous: TN, FP | TP, TP, FN, ?
* beta  — 4 normal, 1 anomalous: TN, ?, TN, FP | TP
* gamma — 3 normal, 3 anomalous: FP, TN, TN | TP, FN, ?

Every expected value below was worked out by hand from those counts (fractions in the comments).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eagle.cli import main
from eagle.evaluation.aggregate import ReportError, build_report
from eagle.evaluation.metrics import MetricsError, classification_metrics
from eagle.evaluation.records import RECORDS_FILE, AnswerRecord, ExpertRecord, RecordWriter, dump_json
from eagle.evaluation.render import csv_rows, render_markdown
from eagle.evaluation.runner import EvalConfig, EvalConfigError

# class -> [(label, verdict)]; "unknown" = the answer parsed to neither yes nor no
ANSWERS = {
    "alpha": [(0, "no_defect"), (0, "defect"), (1, "defect"), (1, "defect"), (1, "no_defect"), (1, "unknown")],
    "beta": [(0, "no_defect"), (0, "unknown"), (0, "no_defect"), (0, "defect"), (1, "defect")],
    "gamma": [(0, "defect"), (0, "no_defect"), (0, "no_defect"), (1, "defect"), (1, "no_defect"), (1, "unknown")],
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder (run.json + records.jsonl) holding exactly the answers above; the expert is always right."""
    out = tmp_path_factory.mktemp("paper-metrics")
    planned = {name: len(items) for name, items in ANSWERS.items()}
    identity = {"dataset": "mvtec", "shard": "0/1", "limit": None, "pixel_size": "off", "expert": "e", "mllm": "m"}
    dump_json(
        out / "run.json",
        {
            "format_version": 1,
            "identity": identity,
            "root": "/data",
            "settings": ["full"],
            "mllm_enabled": True,
            "model": "tiny",
            "planned": planned,
            "notes": [],
        },
    )
    with RecordWriter(out / RECORDS_FILE) as writer:
        for name, items in ANSWERS.items():
            for i, (label, verdict) in enumerate(items):
                key = f"{name}/test/{'bad' if label else 'good'}/{i:03d}.png"
                common = {"key": key, "class_name": name, "label": label}
                writer.append(
                    ExpertRecord(
                        **common,
                        dataset="mvtec",
                        defect_type="bad" if label else "good",
                        score=0.9 if label else 0.1,
                        tau=0.5,
                        s_max=1.0,
                        anomalous=bool(label),
                        low_confidence=False,
                        bank=name,
                        image_size=(8, 8),
                    )
                )
                writer.append(AnswerRecord(**common, setting="full", verdict=verdict))
    return out


def _close(block: dict, **expected: float) -> None:
    for key, value in expected.items():
        assert block[key] == pytest.approx(value, abs=5e-7), key


def test_per_class_values_under_both_rules(run_dir: Path) -> None:
    rules = build_report([run_dir])["metrics"]["mvtec"]["rules"]
    drop, wrong = rules["drop"]["classes"], rules["wrong"]["classes"]
    # drop: alpha TP 2 FP 1 TN 1 FN 1 → acc 3/5, bal (1/2 + 2/3)/2 = 7/12, P = R = F1 = 2/3
    _close(drop["alpha"]["full"], accuracy=0.6, balanced_accuracy=0.583333, precision=0.666667, recall=0.666667)
    assert (drop["alpha"]["full"]["n_unknown"], drop["alpha"]["full"]["n_scored"]) == (1, 5)
    # drop: beta TP 1 FP 1 TN 2 FN 0 → acc 3/4, bal (2/3 + 1)/2 = 5/6, P 1/2, R 1, F1 2/3
    _close(drop["beta"]["full"], accuracy=0.75, balanced_accuracy=0.833333, precision=0.5, recall=1.0, f1=0.666667)
    # drop: gamma TP 1 FP 1 TN 2 FN 1 → acc 3/5, bal (2/3 + 1/2)/2 = 7/12, P = R = F1 = 1/2
    _close(drop["gamma"]["full"], accuracy=0.6, balanced_accuracy=0.583333, precision=0.5, recall=0.5, f1=0.5)
    # wrong: alpha's ? is a FN → TP 2 FP 1 TN 1 FN 2: acc 1/2, bal 1/2, P 2/3, R 1/2, F1 4/7
    _close(wrong["alpha"]["full"], accuracy=0.5, balanced_accuracy=0.5, precision=0.666667, recall=0.5, f1=0.571429)
    # wrong: beta's ? is a FP → TP 1 FP 2 TN 2: acc 3/5, bal (1/2 + 1)/2 = 3/4, P 1/3, R 1, F1 1/2
    _close(wrong["beta"]["full"], accuracy=0.6, balanced_accuracy=0.75, precision=0.333333, recall=1.0, f1=0.5)
    assert (wrong["beta"]["full"]["fp"], wrong["beta"]["full"]["n_scored"]) == (2, 5)


def test_class_mean_pooled_and_balanced_all_differ(run_dir: Path) -> None:
    data = build_report([run_dir])["metrics"]["mvtec"]
    mean, pooled = data["mean"]["settings"]["full"], data["pooled"]["settings"]["full"]
    # the paper's definitions (drop): bal (7/12 + 5/6 + 7/12)/3 = 2/3; P (2/3 + 1/2 + 1/2)/3 = 5/9;
    # R (2/3 + 1 + 1/2)/3 = 13/18; F1 (2/3 + 2/3 + 1/2)/3 = 11/18; plain accuracy (3/5 + 3/4 + 3/5)/3 = 13/20
    _close(mean, balanced_accuracy=0.666667, precision=0.555556, recall=0.722222, f1=0.611111, accuracy=0.65)
    assert (mean["n_unknown"], mean["n_scored"], mean["n_classes"], mean["unparsed"]) == (3, 14, 3, "drop")
    # pooled (drop): TP 4 FP 3 TN 5 FN 2 → acc 9/14, bal (5/8 + 2/3)/2 = 31/48, P 4/7, R 2/3, F1 8/13
    _close(pooled, accuracy=0.642857, balanced_accuracy=0.645833, precision=0.571429, recall=0.666667, f1=0.615385)
    assert (pooled["tp"], pooled["fp"], pooled["tn"], pooled["fn"], pooled["n"]) == (4, 3, 5, 2, 17)
    wrong = data["rules"]["wrong"]
    # ours (wrong): class means bal (1/2 + 3/4 + 1/2)/3 = 7/12, P (2/3 + 1/3 + 1/2)/3 = 1/2,
    # R (1/2 + 1 + 1/3)/3 = 11/18, F1 (4/7 + 1/2 + 2/5)/3 = 103/210, acc (1/2 + 3/5 + 1/2)/3 = 8/15
    _close(wrong["mean"]["full"], balanced_accuracy=0.583333, precision=0.5, recall=0.611111, f1=0.490476)
    _close(wrong["mean"]["full"], accuracy=0.533333)
    # pooled (wrong): TP 4 FP 4 TN 5 FN 4 → acc 9/17, bal (5/9 + 1/2)/2 = 19/36, P = R = F1 = 1/2
    _close(wrong["pooled"]["full"], accuracy=0.529412, balanced_accuracy=0.527778, precision=0.5, recall=0.5, f1=0.5)


def test_the_chosen_rule_fills_the_top_level_blocks(run_dir: Path) -> None:
    report = build_report([run_dir], unparsed="wrong")
    data = report["metrics"]["mvtec"]
    assert report["meta"]["unparsed"] == "wrong"
    assert data["mean"]["settings"] == data["rules"]["wrong"]["mean"]
    assert data["pooled"]["settings"] == data["rules"]["wrong"]["pooled"]
    assert data["classes"]["beta"]["settings"] == data["rules"]["wrong"]["classes"]["beta"]
    assert data["rules"]["drop"] == build_report([run_dir])["metrics"]["mvtec"]["rules"]["drop"]
    with pytest.raises(ReportError, match="unknown rule for unparseable answers 'guess'"):
        build_report([run_dir], unparsed="guess")
    with pytest.raises(EvalConfigError, match="--unparsed must be one of drop, wrong"):
        EvalConfig(dataset="mvtec", root=run_dir, out=run_dir, unparsed="guess")
    with pytest.raises(MetricsError, match="unparsed must be one of"):
        classification_metrics([1], ["defect"], unparsed="guess")


def _line(markdown: str, start: str, contains: str) -> str:
    section = markdown[markdown.index(start) :]
    return next(line for line in section.splitlines() if contains in line)


def test_rendered_tables_state_their_definitions_and_print_the_numbers(run_dir: Path) -> None:
    markdown = render_markdown(build_report([run_dir]))
    headings = [line for line in markdown.splitlines() if line.startswith("## Table")]
    assert len(headings) == 3  # Tables 1, 3, 4
    for heading in headings:
        assert "the paper's definitions" in heading and "balanced accuracy" in heading, heading
        assert "averaged over classes" in heading, heading
    assert "((accuracy on normal images + accuracy on anomalous images) / 2) per class" in headings[0]
    pooled_heading = next(line for line in markdown.splitlines() if line.startswith("## Pooled"))
    assert "NOT the paper's definition" in pooled_heading and "one confusion matrix per data set" in pooled_heading
    assert "are dropped from the counts, as the paper's reference summary does" in markdown
    assert "| MVTec-AD Acc | Prec | Rec | F1 | dropped |" in markdown
    # Table 1: class means (drop); Pooled: one matrix; both print the 3 dropped answers in the row
    assert _line(markdown, "## Table 1", "· full |").endswith("| 66.7 | 55.6 | 72.2 | 61.1 | 3 |")
    assert _line(markdown, "## Pooled", "· full |").endswith("| 64.3 | 57.1 | 66.7 | 61.5 | 3 |")
    assert _line(markdown, "## Table 3", "Expert (Visual + Textual) |") == (
        "| Expert (Visual + Textual) | 66.7 | 61.1 | 3 | 93.1 | 96.2 |"
    )
    assert _line(markdown, "## Table 4", "CAAS off |").startswith("| Visual + Textual, CAAS off | 66.7 | 61.1 | 3 |")
    # per class: Acc, bal.Acc, dropped; then the class mean and the pooled rows
    assert _line(markdown, "### MVTec-AD per class", "| beta |").endswith("| 75.0 | 83.3 | 1 |")
    assert _line(markdown, "### MVTec-AD per class", "**mean over classes**").endswith("| 65.0 | 66.7 | 3 |")
    assert _line(markdown, "### MVTec-AD per class", "**pooled**").endswith("| 64.3 | 64.6 | 3 |")


def test_rendered_tables_under_the_wrong_rule(run_dir: Path) -> None:
    markdown = render_markdown(build_report([run_dir], unparsed="wrong"))
    assert "count as wrong" in markdown and "| MVTec-AD Acc | Prec | Rec | F1 | unparsed |" in markdown
    assert _line(markdown, "## Table 1", "· full |").endswith("| 58.3 | 50.0 | 61.1 | 49.0 | 3 |")
    assert _line(markdown, "## Pooled", "· full |").endswith("| 52.9 | 50.0 | 50.0 | 50.0 | 3 |")


def test_summary_csv_carries_both_rules(run_dir: Path) -> None:
    _, summary = csv_rows(build_report([run_dir]))
    full = {(r["aggregate"], r["unparsed"]): r for r in summary if r["setting"] == "full"}
    assert sorted(full) == [("mean", "drop"), ("mean", "wrong"), ("pooled", "drop"), ("pooled", "wrong")]
    assert full[("mean", "drop")]["balanced_accuracy"] == pytest.approx(2 / 3)
    assert full[("pooled", "wrong")]["accuracy"] == pytest.approx(9 / 17)


def test_eval_merge_flag_picks_the_rule(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval-merge", str(run_dir), "--out", str(tmp_path / "m"), "--no-plots", "--unparsed", "wrong"]) == 0
    printed = capsys.readouterr().out
    assert "unparseable answers counted wrong" in printed
    assert "full           acc  58.3  prec  50.0  rec  61.1  F1  49.0  unparsed 3" in printed
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["meta"]["unparsed"] == "wrong" and set(report["metrics"]["mvtec"]["rules"]) == {"drop", "wrong"}
    assert main(["eval-merge", str(run_dir), "--out", str(tmp_path / "d"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "full           acc  66.7  prec  55.6  rec  72.2  F1  61.1  dropped 3" in printed
    assert json.loads((tmp_path / "d" / "report.json").read_text())["meta"]["unparsed"] == "drop"


def test_eval_flag_reaches_the_runner_report(tmp_path: Path) -> None:
    from eagle.cli import build_parser
    from eagle.evaluation.cli import build_config
    from eagle.evaluation.runner import EvalRunner, bank_root, parse_settings
    from eagle.settings import Settings
    from tests.fake_pipeline import FakePipeline
    from tests.synthetic import make_mvtec_like

    parser = build_parser(["eagle.evaluation.cli"]).parser
    base = ["eval", "--dataset", "mvtec", "--root", str(tmp_path), "--out", str(tmp_path / "o")]
    assert build_config(parser.parse_args(base)).unparsed == "drop"  # the paper's rule by default
    assert build_config(parser.parse_args([*base, "--unparsed", "wrong"])).unparsed == "wrong"
    root = make_mvtec_like(tmp_path / "data", n_train=2, n_test_good=2, n_test_bad_per_type=1, sizes=((32, 32),))
    config = EvalConfig(
        dataset="mvtec",
        root=root,
        out=tmp_path / "run",
        settings=parse_settings("baseline"),
        progress=False,
        plots=False,
        pixel_metrics=False,
        unparsed="wrong",
    )
    pipeline = FakePipeline(bank_root(config), mllm_enabled=True)
    report = EvalRunner(pipeline, Settings(expert={"weights": "random"}), config).run()
    data = report["metrics"]["mvtec"]
    assert report["meta"]["unparsed"] == "wrong" and data["pooled"]["settings"] == data["rules"]["wrong"]["pooled"]
    written = json.loads((config.out / "report.json").read_text())
    assert written["meta"]["unparsed"] == "wrong"
