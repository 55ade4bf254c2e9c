"""The watched folder in batches: several ready images embedded in one forward pass, each finished as if alone."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from deploy.watch import FolderWatcher
from eagle.audit import AuditLog
from eagle.settings import ServiceSettings
from expert.scorer import MAX_SCORE_BATCH
from tests.fixtures_pipeline import BANK, split_test_images


def _run(pipeline, photos: list[Path], tmp_path: Path, *, batch_size: int, extra: dict[str, bytes] | None = None):
    """Drop ``photos`` (and ``extra`` name → bytes) into a fresh folder, watch it once; (outcomes, out, audit rows)."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir(parents=True)
    for photo in photos:  # good/000.png and hole/000.png: one name each in the folder
        (incoming / f"{photo.parent.name}-{photo.name}").write_bytes(photo.read_bytes())
    for name, data in (extra or {}).items():
        (incoming / name).write_bytes(data)
    with AuditLog(tmp_path / "audit.sqlite3") as audit:
        watcher = FolderWatcher(pipeline, incoming, out, BANK, audit=audit, poll_s=0.01, batch_size=batch_size)
        watcher.open()
        try:
            outcomes = watcher.run(threading.Event(), once=True)
        finally:
            watcher.close()
        rows = audit.query()
    return outcomes, out, rows


def _records(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}


@pytest.fixture
def embed_calls(built_pipeline, monkeypatch):
    """The batch sizes the bank's embedder is called with."""
    scorer = built_pipeline.pipeline.banks.load(BANK)
    real = scorer.embedder
    sizes: list[int] = []

    def counting(batch):
        sizes.append(len(batch))
        return real(batch)

    monkeypatch.setattr(scorer, "embedder", counting)
    return sizes


def test_ready_images_are_embedded_together_and_score_as_alone(built_pipeline, synthetic_root, tmp_path, embed_calls):
    good, bad = split_test_images(synthetic_root)
    photos = [good[0], bad[0], good[1], bad[1], good[2]]
    batched, out_batched, rows_batched = _run(built_pipeline.pipeline, photos, tmp_path / "b", batch_size=4)
    batch_calls = list(embed_calls)
    embed_calls.clear()
    alone, out_alone, rows_alone = _run(built_pipeline.pipeline, photos, tmp_path / "a", batch_size=1)

    assert sorted(batch_calls) == [1, 4] and embed_calls == [1] * 5  # 5 images: a batch of 4, then one
    assert [o.status for o in batched] == [o.status for o in alone] == ["done"] * 5
    assert len(rows_batched) == len(rows_alone) == 5
    first, second = _records(out_batched), _records(out_alone)
    assert sorted(first) == sorted(second)
    for name, record in first.items():
        other = second[name]
        assert record["verdict"] == other["verdict"] and record["boxes"] == other["boxes"], name
        assert record["score"] == pytest.approx(other["score"], rel=1e-4), name
        assert record["image_sha256"] == other["image_sha256"]


def test_a_bad_image_in_a_batch_fails_alone(built_pipeline, synthetic_root, tmp_path):
    good, _ = split_test_images(synthetic_root)
    corrupt = {"broken.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 + b"IEND\xaeB`\x82"}
    outcomes, out, rows = _run(built_pipeline.pipeline, good[:2], tmp_path, batch_size=4, extra=corrupt)
    status = {o.name: (o.status, o.error_code) for o in outcomes}
    assert status[f"good-{good[0].name}"] == status[f"good-{good[1].name}"] == ("done", None)
    assert status["broken.png"][0] == "failed" and status["broken.png"][1] == "invalid_image"
    assert (tmp_path / "in" / "failed" / "broken.png").exists()
    assert sorted(p.name for p in (tmp_path / "in" / "done").iterdir()) == sorted(f"good-{p.name}" for p in good[:2])
    assert len(rows) == 3 and json.loads((out / "broken.error.json").read_text())["error"]["code"] == "invalid_image"


def test_inspect_many_equals_inspect_image_by_image(built_pipeline, synthetic_root):
    pipeline = built_pipeline.pipeline
    good, bad = split_test_images(synthetic_root)
    photos = [good[0], bad[0], bad[1]]
    many = pipeline.inspect_many([(p.read_bytes(), p.name) for p in photos] + [(b"not an image", "x.png")], BANK)
    assert isinstance(many[-1], Exception) and getattr(many[-1], "code", None) == "invalid_image"
    for photo, result in zip(photos, many, strict=False):
        one = pipeline.inspect(photo.read_bytes(), BANK, image_name=photo.name)
        assert result.image_name == photo.name and result.verdict == one.verdict and result.boxes == one.boxes
        assert result.score == pytest.approx(one.score, rel=1e-4)
        assert {"decode", "embed", "total"} <= set(result.timings_ms)


def test_an_unknown_bank_fails_every_image_of_the_batch(built_pipeline, synthetic_root):
    good, _ = split_test_images(synthetic_root)
    many = built_pipeline.pipeline.inspect_many([(p.read_bytes(), p.name) for p in good[:2]], "no-such-bank")
    assert [getattr(r, "code", None) for r in many] == ["bank_not_found"] * 2


def test_the_batch_size_setting_is_bounded_by_the_scorer():
    assert ServiceSettings().watch_batch_size == 4
    assert ServiceSettings.model_fields["watch_batch_size"].metadata[-1].le == MAX_SCORE_BATCH
    with pytest.raises(ValueError, match="batch_size"):
        FolderWatcher(None, Path("in"), Path("out"), BANK, audit=None, batch_size=0)  # type: ignore[arg-type]
