"""Every list of banks in the app is read again when a page loads or its tab opens.

The app is built once, but banks are made, imported and deleted elsewhere (the API, the CLI, another browser):
before, the Banks table and the statistics filter showed the banks of the app's start until it was restarted.
"""

from __future__ import annotations

import os
import shutil

import gradio as gr

from app import handlers
from eagle.pipeline import Pipeline
from tests.fixtures_pipeline import BANK, pipeline_settings


def _copy_bank(built_pipeline, pipeline: Pipeline, name: str) -> None:
    """Another bank appears on disk (hard links: no 100 MB copy)."""
    shutil.copytree(built_pipeline.pipeline.banks.root / BANK, pipeline.banks.root / name, copy_function=os.link)


def test_bank_lists_follow_the_disk(built_pipeline, tmp_path):
    pipeline = Pipeline(pipeline_settings(tmp_path))
    _copy_bank(built_pipeline, pipeline, "line-1")
    _copy_bank(built_pipeline, pipeline, "line-2")

    table, choice = handlers.refreshed_banks(pipeline, "line-1")
    assert sorted(row[0] for row in table) == ["line-1", "line-2"]
    assert sorted(choice["choices"]) == ["line-1", "line-2"] and choice["value"] == "line-1"

    pipeline.banks.delete("line-1")  # deleted elsewhere: the selection goes with it
    table, choice = handlers.refreshed_banks(pipeline, "line-1")
    assert [row[0] for row in table] == ["line-2"] and choice == gr.update(choices=["line-2"], value=None)
    assert handlers.bank_choice(pipeline, "line-1", default_first=True)["value"] == "line-2"
    assert handlers.stats_bank_choice(pipeline, "line-1") == gr.update(
        choices=[("all banks", ""), ("line-2", "line-2")], value=""
    )
    assert handlers.stats_bank_choice(pipeline, "line-2")["value"] == "line-2"


def _name(block) -> str:
    return getattr(block, "elem_id", None) or getattr(block, "label", None) or type(block).__name__


def _event(demo: gr.Blocks, event: str, target: str | None = None, *, updates: str):
    """The one function the app runs on ``event`` (of the block labelled ``target``) that updates ``updates``."""
    [function] = [
        f
        for f in demo.fns.values()
        for block_id, name in f.targets
        if name == event
        and (target is None or _name(demo.blocks[block_id]) == target)
        and updates in [_name(b) for b in f.outputs]
    ]
    return function


def test_the_app_reads_bank_lists_on_page_load_and_tab_open(built_pipeline, tmp_path):
    from app.ui import build_ui

    pipeline = Pipeline(pipeline_settings(tmp_path))
    _copy_bank(built_pipeline, pipeline, "line-1")
    demo = build_ui(pipeline)
    _copy_bank(built_pipeline, pipeline, "line-2")  # made through the API after the app started

    on_load = _event(demo, "load", updates="bank-select")
    assert [_name(b) for b in on_load.inputs] == ["bank-select", "Selected bank", "Bank"]
    assert [_name(b) for b in on_load.outputs] == ["bank-select", "banks-table", "Selected bank", "Bank"]
    inspected, table, selected, filtered = on_load.fn("line-1", None, "")
    assert sorted(inspected["choices"]) == ["line-1", "line-2"] and inspected["value"] == "line-1"
    assert sorted(row[0] for row in table) == ["line-1", "line-2"] and selected["value"] is None
    assert ("line-2", "line-2") in filtered["choices"]

    on_banks_tab = _event(demo, "select", target="Banks", updates="banks-table")
    table, selected = on_banks_tab.fn("line-2")
    assert sorted(row[0] for row in table) == ["line-1", "line-2"] and selected["value"] == "line-2"
    on_stats_tab = _event(demo, "select", target="Line statistics", updates="Bank")
    assert ("line-2", "line-2") in on_stats_tab.fn("")["choices"]
