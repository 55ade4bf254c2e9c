"""Every vocabulary (threshold methods, verdict words, audit sources, prompt settings, ...) is spelled out once.

Each vocabulary is one ``Literal`` (its tuple from ``typing.get_args``) in the lowest layer that needs it; every other
module imports it. The scan below reads the product code (not tests/ or docs/) and fails when the full set of a
vocabulary's words appears again as a literal tuple, list, set or ``Literal[...]`` outside its home; the other tests
check that the tables and display labels keyed by a vocabulary cover exactly its words.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

from eagle import audit, cli, doctor, records
from eagle.evaluation import mmad_table
from expert import boxes, coreset, dbt, drift, search
from expert import config as expert_config
from expert.config import ExpertSettings
from mllm import answers
from mllm import config as mllm_config

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("expert", "mllm", "eagle", "app", "deploy", "common")

VOCABULARIES: dict[str, tuple[tuple[str, ...], str]] = {
    "threshold methods": (dbt.THRESHOLD_METHOD_NAMES, "expert/dbt.py"),
    "DBT searches": (dbt.DBT_SEARCHES, "expert/dbt.py"),
    "coreset start methods": (coreset.START_METHODS, "expert/coreset.py"),
    "distances": (search.DISTANCES, "expert/search.py"),
    "weights sources": (get_args(expert_config.WeightsSource), "expert/config.py"),
    "box-merge rules": (boxes.MERGE_RULES, "expert/config.py"),
    "drift states": (drift.DRIFT_STATES, "expert/drift.py"),
    "verdicts": (records.VERDICTS, "eagle/records.py"),
    "operator verdicts": (records.OPERATOR_VERDICTS, "eagle/records.py"),
    "expert decisions": (records.EXPERT_DECISIONS, "eagle/records.py"),
    "feedback kinds": (audit.FEEDBACK_KINDS, "eagle/audit.py"),
    "audit sources": (audit.SOURCES, "eagle/audit.py"),
    "audit periods": (audit.PERIODS, "eagle/audit.py"),
    "doctor statuses": (get_args(doctor.Status), "eagle/doctor.py"),
    "log levels": (cli.LOG_LEVELS, "eagle/cli.py"),
    "unparsed-answer rules": (mmad_table.UNPARSED_RULES, "eagle/evaluation/mmad_table.py"),
    "MLLM answers": (mllm_config.ANSWERS, "mllm/config.py"),
    "answer sources": (get_args(answers.AnswerSource), "mllm/answers.py"),
    "answer parsers": (mllm_config.ANSWER_PARSERS, "mllm/config.py"),
    "prompt settings": (mllm_config.PROMPT_SETTINGS, "mllm/config.py"),
    "instructions": (get_args(mllm_config.Instruction), "mllm/config.py"),
    "CAAS policies": (get_args(mllm_config.CAASPolicy), "mllm/config.py"),
    "CAAS modes": (get_args(mllm_config.CAASMode), "mllm/config.py"),
    "CAAS tokens": (get_args(mllm_config.CAASTokens), "mllm/config.py"),
    "quantizations": (get_args(mllm_config.Quantization), "mllm/config.py"),
    "quantization settings": (get_args(mllm_config.QuantizationSetting), "mllm/config.py"),
}

NOT_COPIES = {
    # the ground truth's axis labels (label 0 / 1) of a confusion matrix, not the expert's decision
    ("expert decisions", "eagle/evaluation/plots.py"),
}
"""(vocabulary, file): the same words in another meaning."""


def _product_files() -> list[Path]:
    return sorted(path for package in PRODUCT for path in (ROOT / package).rglob("*.py"))


def _string_sequences(path: Path) -> list[tuple[int, frozenset[str]]]:
    """(line, words) of every tuple, list or set literal made only of string constants (``Literal[...]`` included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Tuple | ast.List | ast.Set) and len(node.elts) >= 2:
            words = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len(words) == len(node.elts):
                found.append((node.lineno, frozenset(words)))
    return found


SEQUENCES = {path.relative_to(ROOT).as_posix(): _string_sequences(path) for path in _product_files()}


def test_the_scan_sees_the_product_code():
    assert {"expert/dbt.py", "eagle/records.py", "mllm/config.py", "deploy/api.py", "app/ui.py"} <= set(SEQUENCES)
    # the scan finds a vocabulary spelled out: its own home's definition
    assert (frozenset(dbt.THRESHOLD_METHOD_NAMES)) in {words for _, words in SEQUENCES["expert/dbt.py"]}


@pytest.mark.parametrize("name", sorted(VOCABULARIES))
def test_a_vocabulary_is_spelled_out_only_at_home(name):
    words, home = VOCABULARIES[name]
    assert len(set(words)) == len(words) >= 2, words
    assert (ROOT / home).is_file()
    copies = [
        f"{path}:{line}"
        for path, sequences in SEQUENCES.items()
        if path != home and (name, path) not in NOT_COPIES
        for line, found in sequences
        if found == frozenset(words)
    ]
    assert copies == [], f"{name} {words} spelled out again (import them from {home}): {copies}"


def test_the_threshold_tables_cover_every_method():
    names = set(dbt.THRESHOLD_METHOD_NAMES)
    assert names == set(get_args(dbt.ThresholdMethod)) == {"k_sigma", "quantile", "mad", "evt"}
    assert set(dbt.THRESHOLD_METHODS) == set(dbt.THRESHOLD_SETTINGS) == set(dbt._METHODS) == names
    assert dbt.THRESHOLD_SETTINGS == {"k_sigma": "kappa", "quantile": "quantile", "mad": "mad_k", "evt": "evt_quantile"}
    assert set(dbt.THRESHOLD_PARAMETERS) <= set(ExpertSettings.model_fields)
    schema = ExpertSettings.model_json_schema()["properties"]
    assert schema["threshold_method"]["enum"] == list(dbt.THRESHOLD_METHOD_NAMES)


def test_the_verdict_vocabularies_nest():
    assert records.VERDICTS == ("defect", "no_defect", "unknown")
    assert records.OPERATOR_VERDICTS == ("defect", "no_defect") == audit.VERDICTS
    assert records.EXPERT_DECISIONS == ("anomalous", "normal")
    assert audit.SOURCES == ("api", "watch", "app")
    assert audit.FEEDBACK_KINDS == ("confirmed", "overruled")
    assert mllm_config.ANSWERS == get_args(answers.Answer) == ("yes", "no", "unknown")
    assert get_args(mllm_config.QuantizationSetting) == ("auto", *get_args(mllm_config.Quantization))


def test_the_app_labels_cover_their_vocabularies():
    from app import handlers, ui

    assert tuple(handlers.VERDICT_COLOURS) == tuple(handlers.VERDICT_TEXTS) == records.VERDICTS
    assert tuple(handlers.OPERATOR_VERDICT_LABELS) == records.OPERATOR_VERDICTS
    assert [value for _, value in handlers.FEEDBACK_VERDICTS] == ["", *records.OPERATOR_VERDICTS]
    assert set(ui.PROMPT_SETTING_LABELS) == set(mllm_config.PROMPT_SETTINGS)
    assert [value for _, value in ui.PROMPT_SETTINGS] == list(reversed(mllm_config.PROMPT_SETTINGS))
    assert tuple(ui.CAAS_LABELS) == get_args(mllm_config.CAASPolicy)
    assert [value for _, value in ui.CAAS_CHOICES] == ["auto", "off", "on"]
