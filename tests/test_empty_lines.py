"""A line declared before its bank exists: the store, the MLLM-only 0-shot inspection, the audit row, the CLI and the
app's handlers (collecting confirmed good parts, then building the bank with the normal build path)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from eagle.audit import AuditLog, format_table
from eagle.banks import BankNameError, BankNotFoundError
from eagle.lines import LINES_DIR, BankEmptyError, LineExistsError, LineStore, collect_confirmed
from eagle.pipeline import Pipeline
from eagle.records import InspectOptions
from eagle.settings import Settings
from tests.cli_helpers import run_cli


class ZeroShotMLLM:
    """Records what it was sent; answers "yes" (defect) for a bright picture, "no" otherwise."""

    loaded = SimpleNamespace(model_id="tiny-zero-shot", quantization="none")

    def __init__(self) -> None:
        self.asked: list[dict] = []

    def ask(self, *, query, template, boxed, expert_anomalous, setting, caas=None, question=None):
        from mllm.inspector import MLLMAnswer

        self.asked.append(
            {"template": template, "boxed": boxed, "hint": expert_anomalous, "setting": setting, "caas": caas}
        )
        answer = "yes" if np.asarray(query).mean() > 127 else "no"
        return MLLMAnswer(answer[0].upper(), answer, answer, False, 10, 1, {"generate": 2.0})

    def explain_stream(self, *, query, template, boxed, expert_anomalous, answer, setting, stats=None):
        yield "looks "
        yield "fine."


def png(path: Path, grey: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(grey, 6, (48, 64, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def pipeline_for(tmp_path: Path, *, mllm: bool = True, model: ZeroShotMLLM | None = None, **extra) -> Pipeline:
    settings = Settings(data_dir=tmp_path, mllm={"enabled": mllm}, expert={"weights": "random"}, **extra)
    model = model or ZeroShotMLLM()
    return Pipeline(settings, mllm_loader=lambda progress: model)


# -- the store -----------------------------------------------------------------------------------------------------
def test_a_declared_line_is_a_json_record_listed_as_declared_and_deleted(tmp_path):
    pipeline = pipeline_for(tmp_path)
    line = pipeline.banks.declare("line-7", note="  caps\nline ")
    assert (line.name, line.state, line.collected, line.min_references, line.ready_to_build, line.note) == (
        "line-7",
        "declared",
        0,
        2,
        False,
        "caps line",
    )
    assert line.inspection == "mllm-only-0shot"
    record = tmp_path / "banks" / LINES_DIR / "line-7" / "line.json"
    assert json.loads(record.read_text())["name"] == "line-7"  # JSON, nothing pickled
    assert pipeline.banks.list() == [] and [d.name for d in pipeline.banks.declared()] == ["line-7"]
    assert pipeline.banks.is_declared("line-7") and not pipeline.banks.exists("line-7")
    with pytest.raises(LineExistsError) as again:
        pipeline.banks.declare("line-7")
    assert (again.value.code, again.value.http_status) == ("bank_exists", 409)
    with pytest.raises(BankNameError):
        pipeline.banks.declare("../etc")
    with pytest.raises(BankEmptyError) as empty:  # what needs a bank says so, never bank_not_found
        pipeline.banks.load("line-7")
    assert (empty.value.code, empty.value.http_status) == ("bank_empty", 409)
    pipeline.banks.delete("line-7")
    assert pipeline.banks.declared() == [] and not record.exists()
    with pytest.raises(BankNotFoundError):
        pipeline.banks.delete("line-7")


def test_with_the_mllm_disabled_a_declared_line_says_so(tmp_path):
    pipeline = pipeline_for(tmp_path, mllm=False)
    assert pipeline.banks.declare("line-7").inspection == "refused"


# -- the inspection ------------------------------------------------------------------------------------------------
def test_an_inspection_of_a_declared_line_is_the_mllm_alone_zero_shot(tmp_path):
    model = ZeroShotMLLM()
    pipeline = pipeline_for(tmp_path, model=model)
    pipeline.banks.declare("line-7")
    dark = png(tmp_path / "dark.png", 40)
    result = pipeline.inspect(dark, "line-7", InspectOptions(prompt_setting="full", caas="on", explain=True))
    assert (result.mode, result.verdict, result.mllm_answer, result.model_id) == (
        "mllm-only-0shot",
        "no_defect",
        "no",
        "tiny-zero-shot",
    )
    # 0-shot: no template, no expert hints, no CAAS, whatever the request asked for
    assert model.asked == [{"template": None, "boxed": None, "hint": None, "setting": "baseline", "caas": None}]
    assert (result.score, result.tau, result.s_max, result.expert_decision, result.bank_id) == (None,) * 5
    assert (result.prompt_setting, result.caas_applied, result.template, result.boxes) == ("baseline", False, None, [])
    assert result.image_size == (64, 48) and result.inspected_region == (0, 0, 64, 48)
    assert result.explanation == "looks fine." and {"decode", "mllm_generate", "total"} <= set(result.timings_ms)
    assert result.images is not None and result.images.heatmap_overlay.shape == (48, 64, 3)
    body = json.loads(result.model_dump_json())
    assert body["mode"] == "mllm-only-0shot" and body["score"] is None
    bright = pipeline.inspect(png(tmp_path / "bright.png", 220), "line-7")
    assert (bright.mode, bright.verdict) == ("mllm-only-0shot", "defect")


def test_without_the_mllm_a_declared_line_asks_for_a_bank_and_unknown_names_are_not_found(tmp_path):
    image = png(tmp_path / "a.png", 40)
    disabled = pipeline_for(tmp_path / "off", mllm=False)
    disabled.banks.declare("line-7")
    with pytest.raises(BankEmptyError, match=r"line 'line-7' has no bank yet and the MLLM is disabled.*build a bank"):
        disabled.inspect(image, "line-7")
    enabled = pipeline_for(tmp_path / "on")
    enabled.banks.declare("line-7")
    with pytest.raises(BankEmptyError, match="use_mllm is off: build a bank first"):
        enabled.inspect(image, "line-7", InspectOptions(use_mllm=False))
    for pipeline in (disabled, enabled):
        with pytest.raises(BankNotFoundError) as missing:
            pipeline.inspect(image, "never-declared")
        assert missing.value.code == "bank_not_found"


# -- the audit row -------------------------------------------------------------------------------------------------
def test_the_audit_row_is_labelled_mllm_only_and_feedback_finds_the_image(tmp_path):
    pipeline = pipeline_for(tmp_path)
    pipeline.banks.declare("line-7")
    result = pipeline.inspect(png(tmp_path / "a.png", 40), "line-7", image_name="a.png")
    log = AuditLog(tmp_path / "audit.sqlite3")
    assert log.record(result, source="api", run_id="r1", latency_ms=5.0)
    (row,) = log.query()
    assert (row["mode"], row["score"], row["tau"], row["decision"], row["verdict"], row["bank_id"]) == (
        "mllm-only-0shot",
        None,
        None,
        None,
        "no_defect",
        None,
    )
    table = list(format_table([row]))
    assert "mllm-0shot" in table[1] and "no_defect" in table[1]
    out = io.StringIO()
    from eagle.audit import write_csv

    write_csv([row], out)
    header, line = out.getvalue().splitlines()
    assert header.split(",")[-1] == "mode" and line.endswith(",mllm-only-0shot")
    feedback = log.record_feedback("r1", "confirmed", source="api")
    assert (feedback["mode"], feedback["image_sha256"], feedback["image_name"]) == (
        "mllm-only-0shot",
        result.image_sha256,
        "a.png",
    )
    from eagle.audit import line_stats

    (stats,) = line_stats(log.query(), log.latest_feedback())
    assert (stats["mllm_asked"], stats["expert_mllm_disagreements"], stats["expert_mllm_disagreement_rate"]) == (
        1,
        0,
        None,
    )
    log.close()


def test_an_audit_log_written_before_the_mode_column_gains_it(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE inspections (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, run_id TEXT NOT NULL, "
        "source TEXT NOT NULL, image_name TEXT NOT NULL DEFAULT '', image_sha256 TEXT NOT NULL, bank TEXT, "
        "bank_id TEXT, score REAL, tau REAL, s_max REAL, decision TEXT, low_confidence INTEGER, caas_applied INTEGER, "
        "mllm_answer TEXT, verdict TEXT, model_id TEXT, latency_ms REAL, status TEXT NOT NULL, error_code TEXT, "
        "error_message TEXT, UNIQUE (image_sha256, image_name, run_id))"
    )
    conn.execute(
        "INSERT INTO inspections (time, run_id, source, image_sha256, bank, status) "
        "VALUES ('2025-01-01T00:00:00+00:00', 'old', 'api', 'ab', 'w', 'ok')"
    )
    conn.commit()
    conn.close()
    log = AuditLog(path)
    (row,) = log.query()
    assert row["run_id"] == "old" and row["mode"] is None
    log.close()


# -- collecting confirmed good parts -------------------------------------------------------------------------------
def test_collecting_takes_only_parts_confirmed_good_on_a_declared_line_once_each(tmp_path):
    lines = LineStore(tmp_path, min_references=2)
    lines.declare("line-7")
    data = png(tmp_path / "a.png", 40).read_bytes()
    row = {"bank": "line-7", "correct_verdict": "no_defect", "image_sha256": "", "image_name": "a.png", "run_id": "r"}
    assert collect_confirmed(lines, {**row, "correct_verdict": "defect"}, shown=data) is None
    assert collect_confirmed(lines, {**row, "bank": "other"}, shown=data) is None
    assert collect_confirmed(lines, row) is None  # no image on screen and none kept: nothing to collect
    first, new = collect_confirmed(lines, row, shown=data)
    assert (first.collected, first.ready_to_build, new) == (1, False, True)
    again, new = collect_confirmed(lines, row, shown=data)
    assert (again.collected, new) == (1, False)  # the same picture is collected once
    second, new = collect_confirmed(lines, row, shown=png(tmp_path / "b.png", 42, seed=1))
    assert (second.collected, second.ready_to_build, new) == (2, True, True)
    assert [ref.run_id for ref in lines.references("line-7")] == ["r", "r"]
    assert len(lines.reference_paths("line-7")) == 2


def test_kept_images_are_collected_when_images_are_kept(tmp_path):
    from eagle.kept_images import KeptImages

    settings = Settings(data_dir=tmp_path, keep_images={"enabled": True})
    kept = KeptImages.of(settings)
    data = png(tmp_path / "a.png", 40).read_bytes()
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    assert kept.keep(sha, data)
    lines = LineStore(tmp_path / "banks", min_references=2)
    lines.declare("line-7")
    row = {"bank": "line-7", "correct_verdict": "no_defect", "image_sha256": sha, "image_name": "a.png"}
    line, new = collect_confirmed(lines, row, kept=kept)
    assert line.collected == 1 and new
    assert lines.reference_paths("line-7")[0].read_bytes() == data


# -- the CLI -------------------------------------------------------------------------------------------------------
@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    model = ZeroShotMLLM()
    monkeypatch.setenv("EAGLE_DATA_DIR", str(tmp_path / "home"))
    monkeypatch.setenv("EAGLE_EXPERT__WEIGHTS", "random")
    monkeypatch.setenv("EAGLE_LOG_LEVEL", "WARNING")
    monkeypatch.setattr("eagle.models.mllm_loader", lambda settings: lambda progress: model)
    return model


def test_cli_create_empty_list_inspect_and_delete(cli_env, tmp_path, monkeypatch):
    code, out, err = run_cli(["bank", "create", "line-7", "--empty", "--json"])
    assert code == 0, err
    assert json.loads(out)["state"] == "declared"
    code, out, err = run_cli(["bank", "list"])
    assert code == 0 and "line-7" in out and "declared (empty): 0/2 good parts collected" in out
    code, out, _ = run_cli(["bank", "list", "--json"])
    (entry,) = json.loads(out)
    assert (entry["name"], entry["state"], entry["collected"]) == ("line-7", "declared", 0)

    image = png(tmp_path / "part.png", 40)
    code, out, err = run_cli(["bank", "inspect", "line-7", str(image), "--json"])
    assert code == 0, err
    record = json.loads(out)
    assert (record["mode"], record["verdict"], record["score"], record["template"]) == (
        "mllm-only-0shot",
        "no_defect",
        None,
        None,
    )
    code, out, err = run_cli(["bank", "inspect", "line-7", str(image)])
    assert code == 0 and "part.png: no_defect — mllm-only-0shot (MLLM alone" in out

    code, out, err = run_cli(["bank", "inspect", "nope", str(image)])
    assert code == 2 and "no bank named 'nope'" in err and "Traceback" not in err
    code, _, err = run_cli(["bank", "create", "line-7", "--empty"])
    assert code == 2 and "is declared already" in err
    code, _, err = run_cli(["bank", "delete", "line-7"])
    assert code == 0, err
    code, out, _ = run_cli(["bank", "list", "--json"])
    assert json.loads(out) == []


def test_cli_inspect_of_a_declared_line_with_the_mllm_disabled_is_the_clear_error(cli_env, tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE_MLLM__ENABLED", "false")
    assert run_cli(["bank", "create", "line-7", "--empty"])[0] == 0
    code, _, err = run_cli(["bank", "inspect", "line-7", str(png(tmp_path / "part.png", 40))])
    assert code == 2 and "has no bank yet and the MLLM is disabled" in err and "build a bank first" in err
    code, _, err = run_cli(["bank", "inspect", "line-7", str(png(tmp_path / "p.png", 40)), "--no-mllm"])
    assert code == 2 and "build a bank first" in err
