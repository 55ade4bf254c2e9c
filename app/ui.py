"""The Gradio layout: Inspect (with operator feedback), References, Banks, Line statistics and Line health tabs.

Every tab is wired to :mod:`app.handlers`.

Example:
    >>> from eagle.pipeline import Pipeline
    >>> from eagle.settings import Settings
    >>> demo = build_ui(Pipeline(Settings(mllm={"enabled": False})))  # doctest: +SKIP
    >>> demo.launch()                                                  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import gradio as gr

from app import explain, handlers, health_refresh
from app.capabilities import AppGates, app_gates, details_markdown, markdown_text, status_markdown
from eagle.audit import PERIODS
from eagle.doctor import Report, run_checks
from eagle.pipeline import Pipeline
from eagle.records import CAASPolicy, PromptSetting
from eagle.settings import PROMPT_SETTINGS as SETTING_NAMES

TITLE = "EAGLE — tuning-free industrial visual inspection"
PROMPT_SETTING_LABELS: dict[PromptSetting, str] = {
    "full": "full: boxes + textual prior",
    "visual": "visual: boxes only",
    "visual_all": "visual_all: boxes on every image, no prior",
    "textual": "textual: prior only",
    "baseline": "baseline: no expert hints",
}
# Most informative first; the values are the one vocabulary (mllm.config.PROMPT_SETTINGS).
PROMPT_SETTINGS = [(PROMPT_SETTING_LABELS[setting], setting) for setting in reversed(SETTING_NAMES)]
CAAS_LABELS: dict[CAASPolicy, str] = {"auto": "auto (when the expert is unsure)", "off": "off", "on": "forced on"}
CAAS_CHOICES = [(label, policy) for policy, label in CAAS_LABELS.items()]

CSS = """
#capability-details code, #build-unavailable code { white-space: pre-wrap; word-break: break-all; }
#eagle-verdict { overflow-wrap: anywhere; }
"""
"""Style for the app (``launch(css=...)``): long fix commands wrap on a phone instead of running off the screen."""

I18N_FIXES = {"en": {"common.complete": "Complete"}}
"""Translations Gradio's own locale lacks: its status tracker announces ``common.complete`` after every event."""


def _references_tab(pipeline: Pipeline, bank_choices: list[gr.Dropdown], gates: AppGates) -> None:
    if gates.build_reason:
        reason = markdown_text(gates.build_reason)
        gr.Markdown(f"✖ **Build bank is unavailable.** {reason}", elem_id="build-unavailable")
    can_build = gates.build_reason is None
    gr.Markdown(
        "Upload a few dozen photos of **good** parts (image files, a whole folder, or a zip). EAGLE learns "
        "what normal looks like and sets its own threshold (DBT). At least "
        f"{pipeline.settings.expert.min_references} images; {pipeline.settings.expert.recommended_references}+ "
        "recommended."
    )
    with gr.Row():
        files = gr.File(
            label="Reference images or zip", file_count="multiple", elem_id="ref-files", interactive=can_build
        )
        folder = gr.File(label="…or a folder", file_count="directory", elem_id="ref-folder", interactive=can_build)
    name = gr.Textbox(label="Bank name", placeholder="e.g. bottle-line-3", elem_id="bank-name")
    mask_file, mask_drawing = _mask_inputs()
    build = gr.Button(
        "Build bank" if can_build else "Build bank (unavailable: see above)",
        variant="primary",
        elem_id="build-bank",
        interactive=can_build,
    )
    facts = gr.Markdown(elem_id="bank-facts")
    histogram = gr.Plot(label="DBT: training scores, τ and s_max")
    gr.Markdown(f"{explain.DBT}  \n{explain.TAU}  \n{explain.S_MAX}", elem_id="dbt-explained")

    def run(uploads, folder_files, bank_name, mask_path, drawing, progress=gr.Progress()):
        facts_md, figure, choice = handlers.build_bank(
            pipeline,
            list(uploads or []) + list(folder_files or []),
            bank_name,
            progress,
            mask_file=mask_path,
            mask_drawing=drawing,
        )
        return (facts_md, figure, *[choice] * len(bank_choices))

    build.click(
        run, [files, folder, name, mask_file, mask_drawing], [facts, histogram, *bank_choices], api_name="build_bank"
    )


def _mask_inputs() -> tuple[gr.File, gr.ImageEditor]:
    """The optional inspection mask: an uploaded PNG / polygons JSON, or painted over a reference image."""
    with gr.Accordion("Inspection mask (optional): only inspect part of the image", open=False):
        gr.Markdown(
            "Patches outside the mask never count: not for the score, the boxes or the threshold. Upload a binary "
            "PNG the size of your images (**white = inspected**, black = ignored) or polygons JSON, or load a "
            "reference image below and **paint the region to inspect**. The uploaded file wins over the drawing."
        )
        mask_file = gr.File(label="Mask PNG or polygons JSON", file_types=[".png", ".json"], elem_id="mask-file")
        mask_drawing = gr.ImageEditor(
            label="…or paint the inspected region over a reference image",
            type="numpy",
            image_mode="RGBA",
            sources=["upload", "clipboard"],
            brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=24),
            eraser=gr.Eraser(),
            transforms=(),
            layers=False,
            elem_id="mask-editor",
        )
    return mask_file, mask_drawing


def _banks_tab(pipeline: Pipeline, selector: gr.Dropdown) -> gr.Dataframe:
    table = gr.Dataframe(
        headers=handlers.BANK_TABLE_HEADERS,  # filled on every page load (build_ui's demo.load)
        interactive=False,
        label="Saved banks",
        elem_id="banks-table",
    )
    gr.Markdown(f"{explain.TAU}  \n{explain.S_MAX}")
    with gr.Row():
        refresh = gr.Button("Refresh")
        delete = gr.Button("Delete selected", variant="stop")
        export = gr.Button("Download selected as zip")
    facts = gr.Markdown()
    histogram = gr.Plot(label="DBT of the selected bank")
    download = gr.File(label="Bank zip", interactive=False)
    with gr.Accordion("Upload a bank zip", open=False):
        upload = gr.File(label="Bank zip", file_types=[".zip"])
        upload_name = gr.Textbox(label="Name for the imported bank (default: the zip's name)")
        do_import = gr.Button("Import")
    with gr.Accordion("Declare a line before its bank exists", open=False, elem_id="declare-line"):
        gr.Markdown(
            "A declared line has no bank yet: its inspections are answered by the **MLLM alone, 0-shot** (no "
            "template, no expert hints, no CAAS), or refused when the MLLM is disabled. Parts an operator confirms "
            "good in the Inspect tab are collected as its first references; build the bank once "
            f"{pipeline.settings.expert.min_references} are collected. Same as `eagle bank create NAME --empty`."
        )
        with gr.Row():
            line_name = gr.Textbox(label="Line name", placeholder="e.g. line-7", max_lines=1, elem_id="line-name")
            line_note = gr.Textbox(label="Note (optional)", max_lines=1)
        with gr.Row():
            declare = gr.Button("Declare line (no bank yet)", elem_id="declare-line-button")
            build_collected = gr.Button("Build the selected line's bank from its collected parts")

    refresh.click(functools.partial(handlers.refreshed_banks, pipeline), selector, [table, selector])
    selector.change(functools.partial(handlers.show_bank, pipeline), selector, [facts, histogram])
    delete.click(functools.partial(handlers.delete_bank, pipeline), selector, [table, selector])
    export.click(functools.partial(handlers.export_bank, pipeline), selector, download)
    do_import.click(functools.partial(handlers.import_bank, pipeline), [upload, upload_name], [table, selector])
    declare.click(functools.partial(handlers.declare_line, pipeline), [line_name, line_note], [table, selector, facts])

    def build_line(name, progress=gr.Progress()):
        facts_md, figure, choice = handlers.build_collected(pipeline, name, progress)
        return handlers.bank_table(pipeline), choice, facts_md, figure

    build_collected.click(build_line, selector, [table, selector, facts, histogram])
    return table


def _inspect_tab(pipeline: Pipeline, bank: gr.Dropdown, gates: AppGates) -> gr.Image:
    status = gr.Markdown(handlers.mllm_status_markdown(pipeline), elem_id="mllm-status")
    mllm_ok = gates.mllm_reason is None
    shown = not gates.expert_only  # expert-only: the MLLM's options and outputs are hidden, with the reason
    why_not = "" if mllm_ok else f" Unavailable: {gates.mllm_reason}."
    if gates.mllm_reason:
        gr.Markdown(
            f"**Model options {'hidden' if gates.expert_only else 'disabled'}**: {markdown_text(gates.mllm_reason)}.",
            elem_id="mllm-options-reason",
        )
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(
                label="Image to inspect",
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard", "webcam"],
                elem_id="query-image",
            )
            mllm_options = {"visible": shown, "interactive": mllm_ok}
            setting = gr.Radio(
                PROMPT_SETTINGS,
                value=pipeline.settings.prompt.setting,
                label="Prompt setting",
                info=explain.PROMPT_SETTING + why_not,
                **mllm_options,
            )
            caas = gr.Radio(
                CAAS_CHOICES,
                value=pipeline.settings.caas.policy,
                label="CAAS",
                info=explain.CAAS + why_not,
                **mllm_options,
            )
            alpha = gr.Slider(
                0.0,
                2.0,
                value=pipeline.settings.caas.alpha,
                step=0.05,
                label="CAAS α",
                info=explain.CAAS_ALPHA + why_not,
                **mllm_options,
            )
            with gr.Row(visible=shown):
                use_mllm = gr.Checkbox(value=mllm_ok, label="Ask the MLLM", interactive=mllm_ok)
                explain_box = gr.Checkbox(
                    value=pipeline.settings.prompt.explain and mllm_ok, label="Explain the defect", interactive=mllm_ok
                )
                attention = gr.Checkbox(value=False, label="Show where the model looked", interactive=mllm_ok)
            go = gr.Button("Inspect", variant="primary", elem_id="inspect")
        with gr.Column(scale=2):
            verdict = gr.HTML(elem_id="verdict")
            gauge = gr.Plot(label="Score against τ and s_max")
            with gr.Accordion("How to read this result", open=True, elem_id="how-to-read"):
                gr.Markdown(explain.HOW_TO_READ)
            summary = gr.Markdown(elem_id="inspect-summary")
            with gr.Row():
                heatmap = gr.Image(label="Anomaly heatmap and boxes", interactive=False)
                boxed = gr.Image(label="Boxes shown to the model", interactive=False, visible=shown)
                template = gr.Image(label="Template (most similar normal)", interactive=False)
            answer = gr.Textbox(label="Model answer", interactive=False, visible=shown)
            explanation = gr.Textbox(label="Explanation", lines=4, interactive=False, visible=shown)
            looked = gr.Image(label="Where the model looked", interactive=False, visible=shown)
            gr.Markdown("**Timings (ms)**")
            timings = gr.Markdown(elem_id="timings")
            run_id = gr.State(None)
            feedback_status = _feedback_row(pipeline, run_id, image, bank)
            _teach_row(pipeline, image, bank, gates)

    outputs = [verdict, gauge, heatmap, boxed, template, answer, explanation, looked, timings, summary]

    def run(
        img, bank_name, prompt_setting, caas_policy, caas_alpha, do_explain, ask, show_attention, progress=gr.Progress()
    ):
        current = handlers.new_run_id()
        for shown in handlers.inspect(
            pipeline,
            img,
            bank_name,
            prompt_setting,
            caas_policy,
            caas_alpha,
            do_explain,
            ask,
            show_attention,
            progress,
            run_id=current,
        ):
            yield (*shown, current, "")

    go.click(
        run,
        [image, bank, setting, caas, alpha, explain_box, use_mllm, attention],
        [*outputs, run_id, feedback_status],
        api_name="inspect",
    ).then(lambda: handlers.mllm_status_markdown(pipeline), None, status)
    return image


def _feedback_row(pipeline: Pipeline, run_id: gr.State, image: gr.Image, bank: gr.Dropdown) -> gr.Markdown:
    """Confirm / overrule buttons for the verdict shown; each click is a feedback row in the audit log.

    On a line declared before its bank exists, a part confirmed good is collected as one of its first references
    (the image on screen, or the kept copy where images are kept); once enough are collected, "Build the bank from
    the collected parts" appears and builds it with the normal build path.
    """
    with gr.Accordion("Operator feedback on this verdict", open=True):
        with gr.Row():
            confirm = gr.Button("✔ Confirm verdict", elem_id="feedback-confirm")
            overrule = gr.Button("✖ Overrule verdict", variant="stop", elem_id="feedback-overrule")
        with gr.Row():
            correct = gr.Dropdown(handlers.FEEDBACK_VERDICTS, value="", label="Correct verdict (when overruling)")
            operator = gr.Textbox(label="Operator", max_lines=1)
            note = gr.Textbox(label="Note", max_lines=1)
        status = gr.Markdown(elem_id="feedback-status")
        build = gr.Button(
            "Build the bank from the collected good parts",
            variant="primary",
            visible=False,
            elem_id="build-collected",
        )
    confirm.click(
        lambda rid, who, text, img: handlers.feedback_and_collect(pipeline, rid, "confirmed", None, who, text, img),
        [run_id, operator, note, image],
        [status, build],
    )
    overrule.click(
        lambda rid, right, who, text, img: handlers.feedback_and_collect(
            pipeline, rid, "overruled", right, who, text, img
        ),
        [run_id, correct, operator, note, image],
        [status, build],
    )

    def build_bank(name, progress=gr.Progress()):
        facts, _figure, choice = handlers.build_collected(pipeline, name, progress)
        return facts, choice, gr.update(visible=False)

    build.click(build_bank, bank, [status, bank, build])
    return status


def _teach_row(pipeline: Pipeline, image: gr.Image, bank: gr.Dropdown, gates: AppGates) -> gr.Markdown:
    """The "this is normal — teach the bank" button: add the inspected image to the bank (a new bank version)."""
    with gr.Accordion("A good part was flagged? Teach the bank", open=True):
        teach = gr.Button(
            "✚ This is normal — teach the bank", elem_id="teach-bank", interactive=gates.build_reason is None
        )
        reason = f"✖ Teaching is unavailable. {markdown_text(gates.build_reason)}" if gates.build_reason else ""
        status = gr.Markdown(reason, elem_id="teach-status")
    teach.click(functools.partial(handlers.teach_bank, pipeline), [image, bank], status)
    return status


def _stats_tab(pipeline: Pipeline) -> gr.Dropdown:
    gr.Markdown(
        "Per bank and period, from the audit log (the service's, the watched folder's and this app's inspections): "
        "defect rate, how often operators overruled, precision/recall against their verdicts, expert-vs-MLLM "
        "disagreement and latency percentiles. Same numbers as `eagle audit stats`."
    )
    with gr.Row():
        bank = gr.Dropdown(
            [("all banks", "")] + [(n, n) for n in handlers.bank_names(pipeline)], value="", label="Bank"
        )
        since = gr.Textbox(value="7d", label="Since (ISO time or age: 24h, 7d)", max_lines=1)
        per = gr.Radio(list(PERIODS), value="all", label="Per")
        refresh = gr.Button("Refresh", elem_id="stats-refresh")
    table = gr.Dataframe(headers=list(handlers.STATS_COLUMNS), interactive=False, label="Line statistics")
    download = gr.File(label="CSV", interactive=False)
    refresh.click(functools.partial(handlers.line_stats, pipeline), [bank, since, per], [table, download])
    return bank


DRIFT_EXPLAINED = (
    "**Drift** means the expert's scores of good parts are moving away from the bank's own: light, camera or "
    "material changed; teach or rebuild the bank."
)


def _health_tab(pipeline: Pipeline, health_tab: gr.Tab, inspected: gr.Image) -> gr.Dropdown:
    """One bank's drift check (:func:`handlers.line_health`): run on Refresh, a bank choice and opening the tab."""
    gr.Markdown(
        "Are this line's recent scores of good parts still like the bank's own? The last inspections of the bank's "
        "current version (the service's, the watched folder's and this app's; parts an operator marked defective "
        "left out) against its DBT training scores. Same check as `eagle bank health`."
    )
    names = handlers.bank_names(pipeline)
    with gr.Row():
        bank = gr.Dropdown(names, value=names[0] if names else None, label="Bank", elem_id="health-bank")
        refresh = gr.Button("Refresh", elem_id="health-refresh")
    state = gr.HTML(elem_id="health-state")
    gr.Markdown(DRIFT_EXPLAINED, elem_id="drift-explained")
    with gr.Row():
        histogram = gr.Plot(
            label="Training scores, recent scores and τ", elem_id="health-histogram", visible=False, show_label=False
        )
        timeline = gr.Plot(label="Recent scores over time", elem_id="health-timeline", visible=False, show_label=False)

    def show(name):
        html, histogram_fig, timeline_fig = handlers.line_health(pipeline, name)
        return (
            html,
            gr.update(value=histogram_fig, visible=histogram_fig is not None),
            gr.update(value=timeline_fig, visible=timeline_fig is not None),
        )

    outputs = [state, histogram, timeline]
    _refresh_rows(pipeline, bank, inspected, after_teach=(show, outputs))

    refresh.click(show, bank, outputs)
    bank.input(show, bank, outputs)
    health_tab.select(lambda selected: handlers.bank_choice(pipeline, selected, default_first=True), bank, bank).then(
        show, bank, outputs
    )
    return bank


def _refresh_rows(
    pipeline: Pipeline, bank: gr.Dropdown, inspected: gr.Image, *, after_teach: tuple[Callable, list]
) -> None:
    """Grow the bank: propose kept inspections of good parts, teach them on approval (:mod:`app.health_refresh`).

    ``after_teach`` is the drift panel's ``(show, outputs)``: run once a refresh made a new version.
    """
    gr.Markdown(
        "**Grow the bank** from confirmed good parts: the latest kept inspections of this version that the expert "
        "passed with margin or an operator confirmed good. Same proposal as `eagle bank refresh`.",
        elem_id="refresh-explained",
    )
    with gr.Row():
        propose = gr.Button("Propose refresh", elem_id="refresh-propose")
        approve = gr.Button("Approve and teach", elem_id="refresh-approve", variant="primary")
        teach_shown = gr.Button("Teach the inspected image", elem_id="refresh-teach-shown")
    status = gr.Markdown(elem_id="refresh-status")
    gallery = gr.Gallery(label="Candidates", elem_id="refresh-gallery", columns=6, height="auto")
    table = gr.Dataframe(headers=health_refresh.REFRESH_COLUMNS, elem_id="refresh-table", interactive=False)
    proposal = gr.State(None)
    propose.click(functools.partial(health_refresh.propose_refresh, pipeline), bank, [status, gallery, table, proposal])
    show, shown = after_teach
    approve.click(
        functools.partial(health_refresh.approve_refresh, pipeline),
        [bank, proposal],
        [status, gallery, table, proposal],
    ).success(show, bank, shown)
    teach_shown.click(functools.partial(health_refresh.teach_shown_image, pipeline), [inspected, bank], status)


GRADIO_CACHE_CLEANUP = (3600, 86400)  # (how often, how old) in seconds: gr.Blocks(delete_cache=...)


def build_ui(pipeline: Pipeline, report: Report | None = None) -> gr.Blocks:
    """Compose the app for one pipeline (which holds the banks and, lazily, the model).

    Args:
        pipeline: the pipeline the app drives.
        report: what this installation can do (:func:`eagle.doctor.run_checks`; run here when not given): shown in
            the header, and the actions that cannot work are disabled with the reason beside them.
    """
    report = run_checks(pipeline.settings) if report is None else report
    gates = app_gates(report, mllm_enabled=pipeline.mllm_enabled)
    names = handlers.bank_names(pipeline)
    # Gradio keeps a copy of every picture and file it serves; drop copies older than a day, checked hourly.
    with gr.Blocks(title=TITLE, delete_cache=GRADIO_CACHE_CLEANUP) as demo:
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(status_markdown(report, gates), elem_id="capability-status")
        with gr.Accordion(
            "What works on this installation, and how to fix the rest",
            open=bool(gates.build_reason or not report.runnable),
            elem_id="capability-details",
        ):
            gr.Markdown(details_markdown(report))
        inspect_bank = gr.Dropdown(
            names, value=names[0] if names else None, label="Bank", elem_id="bank-select", render=False
        )
        banks_bank = gr.Dropdown(names, value=None, label="Selected bank", render=False)
        with gr.Tab("Inspect", id="inspect"):
            inspect_bank.render()
            inspected = _inspect_tab(pipeline, inspect_bank, gates)
        with gr.Tab("References", id="references"):
            _references_tab(pipeline, [inspect_bank, banks_bank], gates)
        with gr.Tab("Banks", id="banks") as banks_tab:
            banks_bank.render()
            banks_table = _banks_tab(pipeline, banks_bank)
        with gr.Tab("Line statistics", id="stats") as stats_tab:
            stats_bank = _stats_tab(pipeline)
        with gr.Tab("Line health", id="health") as health_tab:
            _health_tab(pipeline, health_tab, inspected)
        # Banks change outside this page (the API, the CLI, another browser): every list of them is read again
        # when a page loads and when its tab opens, so nobody has to restart the app to see a new bank.
        demo.load(
            lambda inspected, selected, filtered: (
                handlers.bank_choice(pipeline, inspected, default_first=True),
                *handlers.refreshed_banks(pipeline, selected),
                handlers.stats_bank_choice(pipeline, filtered),
            ),
            [inspect_bank, banks_bank, stats_bank],
            [inspect_bank, banks_table, banks_bank, stats_bank],
        )
        banks_tab.select(functools.partial(handlers.refreshed_banks, pipeline), banks_bank, [banks_table, banks_bank])
        stats_tab.select(functools.partial(handlers.stats_bank_choice, pipeline), stats_bank, stats_bank)
    return demo
