"""Configuration of the multimodal LLM layer: plain pydantic models, owned by this package.

The application composes them into its settings root (``EAGLE_MLLM__*``, ``EAGLE_CAAS__*``,
``EAGLE_PROMPT__*``); this package reads no environment and imports nothing from the layers above.

:data:`PromptSetting` is the one vocabulary of prompt settings (paper Table 3): which hints the
MLLM gets. Every other module imports it from here, as it does this package's other vocabularies (answer parsers,
CAAS policies, modes and tokens, the model's answers, quantizations).

Example:
    >>> from mllm.config import CAASSettings, PromptSettings, PROMPT_SETTINGS
    >>> CAASSettings(alpha=0.5).alpha
    0.5
    >>> PromptSettings().setting
    'full'
    >>> PROMPT_SETTINGS
    ('baseline', 'visual', 'visual_all', 'textual', 'full')
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ANSWER_PARSERS",
    "ANSWERS",
    "PROMPT_SETTINGS",
    "Answer",
    "AnswerParser",
    "CAASMode",
    "CAASPolicy",
    "CAASSettings",
    "CAASTokens",
    "Instruction",
    "InspectorSettings",
    "MLLMSettings",
    "PromptSetting",
    "PromptSettings",
    "Quantization",
    "QuantizationSetting",
]

PromptSetting = Literal["baseline", "visual", "visual_all", "textual", "full"]
"""Which hints the MLLM gets: none, the visual prompt, the textual prompt, or both (paper Table 3).

``visual`` sends the boxed image only when the expert says anomalous (ours); ``visual_all`` sends it for every
image, normal ones included (the paper's Table 3 visual-only row, §4.3, and the reference code's path without the
textual prior)."""

Instruction = Literal["paper", "reference"]
"""The instruction text: the paper's fixed one (``instruction_P``) or the one the reference's eval path passes
(``instruction_sample``)."""

AnswerParser = Literal["eagle", "reference", "keyword"]
"""How a reply is read: ours (letter, else keywords, else unknown), the reference's (last standalone A-E, else the
closest option text by difflib), or the paper's keyword reading (yes / abnormal / defect words first)."""

ANSWER_PARSERS: tuple[AnswerParser, ...] = get_args(AnswerParser)
"""The answer parsers, in their canonical order."""

PROMPT_SETTINGS: tuple[PromptSetting, ...] = get_args(PromptSetting)
"""The prompt settings in their canonical order (for choices in CLIs and UIs)."""

CAASPolicy = Literal["auto", "off", "on"]
"""When CAAS scales attention: ``auto`` (iff tau <= s_img <= s_max), never, or always."""

CAASMode = Literal["logit", "weight", "weight_raw"]
"""How CAAS scales: the pre-softmax logits, or the post-softmax weights (renormalised or raw)."""

CAASTokens = Literal["all", "query"]
"""Which visual tokens CAAS scales: every image's, or the query image's only."""

Answer = Literal["yes", "no", "unknown"]
"""The model's answer to "is there any defect?" (``unknown``: the reply could not be read). Defined here, with the
other vocabularies, so that the inspection record can name it without importing the parsers (:mod:`mllm.answers`)."""

ANSWERS: tuple[Answer, ...] = get_args(Answer)

Quantization = Literal["4bit", "8bit", "bf16", "fp32"]
"""How the model's weights are loaded (:func:`mllm.loading.resolve_quantization` resolves ``auto``)."""

QuantizationSetting = Literal["auto", Quantization]
"""The ``quantization`` setting: a :data:`Quantization`, or ``auto`` (4-bit on CUDA, fp32 on a CPU-only host)."""


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MLLMSettings(_Group):
    """The multimodal LLM: model, quantisation, device and generation lengths."""

    enabled: bool = Field(True, description="False: expert-only mode, the MLLM stack is never imported.")
    preset: str = Field("qwen2.5-vl-7b", description="Model preset name (see `mllm.presets`).")
    model_id: str | None = Field(None, description="Hub id or local directory; overrides the preset's hub id.")
    quantization: QuantizationSetting = Field(
        "auto", description="auto: 4-bit NF4 on CUDA, fp32 on a CPU-only host (with a warning)."
    )
    attn_implementation: str = Field("sdpa")
    device: str = Field("auto", description="auto, cuda, cuda:N or cpu.")
    trust_remote_code: bool = Field(False, description="Needed by presets with remote code (MiniCPM-V). Opt-in.")
    max_pixels: int | None = Field(
        None,
        ge=28 * 28,
        description="Pixel budget of EVERY image sent (template, query, boxed query: min = max = this for "
        "Qwen2.5-VL); None: the preset's (Qwen2.5-VL: 512*28*28, as the reference code).",
    )
    max_new_tokens: int = Field(8, ge=1)
    explanation_max_new_tokens: int = Field(160, ge=8)


class CAASSettings(_Group):
    """Confidence-Aware Attention Scaling (:mod:`mllm.caas`)."""

    policy: CAASPolicy = Field("auto", description="auto: active iff tau <= s_img <= s_max.")
    mode: CAASMode = Field("logit")
    alpha: float = Field(0.6, ge=0.0)
    layer_start: int = Field(9, ge=0, description="First decoder layer (0-based, inclusive).")
    layer_end: int = Field(15, ge=0, description="Last decoder layer (0-based, inclusive).")
    tokens: CAASTokens = Field("all", description="Visual tokens scaled: every image's or the query's.")

    @model_validator(mode="after")
    def _check(self) -> CAASSettings:
        if self.layer_end < self.layer_start:
            raise ValueError(f"layer_end ({self.layer_end}) < layer_start ({self.layer_start})")
        return self


class PromptSettings(_Group):
    """Which hints the MLLM gets (paper Table 3 settings) and whether it explains."""

    setting: PromptSetting = Field("full")
    explain: bool = Field(False, description="Ask a second turn for the defect's type, location and cause.")
    instruction: Instruction = Field(
        "paper", description="paper: the paper's fixed instruction; reference: the reference eval path's text."
    )
    template: bool = Field(True, description="Send the 1-shot+ normal template (False: 0-shot, the reference run).")
    answer_parser: AnswerParser = Field("eagle", description="eagle, reference or keyword (see mllm.answers).")


class InspectorSettings(Protocol):
    """What :class:`mllm.inspector.MLLMInspector` reads from the settings it is handed.

    The application's settings root satisfies it; so does any object with these two groups.
    """

    @property
    def mllm(self) -> MLLMSettings:
        """The model group (``max_new_tokens``, ``explanation_max_new_tokens``)."""
        ...

    @property
    def caas(self) -> CAASSettings:
        """The CAAS group (layer range, alpha, mode)."""
        ...
