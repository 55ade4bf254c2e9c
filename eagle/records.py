"""The result record of one inspection, shared by the app, the edge service and the evaluation.

The JSON part (:class:`InspectionResult`) is what the API returns, the audit log stores and the
evaluation appends to JSONL; pictures ride along in :class:`InspectionImages`, excluded from JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mllm.config import Answer, CAASPolicy, PromptSetting

OperatorVerdict = Literal["defect", "no_defect"]
"""A verdict an operator can give as the right one (audit feedback): the definite :data:`Verdict` words."""

Verdict = Literal[OperatorVerdict, "unknown"]
"""The final verdict of an inspection: the one vocabulary of verdict words (``unknown``: the MLLM's reply could not
be read)."""

VERDICTS: tuple[Verdict, ...] = get_args(Verdict)
OPERATOR_VERDICTS: tuple[OperatorVerdict, ...] = get_args(OperatorVerdict)

ExpertDecision = Literal["anomalous", "normal"]
"""The expert's decision: anomalous iff score >= tau."""

EXPERT_DECISIONS: tuple[ExpertDecision, ...] = get_args(ExpertDecision)

InspectionMode = Literal["expert-only", "expert+mllm", "mllm-only-0shot"]
"""Who decided an inspection: the expert alone, the expert with the MLLM (the EAGLE pipeline), or, on a line
declared before its bank exists, the MLLM alone 0-shot (no template, no expert hints, no CAAS: not the paper's
1-shot+ baseline row)."""

INSPECTION_MODES: tuple[InspectionMode, ...] = get_args(InspectionMode)
MLLM_ONLY_MODE: InspectionMode = "mllm-only-0shot"


class InspectOptions(BaseModel):
    """Per-request choices; ``None`` means "as configured in settings"."""

    model_config = ConfigDict(extra="forbid")

    prompt_setting: PromptSetting | None = None
    caas: CAASPolicy | None = None
    alpha: float | None = Field(None, ge=0.0)
    explain: bool | None = None
    use_mllm: bool = True
    attention_map: bool = False


class BoxRecord(BaseModel):
    """A predicted defect box in ORIGINAL image pixel coordinates (x1, y1 exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int
    peak: float


@dataclass
class InspectionImages:
    """RGB uint8 pictures for people (H×W×3), all at the original image's resolution unless noted."""

    heatmap_overlay: np.ndarray
    boxed: np.ndarray | None
    template: np.ndarray | None
    attention_overlay: np.ndarray | None = None


class InspectionResult(BaseModel):
    """Everything one inspection decided, in JSON-serialisable form."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    image_name: str | None = None
    image_sha256: str
    image_size: tuple[int, int] = Field(description="(width, height) of the original image.")
    bank: str
    bank_id: str | None = Field(description="The bank version that scored; None: a declared line without a bank.")
    score: float | None = Field(description="The expert's score; None when no expert ran (mllm-only-0shot).")
    tau: float | None = Field(description="The bank's τ; None when no expert ran (mllm-only-0shot).")
    s_max: float | None = Field(description="The bank's s_max; None when no expert ran (mllm-only-0shot).")
    expert_decision: ExpertDecision | None = Field(description="anomalous iff score >= tau; None: no expert ran.")
    low_confidence: bool = Field(description="tau <= score <= s_max: the expert is unsure.")
    boxes: list[BoxRecord]
    inspected_region: tuple[int, int, int, int] = Field(description="(x0, y0, x1, y1) the backbone saw.")
    template: str | None = Field(None, description="Reference image shown to the MLLM as the normal template.")
    mode: InspectionMode = Field(
        description="Who decided: expert-only, expert+mllm, or mllm-only-0shot (a line declared before its bank "
        "exists: the MLLM alone, no template, no expert hints, no CAAS)."
    )
    prompt_setting: PromptSetting | None = None
    caas_applied: bool = False
    caas_alpha: float | None = None
    mllm_letter: str | None = None
    mllm_answer: Answer | None = None
    mllm_raw: str | None = None
    explanation: str | None = None
    verdict: Verdict = Field(description="Final answer: the MLLM's when it ran, else the expert's decision.")
    model_id: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    images: InspectionImages | None = Field(None, exclude=True, repr=False)
