"""MMAD end to end with the fake pipeline: items asked and scored with their own options, every question type
(``--mmad-questions all``) in MMAD's own per-type table, and banks from the original training images.

The fixture is MMAD's real layout (``mmad.json`` next to ``DS-MVTec/<class>/image/<type>/…`` and ``VisA/<class>/
{train,test}/…``) beside an MVTec-style root holding DS-MVTec's training images (``<class>/train/good``), the way
the reference evaluation pairs them. The model's replies are scripted per (image, question) and parsed against the
item's options by :func:`mllm.choices.parse_choice`, as :class:`mllm.inspector.MLLMInspector` does; the verdict of
a detection item is the chosen option's TEXT (:func:`mllm.choices.option_answer`), as :class:`eagle.pipeline.
Pipeline` does. Per image (detection options, correct letter → reply; other turns: type, correct → reply):

* DS-MVTec/bottle broken_large — A "Yes." B "No.", A → "A" (right); Defect Classification A → "A" (right),
  Defect Localization C → "C" (right), Defect Description B → "I think B." (right), Defect Analysis D → "D" (right)
* DS-MVTec/bottle good — REVERSED A "No." B "Yes.", A → "A" (right: "A" is "No"); Object Classification A →
  "Bottle." (the option's text: right), Object Structure B → "A" (wrong), Object Details A → "A" (right)
* DS-MVTec/cable good — A "Yes" B "No" (no periods), B → "A" (wrong: a false alarm); Object Classification B →
  "B" (right), Object Details C (three options) → "C" (right)
* DS-MVTec/cable bent_wire/000 — REVERSED, no periods, A "No" B "Yes", B → "B" (right); Defect Classification
  B → "A" (wrong)
* DS-MVTec/cable bent_wire/001 — THIRD OPTION A "Yes." B "No." C "Not sure.", A → "C" (wrong: a miss, and
  neither yes nor no for the paper tables); Defect Localization A → "the weather is nice" (no option: dropped by
  MMAD's rule, wrong by ours)
* VisA/candle bad — A "Yes." B "No.", A → "No." (wrong: a miss); Defect Description A → "A" (right)
* VisA/candle good — A "Yes." B "No.", B → "B" (right); Object Classification A → "A" (right)

MMAD's table by hand (MMAD's rule ``drop``; DS-MVTec pools bottle and cable):

* DS-MVTec: Anomaly Detection = (normal 1/2 + anomalous 2/3) / 2 = 58.33; Defect Classification 1/2 = 50;
  Defect Localization 1/1 = 100 (one dropped; ``wrong``: 1/2 = 50); Defect Description 1/1, Defect Analysis
  1/1, Object Classification 2/2 = 100; Object Analysis (Structure + Details) 2/3 = 66.67; Average = 575/7 =
  82.14 (``wrong``: 525/7 = 75); Recall = TP/(TP+FN) = 2/3, Precision = TP/(TP+FP) = 2/3, F1 = 2/3.
* VisA: Anomaly Detection (1/1 + 0/1) / 2 = 50; Defect Description 100; Object Classification 100; the other
  types have no answers (–); Average (50 + 100 + 100) / 3 = 83.33; Recall 0/1 = 0, Precision 0/0 = 0, F1 0.
* Average row (mean of the data-set rows, – cells left out): Anomaly Detection 54.17, Defect Classification 50,
  Average (575/7 + 250/3) / 2 = 82.74, Recall = Precision = F1 = 33.33.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eagle.cli import build_parser
from eagle.evaluation.cli import build_config
from eagle.evaluation.mmad_table import MMAD_TYPES, SUMMARY_COLUMNS
from eagle.evaluation.readers import DatasetError, read_dataset
from eagle.evaluation.records import RECORDS_FILE, AnswerRecord, QuestionRecord, read_records
from eagle.evaluation.render import TEMPLATE_BANKS_HEADING
from eagle.evaluation.runner import EvalRunner, bank_root
from eagle.settings import Settings
from mllm.choices import MultipleChoice, option_answer, parse_choice
from tests.cli_helpers import run_cli
from tests.fake_pipeline import FakePipeline

DETECT = "Is there any defect in the object?"
YES_NO = {"A": "Yes.", "B": "No."}
REVERSED = {"A": "No.", "B": "Yes."}


def _png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _turn(kind: str, question: str, options: dict[str, str], answer: str) -> dict:
    return {"Question": question, "Answer": answer, "Options": options, "type": kind, "annotation": True}


BOTTLE_BAD = "DS-MVTec/bottle/image/broken_large/000.png"
BOTTLE_GOOD = "DS-MVTec/bottle/image/good/000.png"
CABLE_GOOD = "DS-MVTec/cable/image/good/000.png"
CABLE_BAD0 = "DS-MVTec/cable/image/bent_wire/000.png"
CABLE_BAD1 = "DS-MVTec/cable/image/bent_wire/001.png"
CANDLE_BAD = "VisA/candle/test/bad/000.png"
CANDLE_GOOD = "VisA/candle/test/good/000.png"
FOUR = {"A": "Broken.", "B": "Scratch.", "C": "Contamination.", "D": "Crack."}
PLACES = {"A": "Top.", "B": "Bottom.", "C": "Center."}

# image -> [(turn, scripted reply)], in conversation order
ITEMS: dict[str, list[tuple[dict, str]]] = {
    BOTTLE_BAD: [
        (_turn("Anomaly Detection", DETECT, YES_NO, "A"), "A"),
        (_turn("Defect Classification", "What is the type of the defect?", FOUR, "A"), "A"),
        (_turn("Defect Localization", "Where is the defect?", PLACES, "C"), "C"),
        (_turn("Defect Description", "What does the defect look like?", FOUR, "B"), "I think B."),
        (_turn("Defect Analysis", "What is the effect of the defect?", FOUR, "D"), "D"),
    ],
    BOTTLE_GOOD: [
        (_turn("Anomaly Detection", DETECT, REVERSED, "A"), "A"),
        (_turn("Object Classification", "What kind of product?", {"A": "Bottle.", "B": "Cable."}, "A"), "Bottle."),
        (_turn("Object Structure", "How many parts?", {"A": "One.", "B": "Two."}, "B"), "A"),
        (_turn("Object Details", "What colour is the rim?", {"A": "Black.", "B": "White."}, "A"), "A"),
    ],
    CABLE_GOOD: [
        (_turn("Anomaly Detection", DETECT, {"A": "Yes", "B": "No"}, "B"), "A"),
        (_turn("Object Classification", "What kind of product?", {"A": "Bottle.", "B": "Cable."}, "B"), "B"),
        (_turn("Object Details", "How many wires?", {"A": "One.", "B": "Two.", "C": "Three."}, "C"), "C"),
    ],
    CABLE_BAD0: [
        (_turn("Anomaly Detection", DETECT, {"A": "No", "B": "Yes"}, "B"), "B"),
        (_turn("Defect Classification", "What is the type of the defect?", FOUR, "B"), "A"),
    ],
    CABLE_BAD1: [
        (_turn("Anomaly Detection", DETECT, {"A": "Yes.", "B": "No.", "C": "Not sure."}, "A"), "C"),
        (_turn("Defect Localization", "Where is the defect?", PLACES, "A"), "the weather is nice"),
    ],
    CANDLE_BAD: [
        (_turn("Anomaly Detection", DETECT, YES_NO, "A"), "No."),
        (_turn("Defect Description", "What does the defect look like?", FOUR, "A"), "A"),
    ],
    CANDLE_GOOD: [
        (_turn("Anomaly Detection", DETECT, YES_NO, "B"), "B"),
        (_turn("Object Classification", "What kind of product?", {"A": "Candle.", "B": "Cable."}, "A"), "A"),
    ],
}
REPLIES = {(image, turn["Question"]): reply for image, turns in ITEMS.items() for turn, reply in turns}
N_TURNS = sum(len(turns) for turns in ITEMS.values())  # 20


class ScriptedPipeline(FakePipeline):
    """The fake pipeline whose model replies as scripted; the reply is parsed against the item's own options."""

    def finish(self, image, expert, bank, options=None, *, question: MultipleChoice | None = None, **kwargs):
        result = super().finish(image, expert, bank, options, question=question, **kwargs)
        if question is None or result.mode != "expert+mllm":
            return result
        raw = REPLIES[(kwargs["image_name"], question.question)]
        letter = parse_choice(raw, question).letter
        answer = option_answer(question, letter)
        verdict = {"yes": "defect", "no": "no_defect"}.get(answer, "unknown")
        return result.model_copy(
            update={"mllm_raw": raw, "mllm_letter": letter, "mllm_answer": answer, "verdict": verdict}
        )


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """``(MMAD root, MVTec-AD root)``: MMAD's layout, and the original data set DS-MVTec's images come from."""
    return make_tree(tmp_path)


def make_tree(tmp_path: Path) -> tuple[Path, Path]:
    """Write the fixture tree under ``tmp_path``: ``(MMAD root, MVTec-AD root)`` (also used by the Ray test)."""
    mmad, mvtec = tmp_path / "MMAD", tmp_path / "mvtec_anomaly_detection"
    for image in ITEMS:
        _png(mmad / image)
    _png(mmad / "DS-MVTec/bottle/rbg_mask/broken_large/000_rbg_mask.png", 255)
    for name in ("bottle", "cable"):  # MMAD's templates of DS-MVTec: the MVTec-AD copy inside MMAD
        for i in range(2):
            _png(mmad / f"MVTec-AD/{name}/train/good/{i:03d}.png")
        for i in range(3):  # the original training split: more images than the templates
            _png(mvtec / f"{name}/train/good/{i:03d}.png")
        _png(mvtec / f"{name}/test/good/000.png")
    for i in range(2):  # VisA inside MMAD is the 1-class MVTec-style copy: its train/good is the original split
        _png(mmad / f"VisA/candle/train/good/{i:03d}.png")
    data = {}
    for image, turns in ITEMS.items():
        name = image.split("/")[1]
        prefix = "MVTec-AD" if image.startswith("DS-MVTec") else "VisA"
        data[image] = {
            "image_path": image,
            "mask_path": "rbg_mask/broken_large/000_rbg_mask.png" if image == BOTTLE_BAD else "",
            "similar_templates": [f"{prefix}/{name}/train/good/001.png", f"{prefix}/{name}/train/good/000.png"],
            "random_templates": [f"{prefix}/{name}/train/good/000.png"],
            "conversation": [turn for turn, _ in turns],
        }
    (mmad / "mmad.json").write_text(json.dumps(data, indent=1))
    return mmad, mvtec


def _eval_args(mmad: Path, out: Path, *extra: str):
    parser = build_parser(["eagle.evaluation.cli"]).parser
    argv = ["eval", "--dataset", "mmad", "--root", str(mmad), "--out", str(out), "--no-progress", "--no-plots"]
    return parser.parse_args([*argv, "--no-pixel", *extra])


def _run(mmad: Path, out: Path, *extra: str) -> tuple[dict, ScriptedPipeline]:
    """``eagle eval --dataset mmad … EXTRA`` parsed by the CLI's parser, run with the scripted fake pipeline."""
    config = build_config(_eval_args(mmad, out, *extra))
    pipeline = ScriptedPipeline(bank_root(config), mllm_enabled=True)
    report = EvalRunner(pipeline, Settings(expert={"weights": "random"}), config).run()
    return report, pipeline


# ---------------------------------------------------------------------------------------------- items, one by one


def test_each_detection_item_is_asked_and_scored_with_its_own_options(tree, tmp_path) -> None:
    mmad, mvtec = tree
    report, pipeline = _run(mmad, tmp_path / "run", "--settings", "full", "--bank-root", f"DS-MVTec={mvtec}")
    asked = {image: q for image, _, q in pipeline.questions}
    # the question list the model is shown: the item's question and options verbatim, in its letter order
    assert asked[BOTTLE_GOOD].question_list() == (
        "Following is the question list: Question 1: Is there any defect in the object? \nA. No.\nB. Yes."
    )
    assert asked[CABLE_GOOD].question_list().endswith("object? \nA. Yes\nB. No")
    assert asked[CABLE_BAD1].question_list().endswith("object? \nA. Yes.\nB. No.\nC. Not sure.")
    assert len(pipeline.questions) == len(ITEMS)  # detection only (the default): one question per image
    records = {r.key: r for r in read_records(tmp_path / "run" / RECORDS_FILE) if isinstance(r, AnswerRecord)}
    expected = {  # image: (label, correct letter, parsed letter, verdict)
        BOTTLE_BAD: (1, "A", "A", "defect"),
        BOTTLE_GOOD: (0, "A", "A", "no_defect"),  # reversed order: "A" is "No."
        CABLE_GOOD: (0, "B", "A", "defect"),
        CABLE_BAD0: (1, "B", "B", "defect"),  # reversed, no periods: "B" is "Yes"
        CABLE_BAD1: (1, "A", "C", "unknown"),  # the third option is neither yes nor no
        CANDLE_BAD: (1, "A", "B", "no_defect"),  # the reply "No." is option B's text
        CANDLE_GOOD: (0, "B", "B", "no_defect"),
    }
    assert {k: (r.label, r.correct_letter, r.mllm_letter, r.verdict) for k, r in records.items()} == expected
    good = records[BOTTLE_GOOD]
    assert (good.question, good.question_type, good.question_index) == (DETECT, "Anomaly Detection", 0)
    assert good.options == [("A", "No."), ("B", "Yes.")]
    assert records[CABLE_BAD1].options == [("A", "Yes."), ("B", "No."), ("C", "Not sure.")]
    assert not [r for r in read_records(tmp_path / "run" / RECORDS_FILE) if isinstance(r, QuestionRecord)]
    # detection only: MMAD's table has its Anomaly Detection column (and the summary columns) alone
    table = report["metrics"]["mmad"]["mmad_table"]["full"]["drop"]
    assert table["columns"] == ["Anomaly Detection", *SUMMARY_COLUMNS]
    assert table["rows"]["DS-MVTec"]["Anomaly Detection"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    # the paper tables (class means): bottle all right; cable: normal 0/1, anomalous 1/1 (the "C" dropped)
    paper = report["metrics"]["mmad"]["mean"]["settings"]["full"]
    assert paper["n_unknown"] == 1  # CABLE_BAD1
    assert report["meta"]["datasets"]["mmad"]["mmad_questions"] == "detection"


# ---------------------------------------------------------------------------------------------- --mmad-questions all


def test_all_questions_make_mmads_per_type_table(tree, tmp_path) -> None:
    mmad, mvtec = tree
    out = tmp_path / "run"
    report, pipeline = _run(
        mmad, out, "--settings", "baseline,full", "--mmad-questions", "all", "--bank-root", f"DS-MVTec={mvtec}"
    )
    # every turn of every conversation, once per setting, each with that setting's prompt and numbered by its place
    asked = [(image, setting, q.question, q.number) for image, setting, q in pipeline.questions]
    expected = [
        (image, setting, turn["Question"], index + 1)
        for image, turns in ITEMS.items()
        for index, (turn, _) in enumerate(turns)
        for setting in ("baseline", "full")
    ]
    assert sorted(asked) == sorted(expected) and len(asked) == 2 * N_TURNS
    location = next(q for image, _, q in pipeline.questions if image == BOTTLE_BAD and q.number == 3)
    assert location.question_list() == (
        "Following is the question list: Question 3: Where is the defect? \nA. Top.\nB. Bottom.\nC. Center."
    )
    questions = [r for r in read_records(out / RECORDS_FILE) if isinstance(r, QuestionRecord)]
    assert len(questions) == 2 * (N_TURNS - len(ITEMS))
    structure = next(r for r in questions if r.key == BOTTLE_GOOD and r.question_type == "Object Structure")
    assert (structure.options, structure.correct_letter, structure.mllm_letter) == (
        [("A", "One."), ("B", "Two.")],
        "B",
        "A",
    )
    weather = next(r for r in questions if r.key == CABLE_BAD1 and r.question_type == "Defect Localization")
    assert (weather.mllm_letter, weather.mllm_raw) == (None, "the weather is nice")

    tables = report["metrics"]["mmad"]["mmad_table"]
    assert set(tables) == {"baseline", "full"} and tables["baseline"] == tables["full"]  # the same replies
    drop, wrong = tables["full"]["drop"], tables["full"]["wrong"]
    assert drop["columns"] == [*MMAD_TYPES, *SUMMARY_COLUMNS]  # MMAD's column names, in its order
    assert list(drop["rows"]) == ["DS-MVTec", "VisA"]  # one row per MMAD data set, its classes pooled
    third = 100 / 3
    ds = {
        "Anomaly Detection": 175 / 3,
        "Defect Classification": 50.0,
        "Defect Localization": 100.0,
        "Defect Description": 100.0,
        "Defect Analysis": 100.0,
        "Object Classification": 100.0,
        "Object Analysis": 200 / 3,  # Object Structure 0/1 and Object Details 2/2, merged
        "Average": 575 / 7,
        "Recall": 2 * third,
        "Precision": 2 * third,
        "F1": 2 * third,
    }
    visa = dict.fromkeys(MMAD_TYPES) | {"Anomaly Detection": 50.0, "Defect Description": 100.0}
    visa |= {"Object Classification": 100.0, "Average": 250 / 3, "Recall": 0.0, "Precision": 0.0, "F1": 0.0}
    assert drop["rows"]["DS-MVTec"] == pytest.approx(ds)
    assert drop["rows"]["VisA"] == visa | {k: pytest.approx(v) for k, v in visa.items() if v is not None}
    assert drop["average"]["Anomaly Detection"] == pytest.approx(325 / 6)
    assert drop["average"]["Average"] == pytest.approx((575 / 7 + 250 / 3) / 2)
    assert drop["average"]["F1"] == pytest.approx(third)
    assert drop["dropped"] == {"DS-MVTec": 1, "VisA": 0}
    assert drop["counts"]["DS-MVTec"]["Object Analysis"] == {"total": 3, "correct": 2}
    assert wrong["rows"]["DS-MVTec"]["Defect Localization"] == pytest.approx(50.0)  # the no-option reply: wrong
    assert wrong["rows"]["DS-MVTec"]["Average"] == pytest.approx(75.0) and wrong["dropped"]["DS-MVTec"] == 0

    written = json.loads((out / "report.json").read_text())
    assert written["metrics"]["mmad"]["mmad_table"]["full"]["drop"]["rows"]["DS-MVTec"] == pytest.approx(ds)
    assert written["meta"]["datasets"]["mmad"]["mmad_questions"] == "all"
    assert json.loads((out / "run.json").read_text())["mmad_questions"] == "all"
    markdown = (out / "report.md").read_text()
    assert "## MMAD per question type (%), MMAD's own table" in markdown
    head = "| Data set | " + " | ".join([*MMAD_TYPES, *SUMMARY_COLUMNS]) + " | dropped |"
    assert head in markdown
    assert (
        "| DS-MVTec | 58.3 | 50.0 | 100.0 | 100.0 | 100.0 | 100.0 | 66.7 | 82.1 | 66.7 | 66.7 | 66.7 | 1 |" in markdown
    )
    assert "| VisA | 50.0 | – | – | 100.0 | – | 100.0 | – | 83.3 | 0.0 | 0.0 | 0.0 | 0 |" in markdown
    assert (
        "| **Average** | 54.2 | 50.0 | 100.0 | 100.0 | 100.0 | 100.0 | 66.7 | 82.7 | 33.3 | 33.3 | 33.3 | 1 |"
        in markdown
    )
    assert "Object Structure and Object Details counted as Object Analysis" in markdown
    assert markdown.index("## Table 1") < markdown.index("## MMAD per question type")  # next to the detection tables


def test_all_questions_resume_asks_only_what_is_missing(tree, tmp_path) -> None:
    mmad, mvtec = tree
    out = tmp_path / "run"
    _run(mmad, out, "--settings", "full", "--bank-root", f"DS-MVTec={mvtec}")  # detection only first
    _, pipeline = _run(mmad, out, "--settings", "full", "--mmad-questions", "all", "--bank-root", f"DS-MVTec={mvtec}")
    assert len(pipeline.questions) == N_TURNS - len(ITEMS)  # the detection answers are reused
    assert {q.number for _, _, q in pipeline.questions} == {2, 3, 4, 5}
    _, again = _run(mmad, out, "--settings", "full", "--mmad-questions", "all", "--bank-root", f"DS-MVTec={mvtec}")
    assert again.questions == []


# ---------------------------------------------------------------------------------------------- banks


def test_bank_root_builds_each_bank_from_the_original_training_images(tree, tmp_path) -> None:
    mmad, mvtec = tree
    out = tmp_path / "run"
    report, pipeline = _run(mmad, out, "--settings", "full", "--bank-root", f"DS-MVTec={mvtec}")
    sources = json.loads((out / "run.json").read_text())["bank_sources"]
    assert sources["DS-MVTec/bottle"] == {
        "source": "bank_root",
        "origin": "MVTec-AD",
        "path": str(mvtec / "bottle" / "train" / "good"),
        "n_images": 3,  # the original split, not MMAD's two templates
    }
    assert sources["DS-MVTec/cable"]["path"] == str(mvtec / "cable" / "train" / "good")
    assert sources["VisA/candle"] == {
        "source": "mmad_tree",
        "origin": None,
        "path": str(mmad / "VisA" / "candle" / "train" / "good"),
        "n_images": 2,
    }
    assert json.loads((out / "run.json").read_text())["bank_from_templates"] is False
    banks = {name: pipeline.banks.meta(name)["names"] for name in (b.name for b in pipeline.banks.list())}
    assert sorted(len(names) for names in banks.values()) == [2, 3, 3]
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# EAGLE evaluation report\n")
    assert "## MMAD banks — where each class's normal references came from" in markdown
    row = f"| DS-MVTec/bottle | the original data set's normal training images (--bank-root) | MVTec-AD | `{mvtec}"
    assert row in markdown
    assert report["meta"]["datasets"]["mmad"]["bank_sources"] == sources


def test_missing_training_images_fail_naming_the_path_and_the_flag(tree, tmp_path) -> None:
    mmad, mvtec = tree
    with pytest.raises(DatasetError) as err:  # no --bank-root: DS-MVTec ships no train split
        read_dataset("mmad", mmad)
    message = str(err.value)
    assert str(mmad / "DS-MVTec" / "bottle" / "train" / "good") in message
    assert "--bank-root DS-MVTec=<the MVTec-AD root>" in message and "--bank-from-templates" in message
    (mvtec / "cable" / "train" / "good" / "000.png").unlink()
    for image in (mvtec / "cable" / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match="--bank-root DS-MVTec=") as err:
        read_dataset("mmad", mmad, bank_roots={"DS-MVTec": mvtec})
    assert str(mvtec / "cable" / "train" / "good") in str(err.value)
    with pytest.raises(DatasetError, match="unknown MMAD data set; use one of DS-MVTec"):
        read_dataset("mmad", mmad, bank_roots={"DS-VisA": mvtec})
    with pytest.raises(DatasetError, match=r"not a directory \(expected the VisA root\)"):
        read_dataset("mmad", mmad, bank_roots={"VisA": tmp_path / "nowhere"})


def test_eval_cli_reports_a_missing_training_folder(tree, tmp_path, monkeypatch) -> None:
    mmad, _ = tree
    monkeypatch.setenv("EAGLE_EXPERT__WEIGHTS", "random")
    monkeypatch.setenv("EAGLE_DATA_DIR", str(tmp_path / "home"))
    argv = ["eval", "--dataset", "mmad", "--root", str(mmad), "--out", str(tmp_path / "o"), "--no-mllm"]
    code, _, err = run_cli([*argv, "--no-progress"])
    assert code == 2
    assert str(mmad / "DS-MVTec" / "bottle" / "train" / "good") in err and "--bank-root DS-MVTec=" in err
    code, _, err = run_cli([*argv, "--bank-root", "DS-MVTec"])
    assert code == 2 and "expected NAME=DIR" in err


def test_bank_from_templates_says_so_in_the_heading(tree, tmp_path) -> None:
    mmad, _ = tree
    out = tmp_path / "run"
    report, _ = _run(mmad, out, "--settings", "full", "--bank-from-templates")
    sources = json.loads((out / "run.json").read_text())["bank_sources"]
    assert sources["DS-MVTec/bottle"]["source"] == "templates" and sources["DS-MVTec/bottle"]["n_images"] == 2
    assert sources["VisA/candle"]["source"] == "mmad_tree"  # found in the tree: no templates needed
    assert report["meta"]["datasets"]["mmad"]["bank_from_templates"] is True
    markdown = (out / "report.md").read_text()
    assert markdown.splitlines()[0] == TEMPLATE_BANKS_HEADING
    assert "--bank-from-templates" in markdown.splitlines()[0] and "NOT from the original training" in markdown
