"""A line declared before its bank exists, through the service and the app.

The service and the app run the REAL pipeline (the bank store, the inspection, the random-weight expert for the final
build) with a tiny injected MLLM (:class:`tests.test_empty_lines.ZeroShotMLLM`): declare the line, inspect it (the MLLM
alone, 0-shot, labelled so in the answer and the audit row), confirm good parts (collected as the line's first
references: from the kept images in the service, from the image on screen in the app), then build the bank with the
normal build path, after which the line inspects as a normal bank.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import handlers
from deploy.api import create_app
from eagle.audit import AuditLog, default_audit_path
from eagle.lines import LINES_DIR
from tests.service_helpers import TOKEN, LiveServer, assert_error
from tests.test_empty_lines import ZeroShotMLLM, pipeline_for, png


def png_bytes(grey: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rng.normal(grey, 6, (48, 64, 3)), 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def no_progress(*args, **kwargs) -> None:
    """The app handlers' progress outside a Gradio event."""


@pytest.fixture
def service(tmp_path):
    pipeline = pipeline_for(tmp_path, service={"token": TOKEN}, keep_images={"enabled": True})
    app = create_app(pipeline, pipeline.settings)
    server = LiveServer(app).start()
    yield server, pipeline
    server.stop()


def test_the_api_declares_inspects_mllm_only_collects_confirmed_parts_and_deletes(service, tmp_path):
    server, pipeline = service
    with server.client() as client:
        created = client.post("/v1/lines", json={"name": "line-7", "note": "caps"})
        assert created.status_code == 201, created.text
        body = created.json()
        assert (body["name"], body["state"], body["collected"], body["min_references"], body["inspection"]) == (
            "line-7",
            "declared",
            0,
            2,
            "mllm-only-0shot",
        )
        assert_error(client.post("/v1/lines", json={"name": "line-7"}), 409, "bank_exists")
        assert_error(client.post("/v1/lines", json={"name": "../x"}), 422, "invalid_bank_name")
        assert client.post("/v1/lines", json={"name": "x", "extra": 1}).status_code == 422
        listed = client.get("/v1/banks").json()
        assert listed["banks"] == [] and [d["name"] for d in listed["declared"]] == ["line-7"]
        assert [d["name"] for d in client.get("/v1/lines").json()["lines"]] == ["line-7"]

        runs = []
        for i, grey in enumerate((40, 44, 220)):
            files = {"image": (f"p{i}.png", png_bytes(grey, seed=i), "image/png")}
            answer = client.post("/v1/inspect", files=files, data={"bank": "line-7", "annotated": "true"})
            assert answer.status_code == 200, answer.text
            result = answer.json()["result"]
            assert (result["mode"], result["score"], result["bank_id"], result["template"]) == (
                "mllm-only-0shot",
                None,
                None,
                None,
            )
            assert answer.json()["annotated_png"]
            runs.append((answer.json()["request_id"], result["verdict"]))
        assert [verdict for _, verdict in runs] == ["no_defect", "no_defect", "defect"]
        assert_error(
            client.post("/v1/inspect", files={"image": ("p.png", png_bytes(40), "image/png")}, data={"bank": "nope"}),
            404,
            "bank_not_found",
        )
        assert_error(
            client.post(
                "/v1/inspect",
                files={"image": ("p.png", png_bytes(40), "image/png")},
                data={"bank": "line-7", "use_mllm": "false"},
            ),
            409,
            "bank_empty",
        )

        # the third part is overruled to "good": confirmed good parts are collected, defects are not
        assert client.post(f"/v1/inspections/{runs[0][0]}/feedback", json={"verdict": "confirmed"}).status_code == 201
        line = client.get("/v1/lines").json()["lines"][0]
        assert (line["collected"], line["ready_to_build"]) == (1, False)
        overruled = client.post(f"/v1/inspections/{runs[2][0]}/feedback", json={"verdict": "overruled"})
        assert overruled.status_code == 201 and overruled.json()["correct_verdict"] == "no_defect"
        line = client.get("/v1/lines").json()["lines"][0]
        assert (line["collected"], line["ready_to_build"]) == (2, True)

        audit = AuditLog(default_audit_path(pipeline.settings))
        rows = [r for r in audit.query() if r["status"] == "ok"]
        assert [r["mode"] for r in rows] == ["mllm-only-0shot"] * 3 and all(r["score"] is None for r in rows)
        audit.close()

        assert client.delete("/v1/banks/line-7").json() == {"deleted": "line-7"}
        assert client.get("/v1/banks").json()["declared"] == []
        assert_error(client.delete("/v1/banks/line-7"), 404, "bank_not_found")
    assert not (tmp_path / "banks" / LINES_DIR / "line-7").exists()


def test_the_api_answers_bank_empty_for_a_declared_line_with_the_mllm_disabled(tmp_path):
    pipeline = pipeline_for(tmp_path, mllm=False, service={"token": TOKEN})
    server = LiveServer(create_app(pipeline, pipeline.settings)).start()
    try:
        with server.client() as client:
            assert client.post("/v1/lines", json={"name": "line-7"}).json()["inspection"] == "refused"
            files = {"image": ("p.png", png_bytes(40), "image/png")}
            error = assert_error(client.post("/v1/inspect", files=files, data={"bank": "line-7"}), 409, "bank_empty")
            assert "build a bank first" in str(error)
    finally:
        server.stop()


def test_openapi_documents_declared_lines(service):
    server, _ = service
    with server.client() as client:
        schema = client.get("/openapi.json").json()
    assert schema["paths"]["/v1/lines"]["post"]["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DeclaredLine"
    }
    assert "get" in schema["paths"]["/v1/lines"]
    components = schema["components"]["schemas"]
    assert components["DeclaredLine"]["properties"]["state"]["const"] == "declared"
    assert "declared" in components["BankList"]["properties"]
    assert "mllm-only-0shot" in components["InspectionResult"]["properties"]["mode"]["enum"]
    assert components["DeclareLineRequest"]["properties"]["name"]["pattern"]


# -- the app -------------------------------------------------------------------------------------------------------
def test_the_app_declares_labels_collects_the_image_on_screen_and_offers_the_build(tmp_path):
    model = ZeroShotMLLM()
    pipeline = pipeline_for(tmp_path, model=model)
    table, choice, facts = handlers.declare_line(pipeline, " line-7 ", "")
    assert table == [["line-7", 0, "", handlers.DECLARED_MARK, "", "", pipeline.banks.lines.get("line-7").declared]]
    assert choice["value"] == "line-7" and "line-7" in choice["choices"]
    assert "MLLM alone, 0-shot" in facts and "0 of 2 good parts" in facts
    assert handlers.bank_names(pipeline) == ["line-7"]
    assert handlers.show_bank(pipeline, "line-7") == (facts, None)

    shots = [png(tmp_path / f"part{i}.png", 40 + i, seed=i) for i in range(3)]
    outputs = []
    for i, shot in enumerate(shots):
        run_id = f"app-run-{i}"
        (shown,) = list(
            handlers.inspect(
                pipeline, str(shot), "line-7", "full", "auto", 0.5, False, True, False, no_progress, run_id=run_id
            )
        )
        outputs.append((run_id, shown))
    verdict_panel = outputs[0][1][0]
    assert 'data-mode="mllm-only-0shot"' in verdict_panel and handlers.MLLM_ONLY_WORDS in verdict_panel
    assert "score" not in verdict_panel.split("decided by")[1].split("</div>")[0]
    assert outputs[0][1][1] is None  # no expert score: no gauge
    assert "mllm-only-0shot" in outputs[0][1][9]
    audit = handlers.audit_log(pipeline)
    assert [r["mode"] for r in audit.query() if r["run_id"].startswith("app-run-")] == ["mllm-only-0shot"] * 3

    text, build = handlers.feedback_and_collect(pipeline, outputs[0][0], "confirmed", None, "ana", "", str(shots[0]))
    assert "Collected as a first reference of line **line-7**: 1 of 2" in text and build["visible"] is False
    text, build = handlers.feedback_and_collect(pipeline, outputs[0][0], "confirmed", None, "", "", str(shots[0]))
    assert build["visible"] is False and "already collected for line **line-7**: 1 of 2" in text  # counted once
    text, build = handlers.feedback_and_collect(
        pipeline, outputs[1][0], "overruled", "defect", "", "", str(shots[1])
    )  # marked defective: not collected
    assert "Collected" not in text and build["visible"] is False
    text, build = handlers.feedback_and_collect(pipeline, outputs[2][0], "confirmed", None, "", "", str(shots[2]))
    assert "2 of 2" in text and "build the bank now" in text and build["visible"] is True
    with pytest.raises(Exception, match="Select a declared line"):
        handlers.build_collected(pipeline, "nope", no_progress)

    facts, figure, choice = handlers.build_collected(pipeline, "line-7", no_progress)
    assert "**line-7** — 2 references" in facts and figure is not None and choice["value"] == "line-7"
    summary = pipeline.banks.summary("line-7")
    assert summary.n_references == 2 and pipeline.banks.declared() == []
    assert not pipeline.banks.is_declared("line-7") and not (Path(tmp_path) / "banks" / LINES_DIR / "line-7").exists()
    (normal,) = list(
        handlers.inspect(pipeline, str(shots[0]), "line-7", "full", "auto", 0.5, False, True, False, no_progress)
    )
    assert 'data-mode="expert+mllm"' in normal[0]
    assert model.asked[-1]["setting"] == "full" and model.asked[-1]["template"] is not None
