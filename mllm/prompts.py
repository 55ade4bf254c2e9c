"""The EAGLE prompt for the ablation settings: the reference code's payload, rendered with the model's chat template.

One user turn (no system message: the model's chat template adds its own default, as in the reference run), whose
content is, in order::

    INSTRUCTION                      the paper's fixed instruction (appendix 6.3.1), never rewritten
                                     (``instruction="reference"``: :data:`INSTRUCTION_REFERENCE` instead)
    ANSWER_LINE                      "Answer with the option's letter from the given choices directly! "
    TEMPLATE_TEXT, <template image>  the 1-shot+ normal template (omitted only when no template is given)
    <query text>, <query image>      QUERY_TEXT (no textual prior) or QUERY_NORMAL_TEXT / QUERY_ANOMALOUS_TEXT
    BOXED_TEXT, <boxed image>        ``visual``/``full``: only when the expert says anomalous; ``visual_all``: always
    QUESTION_LIST                    "Following is the question list: Question 1: <question>", options on own lines

Settings (the paper's Table 3/4) × the expert's verdict:

==============  ===============================  ======================  ======================
setting         query text                       boxed image + sentence  verdict used
==============  ===============================  ======================  ======================
``baseline``    :data:`QUERY_TEXT`               never                   no (may be ``None``)
``visual``      :data:`QUERY_TEXT`               iff anomalous           yes
``visual_all``  :data:`QUERY_TEXT`               always                  no (may be ``None``)
``textual``     normal / anomalous query text    never                   yes
``full``        normal / anomalous query text    iff anomalous           yes
==============  ===============================  ======================  ======================

Every image reaches the model at the same pixel budget: the processor is pinned to the preset's budget
(:func:`mllm.presets.apply_pixel_budget`) and the template is brought to the query's size when it has the query's
shape (:func:`fit_template`), so template, query and boxed query (drawn on the query) get the same token grid.

Where the strings come from (``docs/fidelity.md`` has the whole comparison):

- The texts are the reference code's, character for character (``Eagle/bin/models/mllm_base.py``
  ``processor_framework``/``create_prompt_qwen``; the template sentence from ``evaluation/eval_set.py``; the
  question list as MMAD's ``parse_conversation`` formats it, joined and stripped as the reference does). The
  instruction is the paper's (the reference's ``instruction_P``, with its line breaks).
- The instruction mentions a template image, a query image and a boxed query image whatever is sent: it is the
  paper's *fixed* instruction and the reference sends it unchanged too; the per-image sentences say what each
  image is.
- The reference builds the template block and then drops it (``eval_set.py`` never passes it on); EAGLE's 1-shot+
  setting sends it, where it was built: before the query block.
- The reference sends the boxed image without the textual prior whenever its boxes exist; the paper (3.2.3) gives
  visual prompts only for images the expert calls anomalous, and so do we.
- ``visual_all`` is the paper's Table 3 visual-only row (§4.3: "the expert model generates anomaly maps for all
  images, including normal samples") and the reference's path without the textual prior (status off), which sends
  the boxed copy whatever the verdict; ``visual`` is ours, gated on the verdict like ``full``.
- The texts per backbone family (:class:`PromptTexts`, :func:`prompt_texts`): the reference's Qwen path
  (``create_prompt_qwen``) for every family but InternVL, whose texts are the reference's InternVL strings
  (``Connector.create_prompt`` in ``connector_sort.py``: its ``<image>`` placeholders become image parts).
- Images are numbered the way the reference renders them (``add_vision_id=True``: "Picture 1: " ...) where the
  chat template supports it (Qwen); other templates ignore the flag.

Example:
    >>> from PIL import Image
    >>> img = Image.new("RGB", (64, 64))
    >>> prompt = build_prompt(query=img, template=img, boxed=None, expert_anomalous=False, setting="full")
    >>> prompt.query_index, len(prompt.images), prompt.boxed_included
    (1, 2, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from mllm.choices import MultipleChoice
from mllm.config import PROMPT_SETTINGS, PromptSetting
from mllm.errors import MLLMError

if TYPE_CHECKING:
    from transformers import BatchFeature

    from mllm.loading import LoadedMLLM

__all__ = [
    "ANSWER_LINE",
    "BOXED_TEXT",
    "INSTRUCTION",
    "INSTRUCTION_REFERENCE",
    "INTERNVL_TEXTS",
    "OPTIONS",
    "QUERY_ANOMALOUS_TEXT",
    "QUERY_NORMAL_TEXT",
    "QUERY_TEXT",
    "QUESTION",
    "QUESTION_LIST",
    "QWEN_TEXTS",
    "SETTINGS",
    "TEMPLATE_TEXT",
    "EaglePrompt",
    "PromptError",
    "PromptTexts",
    "Setting",
    "build_explanation_messages",
    "build_prompt",
    "fit_template",
    "image_token_counts",
    "prompt_texts",
    "render_inputs",
    "render_text",
]

Setting = PromptSetting
"""Alias of :data:`mllm.config.PromptSetting` (the one definition)."""
SETTINGS: tuple[Setting, ...] = PROMPT_SETTINGS

INSTRUCTION = (
    "\nYou are my industrial image inspection assistant. You will receive multiple images simultaneously, \n"
    "including a template image, a query image, and a query image with red bounding boxes. Based on the input "
    "images and the accompanying textual information, answer the given question. The question is multiple-choice. "
    "\nRespond only with the letter of the correct option (e.g., A, B, C, or D). Do not include explanations or "
    "extra text.\n"
)
"""The paper's fixed instruction (appendix 6.3.1) as the reference code writes it (``instruction_P``)."""
INSTRUCTION_REFERENCE = (
    "\nYou are an industrial inspector who checks products by images.\n"
    "You should judge whether there is a defect in the query image and answer the questions about it.\n "
)
"""The instruction the reference's eval path actually passes (``instruction_sample`` in ``GPT4/gpt4v.py``, handed to
``processor_framework`` by ``QwenQuery.get_query``), character for character (the final line holds one space)."""
INSTRUCTIONS = {"paper": INSTRUCTION, "reference": INSTRUCTION_REFERENCE}
ANSWER_LINE = "Answer with the option's letter from the given choices directly! "
TEMPLATE_TEXT = (
    "Following is/are 1 image of normal sample, which can be used as a template to compare the image being queried."
)
QUERY_TEXT = "Following is the query image:"
QUERY_NORMAL_TEXT = "Following is the query image. The query image is predicted as normal."
QUERY_ANOMALOUS_TEXT = "Following is the query image. The query image is predicted as anomalous."
BOXED_TEXT = (
    "Following is the query image with red bounding box. "
    "The position of the red bounding box on the query image is the predicted defect location."
)


@dataclass(frozen=True)
class PromptTexts:
    """The sentences that introduce the query and the boxed query, for one backbone family.

    Attributes:
        query: The query sentence without the textual prior.
        query_normal: The query sentence with the prior "normal".
        query_anomalous: The query sentence with the prior "anomalous".
        boxed: The sentence before the boxed query.
    """

    query: str
    query_normal: str
    query_anomalous: str
    boxed: str


QWEN_TEXTS = PromptTexts(QUERY_TEXT, QUERY_NORMAL_TEXT, QUERY_ANOMALOUS_TEXT, BOXED_TEXT)
"""The reference's Qwen path (``create_prompt_qwen``); used by every family but InternVL."""
INTERNVL_TEXTS = PromptTexts(
    query="Following is the query image: \n",
    query_normal="\nFollowing is the query image, The query image is predicted as normal: \n",
    query_anomalous="Following is the query image,The query image is predicted as anomalous: \n",
    boxed=" \nFollowing is the query image with red bounding box, The position of the red bounding box on the query "
    "image is the predicted defect location.\n",
)
"""The reference's InternVL strings (``Connector.create_prompt``), split at their ``<image>`` placeholders: each
text is what precedes its image; the space the reference leaves after the last image is dropped."""


def prompt_texts(family: str | None) -> PromptTexts:
    """The query/boxed sentences for a backbone family (:data:`INTERNVL_TEXTS` for ``internvl``, else Qwen's)."""
    return INTERNVL_TEXTS if family == "internvl" else QWEN_TEXTS


QUESTION = "Is there any defect in the object?"
OPTIONS = ("A. Yes", "B. No")
QUESTION_LIST = f"Following is the question list: Question 1: {QUESTION} \n" + "\n".join(OPTIONS)
"""MMAD's question as the reference formats it: "Question 1: <q> " then one option per line, stripped."""

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


class PromptError(MLLMError, ValueError):
    """The prompt cannot be built from the given inputs (one-line message)."""

    code = "invalid_prompt"


@dataclass
class EaglePrompt:
    """A chat in the processor's message format plus the images its image placeholders stand for.

    Attributes:
        messages: One user message (``{"role": "user", "content": [{"type": "text", "text"} | {"type": "image"}]}``).
        images: The images in placeholder order: (template), query, (boxed query).
        query_index: Position of the query image in ``images`` (CAAS query-only mode selects its tokens).
        setting: The ablation setting the prompt was built for.
        boxed_included: Whether the boxed query image is among ``images``.
        template_included: Whether the template image is among ``images``.
        query_text: The sentence introducing the query image (it carries the textual prior, if any).
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image]
    query_index: int
    setting: Setting
    boxed_included: bool
    template_included: bool = True
    query_text: str = QUERY_TEXT


def _rgb(image: Any, name: str) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise PromptError(f"{name} image must be a PIL image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


TEMPLATE_ASPECT_TOLERANCE = 0.02
"""Relative aspect-ratio difference under which the template is brought to the query's size."""


def fit_template(template: Image.Image, query: Image.Image) -> Image.Image:
    """The template at the query's size when both have the same shape (aspect ratios within 2 %), else as it is.

    The processor brings every image to the same pixel budget, but its rounding to whole tokens depends on the
    size it starts from (an upscaled 512-px thumbnail ends on another token grid than a downscaled 1024-px query).
    Starting from the same size, the template, the query and the boxed query (drawn on the query) map onto the
    same token grid. Resampling is bicubic.
    """
    if template.size == query.size:
        return template
    (tw, th), (qw, qh) = template.size, query.size
    if min(tw, th, qw, qh) < 1 or abs(tw / th - qw / qh) > TEMPLATE_ASPECT_TOLERANCE * (qw / qh):
        return template
    return template.resize(query.size, Image.Resampling.BICUBIC)


def build_prompt(
    *,
    query: Image.Image,
    template: Image.Image | None,
    boxed: Image.Image | None,
    expert_anomalous: bool | None,
    setting: Setting,
    question: MultipleChoice | None = None,
    instruction: str = "paper",
    texts: PromptTexts = QWEN_TEXTS,
) -> EaglePrompt:
    """Build the EAGLE message for one query image (see the module docstring for the layout).

    Args:
        query: The image under inspection.
        template: The 1-shot+ normal template image; ``None`` sends no template block (0-shot). Brought to the
            query's size when it has the query's shape (:func:`fit_template`).
        boxed: The query image with the expert's red boxes; needed by ``visual``/``full`` when the expert
            says anomalous and by ``visual_all`` always, ignored otherwise.
        expert_anomalous: The expert's verdict (``s_img >= tau``); may be ``None`` for ``baseline``/``visual_all``.
        setting: ``baseline``, ``visual``, ``visual_all``, ``textual`` or ``full``.
        question: A data set's own multiple-choice question (MMAD), shown verbatim in its letter order in place
            of :data:`QUESTION_LIST` (:meth:`mllm.choices.MultipleChoice.question_list`); ``None``: the yes/no one.
        instruction: ``paper`` (:data:`INSTRUCTION`) or ``reference`` (:data:`INSTRUCTION_REFERENCE`).
        texts: The query/boxed sentences (:func:`prompt_texts` of the model's family).

    Returns:
        The :class:`EaglePrompt`.

    Raises:
        PromptError: unknown setting, a missing expert verdict or boxed image the setting needs, or a non-image.
    """
    if setting not in SETTINGS:
        raise PromptError(f"unknown prompt setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    if instruction not in INSTRUCTIONS:
        raise PromptError(f"unknown instruction {instruction!r}; expected one of {', '.join(INSTRUCTIONS)}")
    if setting not in ("baseline", "visual_all") and expert_anomalous is None:
        raise PromptError(f"prompt setting {setting!r} needs the expert's verdict (expert_anomalous)")
    include_boxed = setting == "visual_all" or (setting in ("visual", "full") and bool(expert_anomalous))
    if include_boxed and boxed is None:
        needs = "always needs" if setting == "visual_all" else "with an anomalous expert verdict needs"
        raise PromptError(f"prompt setting {setting!r} {needs} the boxed image")
    if setting in ("textual", "full"):
        query_text = texts.query_anomalous if expert_anomalous else texts.query_normal
    else:
        query_text = texts.query
    content: list[dict[str, Any]] = [
        {"type": "text", "text": INSTRUCTIONS[instruction]},
        {"type": "text", "text": ANSWER_LINE},
    ]
    images: list[Image.Image] = []
    query_rgb = _rgb(query, "query")
    if template is not None:
        content += [{"type": "text", "text": TEMPLATE_TEXT}, {"type": "image"}]
        images.append(fit_template(_rgb(template, "template"), query_rgb))
    content += [{"type": "text", "text": query_text}, {"type": "image"}]
    query_index = len(images)
    images.append(query_rgb)
    if include_boxed:
        content += [{"type": "text", "text": texts.boxed}, {"type": "image"}]
        images.append(_rgb(boxed, "boxed"))
    content.append({"type": "text", "text": QUESTION_LIST if question is None else question.question_list()})
    return EaglePrompt(
        messages=[{"role": "user", "content": content}],
        images=images,
        query_index=query_index,
        setting=setting,
        boxed_included=include_boxed,
        template_included=template is not None,
        query_text=query_text,
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
    """The chat as the model sees it: the processor's chat template with the generation prompt appended.

    Images are numbered ("Picture 1: ") where the template supports it, as the reference renders them.
    """
    text: str = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, add_vision_id=True)
    return text


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

    Every image goes through the same processor settings, i.e. the preset's pixel budget (see
    :func:`mllm.presets.apply_pixel_budget`). Floating-point tensors (``pixel_values``) take the model's dtype;
    integer tensors keep theirs.

    Raises:
        PromptError: the number of images differs from the number of image placeholders in ``messages``.
    """
    expected = _count_images(messages)
    if expected != len(images):
        raise PromptError(f"the messages hold {expected} image placeholder(s) but {len(images)} image(s) were given")
    text = render_text(loaded.processor, messages)
    batch: BatchFeature = loaded.processor(text=[text], images=list(images) or None, return_tensors="pt")
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(loaded.device)
            batch[key] = value.to(loaded.dtype) if value.is_floating_point() else value
    return batch


def image_token_counts(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Visual tokens per image of a one-row prompt, in image order (each image is one contiguous run).

    Example:
        >>> image_token_counts(torch.tensor([[5, 9, 9, 6, 9, 9, 7]]), 9)
        [2, 2]
    """
    row = input_ids.reshape(-1) if input_ids.ndim == 1 or input_ids.shape[0] == 1 else input_ids[0]
    is_image = (row == image_token_id).to(torch.int8).tolist()
    counts: list[int] = []
    previous = 0
    for flag in is_image:
        if flag and not previous:
            counts.append(0)
        if flag:
            counts[-1] += 1
        previous = flag
    return counts
