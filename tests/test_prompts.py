"""The EAGLE prompt: paper texts verbatim, per-setting content, and rendering through the model's chat template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eagle.settings import MLLMSettings
from mllm.loading import load_mllm
from mllm.prompts import (
    SETTINGS,
    SYSTEM_PROMPT,
    SYSTEM_PROMPT_TWO_IMAGES,
    PromptError,
    build_explanation_messages,
    build_prompt,
    render_inputs,
    render_text,
)

torch.set_num_threads(1)

# Paper appendix 6.3.1, typed out independently of mllm/prompts.py.
PAPER_SYSTEM = (
    "You are my industrial image inspection assistant. You will receive multiple images simultaneously, including a "
    "template image, a query image, and a query image with red bounding boxes. Based on the input images and the "
    "accompanying textual information, answer the given question. The question is multiple-choice. Respond only "
    "with the letter of the correct option (e.g., A, B, C, or D). Do not include explanations or extra text."
)
TWO_IMAGE_SYSTEM = PAPER_SYSTEM.replace(
    "including a template image, a query image, and a query image with red bounding boxes.",
    "including a template image and a query image.",
)
TAIL = (
    "Answer with the option's letter from the given choices directly!\nIs there any defect in the object?\n"
    "A. Yes\nB. No"
)
ABNORMAL = (
    "The query image is predicted as anomalous. "
    "The position of the red bounding box on the query image is the predicted defect location."
)
NORMAL = "The query image is predicted as normal."
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


TEMPLATE, QUERY, BOXED = _image(1), _image(2), _image(3)


def _qwen_chat(system: str, images: int, text: str) -> str:
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{IMAGE * images}{text}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# (setting, expert_anomalous) -> (system, number of images, user text)
EXPECTED = {
    ("baseline", None): (TWO_IMAGE_SYSTEM, 2, TAIL),
    ("baseline", True): (TWO_IMAGE_SYSTEM, 2, TAIL),
    ("visual", True): (PAPER_SYSTEM, 3, TAIL),
    ("visual", False): (TWO_IMAGE_SYSTEM, 2, TAIL),
    ("textual", True): (TWO_IMAGE_SYSTEM, 2, "The query image is predicted as anomalous.\n" + TAIL),
    ("textual", False): (TWO_IMAGE_SYSTEM, 2, NORMAL + "\n" + TAIL),
    ("full", True): (PAPER_SYSTEM, 3, ABNORMAL + "\n" + TAIL),
    ("full", False): (TWO_IMAGE_SYSTEM, 2, NORMAL + "\n" + TAIL),
}


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    return load_mllm(MLLMSettings(model_id=str(tiny_qwen_dir)))


def test_system_texts_are_the_papers():
    assert SYSTEM_PROMPT == PAPER_SYSTEM
    assert SYSTEM_PROMPT_TWO_IMAGES == TWO_IMAGE_SYSTEM
    assert "red bounding boxes" not in SYSTEM_PROMPT_TWO_IMAGES


@pytest.mark.parametrize(("setting", "anomalous"), list(EXPECTED))
def test_exact_rendered_text_with_the_qwen_template(qwen, setting, anomalous):
    prompt = build_prompt(query=QUERY, template=TEMPLATE, boxed=BOXED, expert_anomalous=anomalous, setting=setting)
    system, count, text = EXPECTED[(setting, anomalous)]
    assert render_text(qwen.processor, prompt.messages) == _qwen_chat(system, count, text)
    assert len(prompt.images) == count and prompt.boxed_included == (count == 3)
    assert prompt.images[0] is TEMPLATE and prompt.images[prompt.query_index] is QUERY
    if count == 3:
        assert prompt.images[2] is BOXED


@pytest.mark.parametrize("setting", SETTINGS)
def test_image_tokens_match_the_processor(qwen, setting):
    prompt = build_prompt(query=QUERY, template=TEMPLATE, boxed=BOXED, expert_anomalous=True, setting=setting)
    batch = render_inputs(qwen, prompt.messages, prompt.images)
    grid = batch["image_grid_thw"]
    assert grid.shape[0] == len(prompt.images)
    merge = qwen.processor.image_processor.merge_size**2
    expected_tokens = int((grid.prod(dim=1) // merge).sum())
    assert int((batch["input_ids"] == qwen.image_token_id).sum()) == expected_tokens == 4 * len(prompt.images)
    vision_start = qwen.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert int((batch["input_ids"] == vision_start).sum()) == len(prompt.images)
    assert batch["pixel_values"].dtype == torch.float32 and batch["input_ids"].device == qwen.device


def test_query_index_points_at_the_query_images_pixels(qwen):
    prompt = build_prompt(query=QUERY, template=TEMPLATE, boxed=BOXED, expert_anomalous=True, setting="full")
    batch = render_inputs(qwen, prompt.messages, prompt.images)
    patches_per_image = int(batch["image_grid_thw"][0].prod())
    alone = qwen.processor.image_processor(images=[QUERY], return_tensors="pt")["pixel_values"]
    start = prompt.query_index * patches_per_image
    torch.testing.assert_close(batch["pixel_values"][start : start + patches_per_image], alone)


def test_llava_renders_images_first_and_counts_tokens(tiny_llava_dir):
    llava = load_mllm(MLLMSettings(preset="llava-1.5-7b", model_id=str(tiny_llava_dir)))
    prompt = build_prompt(query=QUERY, template=TEMPLATE, boxed=BOXED, expert_anomalous=True, setting="full")
    text = render_text(llava.processor, prompt.messages)
    assert text == f"{PAPER_SYSTEM} USER: <image>\n<image>\n<image>\n{ABNORMAL}\n{TAIL} ASSISTANT:"
    batch = render_inputs(llava, prompt.messages, prompt.images)
    assert int((batch["input_ids"] == llava.image_token_id).sum()) == 3 * 16


def test_bad_inputs_are_refused():
    with pytest.raises(PromptError, match="unknown prompt setting"):
        build_prompt(query=QUERY, template=TEMPLATE, boxed=None, expert_anomalous=True, setting="both")
    with pytest.raises(PromptError, match="needs the expert's verdict"):
        build_prompt(query=QUERY, template=TEMPLATE, boxed=None, expert_anomalous=None, setting="textual")
    with pytest.raises(PromptError, match="needs the boxed image"):
        build_prompt(query=QUERY, template=TEMPLATE, boxed=None, expert_anomalous=True, setting="visual")
    with pytest.raises(PromptError, match="query image must be a PIL image"):
        build_prompt(
            query=np.zeros((4, 4, 3)), template=TEMPLATE, boxed=None, expert_anomalous=None, setting="baseline"
        )
    # a normal verdict never needs the boxed image
    assert not build_prompt(
        query=QUERY, template=TEMPLATE, boxed=None, expert_anomalous=False, setting="full"
    ).boxed_included


def test_non_rgb_images_are_converted():
    grey = Image.new("L", (64, 64), 128)
    prompt = build_prompt(query=grey, template=TEMPLATE, boxed=None, expert_anomalous=None, setting="baseline")
    assert prompt.images[1].mode == "RGB" and prompt.images[1].getpixel((0, 0)) == (128, 128, 128)


def test_render_inputs_checks_the_image_count(qwen):
    prompt = build_prompt(query=QUERY, template=TEMPLATE, boxed=None, expert_anomalous=False, setting="full")
    with pytest.raises(PromptError, match="2 image placeholder"):
        render_inputs(qwen, prompt.messages, prompt.images[:1])


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [("yes", "type of defect"), ("no", "why the query image looks normal"), ("unknown", "do you see any defect")],
)
def test_explanation_turn(qwen, answer, phrase):
    prompt = build_prompt(query=QUERY, template=TEMPLATE, boxed=BOXED, expert_anomalous=True, setting="full")
    before = [dict(m) for m in prompt.messages]
    messages = build_explanation_messages(prompt, " A\n", answer)
    assert prompt.messages == before  # not modified
    assert messages[:2] == prompt.messages
    assert messages[2] == {"role": "assistant", "content": [{"type": "text", "text": "A"}]}
    assert phrase in messages[3]["content"][0]["text"] and "2-3" in messages[3]["content"][0]["text"]
    text = render_text(qwen.processor, messages)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nNow " in text
