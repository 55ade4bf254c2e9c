"""Operator feedback and line statistics: the API endpoint, the audit rows, ``eagle audit stats`` and the app."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import gradio as gr
import pytest

from app import handlers
from deploy.api import create_app
from eagle.audit import STATS_COLUMNS, AuditFilter, AuditLog, FeedbackError, InspectionNotFoundError, line_stats
from eagle.settings import Settings
from tests.cli_helpers import run_cli as _run
from tests.fake_pipeline import FakePipeline
from tests.service_helpers import TOKEN, LiveServer, assert_error, parse_metrics, png_bytes


# -- the API -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feedback-service")
    settings = Settings(data_dir=tmp, mllm={"enabled": False}, service={"token": TOKEN})
    pipeline = FakePipeline(banks=["widget"])
    app = create_app(pipeline, settings)
    server = LiveServer(app).start()
    yield server, app.state.service
    server.stop()


def _inspect(client) -> str:
    response = client.post(
        "/v1/inspect", files={"image": ("part.png", png_bytes(seed=3), "image/png")}, data={"bank": "widget"}
    )
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def _overrules(client) -> float:
    metrics = parse_metrics(client.get("/metrics").text)
    return metrics.get(("eagle_overrules_total", (("bank", "widget"),)), 0.0)


def test_feedback_is_a_new_row_linked_by_run_id_and_the_inspection_row_is_unchanged(live):
    server, service = live
    with server.client() as client:
        run_id = _inspect(client)
        before = service.audit.query(AuditFilter())
        original = next(row for row in before if row["run_id"] == run_id)
        overrules = _overrules(client)
        response = client.post(
            f"/v1/inspections/{run_id}/feedback",
            json={"verdict": "overruled", "operator": "ana", "note": "scratch under the label"},
        )
        assert response.status_code == 201, response.text
        body = response.json()
        opposite = "defect" if original["verdict"] == "no_defect" else "no_defect"
        assert body["run_id"] == run_id and body["feedback"] == "overruled" and body["bank"] == "widget"
        assert body["verdict"] == original["verdict"] and body["correct_verdict"] == opposite
        assert body["operator"] == "ana" and body["note"] == "scratch under the label"
        assert _overrules(client) == overrules + 1

        confirmed = client.post(f"/v1/inspections/{run_id}/feedback", json={"verdict": "confirmed"})
        assert confirmed.status_code == 201 and confirmed.json()["correct_verdict"] == original["verdict"]
        assert _overrules(client) == overrules + 1  # a confirmation is not an overrule
        feedback_metric = parse_metrics(client.get("/metrics").text)
        assert feedback_metric[("eagle_feedback_total", (("bank", "widget"), ("feedback", "confirmed")))] >= 1

    assert service.audit.query(AuditFilter()) == before  # never an edit of an inspection row
    rows = service.audit.feedback(run_id)
    assert [r["feedback"] for r in rows] == ["overruled", "confirmed"]
    assert {r["inspection_id"] for r in rows} == {original["id"]}


def test_feedback_on_an_unknown_run_id_is_404(live):
    server, service = live
    with server.client() as client:
        response = client.post("/v1/inspections/no-such-run/feedback", json={"verdict": "confirmed"})
    assert_error(response, 404, "inspection_not_found")
    assert service.audit.feedback("no-such-run") == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"verdict": "maybe"}, "invalid_request"),
        ({"verdict": "confirmed", "extra": 1}, "invalid_request"),
        ({"verdict": "overruled", "correct_verdict": "broken"}, "invalid_request"),
        ({"verdict": "confirmed", "correct_verdict": "CONTRADICTION"}, "invalid_feedback"),
        ({"verdict": "overruled", "correct_verdict": "SAME"}, "invalid_feedback"),
    ],
)
def test_bad_feedback_is_422(live, body, code):
    server, service = live
    with server.client() as client:
        run_id = _inspect(client)
        verdict = next(r["verdict"] for r in service.audit.query(AuditFilter()) if r["run_id"] == run_id)
        other = "defect" if verdict == "no_defect" else "no_defect"
        if body.get("correct_verdict") == "CONTRADICTION":
            body = {**body, "correct_verdict": other}
        if body.get("correct_verdict") == "SAME":
            body = {**body, "correct_verdict": verdict}
        response = client.post(f"/v1/inspections/{run_id}/feedback", json=body)
    assert_error(response, 422, code)
    assert service.audit.feedback(run_id) == []


def test_feedback_needs_the_token(live):
    server, _ = live
    with server.client(token=None) as anonymous:
        response = anonymous.post("/v1/inspections/x/feedback", json={"verdict": "confirmed"})
    assert_error(response, 401, "unauthorized")


# -- line statistics on a hand-made log ------------------------------------------------------------------------------
DAY1, DAY2 = "2025-01-01T08:00:00.000000+00:00", "2025-01-02T08:00:00.000000+00:00"

#: (run id, time, bank, verdict, decision, mllm answer, latency ms, status)
ROWS = [
    ("r1", DAY1, "a", "defect", "anomalous", "yes", 10.0, "ok"),
    ("r2", DAY1, "a", "defect", "normal", "yes", 20.0, "ok"),
    ("r3", DAY1, "a", "no_defect", "anomalous", "no", 30.0, "ok"),
    ("r4", DAY2, "a", "no_defect", "normal", None, 40.0, "ok"),
    ("r5", DAY2, "a", "unknown", "anomalous", "unknown", 50.0, "ok"),
    ("r6", DAY2, "a", None, None, None, 5.0, "error"),
    ("r7", DAY2, "b", "no_defect", "normal", None, 100.0, "ok"),
]


@pytest.fixture
def hand_made(tmp_path) -> Path:
    path = tmp_path / "audit.sqlite3"
    with AuditLog(path) as log:
        for run_id, time, bank, verdict, decision, answer, latency, status in ROWS:
            row = {
                "time": time,
                "run_id": run_id,
                "source": "api",
                "image_sha256": run_id * 8,
                "bank": bank,
                "verdict": verdict,
                "decision": decision,
                "mllm_answer": answer,
                "latency_ms": latency,
                "status": status,
            }
            assert log._insert(row)
        log.record_feedback("r1", "overruled")  # changed their mind: the latest feedback counts
        log.record_feedback("r1", "confirmed", operator="ana")  # truth defect, flagged: TP
        log.record_feedback("r2", "overruled")  # truth no_defect, flagged: FP
        log.record_feedback("r3", "overruled")  # truth defect, not flagged: FN
        log.record_feedback("r5", "overruled", correct_verdict="defect")  # unknown = not flagged: FN
        log.record_feedback("r7", "confirmed")  # truth no_defect, not flagged: TN
        with pytest.raises(InspectionNotFoundError):
            log.record_feedback("r6", "confirmed")  # an error row has no verdict to judge
        with pytest.raises(FeedbackError):
            log.record_feedback("r5", "overruled")  # unknown verdict: the right one must be given
    return path


def test_stats_equal_hand_computed_values(hand_made):
    with AuditLog(hand_made) as log:
        stats = {g["bank"]: g for g in log.stats()}
    a, b = stats["a"], stats["b"]
    assert (a["inspections"], a["errors"], a["defects"], a["defect_rate"]) == (5, 1, 2, 0.4)
    assert (a["feedback"], a["overruled"], a["overrule_rate"]) == (4, 3, 0.75)
    assert (a["true_positives"], a["false_positives"], a["false_negatives"]) == (1, 1, 2)
    assert a["precision"] == 0.5 and a["recall"] == pytest.approx(1 / 3)
    assert (a["mllm_asked"], a["expert_mllm_disagreements"]) == (3, 2)
    assert a["expert_mllm_disagreement_rate"] == pytest.approx(2 / 3)
    assert a["latency_p50_ms"] == 30.0
    assert a["latency_p90_ms"] == pytest.approx(46.0) and a["latency_p99_ms"] == pytest.approx(49.6)
    assert (b["inspections"], b["defect_rate"], b["feedback"], b["overrule_rate"]) == (1, 0.0, 1, 0.0)
    assert b["precision"] is None and b["recall"] is None and b["expert_mllm_disagreement_rate"] is None
    assert b["latency_p50_ms"] == b["latency_p99_ms"] == 100.0


def test_stats_per_day_and_since_and_bank(hand_made):
    with AuditLog(hand_made) as log:
        per_day = {(g["bank"], g["period"]): g for g in log.stats(per="day")}
        since = log.stats(AuditFilter(since="2025-01-02", bank="a"))
    assert sorted(per_day) == [("a", "2025-01-01"), ("a", "2025-01-02"), ("b", "2025-01-02")]
    day1 = per_day[("a", "2025-01-01")]
    assert (day1["inspections"], day1["defects"], day1["overruled"], day1["feedback"]) == (3, 2, 2, 3)
    assert [(g["bank"], g["inspections"], g["errors"], g["feedback"], g["overruled"]) for g in since] == [
        ("a", 2, 1, 1, 1)
    ]
    assert line_stats([], {}) == []


def test_eagle_audit_stats_csv_json_and_table(hand_made, tmp_path):
    out_csv = tmp_path / "stats.csv"
    code, _, err = _run(["audit", "stats", "--db", str(hand_made), "--csv", str(out_csv)])
    assert code == 0, err
    with open(out_csv, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(STATS_COLUMNS)
    a = next(r for r in rows if r["bank"] == "a")
    assert a["inspections"] == "5" and float(a["overrule_rate"]) == 0.75 and float(a["precision"]) == 0.5
    assert next(r for r in rows if r["bank"] == "b")["precision"] == ""

    code, out, err = _run(["audit", "stats", "--db", str(hand_made), "--bank", "b", "--json"])
    assert code == 0, err
    assert [(g["bank"], g["inspections"]) for g in json.loads(out)] == [("b", 1)]

    code, out, _ = _run(["audit", "stats", "--db", str(hand_made), "--since", "2025-01-02", "--per", "day"])
    assert code == 0 and "2025-01-02" in out and "2025-01-01" not in out

    code, _, err = _run(["audit", "stats", "--db", str(hand_made), "--since", "yesterday-ish"])
    assert code == 2 and "unreadable time" in err
    code, _, err = _run(["audit", "stats", "--db", str(tmp_path / "missing.sqlite3")])
    assert code == 2 and "no audit log" in err
    code, out, _ = _run(["audit", "--db", str(hand_made)])  # the plain listing still works
    assert code == 0 and "r1" not in out and len(out.splitlines()) == len(ROWS) + 1


# -- the app -----------------------------------------------------------------------------------------------------
def _no_progress(*args, **kwargs) -> None:
    return None


def test_app_inspection_is_audited_and_takes_feedback(tmp_path):
    pipeline = FakePipeline(tmp_path / "data", banks=["widget"])
    pipeline.settings = Settings(data_dir=tmp_path / "data", mllm={"enabled": False})
    photo = tmp_path / "part.png"
    photo.write_bytes(png_bytes(seed=5))
    outputs = list(
        handlers.inspect(
            pipeline, str(photo), "widget", "full", "auto", 0.6, False, False, False, _no_progress, run_id="app-run-1"
        )
    )
    assert 'data-run-id="app-run-1"' in outputs[0][0]
    log = handlers.audit_log(pipeline)
    row = next(r for r in log.query(AuditFilter(source="app")) if r["run_id"] == "app-run-1")
    assert row["bank"] == "widget" and row["latency_ms"] is not None

    line = handlers.record_feedback(pipeline, "app-run-1", "overruled", "", " bo ", "")
    assert "overruled by bo" in line
    [feedback] = log.feedback("app-run-1")
    assert feedback["source"] == "app" and feedback["operator"] == "bo" and feedback["note"] is None
    assert log.query(AuditFilter(source="app")) == [row]

    with pytest.raises(gr.Error, match="Inspect an image first"):
        handlers.record_feedback(pipeline, None, "confirmed")
    with pytest.raises(gr.Error, match="no inspection with run id"):
        handlers.record_feedback(pipeline, "app-unknown", "confirmed")

    rows, csv_path = handlers.line_stats(pipeline, "widget", "1d", "all")
    assert len(rows) == 1 and rows[0][STATS_COLUMNS.index("overruled")] == 1
    assert Path(csv_path).read_text(encoding="utf-8").startswith(",".join(STATS_COLUMNS))
    with pytest.raises(gr.Error, match="unreadable time"):
        handlers.line_stats(pipeline, "", "soon", "all")
