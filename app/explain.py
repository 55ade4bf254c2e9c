"""The numbers of a result in plain words.

One-line explanations of τ, s_max, low confidence, CAAS and DBT, the "How to read this result" section, the
verdict's reason and the timings table.

Example:
    >>> print(timings_markdown({"embed": 12.0, "search": 3.0}))
    | stage | ms |
    |---|---:|
    | embed | 12.0 |
    | search | 3.0 |
    | **total** | **15.0** |
"""

from __future__ import annotations

from eagle.records import InspectionResult

TAU = "τ: the score above which the expert calls a part defective, set from your good references (DBT)."
S_MAX = "s_max: the highest score any of your good references got; between τ and s_max the expert is unsure."
LOW_CONFIDENCE = (
    "Low confidence: the score lies between τ and s_max, where good and defective parts overlap: the expert is unsure."
)
CAAS = (
    "CAAS (confidence-aware attention sharpening): when the expert is unsure, the model's attention to the image "
    "is strengthened so it looks closer instead of trusting the expert's hint."
)
CAAS_ALPHA = "CAAS α: how strongly the model's attention to the image is strengthened (0: not at all)."
DBT = (
    "DBT (distribution-based thresholding): τ and s_max are set from the scores of your good references, "
    "with no tuning by hand."
)
PROMPT_SETTING = "What the model is shown besides the image: the expert's boxes, its verdict in words, both or neither."
SCORE = "Score: how unlike your good references the most unusual part of the image looks (higher: more unusual)."


def _term(line: str) -> str:
    term, _, rest = line.partition(": ")
    return f"**{term}**: {rest}"


HOW_TO_READ = "\n".join(
    [
        f"- {_term(SCORE)}",
        f"- {_term(TAU)}",
        f"- {_term(S_MAX)}",
        f"- {_term(LOW_CONFIDENCE)} Then the multimodal model (when there is one) looks closer.",
        f"- {_term(CAAS)}",
        f"- {_term(DBT)}",
        "- The heatmap shows where the image looks unusual; the boxes are its most unusual regions.",
        "- The template is the good reference most similar to this image.",
    ]
)


def verdict_reason(result: InspectionResult) -> str:
    """Why the verdict is what it is, in words (expert sure / unsure, and what the model did)."""
    if result.score is None or result.tau is None:  # a declared line without a bank: the MLLM alone, 0-shot
        return "No bank yet: the verdict is the multimodal model's alone, 0-shot (no template, no expert hints)."
    above = result.score > result.tau
    if result.low_confidence:
        expert = (
            f"The expert is unsure: the score {result.score:.4g} lies between τ {result.tau:.4g} and "
            f"s_max {result.s_max:.4g}"
        )
    elif above:
        expert = f"The expert is sure: the score {result.score:.4g} is above τ {result.tau:.4g} (and s_max)"
    else:
        expert = f"The expert is sure: the score {result.score:.4g} is below τ {result.tau:.4g}, like your good parts"
    if result.mode != "expert+mllm":
        return expert + "; the verdict is the expert's (no multimodal model here)."
    closer = " with CAAS" + (f" (α = {result.caas_alpha:g})" if result.caas_alpha is not None else "")
    if result.low_confidence:
        model = ", so the model looked closer" + (closer if result.caas_applied else "")
    else:
        model = ", and the model checked" + (closer if result.caas_applied else "")
    agrees = (result.verdict == "defect") == (result.expert_decision == "anomalous")
    if result.verdict == "unknown":
        outcome = "; its answer could not be read, so the verdict is unsure."
    elif agrees:
        outcome = "; it agrees with the expert."
    else:
        outcome = "; it overruled the expert."
    return expert + model + outcome


def timings_markdown(timings_ms: dict[str, float]) -> str:
    """The timings as a small table (stage, ms) with the total (measured when given, else the sum)."""
    if not timings_ms:
        return ""
    stages = {k: v for k, v in timings_ms.items() if k != "total"}
    total = timings_ms.get("total", sum(stages.values()))
    rows = [f"| {stage} | {ms:.1f} |" for stage, ms in stages.items()]
    return "\n".join(["| stage | ms |", "|---|---:|", *rows, f"| **total** | **{total:.1f}** |"])
