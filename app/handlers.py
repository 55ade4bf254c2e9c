"""What the app's buttons do, as plain functions of the pipeline (no layout here; see :mod:`app.ui`).

Every handler turns known errors into :class:`gradio.Error` with a one-line message (shown as a toast, never a
stack trace): the same :class:`eagle.errors.EagleError` messages the API and the watcher report, through
:func:`eagle.errors.describe`. Unexpected errors are logged with their traceback and shown as a generic line.
"""

from __future__ import annotations

import functools
import inspect as pyinspect
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from app.plots import dbt_histogram, score_gauge
from app.uploads import collect_reference_files
from eagle.archives import ArchiveLimits
from eagle.errors import describe
from eagle.pipeline import Pipeline
from eagle.records import InspectionResult, InspectOptions

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


def bank_names(pipeline: Pipeline) -> list[str]:
    """Names of the saved banks, newest first."""
    return [summary.name for summary in pipeline.banks.list()]


def bank_table(pipeline: Pipeline) -> list[list[Any]]:
    """Rows for the banks table."""
    return [
        [s.name, s.n_references, s.coreset_size, s.threshold_method, round(s.tau, 5), round(s.s_max, 5), s.created]
        for s in pipeline.banks.list()
    ]


BANK_TABLE_HEADERS = ["bank", "references", "coreset", "τ method", "τ", "s_max", "created"]


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
        f"backbone `{s.backbone}` ({s.weights_source} weights); distance `{s.distance}`."
        + "".join(f"\n\n⚠️ {warning}" for warning in warnings)
    )


def _dbt_figure(pipeline: Pipeline, name: str):
    bank = pipeline.banks.load(name).bank
    threshold = bank.meta.threshold
    return dbt_histogram(bank.train_scores, threshold.tau, threshold.s_max, method=threshold.method)


@user_facing
def build_bank(pipeline: Pipeline, uploads: list[str] | None, name: str, progress=gr.Progress()):
    """Build a bank from uploaded files/folder/zip, reporting each stage; returns (facts, DBT figure, banks)."""
    name = (name or "").strip()
    if not name:
        raise gr.Error("Give the bank a name first.", print_exception=False)
    with tempfile.TemporaryDirectory(prefix="eagle-upload-") as workdir:
        files = collect_reference_files(uploads, workdir, limits=ArchiveLimits.from_settings(pipeline.settings))
        if not files:
            raise gr.Error("Upload normal reference images (files, a folder or a zip) first.", print_exception=False)
        progress(0.0, desc=f"reading {len(files)} images")
        pipeline.build_bank(files, name, progress=lambda stage, fraction: progress(fraction, desc=stage))
    return (
        bank_facts_markdown(pipeline, name),
        _dbt_figure(pipeline, name),
        gr.update(choices=bank_names(pipeline), value=name),
    )


@user_facing
def show_bank(pipeline: Pipeline, name: str | None):
    """Facts and the DBT histogram of one bank."""
    if not name:
        return "No bank selected.", None
    return bank_facts_markdown(pipeline, name), _dbt_figure(pipeline, name)


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
    """Write the bank as a zip into a fresh temporary file; returns its path for download."""
    if not name:
        raise gr.Error("Select a bank to download.", print_exception=False)
    dest = Path(tempfile.mkdtemp(prefix="eagle-export-")) / f"{name}.zip"
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


def verdict_html(result: InspectionResult) -> str:
    """The verdict, large and coloured, with the expert's view beside it."""
    colour = {"defect": "#c62828", "no_defect": "#2e7d32", "unknown": "#6d6d6d"}[result.verdict]
    text = {"defect": "DEFECT", "no_defect": "NO DEFECT", "unknown": "UNSURE"}[result.verdict]
    source = "MLLM" if result.mode == "expert+mllm" else "expert only"
    unsure = " · expert unsure (τ ≤ score ≤ s_max)" if result.low_confidence else ""
    caas = f" · CAAS α={result.caas_alpha:g}" if result.caas_applied else ""
    return (
        f'<div id="eagle-verdict" data-verdict="{result.verdict}" data-sha="{result.image_sha256[:16]}" '
        f'style="padding:14px;border-radius:8px;background:{colour};color:white">'
        f'<div style="font-size:2em;font-weight:700">{text}</div>'
        f"<div>decided by {source}; expert score {result.score:.4g} vs τ {result.tau:.4g} "
        f"(s_max {result.s_max:.4g}){unsure}{caas}</div></div>"
    )


def mllm_status_markdown(pipeline: Pipeline) -> str:
    """One line on the LLM side; says so plainly in expert-only mode."""
    import torch

    gpu = torch.cuda.is_available()
    line = pipeline.mllm_status()
    if not gpu:
        line += " — no GPU found: the MLLM (if enabled) runs slowly on the CPU; expert-only mode is recommended."
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
) -> Iterator[tuple]:
    """Inspect one image; yields the outputs once the verdict is known, then again as the explanation streams."""
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
    image = pipeline.decode(path, image_name=path.name)  # the FILE: image_sha256 is its bytes' hash, as in the API
    result = pipeline.inspect(image, bank, options, image_name=path.name)
    outputs = _render(result, pipeline)
    yield outputs
    if explain and result.mode == "expert+mllm":
        text = ""
        for chunk in pipeline.explain_stream(image, result):
            text += chunk
            yield (*outputs[:6], text, *outputs[7:])


def _render(result: InspectionResult, pipeline: Pipeline) -> tuple:
    images = result.images
    answer = (
        f"{result.mllm_letter or '?'} → {result.mllm_answer}  (raw: {result.mllm_raw!r})"
        if result.mode == "expert+mllm"
        else "expert-only mode: no MLLM answer"
    )
    crop = result.inspected_region
    w, h = result.image_size
    note = "" if crop == (0, 0, w, h) else f" (inspected region {crop}; the greyed border was not inspected)"
    return (
        verdict_html(result),
        score_gauge(result.score, result.tau, result.s_max),
        images.heatmap_overlay if images else None,
        images.boxed if images is not None and images.boxed is not None else None,
        images.template if images else None,
        answer,
        result.explanation or "",
        images.attention_overlay if images else None,
        {k: round(v, 1) for k, v in result.timings_ms.items()},
        f"{len(result.boxes)} box(es); template: {result.template}{note}",
    )
