"""JSONL records (truncated tail tolerated, corruption refused) and deterministic sharding."""

from __future__ import annotations

from pathlib import Path

import pytest

from eagle.evaluation.records import (
    AnswerRecord,
    ErrorRecord,
    ExpertRecord,
    RecordsError,
    RecordSet,
    RecordWriter,
    read_records,
)
from eagle.evaluation.shards import Shard, ShardError, stable_hash


def _expert(key: str, score: float = 1.0) -> ExpertRecord:
    return ExpertRecord(
        key=key,
        class_name="c",
        dataset="mvtec",
        label=1,
        defect_type="crack",
        score=score,
        tau=0.5,
        s_max=2.0,
        anomalous=True,
        low_confidence=True,
        bank="c-0123456789abcdef",
        image_size=(8, 6),
    )


def _answer(key: str, setting: str, verdict: str = "defect") -> AnswerRecord:
    return AnswerRecord(key=key, class_name="c", setting=setting, label=1, verdict=verdict)


def test_write_read_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    records = [
        _expert("a.png"),
        _answer("a.png", "full"),
        ErrorRecord(key="b.png", class_name="c", stage="load", message="b.png: truncated file"),
    ]
    with RecordWriter(path) as writer:
        for record in records:
            writer.append(record)
    assert read_records(path) == records
    assert read_records(tmp_path / "missing.jsonl") == []


def test_truncated_last_line_is_ignored_and_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as writer:
        writer.append(_expert("a.png"))
    whole = _expert("b.png").model_dump_json()
    with path.open("a") as handle:
        handle.write(whole[: len(whole) // 2])  # the process died mid-write
    assert [r.key for r in read_records(path)] == ["a.png"]
    with RecordWriter(path) as writer:
        writer.append(_expert("c.png"))
    assert [r.key for r in read_records(path)] == ["a.png", "c.png"]
    assert path.read_text().count("\n") == 2


def test_malformed_middle_line_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text(_expert("a.png").model_dump_json() + "\n{garbage\n" + _expert("b.png").model_dump_json() + "\n")
    with pytest.raises(RecordsError, match="records.jsonl:2: malformed record"):
        read_records(path)


def test_record_set_last_wins_and_done_logic() -> None:
    records = RecordSet().add(
        [
            ErrorRecord(key="a.png", class_name="c", stage="load", message="x"),
            _expert("a.png", 1.0),
            _expert("a.png", 2.0),
            _answer("a.png", "full", "unknown"),
            _answer("a.png", "full", "defect"),
        ]
    )
    assert records.experts["a.png"].score == 2.0 and not records.errors
    assert records.answers[("a.png", "full")].verdict == "defect"
    assert records.is_done("a.png", ["full"]) and not records.is_done("a.png", ["full", "baseline"])


def test_shards_partition_every_image_exactly_once() -> None:
    keys = [("bottle", f"bottle/test/good/{i:03d}.png") for i in range(200)] + [("cable", "cable/x.png")]
    for n in (1, 2, 3, 7):
        owners = [[i for i in range(n) if Shard(i, n).contains(c, k)] for c, k in keys]
        assert all(len(o) == 1 for o in owners)
    sizes = [sum(Shard(i, 4).contains(c, k) for c, k in keys) for i in range(4)]
    assert min(sizes) > 30  # the hash spreads images, not whole classes
    assert stable_hash("bottle", "a.png") == stable_hash("bottle", "a.png") != stable_hash("cable", "a.png")


def test_shard_parse() -> None:
    assert Shard.parse("2/5") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"
    for bad in ("5/5", "1", "a/b", "-1/3", "0/0"):
        with pytest.raises(ShardError):
            Shard.parse(bad)
