"""Result assembly: an expert result (and the MLLM's answer) turned into pictures and an :class:`InspectionResult`.

Pure functions of what the inspection computed: the pictures are made at the bounded view of the query, the boxes
and sizes in the record are the ORIGINAL image's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from eagle.images import DecodedImage
from eagle.images import image_sha256 as sha256_of_image
from eagle.records import BoxRecord, InspectionImages, InspectionResult

if TYPE_CHECKING:
    from expert.boxes import Box
    from expert.config import ExpertSettings
    from expert.scorer import ExpertResult
    from mllm.caas import CAASConfig
    from mllm.inspector import MLLMAnswer


def pictures(
    view: np.ndarray, expert: ExpertResult, template: np.ndarray, *, boxes_always: bool, settings: ExpertSettings
) -> tuple[list[Box], InspectionImages]:
    """The boxes shown and the pictures: heatmap and boxed query at ``view``'s size, and the template.

    Boxes (ORIGINAL pixels) are scaled onto the view, the map is sampled onto it from the expert's crop-resolution
    map. ``boxes_always`` (``visual_all``, the paper's Table 3 visual-only row) boxes a normal image too. The boxed
    view exists whenever the expert says anomalous (the prompt promises it) or ``boxes_always``; in the rare case
    that every region was too small to box, it is the plain image.
    """
    from expert.boxes import draw_boxes, find_boxes_in_original, heatmap_overlay

    view_h, view_w = view.shape[:2]
    sx, sy = view_w / expert.geometry.orig_w, view_h / expert.geometry.orig_h
    drawn = expert.boxes
    if boxes_always and not expert.anomalous:
        drawn = find_boxes_in_original(
            expert.crop_map,
            expert.geometry,
            max_boxes=settings.max_boxes,
            crop_mask=expert.crop_mask,
            merge=settings.box_merge,
        )
    view_boxes = [b.scaled(sx, sy, width=view_w, height=view_h) for b in drawn]
    boxed = draw_boxes(view, view_boxes) if expert.anomalous or boxes_always else None
    view_map, view_valid = expert.map_at(view_h, view_w)
    images = InspectionImages(
        heatmap_overlay=heatmap_overlay(view, view_map, view_valid, vmin=0.0, vmax=expert.s_max),
        boxed=boxed,
        template=template,
    )
    return drawn, images


def expert_record(
    image: np.ndarray | DecodedImage,
    expert: ExpertResult,
    *,
    bank: str,
    bank_id: str,
    drawn: list[Box],
    images: InspectionImages,
    template_name: str | None,
    image_name: str | None,
    image_sha256: str | None,
) -> dict[str, Any]:
    """The expert's half of an :class:`InspectionResult`, as keyword arguments."""
    return dict(
        image_name=image_name,
        image_sha256=image_sha256 or sha256_of_image(image),
        image_size=(int(expert.geometry.orig_w), int(expert.geometry.orig_h)),
        bank=bank,
        bank_id=bank_id,
        score=float(expert.score),
        tau=float(expert.tau),
        s_max=float(expert.s_max),
        expert_decision="anomalous" if expert.anomalous else "normal",
        low_confidence=bool(expert.low_confidence),
        # what the MLLM was shown: visual_all boxes a normal image too, and its record says so
        boxes=[BoxRecord(x0=b.x0, y0=b.y0, x1=b.x1, y1=b.y1, peak=float(b.peak)) for b in drawn],
        inspected_region=expert.geometry.inspected_region(),
        template=template_name,
        images=images,
    )


def expert_only_result(record: dict[str, Any], expert: ExpertResult, timings: dict[str, float]) -> InspectionResult:
    """The record with the expert's verdict (``use_mllm`` off or the MLLM disabled)."""
    verdict = "defect" if expert.anomalous else "no_defect"
    return InspectionResult(**record, mode="expert-only", verdict=verdict, timings_ms=timings)


def mllm_result(
    record: dict[str, Any],
    answer: MLLMAnswer,
    *,
    setting: str,
    caas: CAASConfig | None,
    explanation: str | None,
    model_id: str,
    timings: dict[str, float],
) -> InspectionResult:
    """The record with the MLLM's answer: ``yes → defect``, ``no → no_defect``, anything else ``unknown``."""
    return InspectionResult(
        **record,
        mode="expert+mllm",
        prompt_setting=setting,
        caas_applied=answer.caas_applied,
        caas_alpha=caas.alpha if caas is not None else None,
        mllm_letter=answer.letter,
        mllm_answer=answer.answer,
        mllm_raw=answer.raw_text,
        explanation=explanation,
        verdict={"yes": "defect", "no": "no_defect"}.get(answer.answer, "unknown"),
        model_id=model_id,
        timings_ms=timings,
    )


def mllm_only_result(
    image: np.ndarray | DecodedImage,
    view: np.ndarray,
    answer: MLLMAnswer,
    *,
    bank: str,
    image_name: str | None,
    image_sha256: str | None,
    explanation: str | None,
    model_id: str,
    timings: dict[str, float],
) -> InspectionResult:
    """The record of a declared line without a bank: the MLLM alone, 0-shot (no template, no hints, no CAAS).

    No expert ran: ``score``, ``tau``, ``s_max``, ``expert_decision`` and ``bank_id`` are ``None``, there are no
    boxes, and the picture is the query's view itself (nothing to overlay). The MLLM saw the whole image.
    """
    from eagle.records import MLLM_ONLY_MODE

    pixels = image.pixels if isinstance(image, DecodedImage) else image
    width, height = image.original_size if isinstance(image, DecodedImage) else (pixels.shape[1], pixels.shape[0])
    return InspectionResult(
        image_name=image_name,
        image_sha256=image_sha256 or sha256_of_image(image),
        image_size=(int(width), int(height)),
        bank=bank,
        bank_id=None,
        score=None,
        tau=None,
        s_max=None,
        expert_decision=None,
        low_confidence=False,
        boxes=[],
        inspected_region=(0, 0, int(width), int(height)),
        template=None,
        mode=MLLM_ONLY_MODE,
        prompt_setting="baseline",
        caas_applied=False,
        caas_alpha=None,
        mllm_letter=answer.letter,
        mllm_answer=answer.answer,
        mllm_raw=answer.raw_text,
        explanation=explanation,
        verdict={"yes": "defect", "no": "no_defect"}.get(answer.answer, "unknown"),
        model_id=model_id,
        timings_ms=timings,
        images=InspectionImages(heatmap_overlay=np.ascontiguousarray(view), boxed=None, template=None),
    )
