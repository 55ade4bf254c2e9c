"""Start the web app: locally (``eagle app``) or as a Hugging Face Space (``app.py``).

On ZeroGPU Spaces (the ``spaces`` package is importable and ``SPACE_ID`` is set), GPU work is wrapped
in ``spaces.GPU`` so a GPU is attached only while the model runs.
"""

from __future__ import annotations

import logging
import os
import threading

from eagle.doctor import Report, run_checks
from eagle.pipeline import Pipeline
from eagle.settings import Settings

log = logging.getLogger(__name__)


def on_spaces() -> bool:
    """Whether we run inside a Hugging Face Space."""
    return bool(os.environ.get("SPACE_ID"))


def wrap_for_zerogpu(pipeline: Pipeline) -> Pipeline:
    """Route the pipeline's MLLM-bound methods through ``spaces.GPU`` when that package is present."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return pipeline
    pipeline.inspect = spaces.GPU(duration=120)(pipeline.inspect)  # type: ignore[method-assign]
    pipeline.explain_stream = spaces.GPU(duration=120)(pipeline.explain_stream)  # type: ignore[method-assign]
    log.info("ZeroGPU detected: inspections run under spaces.GPU")
    return pipeline


def start_onnx_warm_up(pipeline: Pipeline, report: Report | None = None) -> threading.Thread | None:
    """Export the expert's ONNX backbone into the cache in a daemon thread (start-up is not slowed).

    A bank build started meanwhile waits for it instead of exporting too; a failure is logged, and the build then
    reports it to the user. When the start-up check (``report``, :func:`eagle.doctor.run_checks`) found the backbone
    weights neither cached nor downloadable (offline mode, or the hub did not answer its short probe), nothing is
    started: the log says so at once instead of waiting on the network.

    Returns:
        The thread, or ``None`` when the warm-up was skipped.
    """
    if report is not None and report.get("expert_weights").status == "missing":
        check = report.get("expert_weights")
        log.warning("ONNX warm-up skipped at start-up: %s; fix: %s", check.detail, check.fix)
        return None

    def warm() -> None:
        try:
            path = pipeline.warm_onnx_cache()
            log.info("ONNX backbone ready in the cache: %s", path)
        except Exception as err:  # noqa: BLE001 - a warm-up must never take the app down
            log.warning("ONNX warm-up at start-up failed (the first bank build will retry): %s", err)

    thread = threading.Thread(target=warm, name="eagle-onnx-warm-up", daemon=True)
    thread.start()
    return thread


def create_demo(settings: Settings):
    """The Gradio Blocks for these settings (banks under ``settings.data_dir``)."""
    from app.ui import build_ui

    settings.banks_dir.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(settings)
    if on_spaces():
        wrap_for_zerogpu(pipeline)
    report = run_checks(settings)  # what works here: the header shows it before anyone uploads anything
    log.info("start-up check: %s", report.summary())
    demo = build_ui(pipeline, report)
    if settings.app.warm_onnx_cache:
        start_onnx_warm_up(pipeline, report)  # after the UI is built: its imports do not compete with the export
    return demo


def launch(settings: Settings, *, host: str | None = None, port: int | None = None, share: bool | None = None):
    """Build and serve the app (blocks until stopped)."""
    import gradio as gr

    from app.ui import CSS, I18N_FIXES

    demo = create_demo(settings)
    demo.queue(default_concurrency_limit=1)  # one model, one device: requests are served in order
    server_name = None if on_spaces() else (host or settings.app.host)
    return demo.launch(
        server_name=server_name,
        server_port=None if on_spaces() else (port or settings.app.port),
        share=settings.app.share if share is None else share,
        max_file_size=f"{settings.app.max_upload_mb}mb",
        show_error=True,
        css=CSS,
        i18n=gr.I18n(**I18N_FIXES),
    )
