"""The EAGLE prompt (paper appendix 6.3.1) for the ablation settings, rendered with the model's own chat template.

Message layout — a system message, then one user message holding the images in order and one text::

    system: SYSTEM_PROMPT (three images) or SYSTEM_PROMPT_TWO_IMAGES (no boxed image)
    user:   [template image] [query image] ([boxed query image]) text
            text = one line each: <prior, if any> / ANSWER_INSTRUCTION / QUESTION / "A. Yes" / "B. No"

Settings (the paper's Table 3/4):

============  ==========================  ==============================================
setting       boxed query image           textual prior
============  ==========================  ==============================================
``baseline``  never                       none
``visual``    only if expert anomalous    none
``textual``   never                       anomalous: :data:`ABNORMAL_PRIOR_TEXT_ONLY`;
                                          normal: :data:`NORMAL_PRIOR`
``full``      only if expert anomalous    anomalous: :data:`ABNORMAL_PRIOR`; normal: :data:`NORMAL_PRIOR`
============  ==========================  ==============================================

Wording decisions (the paper's texts are copied verbatim; where they would be false they are cut, never
reworded):

- Visual prompts are given only for images the expert predicts anomalous (paper 3.2). When no boxed image is
  sent, the system text's list of images drops "and a query image with red bounding boxes"
  (:data:`SYSTEM_PROMPT_TWO_IMAGES`) so it never promises three images.
- The abnormal prior's second sentence points at the red box; in ``textual`` there is no boxed image, so only
  its first sentence is sent (:data:`ABNORMAL_PRIOR_TEXT_ONLY`).
- The paper prints the question tail as "... directly! Is there any defect in the object? A. Yes. B. No."; the
  parts are sent on separate lines with the options as "A. Yes" / "B. No" (the dots between them are list
  separators in the paper's one-line rendering).
- The appendix labels its two textual prompts the wrong way round ("Normal Prompt" holds the anomalous text);
  they are used by meaning.

Example:
    >>> from PIL import Image
    >>> img = Image.new("RGB", (64, 64))
    >>> prompt = build_prompt(query=img, template=img, boxed=None, expert_anomalous=False, setting="full")
    >>> prompt.query_index, len(prompt.images), prompt.boxed_included
    (1, 2, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image

if TYPE_CHECKING:
    from transformers import BatchFeature

    from mllm.loading import LoadedMLLM

__all__ = [
    "ABNORMAL_PRIOR",
    "ABNORMAL_PRIOR_TEXT_ONLY",
    "ANSWER_INSTRUCTION",
    "NORMAL_PRIOR",
    "OPTIONS",
    "QUESTION",
    "SETTINGS",
    "SYSTEM_PROMPT",
    "SYSTEM_PROMPT_TWO_IMAGES",
    "EaglePrompt",
    "PromptError",
    "Setting",
    "build_explanation_messages",
    "build_prompt",
    "render_inputs",
    "render_text",
]

Setting = Literal["baseline", "visual", "textual", "full"]
SETTINGS: tuple[Setting, ...] = ("baseline", "visual", "textual", "full")

_SYSTEM_HEAD = "You are my industrial image inspection assistant. You will receive multiple images simultaneously, "
_SYSTEM_TAIL = (
    "Based on the input images and the accompanying textual information, answer the given question. "
    "The question is multiple-choice. Respond only with the letter of the correct option (e.g., A, B, C, or D). "
    "Do not include explanations or extra text."
)
SYSTEM_PROMPT = (
    _SYSTEM_HEAD
    + "including a template image, a query image, and a query image with red bounding boxes. "
    + _SYSTEM_TAIL
)
"""The paper's system instruction, verbatim (sent when the boxed query image is included)."""
SYSTEM_PROMPT_TWO_IMAGES = _SYSTEM_HEAD + "including a template image and a query image. " + _SYSTEM_TAIL
"""The same instruction with the boxed image struck from the list (sent when no boxed image is included)."""

ABNORMAL_PRIOR = (
    "The query image is predicted as anomalous. "
    "The position of the red bounding box on the query image is the predicted defect location."
)
ABNORMAL_PRIOR_TEXT_ONLY = "The query image is predicted as anomalous."
NORMAL_PRIOR = "The query image is predicted as normal."
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly!"
QUESTION = "Is there any defect in the object?"
OPTIONS = ("A. Yes", "B. No")

_EXPLAIN_DEFECT = (
    "Now explain your answer in 2-3 short sentences of plain text (the letter-only rule does not apply to this "
    "reply): name the type of defect, where it is on the object in the query image, and its most likely cause."
)
_EXPLAIN_NORMAL = (
    "Now explain your answer in 2-3 short sentences of plain text (the letter-only rule does not apply to this "
    "reply): say which parts of the object you compared with the template image and why the query image looks "
    "normal."
)
_EXPLAIN_UNKNOWN = (
    "Now answer in 2-3 short sentences of plain text (the letter-only rule does not apply to this reply): do you "
    "see any defect in the query image? If so, name its type, where it is, and its most likely cause."
)


class PromptError(ValueError):
    """The prompt cannot be built from the given inputs (one-line message)."""


@dataclass
class EaglePrompt:
    """A chat in the processor's message format plus the images its image placeholders stand for.

    Attributes:
        messages: Chat messages (``{"role", "content": [{"type": "image"} | {"type": "text", "text"}]}``).
        images: The images in placeholder order: template, query, (boxed query).
        query_index: Position of the query image in ``images`` (CAAS query-only mode selects its tokens).
        setting: The ablation setting the prompt was built for.
        boxed_included: Whether the boxed query image is among ``images``.
        prior: The textual prior sent, or ``None``.
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image]
    query_index: int
    setting: Setting
    boxed_included: bool
    prior: str | None = None


def _rgb(image: Any, name: str) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise PromptError(f"{name} image must be a PIL image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def build_prompt(
    *,
    query: Image.Image,
    template: Image.Image,
    boxed: Image.Image | None,
    expert_anomalous: bool | None,
    setting: Setting,
) -> EaglePrompt:
    """Build the EAGLE message for one query image.

    Args:
        query: The image under inspection.
        template: The most similar normal reference image (the paper's 1-shot+ template).
        boxed: The query image with the expert's red boxes; needed by ``visual``/``full`` when the expert
            says anomalous, ignored otherwise.
        expert_anomalous: The expert's verdict (``s_img >= tau``); may be ``None`` only for ``baseline``.
        setting: ``baseline``, ``visual``, ``textual`` or ``full``.

    Returns:
        The :class:`EaglePrompt`.

    Raises:
        PromptError: unknown setting, a missing expert verdict or boxed image the setting needs, or a non-image.
    """
    if setting not in SETTINGS:
        raise PromptError(f"unknown prompt setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    if setting != "baseline" and expert_anomalous is None:
        raise PromptError(f"prompt setting {setting!r} needs the expert's verdict (expert_anomalous)")
    images = [_rgb(template, "template"), _rgb(query, "query")]
    include_boxed = setting in ("visual", "full") and bool(expert_anomalous)
    if include_boxed:
        if boxed is None:
            raise PromptError(f"prompt setting {setting!r} with an anomalous expert verdict needs the boxed image")
        images.append(_rgb(boxed, "boxed"))
    prior: str | None = None
    if setting == "textual":
        prior = ABNORMAL_PRIOR_TEXT_ONLY if expert_anomalous else NORMAL_PRIOR
    elif setting == "full":
        prior = ABNORMAL_PRIOR if expert_anomalous else NORMAL_PRIOR
    lines = ([prior] if prior else []) + [ANSWER_INSTRUCTION, QUESTION, *OPTIONS]
    system = SYSTEM_PROMPT if include_boxed else SYSTEM_PROMPT_TWO_IMAGES
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": "\n".join(lines)})
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": content},
    ]
    return EaglePrompt(
        messages=messages, images=images, query_index=1, setting=setting, boxed_included=include_boxed, prior=prior
    )


def build_explanation_messages(prompt: EaglePrompt, answer_text: str, answer: str) -> list[dict[str, Any]]:
    """Extend the first turn with the model's reply and a request for a short explanation.

    Args:
        prompt: The first-turn prompt.
        answer_text: The model's raw first reply (e.g. ``"A"``), kept as the assistant turn.
        answer: The parsed answer: ``yes`` asks for the defect's type, location and likely cause; ``no`` asks what
            was checked and why it looks normal; ``unknown`` asks the question openly.

    Returns:
        New messages (the prompt's own list is not modified); the images are the prompt's.
    """
    follow_up = {"yes": _EXPLAIN_DEFECT, "no": _EXPLAIN_NORMAL}.get(answer, _EXPLAIN_UNKNOWN)
    return [
        *prompt.messages,
        {"role": "assistant", "content": [{"type": "text", "text": answer_text.strip() or "?"}]},
        {"role": "user", "content": [{"type": "text", "text": follow_up}]},
    ]


def render_text(processor: Any, messages: list[dict[str, Any]]) -> str:
    """The chat as the model sees it: the processor's chat template with the generation prompt appended."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _count_images(messages: list[dict[str, Any]]) -> int:
    return sum(
        1
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image"
    )


def render_inputs(loaded: LoadedMLLM, messages: list[dict[str, Any]], images: list[Image.Image]) -> BatchFeature:
    """Tokenise the chat and preprocess the images into model inputs on the model's device.

    Floating-point tensors (``pixel_values``) take the model's dtype; integer tensors keep theirs.

    Raises:
        PromptError: the number of images differs from the number of image placeholders in ``messages``.
    """
    expected = _count_images(messages)
    if expected != len(images):
        raise PromptError(f"the messages hold {expected} image placeholder(s) but {len(images)} image(s) were given")
    text = render_text(loaded.processor, messages)
    batch = loaded.processor(text=[text], images=list(images) or None, return_tensors="pt")
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(loaded.device)
            batch[key] = value.to(loaded.dtype) if value.is_floating_point() else value
    return batch
