"""The Line health tab's refresh: propose recent kept inspections of good parts, and teach them on approval.

The same proposal as ``eagle bank refresh`` and ``GET /v1/banks/{name}/refresh`` (:mod:`eagle.bank_refresh`).
With keeping off (``EAGLE_KEEP_IMAGES__ENABLED=false``, the default) nothing is proposed and the tab offers to teach
the image on the Inspect tab instead (:func:`app.handlers.teach_bank`).
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np

from app.handlers import audit_log, teach_bank, user_facing
from eagle.bank_refresh import RefreshProposal, apply, propose_for, select
from eagle.images import load_image, resize_rgb
from eagle.kept_images import KeptImageError, KeptImages
from eagle.pipeline import Pipeline

__all__ = ["REFRESH_COLUMNS", "KEEPING_OFF", "approve_refresh", "propose_refresh", "teach_shown_image"]

REFRESH_COLUMNS = ["time (UTC)", "image", "score", "τ", "why"]
"""The columns of the candidates table."""

KEEPING_OFF = (
    "**Keeping inspected images is off** (the default: the audit log keeps only names and hashes), so there is "
    "nothing to propose. Set `EAGLE_KEEP_IMAGES__ENABLED=true` to keep them (docs/edge.md, *Growing the bank*), or "
    "teach the image on the Inspect tab with the button below."
)

THUMB_SIDE = 256


def _thumbnail(data: bytes, max_pixels: int) -> np.ndarray:
    pixels = load_image(data, max_pixels=max_pixels)
    height, width = pixels.shape[:2]
    scale = min(1.0, THUMB_SIDE / max(height, width))
    if scale < 1.0:
        pixels = resize_rgb(pixels, max(1, round(height * scale)), max(1, round(width * scale)))
    return pixels


@user_facing
def propose_refresh(pipeline: Pipeline, name: str | None) -> tuple[str, list[Any], list[list[Any]], dict | None]:
    """The proposal for bank ``name``: (Markdown, gallery items, table rows, the proposal for approval)."""
    if not name:
        raise gr.Error("Pick a bank first.", print_exception=False)
    settings = pipeline.settings
    kept = KeptImages.of(settings)
    proposal = propose_for(pipeline, settings, name, audit_log(pipeline), kept)
    if not proposal.keeping and not proposal.candidates:
        return KEEPING_OFF, [], [], None
    if not proposal.candidates:
        text = (
            f"No candidates for bank {name!r}: no kept inspection of its current version passed with score ≤ "
            f"{proposal.margin:g} × τ or was confirmed good by an operator."
        )
        return text, [], [], None
    gallery, rows = [], []
    for candidate in proposal.candidates:
        label = candidate.image_name or candidate.image_sha256[:16]
        try:
            gallery.append((_thumbnail(kept.read(candidate.image_sha256), settings.max_image_pixels), label))
        except KeptImageError:
            continue
        rows.append([candidate.time[:19], label, round(candidate.score, 5), round(candidate.tau, 5), candidate.why])
    text = (
        f"**{len(proposal.candidates)} candidate(s)** for bank {name!r} (τ {proposal.tau:.4g}). "
        "**Approve and teach** adds them as a new bank version (undo: Banks tab history or `eagle bank rollback`)."
    )
    return text, gallery, rows, proposal.model_dump()


@user_facing
def approve_refresh(
    pipeline: Pipeline, name: str | None, proposed: dict | None, progress=gr.Progress()
) -> tuple[str, list, list, None]:
    """Teach bank ``name`` the proposal shown (still proposed now).

    Returns:
        Markdown of the change, then an empty gallery, table and proposal: what was taught is no longer proposed.
    """
    if not name or not proposed or not proposed.get("candidates"):
        raise gr.Error("Propose a refresh first: only the candidates shown are taught.", print_exception=False)
    shown = RefreshProposal.model_validate(proposed)
    if shown.bank != name:
        raise gr.Error("The proposal shown is for another bank: propose again.", print_exception=False)
    settings = pipeline.settings
    kept = KeptImages.of(settings)
    current = propose_for(pipeline, settings, name, audit_log(pipeline), kept, count=max(64, shown.count))
    chosen = select(current, [c.image_sha256 for c in shown.candidates])
    progress(0.0, desc=f"teaching {name!r} {len(chosen)} image(s)")
    result = apply(
        pipeline,
        name,
        chosen,
        kept,
        data_dir=settings.data_dir,
        approved_by="app",
        progress=lambda stage, fraction: progress(fraction, desc=stage),
    )
    return (
        f"**Bank {name!r} refreshed** — version {result.version_before or 'unversioned'} → {result.version}, "
        f"{result.references_before} → {result.references_after} references, τ {result.tau_before:.5g} → "
        f"{result.tau_after:.5g}. Undo with `eagle bank rollback {name} {result.version_before or ''}`.",
        [],
        [],
        None,
    )


def teach_shown_image(pipeline: Pipeline, image_path: str | None, bank: str | None, progress=gr.Progress()) -> str:
    """Keeping off: teach the image on the Inspect tab (the existing teach path, :func:`app.handlers.teach_bank`)."""
    return teach_bank(pipeline, image_path, bank, progress)
