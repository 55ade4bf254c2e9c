"""The bank's precision (fp32 or int8) in its summary and in the app's bank facts."""

from __future__ import annotations

from app import handlers
from tests.fixtures_pipeline import BANK


def test_the_summary_and_the_app_facts_name_the_precision(built_pipeline, monkeypatch):
    pipeline = built_pipeline.pipeline
    summary = pipeline.banks.summary(BANK)
    assert summary.precision == "fp32" == pipeline.banks.load(BANK).bank.meta.backbone.precision
    assert "weights, fp32)" in handlers.bank_facts_markdown(pipeline, BANK)
    quantised = summary.model_copy(update={"precision": "int8"})
    monkeypatch.setattr(pipeline.banks, "summary", lambda name: quantised)
    assert "int8: a quantised copy, faster on a CPU" in handlers.bank_facts_markdown(pipeline, BANK)
