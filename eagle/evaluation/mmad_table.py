"""MMAD's own per-question-type accuracy table (the table of MMAD's leaderboard and result files).

The definition is MMAD's ``caculate_accuracy_mmad`` (``evaluation/examples/helper/summary.py`` in MMAD's
repository), applied to one setting's answers:

* **Rows** are MMAD's data sets: the first component of the image path (``DS-MVTec``, ``MVTec-LOCO``, ``VisA``,
  ``GoodsAD``, ...), each POOLED over all its classes; a last row ``Average`` is the mean of the data-set rows.
* **Columns** are the question types, ``Object Structure`` and ``Object Details`` merged into ``Object Analysis``
  (:data:`MERGED_TYPES`), in MMAD's order (:data:`MMAD_TYPES`; other types follow in first-seen order), then
  ``Average`` (the mean of the row's type columns), ``Recall``, ``Precision`` and ``F1`` (of the detection
  question, anomalous = positive), all in percent; the columns of MMAD's published result files.
* A type cell is ``correct / total`` over the data set's answers of that type. The ``Anomaly Detection`` cell is
  instead ``(accuracy on normal images + accuracy on anomalous images) / 2``, an image being normal when its path
  contains ``good`` (MMAD's ``normal_flag``). Recall = TP / (TP + FN), Precision = TP / (TP + FP) with TP the
  anomalous images answered right, FP the normal images answered wrong, FN the anomalous images answered wrong
  (so any wrong letter on a normal image, a third option included, is a false positive); an empty denominator
  gives 0, F1 = 2PR / (P + R) (0 when P + R = 0).
* An answer whose correct or parsed letter is not one of ``A``–``E`` is removed before counting (rule ``drop``,
  MMAD's; ``dropped`` counts them). Rule ``wrong`` (ours) counts a missing or invalid parsed letter as a wrong
  answer instead.

Two deliberate differences, both only where MMAD's code misbehaves:

* MMAD removes an invalid answer from the list it is iterating over (``all_answers_json.remove(answer)`` inside
  ``for answer in all_answers_json``), so the answer right AFTER each invalid one is skipped too, whatever it
  was. Here exactly the invalid answers are left out: which answers count must not depend on their order.
* MMAD writes 0 into a cell whose data set has no answer of that type (and averages that 0 in); here such a
  cell is ``None`` (printed ``–``) and left out of the averages.

Example:
    >>> rows = [MmadAnswer("VisA/candle/test/good/0.png", "Anomaly Detection", "B", "B"),
    ...         MmadAnswer("VisA/candle/test/bad/1.png", "Anomaly Detection", "A", "B")]
    >>> table = mmad_accuracy_table(rows)
    >>> table["rows"]["VisA"]["Anomaly Detection"], table["rows"]["VisA"]["Recall"]
    (50.0, 0.0)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

__all__ = [
    "DETECTION_TYPE",
    "MERGED_TYPES",
    "MMAD_DATASET_ORDER",
    "MMAD_TYPES",
    "NORMAL_FLAG",
    "SUMMARY_COLUMNS",
    "MmadAnswer",
    "mmad_accuracy_table",
    "mmad_type",
]

DETECTION_TYPE = "Anomaly Detection"
MMAD_TYPES: tuple[str, ...] = (
    DETECTION_TYPE,
    "Defect Classification",
    "Defect Localization",
    "Defect Description",
    "Defect Analysis",
    "Object Classification",
    "Object Analysis",
)
"""MMAD's question types in the order of its result files (after merging, :data:`MERGED_TYPES`)."""
MERGED_TYPES = {"Object Structure": "Object Analysis", "Object Details": "Object Analysis"}
"""MMAD's summary counts these two types as one column, ``Object Analysis``."""
SUMMARY_COLUMNS: tuple[str, ...] = ("Average", "Recall", "Precision", "F1")
"""The columns after the type columns (MMAD's result files)."""
MMAD_DATASET_ORDER: tuple[str, ...] = ("DS-MVTec", "MVTec-AD", "MVTec-LOCO", "VisA", "GoodsAD")
"""Row order: MMAD's data sets first (others follow alphabetically)."""
NORMAL_FLAG = "good"
"""An image is normal for the detection column when its path contains this (MMAD's ``normal_flag``)."""
VALID_LETTERS = frozenset("ABCDE")
"""The letters MMAD's summary accepts; any other correct or parsed letter is removed (``drop``)."""
UnparsedRule = Literal["drop", "wrong"]
UNPARSED_RULES: tuple[UnparsedRule, ...] = get_args(UnparsedRule)
"""How ``unknown`` answers enter the metrics: ``drop`` (the paper's reference summary) or ``wrong`` (ours)."""


@dataclass(frozen=True)
class MmadAnswer:
    """One answered MMAD question.

    Attributes:
        image: The image's path in ``mmad.json`` (``<data set>/<class>/...``).
        question_type: MMAD's type of the question (as ``mmad.json`` writes it).
        correct: The item's Answer letter.
        answer: The parsed letter of the model's reply (``None``: no option).
    """

    image: str
    question_type: str
    correct: str | None
    answer: str | None


def mmad_type(question_type: str) -> str:
    """The table column of a question type (``Object Structure`` / ``Object Details`` → ``Object Analysis``)."""
    return MERGED_TYPES.get(question_type, question_type)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _dataset_order(names: Iterable[str]) -> list[str]:
    names = set(names)
    known = [n for n in MMAD_DATASET_ORDER if n in names]
    return known + sorted(names - set(known))


def mmad_accuracy_table(answers: Iterable[MmadAnswer], *, unparsed: str = "drop") -> dict[str, Any]:
    """MMAD's per-type accuracy table of ``answers`` (definition in the module docstring).

    Args:
        answers: The answers of one setting.
        unparsed: ``drop`` (MMAD's: invalid answers removed) or ``wrong`` (an answer without a valid parsed
            letter counts as wrong; a correct letter outside A–E is still removed: it cannot be scored).

    Returns:
        ``{"columns", "rows": {data set: {column: % or None}}, "average": {column: % or None}, "counts": {data
        set: {type: {"total", "correct"}}}, "dropped": {data set: n}, "unparsed"}``.

    Raises:
        ValueError: an unknown rule.
    """
    if unparsed not in UNPARSED_RULES:
        raise ValueError(f"unparsed must be one of {UNPARSED_RULES}, got {unparsed!r}")
    counts: dict[str, dict[str, dict[str, int]]] = {}
    detection: dict[str, dict[str, int]] = {}
    dropped: dict[str, int] = {}
    seen_types: list[str] = []
    for item in answers:
        dataset = item.image.split("/")[0]
        column = mmad_type(item.question_type)
        counts.setdefault(dataset, {})
        dropped.setdefault(dataset, 0)
        if column not in seen_types:
            seen_types.append(column)
        valid_answer = item.answer in VALID_LETTERS
        if item.correct not in VALID_LETTERS or (not valid_answer and unparsed == "drop"):
            dropped[dataset] += 1
            continue
        right = valid_answer and item.answer == item.correct
        cell = counts[dataset].setdefault(column, {"total": 0, "correct": 0})
        cell["total"] += 1
        cell["correct"] += int(right)
        if column == DETECTION_TYPE:
            side = "normal" if NORMAL_FLAG in item.image else "abnormal"
            stats = detection.setdefault(
                dataset, {"normal": 0, "normal_correct": 0, "abnormal": 0, "abnormal_correct": 0}
            )
            stats[side] += 1
            stats[f"{side}_correct"] += int(right)
    types = [t for t in MMAD_TYPES if t in seen_types] + [t for t in seen_types if t not in MMAD_TYPES]
    rows: dict[str, dict[str, float | None]] = {}
    for dataset in _dataset_order(counts):
        row: dict[str, float | None] = {}
        for column in types:
            cell = counts[dataset].get(column)
            row[column] = 100 * _ratio(cell["correct"], cell["total"]) if cell else None
        stats = detection.get(dataset)
        if stats is not None:
            normal_acc = _ratio(stats["normal_correct"], stats["normal"])
            anomaly_acc = _ratio(stats["abnormal_correct"], stats["abnormal"])
            row[DETECTION_TYPE] = 100 * (normal_acc + anomaly_acc) / 2
        row["Average"] = _mean(row[t] for t in types)
        if stats is not None:
            tp = stats["abnormal_correct"]
            fp = stats["normal"] - stats["normal_correct"]
            fn = stats["abnormal"] - stats["abnormal_correct"]
            precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            row.update(Recall=100 * recall, Precision=100 * precision, F1=100 * f1)
        else:
            row.update(Recall=None, Precision=None, F1=None)
        rows[dataset] = row
    columns = [*types, *SUMMARY_COLUMNS]
    average = {c: _mean(row[c] for row in rows.values()) for c in columns}
    return {
        "columns": columns,
        "rows": rows,
        "average": average,
        "counts": {d: counts[d] for d in rows},
        "dropped": {d: dropped[d] for d in rows},
        "unparsed": unparsed,
    }
