"""The 1-shot+ template of the evaluation: MMAD's own ``similar_templates`` on MMAD, the bank's retrieval elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eagle.evaluation.records import RECORDS_FILE, AnswerRecord, read_records
from eagle.evaluation.runner import (
    MMAD_TEMPLATE_REASON,
    RETRIEVAL_REASON,
    EvalConfig,
    EvalRunner,
    bank_root,
    parse_settings,
)
from eagle.settings import Settings
from tests.fake_pipeline import FakePipeline
from tests.test_eval_readers import mmad_root, mvtec_root  # noqa: F401 - fixtures


def _run(dataset: str, root: Path, out: Path, settings: str = "full,full+caas") -> tuple[list, FakePipeline]:
    config = EvalConfig(
        dataset=dataset,
        root=root,
        out=out,
        settings=parse_settings(settings),
        progress=False,
        plots=False,
        bank_from_templates=dataset == "mmad",  # the fixture's DS-VisA has no training images
    )
    pipeline = FakePipeline(bank_root(config), mllm_enabled=True)
    EvalRunner(pipeline, Settings(expert={"weights": "random"}), config).run()
    answers = [r for r in read_records(out / RECORDS_FILE) if isinstance(r, AnswerRecord)]
    return answers, pipeline


def test_mmad_uses_its_own_similar_templates(mmad_root: Path, tmp_path: Path) -> None:  # noqa: F811
    answers, pipeline = _run("mmad", mmad_root, tmp_path / "run")
    expected = {
        "MVTec-AD/bottle/test/broken_large/000.png": "MVTec-AD/bottle/train/good/001.png",  # the FIRST listed
        "MVTec-AD/bottle/test/good/000.png": "MVTec-AD/bottle/train/good/000.png",
        "DS-VisA/candle/image/wax/000.png": "DS-VisA/candle/image/good/000.png",
        "DS-VisA/candle/image/good/002.png": "DS-VisA/candle/image/good/000.png",
    }
    assert len(answers) == 2 * len(expected)
    for record in answers:
        assert record.template_source == "mmad_similar_templates"
        assert record.template_path == expected[record.key]
        assert record.template_reason == MMAD_TEMPLATE_REASON
    # the pipeline was handed that image (decoded) and its name, for every setting
    assert sorted(pipeline.templates) == sorted(
        (key, template, (8, 8, 3)) for key, template in expected.items() for _ in range(2)
    )


def test_mmad_without_a_usable_template_falls_back_to_retrieval(mmad_root: Path, tmp_path: Path) -> None:  # noqa: F811
    data = json.loads((mmad_root / "mmad.json").read_text())
    data["MVTec-AD/bottle/test/good/000.png"]["similar_templates"] = []
    data["DS-VisA/candle/image/wax/000.png"]["similar_templates"] = ["DS-VisA/candle/image/good/missing.png"]
    (mmad_root / "mmad.json").write_text(json.dumps(data))
    answers, pipeline = _run("mmad", mmad_root, tmp_path / "run", settings="full")
    by_key = {r.key: r for r in answers}
    empty = by_key["MVTec-AD/bottle/test/good/000.png"]
    assert empty.template_source == "retrieval" and "lists no similar_templates" in empty.template_reason
    assert empty.template_path == "000.png"  # the bank reference the (fake) retrieval chose
    missing = by_key["DS-VisA/candle/image/wax/000.png"]
    assert missing.template_source == "retrieval"
    assert "DS-VisA/candle/image/good/missing.png unusable" in missing.template_reason
    assert by_key["MVTec-AD/bottle/test/broken_large/000.png"].template_source == "mmad_similar_templates"
    handed = {key: name for key, name, _ in pipeline.templates}
    assert handed["MVTec-AD/bottle/test/good/000.png"] is None and handed["DS-VisA/candle/image/wax/000.png"] is None


def test_mvtec_uses_the_banks_retrieval(mvtec_root: Path, tmp_path: Path) -> None:  # noqa: F811
    answers, pipeline = _run("mvtec", mvtec_root, tmp_path / "run", settings="baseline,full")
    assert answers and all(r.template_source == "retrieval" for r in answers)
    assert all(r.template_reason == RETRIEVAL_REASON and r.template_path == "000.png" for r in answers)
    assert all(shape is None and name is None for _, name, shape in pipeline.templates)  # the pipeline retrieves


def test_records_without_template_fields_still_read(tmp_path: Path) -> None:
    old = {"kind": "answer", "key": "a.png", "class_name": "c", "setting": "full", "label": 1, "verdict": "defect"}
    (tmp_path / RECORDS_FILE).write_text(json.dumps(old) + "\n")
    (record,) = read_records(tmp_path / RECORDS_FILE)
    assert record.template_source is None and record.template_path is None


@pytest.mark.parametrize("source", ["mmad_similar_templates", "retrieval"])
def test_template_source_values(source: str) -> None:
    record = AnswerRecord(key="a", class_name="c", setting="full", label=0, verdict="no_defect", template_source=source)
    assert json.loads(record.model_dump_json())["template_source"] == source
