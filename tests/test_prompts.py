"""The EAGLE prompt: the reference code's payload per setting × expert verdict, literally, and one pixel budget.

The expected texts below are typed out from the reference repository (shengtun/Eagle: ``Eagle/bin/models/
mllm_base.py`` ``processor_framework`` + ``create_prompt_qwen``, ``evaluation/eval_set.py``, ``GPT4/gpt4v.py``
``instruction_P`` and ``parse_conversation``), independently of ``mllm/prompts.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from eagle.settings import MLLMSettings
from mllm.loading import load_mllm
from mllm.prompts import (
    INSTRUCTION,
    SETTINGS,
    PromptError,
    build_explanation_messages,
    build_prompt,
    fit_template,
    image_token_counts,
    render_inputs,
    render_text,
)

torch.set_num_threads(1)

# The reference's instruction_P (= the paper's appendix 6.3.1 instruction), line breaks included.
REF_INSTRUCTION = (
    "\nYou are my industrial image inspection assistant. You will receive multiple images simultaneously, \n"
    "including a template image, a query image, and a query image with red bounding boxes. Based on the input images "
    "and the accompanying textual information, answer the given question. The question is multiple-choice. \n"
    "Respond only with the letter of the correct option (e.g., A, B, C, or D). Do not include explanations or extra "
    "text.\n"
)
PAPER_INSTRUCTION = (
    "You are my industrial image inspection assistant. You will receive multiple images simultaneously, including a "
    "template image, a query image, and a query image with red bounding boxes. Based on the input images and the "
    "accompanying textual information, answer the given question. The question is multiple-choice. Respond only "
    "with the letter of the correct option (e.g., A, B, C, or D). Do not include explanations or extra text."
)
ANSWER = "Answer with the option's letter from the given choices directly! "
TEMPLATE = (
    "Following is/are 1 image of normal sample, which can be used as a template to compare the image being queried."
)
QUERY_PLAIN = "Following is the query image:"
QUERY_NORMAL = "Following is the query image. The query image is predicted as normal."
QUERY_ANOMALOUS = "Following is the query image. The query image is predicted as anomalous."
BOXED = (
    "Following is the query image with red bounding box. The position of the red bounding box on the query image is "
    "the predicted defect location."
)
QUESTIONS = "Following is the question list: Question 1: Is there any defect in the object? \nA. Yes\nB. No"


def _picture(n: int) -> str:
    return f"Picture {n}: <|vision_start|><|image_pad|><|vision_end|>"


def _qwen(*parts: str) -> str:
    """The reference's one user turn through Qwen2.5-VL's chat template (default system, add_vision_id=True)."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + "".join(parts)
        + "<|im_end|>\n<|im_start|>assistant\n"
    )


# (setting, expert verdict) -> (rendered chat, number of images). Verdict None = no expert (baseline only).
BASELINE = _qwen(REF_INSTRUCTION, ANSWER, TEMPLATE, _picture(1), QUERY_PLAIN, _picture(2), QUESTIONS)
EXPECTED = {
    ("baseline", None): (BASELINE, 2),
    ("baseline", True): (BASELINE, 2),
    ("baseline", False): (BASELINE, 2),
    ("visual", True): (
        _qwen(REF_INSTRUCTION, ANSWER, TEMPLATE, _picture(1), QUERY_PLAIN, _picture(2), BOXED, _picture(3), QUESTIONS),
        3,
    ),
    ("visual", False): (BASELINE, 2),
    # the paper's Table 3 visual-only row: the boxed image whatever the expert says, no prior
    **{
        ("visual_all", verdict): (
            _qwen(
                REF_INSTRUCTION, ANSWER, TEMPLATE, _picture(1), QUERY_PLAIN, _picture(2), BOXED, _picture(3), QUESTIONS
            ),
            3,
        )
        for verdict in (None, True, False)
    },
    ("textual", True): (
        _qwen(REF_INSTRUCTION, ANSWER, TEMPLATE, _picture(1), QUERY_ANOMALOUS, _picture(2), QUESTIONS),
        2,
    ),
    ("textual", False): (
        _qwen(REF_INSTRUCTION, ANSWER, TEMPLATE, _picture(1), QUERY_NORMAL, _picture(2), QUESTIONS),
        2,
    ),
    ("full", True): (
        _qwen(
            REF_INSTRUCTION, ANSWER, TEMPLATE, _picture(1), QUERY_ANOMALOUS, _picture(2), BOXED, _picture(3), QUESTIONS
        ),
        3,
    ),
    ("full", False): (
        _qwen(REF_INSTRUCTION, ANSWER, TEMPLATE, _picture(1), QUERY_NORMAL, _picture(2), QUESTIONS),
        2,
    ),
}


def _image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


TEMPLATE_IMG, QUERY_IMG, BOXED_IMG = _image(1), _image(2), _image(3)


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    # 56·56 px per image: a 64-px image is one 2×2 token grid, cheap on the shared CPU host
    return load_mllm(MLLMSettings(model_id=str(tiny_qwen_dir), max_pixels=56 * 56))


def test_instruction_is_the_papers_and_the_references():
    assert INSTRUCTION == REF_INSTRUCTION
    assert " ".join(INSTRUCTION.split()) == PAPER_INSTRUCTION


@pytest.mark.parametrize(("setting", "anomalous"), list(EXPECTED))
def test_the_reference_payload_per_setting_and_verdict(qwen, setting, anomalous):
    prompt = build_prompt(
        query=QUERY_IMG, template=TEMPLATE_IMG, boxed=BOXED_IMG, expert_anomalous=anomalous, setting=setting
    )
    expected, count = EXPECTED[(setting, anomalous)]
    assert render_text(qwen.processor, prompt.messages) == expected
    assert [m["role"] for m in prompt.messages] == ["user"]  # one user turn, no system-prompt variants
    assert prompt.messages[0]["content"][0] == {"type": "text", "text": REF_INSTRUCTION}  # the same in every case
    assert len(prompt.images) == count and prompt.boxed_included == (count == 3)
    assert prompt.images[0] is TEMPLATE_IMG and prompt.images[prompt.query_index] is QUERY_IMG
    assert prompt.query_index == 1
    if count == 3:
        assert prompt.images[2] is BOXED_IMG


def test_without_a_template_the_query_comes_first(qwen):
    prompt = build_prompt(query=QUERY_IMG, template=None, boxed=BOXED_IMG, expert_anomalous=True, setting="full")
    assert render_text(qwen.processor, prompt.messages) == _qwen(
        REF_INSTRUCTION, ANSWER, QUERY_ANOMALOUS, _picture(1), BOXED, _picture(2), QUESTIONS
    )
    assert prompt.query_index == 0 and not prompt.template_included and prompt.images == [QUERY_IMG, BOXED_IMG]


@pytest.mark.parametrize("setting", SETTINGS)
def test_image_tokens_match_the_processor(qwen, setting):
    prompt = build_prompt(
        query=QUERY_IMG, template=TEMPLATE_IMG, boxed=BOXED_IMG, expert_anomalous=True, setting=setting
    )
    batch = render_inputs(qwen, prompt.messages, prompt.images)
    grid = batch["image_grid_thw"]
    assert grid.shape[0] == len(prompt.images)
    merge = qwen.processor.image_processor.merge_size**2
    expected_tokens = [int(n) for n in grid.prod(dim=1) // merge]
    assert image_token_counts(batch["input_ids"], qwen.image_token_id) == expected_tokens == [4] * len(prompt.images)
    vision_start = qwen.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert int((batch["input_ids"] == vision_start).sum()) == len(prompt.images)
    assert batch["pixel_values"].dtype == torch.float32 and batch["input_ids"].device == qwen.device


def test_query_index_points_at_the_query_images_pixels(qwen):
    prompt = build_prompt(
        query=QUERY_IMG, template=TEMPLATE_IMG, boxed=BOXED_IMG, expert_anomalous=True, setting="full"
    )
    batch = render_inputs(qwen, prompt.messages, prompt.images)
    patches_per_image = int(batch["image_grid_thw"][0].prod())
    alone = qwen.processor.image_processor(images=[QUERY_IMG], return_tensors="pt")["pixel_values"]
    start = prompt.query_index * patches_per_image
    torch.testing.assert_close(batch["pixel_values"][start : start + patches_per_image], alone)


# ------------------------------------------------------------------------------------------ pixel budget


@pytest.fixture(scope="module")
def qwen_preset_budget(tiny_qwen_dir):
    """The tiny Qwen at the qwen2.5-vl-7b preset's own budget: the reference's min = max = 512·28·28."""
    return load_mllm(MLLMSettings(model_id=str(tiny_qwen_dir)))


def test_the_preset_pins_the_references_budget(qwen_preset_budget):
    size = qwen_preset_budget.processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (512 * 28 * 28, 512 * 28 * 28)
    assert qwen_preset_budget.max_pixels == 512 * 28 * 28


@pytest.mark.parametrize(
    ("query_size", "template_size"),
    [
        ((1024, 1024), (1024, 1024)),  # MVTec-AD: the bank keeps the reference at its original size
        ((1500, 1000), (1024, 683)),  # VisA: the bank keeps it at 1024 px on the longest side
        ((1024, 1024), (512, 512)),  # an old bank's 512-px thumbnail (before: 324 template vs 484 query tokens)
        ((300, 200), (300, 200)),  # a small camera image: brought UP to the budget, like the template
    ],
)
def test_every_image_of_a_prompt_gets_the_same_token_count(qwen_preset_budget, query_size, template_size):
    from expert.boxes import Box, draw_boxes

    query = _image(7, query_size)
    boxed = Image.fromarray(draw_boxes(np.asarray(query), [Box(10, 10, 60, 40, 1.0)]))  # on the original image
    template = _image(8, template_size)
    prompt = build_prompt(query=query, template=template, boxed=boxed, expert_anomalous=True, setting="full")
    batch = render_inputs(qwen_preset_budget, prompt.messages, prompt.images)
    counts = image_token_counts(batch["input_ids"], qwen_preset_budget.image_token_id)
    assert len(counts) == 3 and len(set(counts)) == 1, counts
    assert 400 <= counts[0] <= 512 * 28 * 28 // (28 * 28) * 1.1  # ≈ the 512-token budget, up or down
    grid = batch["image_grid_thw"]
    assert (grid == grid[0]).all()


def test_fit_template_only_for_the_same_shape():
    square = _image(1, (512, 512))
    assert fit_template(square, _image(2, (1024, 1024))).size == (1024, 1024)
    assert fit_template(_image(1, (1024, 683)), _image(2, (1500, 1000))).size == (1500, 1000)
    wide = _image(1, (800, 400))
    assert fit_template(wide, _image(2, (1024, 1024))) is wide  # another shape: sent as it is
    same = _image(1, (64, 64))
    assert fit_template(same, QUERY_IMG) is same


# ------------------------------------------------------------------------------------------ other models


def test_llava_renders_images_first_and_counts_tokens(tiny_llava_dir):
    llava = load_mllm(MLLMSettings(preset="llava-1.5-7b", model_id=str(tiny_llava_dir)))
    prompt = build_prompt(
        query=QUERY_IMG, template=TEMPLATE_IMG, boxed=BOXED_IMG, expert_anomalous=True, setting="full"
    )
    text = render_text(llava.processor, prompt.messages)
    texts = [REF_INSTRUCTION, ANSWER, TEMPLATE, QUERY_ANOMALOUS, BOXED, QUESTIONS]
    assert text == "USER: " + "<image>\n" * 3 + "".join(t + " " for t in texts) + "ASSISTANT:"
    batch = render_inputs(llava, prompt.messages, prompt.images)
    assert image_token_counts(batch["input_ids"], llava.image_token_id) == [16, 16, 16]


# ------------------------------------------------------------------------------------------ errors, turns


def test_bad_inputs_are_refused():
    with pytest.raises(PromptError, match="unknown prompt setting"):
        build_prompt(query=QUERY_IMG, template=TEMPLATE_IMG, boxed=None, expert_anomalous=True, setting="both")
    with pytest.raises(PromptError, match="needs the expert's verdict"):
        build_prompt(query=QUERY_IMG, template=TEMPLATE_IMG, boxed=None, expert_anomalous=None, setting="textual")
    with pytest.raises(PromptError, match="needs the boxed image"):
        build_prompt(query=QUERY_IMG, template=TEMPLATE_IMG, boxed=None, expert_anomalous=True, setting="visual")
    with pytest.raises(PromptError, match="query image must be a PIL image"):
        build_prompt(
            query=np.zeros((4, 4, 3)), template=TEMPLATE_IMG, boxed=None, expert_anomalous=None, setting="baseline"
        )
    # a normal verdict never needs the boxed image
    assert not build_prompt(
        query=QUERY_IMG, template=TEMPLATE_IMG, boxed=None, expert_anomalous=False, setting="full"
    ).boxed_included


def test_non_rgb_images_are_converted():
    grey = Image.new("L", (64, 64), 128)
    prompt = build_prompt(query=grey, template=TEMPLATE_IMG, boxed=None, expert_anomalous=None, setting="baseline")
    assert prompt.images[1].mode == "RGB" and prompt.images[1].getpixel((0, 0)) == (128, 128, 128)


def test_render_inputs_checks_the_image_count(qwen):
    prompt = build_prompt(query=QUERY_IMG, template=TEMPLATE_IMG, boxed=None, expert_anomalous=False, setting="full")
    with pytest.raises(PromptError, match="2 image placeholder"):
        render_inputs(qwen, prompt.messages, prompt.images[:1])


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [("yes", "type of defect"), ("no", "why the query image looks normal"), ("unknown", "do you see any defect")],
)
def test_explanation_turn(qwen, answer, phrase):
    prompt = build_prompt(
        query=QUERY_IMG, template=TEMPLATE_IMG, boxed=BOXED_IMG, expert_anomalous=True, setting="full"
    )
    before = [dict(m) for m in prompt.messages]
    messages = build_explanation_messages(prompt, " A\n", answer)
    assert prompt.messages == before  # not modified
    assert messages[:1] == prompt.messages
    assert messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "A"}]}
    assert phrase in messages[2]["content"][0]["text"] and "2-3" in messages[2]["content"][0]["text"]
    text = render_text(qwen.processor, messages)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nNow " in text
    assert len(re.findall(r"Picture \d: ", text)) == 3
