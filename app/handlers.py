"""What the app's buttons do, as plain functions of the pipeline (no layout here; see :mod:`app.ui`).

Every handler turns known errors into :class:`gradio.Error` with a one-line message (shown as a toast, never a
stack trace): the same :class:`eagle.errors.EagleError` messages the API and the watcher report, through
:func:`eagle.errors.describe`. Unexpected errors are logged with their traceback and shown as a generic line.
"""

from __future__ import annotations

import functools
import html
import inspect as pyinspect
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from app.downloads import download_path
from app.explain import timings_markdown, verdict_reason
from app.health_plots import health_histogram, recent_scores_plot
from app.plots import dbt_histogram, score_gauge
from app.uploads import collect_reference_files
from eagle.annotate import annotated_image
from eagle.archives import ArchiveLimits
from eagle.audit import STATS_COLUMNS, AuditFilter, AuditLog, default_audit_path, parse_time, write_stats_csv
from eagle.errors import describe
from eagle.kept_images import KeptImages, keep_inspected_image
from eagle.line_health import DriftState, LineHealth
from eagle.lines import DeclaredLine, collect_confirmed
from eagle.pipeline import Pipeline
from eagle.records import OPERATOR_VERDICTS, InspectionResult, InspectOptions, OperatorVerdict, Verdict

log = logging.getLogger(__name__)

GENERIC_ERROR = "Something went wrong; the server log has the details."


def _as_gradio_error(err: Exception, where: str) -> gr.Error:
    info = describe(err)
    if info is None:
        log.exception("unexpected error in %s", where)
        return gr.Error(GENERIC_ERROR, print_exception=False)
    return gr.Error(info.message, print_exception=False)


def user_facing(func: Callable) -> Callable:
    """Show known errors (:class:`~eagle.errors.EagleError` and the mapped expert/MLLM errors) as one line.

    Generator handlers (streamed outputs) are wrapped as generators, so an error while streaming is caught too.
    """
    if pyinspect.isgeneratorfunction(func):

        @functools.wraps(func)
        def streaming(*args, **kwargs):
            try:
                yield from func(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as err:  # noqa: BLE001 - the UI must never show a traceback
                raise _as_gradio_error(err, func.__name__) from None

        return streaming

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as err:  # noqa: BLE001 - the UI must never show a traceback
            raise _as_gradio_error(err, func.__name__) from None

    return wrapper


def declared_lines(pipeline: Pipeline) -> list[DeclaredLine]:
    """The lines declared before their bank exists."""
    return pipeline.banks.declared()


def bank_names(pipeline: Pipeline) -> list[str]:
    """Names of the saved banks, newest first, then the lines declared without a bank (they can be inspected)."""
    return [summary.name for summary in pipeline.banks.list()] + [line.name for line in declared_lines(pipeline)]


DECLARED_MARK = "declared (empty)"
"""What the banks table shows in a declared line's threshold column: no bank, no τ yet."""


def bank_table(pipeline: Pipeline) -> list[list[Any]]:
    """Rows for the banks table: the saved banks, then the declared lines (collected parts as references)."""
    rows = [
        [s.name, s.n_references, s.coreset_size, s.threshold_method, round(s.tau, 5), round(s.s_max, 5), s.created]
        for s in pipeline.banks.list()
    ]
    rows += [[line.name, line.collected, "", DECLARED_MARK, "", "", line.declared] for line in declared_lines(pipeline)]
    return rows


BANK_TABLE_HEADERS = ["bank", "references", "coreset", "τ method", "τ", "s_max", "created"]


def bank_choice(pipeline: Pipeline, selected: str | None, *, default_first: bool = False) -> dict[str, Any]:
    """A dropdown update listing the banks on disk now; the selection stays when the bank still exists.

    The app is built once but banks come and go (built in another tab, taught or imported through the API, the
    CLI or another browser), so every list of banks is read again when a page loads or a tab opens.
    """
    names = bank_names(pipeline)
    if selected not in names:
        selected = names[0] if default_first and names else None
    return gr.update(choices=names, value=selected)


def refreshed_banks(pipeline: Pipeline, selected: str | None) -> tuple[list[list[Any]], dict[str, Any]]:
    """The banks table and its dropdown, as they are on disk now (the Banks tab's Refresh, and opening the tab)."""
    return bank_table(pipeline), bank_choice(pipeline, selected)


def stats_bank_choice(pipeline: Pipeline, selected: str | None) -> dict[str, Any]:
    """The line-statistics bank filter: "all banks" and every bank on disk now."""
    names = bank_names(pipeline)
    return gr.update(choices=[("all banks", ""), *[(n, n) for n in names]], value=selected if selected in names else "")


_PRECISION_WORDS: dict[str, str] = {"fp32": "fp32", "int8": "int8: a quantised copy, faster on a CPU"}
"""How the facts name a bank's precision (``EAGLE_EXPERT__PRECISION``)."""


def bank_facts_markdown(pipeline: Pipeline, name: str) -> str:
    """A short Markdown description of a bank."""
    s = pipeline.banks.summary(name)
    warnings = list(s.build_warnings)
    # The build already warned about few references (expert.dbt.check_reference_count): say it once.
    if s.warning and not any(w.startswith(f"only {s.n_references} reference images;") for w in warnings):
        warnings.insert(0, s.warning)
    return (
        f"**{s.name}** — {s.n_references} references, {s.n_patches:,} patches, coreset {s.coreset_size:,} "
        f"({s.coreset_ratio:.0%}), threshold `{s.threshold_method}`: τ = {s.tau:.5g}, s_max = {s.s_max:.5g}; "
        f"backbone `{s.backbone}` ({s.weights_source} weights, {_PRECISION_WORDS[s.precision]}); "
        f"distance `{s.distance}`."
        + ("" if s.mask is None else f" Inspection mask: {s.mask}; the outside is greyed in the heatmap.")
        + "".join(f"\n\n⚠️ {warning}" for warning in warnings)
    )


def _dbt_figure(pipeline: Pipeline, name: str):
    bank = pipeline.banks.load(name).bank
    threshold = bank.meta.threshold
    return dbt_histogram(bank.train_scores, threshold.tau, threshold.s_max, method=threshold.method)


def mask_from_inputs(mask_file: str | None, drawing: dict | None) -> Path | np.ndarray | None:
    """The inspection mask the References tab gives: the uploaded PNG/JSON file, else the painted strokes, else None.

    The painting (Gradio's ImageEditor value) becomes a bool picture of the background image's size: True where any
    stroke was painted (its layers' alpha), i.e. the region to inspect.
    """
    if mask_file:
        return Path(mask_file)
    if not isinstance(drawing, dict):
        return None
    layers = [np.asarray(layer) for layer in drawing.get("layers") or [] if layer is not None]
    painted = [layer[..., 3] > 0 for layer in layers if layer.ndim == 3 and layer.shape[2] == 4]
    if not painted:
        return None
    inside = np.logical_or.reduce(painted)
    return inside if inside.any() else None


@user_facing
def build_bank(
    pipeline: Pipeline,
    uploads: list[str] | None,
    name: str,
    progress=gr.Progress(),
    *,
    mask_file: str | None = None,
    mask_drawing: dict | None = None,
):
    """Build a bank from uploaded files/folder/zip, reporting each stage; returns (facts, DBT figure, banks).

    ``mask_file`` / ``mask_drawing``: the optional inspection mask (:func:`mask_from_inputs`).
    """
    name = (name or "").strip()
    if not name:
        raise gr.Error("Give the bank a name first.", print_exception=False)
    mask = mask_from_inputs(mask_file, mask_drawing)
    with tempfile.TemporaryDirectory(prefix="eagle-upload-") as workdir:
        files = collect_reference_files(uploads, workdir, limits=ArchiveLimits.from_settings(pipeline.settings))
        if not files:
            raise gr.Error("Upload normal reference images (files, a folder or a zip) first.", print_exception=False)
        progress(0.0, desc=f"reading {len(files)} images")
        pipeline.build_bank(files, name, progress=lambda stage, fraction: progress(fraction, desc=stage), mask=mask)
    return (
        bank_facts_markdown(pipeline, name),
        _dbt_figure(pipeline, name),
        gr.update(choices=bank_names(pipeline), value=name),
    )


@user_facing
def show_bank(pipeline: Pipeline, name: str | None):
    """Facts and the DBT histogram of one bank (a declared line: what it has collected, no histogram)."""
    if not name:
        return "No bank selected.", None
    line = _declared(pipeline, name)
    if line is not None:
        return declared_markdown(line), None
    return bank_facts_markdown(pipeline, name), _dbt_figure(pipeline, name)


def _declared(pipeline: Pipeline, name: str | None) -> DeclaredLine | None:
    """The declared line ``name`` when it has no bank yet, else ``None``."""
    if not name or not pipeline.banks.is_declared(name):
        return None
    return pipeline.banks.lines.get(name)


def declared_markdown(line: DeclaredLine) -> str:
    """A declared line in words: no bank yet, what an inspection does, what is collected, whether to build."""
    inspection = (
        "inspections are answered by the **MLLM alone, 0-shot** (no template, no expert hints, no CAAS)"
        if line.inspection == "mllm-only-0shot"
        else "inspections are **refused** until the bank is built (the MLLM is disabled)"
    )
    build = (
        f" **Enough collected: build the bank** ({line.collected} good parts)."
        if line.ready_to_build
        else f" Confirm good parts in the Inspect tab to collect them ({line.min_references} needed)."
    )
    return (
        f"**{line.name}** — declared (empty): no bank yet; {inspection}. "
        f"{line.collected} of {line.min_references} good parts collected as its first references.{build}"
    )


@user_facing
def declare_line(pipeline: Pipeline, name: str | None, note: str | None = None):
    """Declare a line before its bank exists; returns the refreshed table, the choices and the line's facts."""
    name = (name or "").strip()
    if not name:
        raise gr.Error("Name the line to declare.", print_exception=False)
    line = pipeline.banks.declare(name, note=(note or "").strip())
    gr.Info(f"Line {name!r} declared (no bank yet).")
    return bank_table(pipeline), gr.update(choices=bank_names(pipeline), value=line.name), declared_markdown(line)


@user_facing
def build_collected(pipeline: Pipeline, name: str | None, progress=gr.Progress()):
    """Build a declared line's bank from its collected good parts (the normal build path); returns facts and choices.

    Returns the bank's facts (Markdown), its DBT figure and a dropdown update selecting it.
    """
    from eagle.lines import build_line

    line = _declared(pipeline, name)
    if line is None:
        raise gr.Error("Select a declared line (one without a bank) to build.", print_exception=False)
    progress(0.0, desc=f"building {line.name!r} from {line.collected} collected good parts")
    summary = build_line(pipeline, line.name, progress=lambda stage, fraction: progress(fraction, desc=stage))
    gr.Info(f"Bank {summary.name!r} built from {summary.n_references} collected good parts.")
    return (
        bank_facts_markdown(pipeline, summary.name),
        _dbt_figure(pipeline, summary.name),
        gr.update(choices=bank_names(pipeline), value=summary.name),
    )


@user_facing
def delete_bank(pipeline: Pipeline, name: str | None):
    """Delete a bank; returns the refreshed table and choices."""
    if not name:
        raise gr.Error("Select a bank to delete.", print_exception=False)
    pipeline.banks.delete(name)
    gr.Info(f"Bank {name!r} deleted.")
    return bank_table(pipeline), gr.update(choices=bank_names(pipeline), value=None)


@user_facing
def export_bank(pipeline: Pipeline, name: str | None) -> str:
    """Write the bank as a zip into the app's download folder (:mod:`app.downloads`); returns its path."""
    if not name:
        raise gr.Error("Select a bank to download.", print_exception=False)
    dest = download_path(f"{name}.zip")
    return str(pipeline.banks.export_zip(name, dest))


@user_facing
def import_bank(pipeline: Pipeline, zip_path: str | None, name: str):
    """Import a bank zip (validated, never unpickled); returns the refreshed table and choices."""
    if not zip_path:
        raise gr.Error("Choose a bank zip to upload.", print_exception=False)
    name = (name or "").strip() or Path(zip_path).stem
    summary = pipeline.banks.import_zip(Path(zip_path), name)
    gr.Info(f"Bank {summary.name!r} imported ({summary.n_references} references).")
    return bank_table(pipeline), gr.update(choices=bank_names(pipeline), value=summary.name)


@user_facing
def teach_bank(pipeline: Pipeline, image_path: str | None, bank: str | None, progress=gr.Progress()) -> str:
    """Teach the bank "this is normal": add the inspected image to its references and rebuild it as a new version.

    Returns Markdown showing the change (old τ → new τ, the image's score before → after, whether it passes now).
    """
    if not bank:
        raise gr.Error("Pick a bank first.", print_exception=False)
    if not image_path:
        raise gr.Error("Inspect an image first: the image shown is the one taught.", print_exception=False)
    path = Path(image_path)
    progress(0.0, desc=f"teaching {bank!r}: rebuilding with {path.name}")
    result = pipeline.add_references(
        [path], bank, names=[path.name], progress=lambda stage, fraction: progress(fraction, desc=stage)
    )
    lines = [
        f"**Bank {bank!r} taught** — version {result.version_before or 'unversioned'} → {result.version}, "
        f"{result.references_before} → {result.references_after} references.",
        f"τ {result.tau_before:.5g} → {result.tau_after:.5g}, s_max {result.s_max_before:.5g} → "
        f"{result.s_max_after:.5g}.",
    ]
    for image in result.taught:
        verdict = "**passes now**" if image.passes_now else "would **still be flagged**"
        lines.append(f"{image.name}: score {image.score_before:.5g} → {image.score_after:.5g}, {verdict}.")
    lines.append("Undo with `eagle bank rollback` (see `eagle bank history`).")
    return "\n\n".join(lines)


# -- audit log: the app's inspections and operator feedback ---------------------------------------------------------
_AUDIT_LOGS: dict[Path, AuditLog] = {}
_AUDIT_LOCK = threading.Lock()


def audit_log(pipeline: Pipeline) -> AuditLog:
    """The audit log the app writes (the service's: ``settings.service.audit_path`` or ``<data_dir>/audit.sqlite3``).

    One open :class:`~eagle.audit.AuditLog` per file for the process (it is thread-safe and WAL-shared).
    """
    path = Path(default_audit_path(pipeline.settings)).resolve()
    with _AUDIT_LOCK:
        log_ = _AUDIT_LOGS.get(path)
        if log_ is None:
            log_ = _AUDIT_LOGS[path] = AuditLog(path)
        return log_


def new_run_id() -> str:
    """A fresh run id for one app inspection (the audit row's ``run_id``; feedback links to it)."""
    return f"app-{uuid.uuid4().hex}"


def _audit_inspection(pipeline: Pipeline, result: InspectionResult, run_id: str, latency_ms: float) -> None:
    """Audit one app inspection (source ``app``); a failing log is logged, never shown instead of the verdict."""
    try:
        audit_log(pipeline).record(result, source="app", run_id=run_id, latency_ms=latency_ms)
    except Exception:  # noqa: BLE001 - the verdict matters more than its audit row; the log says why
        log.exception("could not audit app inspection %s", run_id)


OPERATOR_VERDICT_LABELS: dict[OperatorVerdict, str] = {"defect": "defect", "no_defect": "no defect"}
"""How the feedback form names each verdict an operator can give (each of :data:`eagle.records.OPERATOR_VERDICTS`)."""
FEEDBACK_VERDICTS = [
    ("(opposite of the verdict)", ""),
    *((OPERATOR_VERDICT_LABELS[verdict], verdict) for verdict in OPERATOR_VERDICTS),
]


@user_facing
def record_feedback(
    pipeline: Pipeline,
    run_id: str | None,
    feedback: str,
    correct_verdict: str | None = None,
    operator: str | None = None,
    note: str | None = None,
) -> str:
    """Record an operator's ``confirmed``/``overruled`` on the last inspection; returns a Markdown line.

    A new feedback row in the audit log, linked by run id (the inspection row is never changed).
    """
    return _feedback_words(_feedback_row(pipeline, run_id, feedback, correct_verdict, operator, note))


def _feedback_row(
    pipeline: Pipeline,
    run_id: str | None,
    feedback: str,
    correct_verdict: str | None,
    operator: str | None,
    note: str | None,
) -> dict[str, Any]:
    """The app's feedback row in the audit log (refused before any inspection: nothing to give feedback on)."""
    if not run_id:
        raise gr.Error("Inspect an image first: feedback is about the verdict shown.", print_exception=False)
    row = audit_log(pipeline).record_feedback(
        run_id,
        feedback,
        correct_verdict=correct_verdict or None,
        operator=(operator or "").strip() or None,
        note=(note or "").strip() or None,
        source="app",
    )
    return row


def _feedback_words(row: dict[str, Any]) -> str:
    who = f" by {row['operator']}" if row["operator"] else ""
    if row["feedback"] == "confirmed":
        return f"✔ Verdict **{row['verdict']}** confirmed{who}."
    return f"✖ Verdict **{row['verdict']}** overruled{who}: correct verdict **{row['correct_verdict']}**."


@user_facing
def feedback_and_collect(
    pipeline: Pipeline,
    run_id: str | None,
    feedback: str,
    correct_verdict: str | None,
    operator: str | None,
    note: str | None,
    image_path: str | None,
) -> tuple[str, dict[str, Any]]:
    """Record feedback; on a declared line, a part confirmed good is collected as one of its first references.

    The image comes from the kept images where they are kept (``EAGLE_KEEP_IMAGES__ENABLED``), else it is the image
    on screen. Returns the Markdown status and an update of the "build the bank" button: shown once enough good
    parts are collected (``settings.expert.min_references``).
    """
    row = _feedback_row(pipeline, run_id, feedback, correct_verdict, operator, note)
    text = _feedback_words(row)
    lines = getattr(pipeline.banks, "lines", None)
    if lines is None or not row.get("bank") or not lines.exists(row["bank"]):
        return text, gr.update(visible=False)
    kept = KeptImages.of(pipeline.settings) if pipeline.settings.keep_images.enabled else None
    shown = None if kept is not None and kept.has(row.get("image_sha256") or "") else image_path
    collected = collect_confirmed(lines, row, shown=shown, kept=kept)
    if collected is None:
        line = lines.get(row["bank"])
        return f"{text}\n\n{declared_markdown(line)}", gr.update(visible=line.ready_to_build)
    line, new = collected
    if new:
        text += f"\n\n✚ Collected as a first reference of line **{line.name}**: "
    else:
        text += f"\n\nThis part is already collected for line **{line.name}**: "
    text += f"{line.collected} of {line.min_references}."
    if line.ready_to_build:
        text += " **Enough good parts: build the bank now.**"
    return text, gr.update(visible=line.ready_to_build)


@user_facing
def line_stats(pipeline: Pipeline, bank: str | None, since: str | None, per: str = "all") -> tuple[list, str | None]:
    """The line-statistics panel: rows of :data:`eagle.audit.STATS_COLUMNS` and a CSV file of them."""
    try:
        start = parse_time(since) if since and since.strip() else None
    except ValueError as err:
        raise gr.Error(str(err), print_exception=False) from None
    stats = audit_log(pipeline).stats(AuditFilter(since=start, bank=bank or None), per=per or "all")
    rows = [[_cell(group[column]) for column in STATS_COLUMNS] for group in stats]
    dest = download_path("line-stats.csv")
    with open(dest, "w", encoding="utf-8", newline="") as handle:
        write_stats_csv(stats, handle)
    return rows, str(dest)


HEALTH_STATE_TEXTS: dict[DriftState, str] = {
    "ok": "OK",
    "watch": "WATCH",
    "drifting": "DRIFTING",
    "not_enough_references": "NOT ENOUGH REFERENCES",
    "not_enough_inspections": "NOT ENOUGH INSPECTIONS",
}
"""What the Line health panel shows for each state (every state of :class:`eagle.line_health.LineHealth`)."""
HEALTH_STATE_COLOURS: dict[DriftState, str] = {
    "ok": "#2e7d32",
    "watch": "#ef6c00",
    "drifting": "#c62828",
    "not_enough_references": "#6d6d6d",
    "not_enough_inspections": "#6d6d6d",
}
"""The colour of each state's box in :func:`health_html`."""
HEALTH_CHECK_FAILED = "CANNOT CHECK"
"""The panel's state word when the bank cannot be checked (not found, unreadable): its one-line error follows."""


def _state_box(state: str, colour: str, title: str, lines: list[str]) -> str:
    body = "".join(f'<div style="margin-top:4px;color:white">{html.escape(line)}</div>' for line in lines)
    return (
        f'<div id="eagle-health" data-state="{state}" '
        f'style="padding:14px;border-radius:8px;background:{colour};color:white;overflow-wrap:anywhere">'
        f'<div style="font-size:1.8em;font-weight:700;color:white">{html.escape(title)}</div>{body}</div>'
    )


def health_html(health: LineHealth) -> str:
    """The state, large and coloured, with its reason in words and what it compared."""
    facts = (
        f"bank {health.bank!r} (version {health.bank_id}): {health.n_references} training scores, "
        f"{health.n_recent} recent inspection{'' if health.n_recent == 1 else 's'}, τ = {health.tau:.4g}"
    )
    return _state_box(
        health.state, HEALTH_STATE_COLOURS[health.state], HEALTH_STATE_TEXTS[health.state], [health.reason, facts]
    )


def health_figures(health: LineHealth) -> tuple[Any, Any]:
    """(histogram of the bank's DBT scores with the recent ones and τ, recent scores over time with τ).

    Each is ``None`` when it would be empty: no training scores (histogram), no recent inspection (time plot).
    """
    recent = [point.score for point in health.recent]
    histogram = health_histogram(health.train_scores, recent, health.tau) if health.train_scores else None
    timeline = recent_scores_plot([p.time for p in health.recent], recent, health.tau) if recent else None
    return histogram, timeline


def line_health(pipeline: Pipeline, name: str | None) -> tuple[str, Any, Any]:
    """The Line health panel for bank ``name``: (state HTML, histogram figure, time-plot figure).

    Reads the bank and the app's audit log (:meth:`eagle.pipeline.Pipeline.line_health`); only called on the
    panel's Refresh, its bank choice and opening its tab, never while inspecting. A bank that cannot be checked
    shows its one-line error in the state box (no figures), never a traceback.
    """
    if not name:
        return _state_box("", "#6d6d6d", "NO BANK", ["Pick a bank (build one in the References tab)."]), None, None
    try:
        health = pipeline.line_health(name, audit_log(pipeline))
    except Exception as err:  # noqa: BLE001 - the panel shows why, never a traceback
        info = describe(err)
        if info is None:
            log.exception("unexpected error in line_health")
        message = GENERIC_ERROR if info is None else info.message
        return _state_box("error", "#6d6d6d", HEALTH_CHECK_FAILED, [message]), None, None
    return (health_html(health), *health_figures(health))


def _cell(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else ("" if value is None else value)


VERDICT_COLOURS: dict[Verdict, str] = {"defect": "#c62828", "no_defect": "#2e7d32", "unknown": "#6d6d6d"}
"""The colour of each verdict word (every one of :data:`eagle.records.VERDICTS`) in :func:`verdict_html`."""
VERDICT_TEXTS: dict[Verdict, str] = {"defect": "DEFECT", "no_defect": "NO DEFECT", "unknown": "UNSURE"}
"""What :func:`verdict_html` shows for each verdict word (every one of :data:`eagle.records.VERDICTS`)."""


MLLM_ONLY_WORDS = "MLLM alone, 0-shot (no bank yet: no template, no expert hints, no CAAS)"
"""How the verdict panel names a declared line's inspection (mode ``mllm-only-0shot``)."""


def verdict_html(result: InspectionResult, run_id: str | None = None) -> str:
    """The verdict, large and coloured, with the expert's view beside it (or, with no bank yet, the MLLM-only label)."""
    colour = VERDICT_COLOURS[result.verdict]
    text = VERDICT_TEXTS[result.verdict]
    if result.score is None or result.tau is None or result.s_max is None:  # mllm-only-0shot: no expert ran
        decided = f"decided by the {MLLM_ONLY_WORDS}"
        why = html.escape(
            "This line has no bank yet, so no expert scored the part; the model answered from the image alone. "
            "Confirm good parts to collect them, then build the bank."
        )
    else:
        source = "MLLM" if result.mode == "expert+mllm" else "expert only"
        unsure = " · expert unsure (τ ≤ score ≤ s_max)" if result.low_confidence else ""
        caas = f" · CAAS α={result.caas_alpha:g}" if result.caas_applied else ""
        decided = (
            f"decided by {source}; expert score {result.score:.4g} vs τ {result.tau:.4g} "
            f"(s_max {result.s_max:.4g}){unsure}{caas}"
        )
        why = html.escape(verdict_reason(result))
    return (
        f'<div id="eagle-verdict" data-verdict="{result.verdict}" data-mode="{result.mode}" '
        f'data-sha="{result.image_sha256[:16]}" data-run-id="{run_id or ""}" '
        f'style="padding:14px;border-radius:8px;background:{colour};color:white">'
        f'<div style="font-size:2em;font-weight:700">{text}</div>'
        f"<div>{decided}</div>"
        f'<div id="eagle-verdict-why" style="margin-top:6px">{why}</div></div>'
    )


def mllm_status_markdown(pipeline: Pipeline) -> str:
    """One line on the LLM side; says so plainly in expert-only mode."""
    import torch

    gpu = torch.cuda.is_available()
    line = pipeline.mllm_status()
    if not gpu and pipeline.mllm_enabled:  # expert-only: the expert runs on the CPU, no GPU is wanted
        line += " — no GPU found: the MLLM runs slowly on the CPU; expert-only mode is recommended."
    return f"**Model:** {line}"


@user_facing
def inspect(
    pipeline: Pipeline,
    image_path: str | None,
    bank: str | None,
    prompt_setting: str,
    caas: str,
    alpha: float,
    explain: bool,
    use_mllm: bool,
    attention: bool,
    progress=gr.Progress(),
    *,
    run_id: str | None = None,
) -> Iterator[tuple]:
    """Inspect one image; yields the outputs once the verdict is known, then again as the explanation streams.

    The inspection is written to the audit log (source ``app``) under ``run_id`` (default: a new one), which
    operator feedback (:func:`record_feedback`) links to.
    """
    if not bank:
        raise gr.Error("Pick a bank first (build one in the References tab).", print_exception=False)
    if not image_path:
        raise gr.Error("Upload, paste or take a picture to inspect.", print_exception=False)
    use_mllm = bool(use_mllm) and pipeline.mllm_enabled
    if use_mllm and not pipeline.mllm_loaded():
        # A failed load raises MLLMUnavailableError, shown as its message: the pipeline decides, as for the API.
        progress(0.1, desc="loading the multimodal model (first inspection only)")
        pipeline.load_mllm(progress=lambda stage, fraction: progress(fraction, desc=f"loading model: {stage}"))
    progress(0.5, desc="inspecting")
    options = InspectOptions(
        prompt_setting=prompt_setting,
        caas=caas,
        alpha=alpha,
        explain=False,
        use_mllm=use_mllm,
        attention_map=bool(attention) and use_mllm,
    )
    path = Path(image_path)
    run_id = run_id or new_run_id()
    start = time.perf_counter()
    image = pipeline.decode(path, image_name=path.name)  # the FILE: image_sha256 is its bytes' hash, as in the API
    result = pipeline.inspect(image, bank, options, image_name=path.name)
    _audit_inspection(pipeline, result, run_id, (time.perf_counter() - start) * 1000.0)
    keep_inspected_image(pipeline.settings, result.image_sha256, path)
    outputs = _render(result, pipeline, run_id)
    yield outputs
    if explain and result.mode != "expert-only":
        text = ""
        for chunk in pipeline.explain_stream(image, result):
            text += chunk
            yield (*outputs[:6], text, *outputs[7:])


def _render(result: InspectionResult, pipeline: Pipeline, run_id: str | None = None) -> tuple:
    images = result.images
    answer = (
        f"{result.mllm_letter or '?'} → {result.mllm_answer}  (raw: {result.mllm_raw!r})"
        if result.mode != "expert-only"
        else "expert-only mode: no MLLM answer"
    )
    if result.score is None or result.tau is None or result.s_max is None:
        gauge = None  # a declared line: no expert, no score
    else:
        gauge = score_gauge(result.score, result.tau, result.s_max)
    crop = result.inspected_region
    w, h = result.image_size
    note = "" if crop == (0, 0, w, h) else f" (inspected region {crop}; the greyed border was not inspected)"
    return (
        verdict_html(result, run_id),
        gauge,
        annotated_image(result) if images else None,
        images.boxed if images is not None and images.boxed is not None else None,
        images.template if images else None,
        answer,
        result.explanation or "",
        images.attention_overlay if images else None,
        timings_markdown(result.timings_ms),
        (
            f"{len(result.boxes)} box(es); template: {result.template}{note}"
            if result.score is not None
            else f"mode `{result.mode}`: {MLLM_ONLY_WORDS}"
        ),
    )
