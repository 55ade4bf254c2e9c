"""Growing a bank from confirmed good parts: the proposal's rules on a hand-made audit log, and teaching it.

The bank is the fake pipeline's (τ = 0.5; a part's score is its grey level's distance from the bank's mean); the
audit rows are written as the front ends write them, the kept images are real PNGs in the kept-images store.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from eagle.audit import AuditLog
from eagle.bank_refresh import (
    RefreshError,
    apply,
    describe_proposal,
    propose,
    propose_for,
    read_refresh_log,
    select,
)
from eagle.kept_images import KeptImages
from eagle.settings import Settings
from tests.fake_pipeline import FakePipeline

BANK = "line"
IMAGES: dict[str, bytes] = {}
"""The bytes of every image a test row names, by sha256."""


def png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def row(i: int, bank_id: str, score: float, *, verdict="no_defect", decision="normal", image=None, tau=0.5) -> dict:
    data = image if image is not None else png(i)
    IMAGES[sha(data)] = data
    return {
        "time": f"2026-12-07T01:00:{i:02d}Z",
        "run_id": f"run{i}",
        "source": "watch",
        "image_name": f"part{i}.png",
        "image_sha256": sha(data),
        "bank": BANK,
        "bank_id": bank_id,
        "score": score,
        "tau": tau,
        "decision": decision,
        "verdict": verdict,
        "status": "ok",
    }


@pytest.fixture
def line(tmp_path):
    settings = Settings(data_dir=tmp_path, keep_images={"enabled": True, "refresh_margin": 0.8, "refresh_count": 10})
    pipeline = FakePipeline(tmp_path)
    pipeline.build_bank([np.full((16, 16, 3), grey, np.uint8) for grey in (120, 128, 136)], BANK)
    kept = KeptImages.of(settings)
    with AuditLog(tmp_path / "audit.sqlite3") as audit:
        yield pipeline, settings, kept, audit


def write(audit: AuditLog, kept: KeptImages, rows: list[dict], *, keep: bool = True) -> None:
    for item in rows:
        audit._insert(item)
        if keep:
            kept.keep(item["image_sha256"], IMAGES[item["image_sha256"]])


def current(pipeline) -> tuple[str, float]:
    summary = next(s for s in pipeline.banks.list() if s.name == BANK)
    return summary.bank_id, summary.tau


def test_the_proposal_follows_margin_feedback_and_the_current_version(line):
    pipeline, settings, kept, audit = line
    bank_id, tau = current(pipeline)
    write(
        audit,
        kept,
        [
            row(1, bank_id, 0.30),  # pass with margin (0.30 <= 0.8 x 0.5 = 0.40)
            row(2, bank_id, 0.45),  # pass, but inside the margin: not proposed ...
            row(3, bank_id, 0.46),  # ... unless an operator says good
            row(4, bank_id, 0.10),  # a clear pass that an operator marked defective: never
            row(5, "0123456789abcdef", 0.10),  # another version of the bank: not this line history
            row(6, bank_id, 0.70, verdict="defect", decision="anomalous"),  # flagged and overruled as good
            row(7, bank_id, 0.20, verdict="defect"),  # the expert passed it, the MLLM said defect: not by margin
            row(8, bank_id, 0.40),  # exactly margin x tau: proposed
        ],
    )
    write(audit, kept, [row(9, bank_id, 0.05)], keep=False)  # a good part whose image is not kept
    audit.record_feedback("run3", "confirmed")
    audit.record_feedback("run4", "overruled", correct_verdict="defect")
    audit.record_feedback("run6", "overruled")  # the opposite of defect: no_defect

    proposal = propose(audit, kept, BANK, bank_id, tau, count=10, margin=0.8)
    assert [c.run_id for c in proposal.candidates] == ["run8", "run6", "run3", "run1"]  # newest first
    assert [c.reason for c in proposal.candidates] == ["margin", "operator_good", "operator_good", "margin"]
    assert proposal.candidates[0].why == "score 0.4 ≤ 0.8 × τ 0.5"
    assert proposal.candidates[-1].image_name == "part1.png" and proposal.candidates[-1].score == 0.30
    assert proposal.bank_id == bank_id and proposal.keeping

    assert [c.run_id for c in propose(audit, kept, BANK, bank_id, tau, count=2, margin=0.8).candidates] == [
        "run8",
        "run6",
    ]
    assert [c.run_id for c in propose(audit, kept, BANK, bank_id, tau, count=10, margin=0.5).candidates] == [
        "run6",
        "run3",
    ]
    assert propose_for(pipeline, settings, BANK, audit, kept) == proposal  # the settings' margin and count
    text = describe_proposal(proposal)
    assert text.splitlines()[0] == f"bank 'line' (bank id {bank_id}, τ {tau:.4g}): 4 candidates"
    assert "part6.png" in text and "an operator said no defect" in text


def test_the_same_picture_is_proposed_once_and_the_latest_feedback_counts(line):
    pipeline, _, kept, audit = line
    bank_id, tau = current(pipeline)
    same = png(1)
    write(audit, kept, [row(1, bank_id, 0.2, image=same), row(2, bank_id, 0.2, image=same)])
    audit.record_feedback("run2", "overruled", correct_verdict="defect")
    audit.record_feedback("run2", "confirmed", correct_verdict="no_defect")  # changed their mind: good after all
    found = propose(audit, kept, BANK, bank_id, tau, count=10, margin=0.8).candidates
    assert [(c.run_id, c.reason) for c in found] == [("run2", "operator_good")]


def test_approved_candidates_are_taught_as_a_new_version(line, tmp_path):
    """(The fake keeps one version; rollback after a refresh is tested with the real pipeline's history.)"""
    pipeline, settings, kept, audit = line
    bank_id, tau = current(pipeline)
    write(audit, kept, [row(1, bank_id, 0.1), row(2, bank_id, 0.2), row(3, bank_id, 0.3)])
    proposal = propose_for(pipeline, settings, BANK, audit, kept)
    with pytest.raises(RefreshError, match="not proposed"):
        select(proposal, [sha(png(99))])
    with pytest.raises(RefreshError):
        select(proposal, [])
    chosen = select(proposal, [sha(png(1)), sha(png(3))])
    assert [c.run_id for c in chosen] == ["run3", "run1"]

    result = apply(pipeline, BANK, chosen, kept, data_dir=tmp_path, approved_by="cli")
    assert (result.version_before, result.version) == (1, 2)
    assert (result.references_before, result.references_after) == (3, 5)
    assert [image.name for image in result.taught] == ["part3.png", "part1.png"]
    assert [v.version for v in pipeline.banks.history(BANK)] == [2]
    assert current(pipeline)[0] != bank_id  # a new line history starts: the old rows are not proposed again
    assert propose_for(pipeline, settings, BANK, audit, kept).candidates == []
    [entry] = read_refresh_log(tmp_path)
    assert (
        entry["bank"] == BANK
        and entry["approved_by"] == "cli"
        and (entry["version_before"], entry["version"]) == (1, 2)
    )
    assert [image["run_id"] for image in entry["images"]] == ["run3", "run1"]


def test_an_altered_kept_image_stops_the_teach_before_anything_changes(line, tmp_path):
    pipeline, settings, kept, audit = line
    bank_id, _ = current(pipeline)
    write(audit, kept, [row(1, bank_id, 0.1), row(2, bank_id, 0.2)])
    proposal = propose_for(pipeline, settings, BANK, audit, kept)
    kept.path(sha(png(1))).write_bytes(png(77))
    with pytest.raises(Exception, match="altered"):
        apply(pipeline, BANK, proposal.candidates, kept, data_dir=tmp_path, approved_by="cli")
    assert [v.version for v in pipeline.banks.history(BANK)] == [1] and read_refresh_log(tmp_path) == []
    with pytest.raises(RefreshError, match="nothing to teach"):
        apply(pipeline, BANK, [], kept, data_dir=tmp_path, approved_by="cli")
