"""Per-image evaluation records in JSON Lines, written as they finish so an interrupted run resumes.

One file, ``records.jsonl``, three kinds of line:

* ``expert``: one per test image — ground truth, the expert's score, τ, s_max, decision, the file holding its
  anomaly map for pixel metrics, timings.
* ``answer``: one per (image, prompt setting) — the MLLM's verdict for that setting, timings; on MMAD also the
  item's detection question (its options in the item's letter order, the correct letter; ``mllm_letter`` is the
  parsed one).
* ``question``: MMAD with ``--mmad-questions all`` only: one per (image, setting, other conversation turn) — the
  question, its options, the correct and the parsed letter (MMAD's per-type table is computed from these).
* ``error``: an image that could not be evaluated (unreadable file …), with the one-line reason.

Every line is flushed and fsync'ed before the next image starts. A run killed mid-write leaves at most one
truncated last line: :func:`read_records` ignores it (and :class:`RecordWriter` cuts it off before
appending), while a malformed line anywhere else is corruption and raises :class:`RecordsError`.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "records.jsonl"
    >>> with RecordWriter(path) as w:
    ...     w.append(ErrorRecord(key="a.png", class_name="c", stage="load", message="truncated file"))
    >>> [r.kind for r in read_records(path)]
    ['error']
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from common import atomic
from eagle.records import Verdict

RECORDS_FILE = "records.jsonl"


class RecordsError(ValueError):
    """A records file is corrupt (a malformed line that is not the last one) or unreadable."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="The image's path relative to the data set root (its identity).")
    class_name: str


class ExpertRecord(_Record):
    """The expert's view of one test image plus its ground truth."""

    kind: Literal["expert"] = "expert"
    dataset: str
    label: int = Field(ge=0, le=1)
    defect_type: str
    score: float
    tau: float
    s_max: float
    anomalous: bool
    low_confidence: bool
    bank: str
    n_boxes: int = 0
    template: str | None = None
    image_size: tuple[int, int] = Field(description="(width, height).")
    map_file: str | None = Field(None, description="Anomaly map + mask (.npz) relative to the run folder.")
    timings_ms: dict[str, float] = Field(default_factory=dict)


class AnswerRecord(_Record):
    """The final verdict for one image under one prompt setting."""

    kind: Literal["answer"] = "answer"
    setting: str = Field(description="Evaluation setting name, e.g. full+caas.")
    label: int = Field(ge=0, le=1)
    verdict: Verdict
    mllm_answer: str | None = None
    mllm_letter: str | None = None
    mllm_raw: str | None = None
    caas_applied: bool = False
    model_id: str | None = None
    template_source: Literal["mmad_similar_templates", "retrieval"] | None = Field(
        None,
        description="Where the 1-shot+ template came from: MMAD's own similar_templates entry for the image (MMAD, "
        "as the reference evaluation) or the bank's retrieval of its most similar reference (other data sets).",
    )
    template_path: str | None = Field(
        None, description="The template used: its path relative to the data set root (MMAD) or the reference's name."
    )
    template_reason: str | None = Field(None, description="Why this template was used (one line).")
    question_type: str | None = Field(None, description="MMAD: the turn's type (Anomaly Detection).")
    question_index: int | None = Field(None, description="MMAD: the turn's position in the item's conversation.")
    question: str | None = Field(None, description="MMAD: the question text asked, verbatim.")
    options: list[tuple[str, str]] | None = Field(
        None, description="MMAD: the options shown, (letter, text) in the item's letter order."
    )
    correct_letter: str | None = Field(
        None, description="MMAD: the item's Answer letter (mllm_letter: the parsed one)."
    )
    timings_ms: dict[str, float] = Field(default_factory=dict)


class QuestionRecord(_Record):
    """The answer to one non-detection turn of an MMAD item under one setting (``--mmad-questions all``)."""

    kind: Literal["question"] = "question"
    setting: str
    question_index: int = Field(ge=0, description="The turn's position in the item's conversation.")
    question_type: str
    question: str
    options: list[tuple[str, str]]
    correct_letter: str
    mllm_letter: str | None = Field(None, description="The parsed letter (None: the reply named no option).")
    mllm_raw: str | None = None
    model_id: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)


class ErrorRecord(_Record):
    """An image that could not be evaluated."""

    kind: Literal["error"] = "error"
    stage: str
    message: str


AnyRecord = ExpertRecord | AnswerRecord | QuestionRecord | ErrorRecord
Record = Annotated[AnyRecord, Field(discriminator="kind")]
_RECORD_ADAPTER: TypeAdapter[Record] = TypeAdapter(Record)


def parse_record(line: str) -> AnyRecord:
    """Parse one JSON line into its record type.

    Raises:
        ValueError: not JSON or not a valid record (pydantic's ``ValidationError`` is a ``ValueError``).
    """
    return _RECORD_ADAPTER.validate_json(line)


def read_records(path: Path) -> list[AnyRecord]:
    """Read a records file; a missing file is an empty run.

    A malformed LAST line (a write cut short by an interruption) is ignored; any other malformed line raises.

    Raises:
        RecordsError: a malformed line before the last one.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            records.append(parse_record(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError, ValidationError) as err:
            is_last = not any(rest.strip() for rest in lines[number:])
            if is_last:
                break
            first = str(err).splitlines()[0]
            raise RecordsError(f"{path}:{number}: malformed record ({first}); the file is corrupt") from None
    return records


def _cut_partial_tail(path: Path) -> None:
    """Remove a last line that lacks its newline (an interrupted write) so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        keep = handle.read().rfind(b"\n") + 1
        handle.truncate(keep)


class RecordWriter:
    """Append records to a JSONL file, each flushed and fsync'ed before :meth:`append` returns.

    Use as a context manager. Opening cuts off a partial last line left by an interrupted run.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handle = None

    def __enter__(self) -> RecordWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_partial_tail(self.path)
        self._handle = self.path.open("a", encoding="utf-8")
        return self

    def append(self, record: AnyRecord) -> None:
        """Write one record as one line and make it durable."""
        if self._handle is None:
            raise RuntimeError("RecordWriter used outside its `with` block")
        self._handle.write(record.model_dump_json() + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass
class RecordSet:
    """Records of one or more runs, de-duplicated: the last record per image (and setting) wins."""

    experts: dict[str, ExpertRecord] = field(default_factory=dict)
    answers: dict[tuple[str, str], AnswerRecord] = field(default_factory=dict)
    questions: dict[tuple[str, str, int], QuestionRecord] = field(default_factory=dict)
    errors: dict[str, ErrorRecord] = field(default_factory=dict)

    def add(self, records: Iterable[AnyRecord]) -> RecordSet:
        """Fold records in order; a later success clears an earlier error for the same image."""
        for record in records:
            if isinstance(record, ExpertRecord):
                self.experts[record.key] = record
                self.errors.pop(record.key, None)
            elif isinstance(record, AnswerRecord):
                self.answers[(record.key, record.setting)] = record
            elif isinstance(record, QuestionRecord):
                self.questions[(record.key, record.setting, record.question_index)] = record
            else:
                self.errors[record.key] = record
        return self

    def is_done(self, key: str, settings: Iterable[str], questions: Iterable[int] = ()) -> bool:
        """Whether the image has its expert record and, per setting, its answer and every turn in ``questions``."""
        settings, questions = list(settings), list(questions)
        return (
            key in self.experts
            and all((key, s) in self.answers for s in settings)
            and all((key, s, i) in self.questions for s in settings for i in questions)
        )


def dump_json(path: Path, data: dict) -> None:
    """Write JSON atomically and durably (:func:`common.atomic.write_text`), so readers never see half a file."""
    atomic.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
