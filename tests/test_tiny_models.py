"""The tiny offline models: complete HF directories, real architectures, deterministic weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.tiny_models import (
    LLAVA_SPECIAL_TOKENS,
    QWEN_SPECIAL_TOKENS,
    TINY_LLAVA_IMAGE_SIZE,
    make_tiny_qwen2_5_vl,
)

torch.set_num_threads(1)


def _image(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("fixture", ["tiny_qwen_dir", "tiny_llava_dir"])
def test_directory_is_complete_and_small(fixture, request):
    directory = request.getfixturevalue(fixture)
    names = {path.name for path in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    assert (directory / "model.safetensors").stat().st_size < 5 * 2**20
    config = json.loads((directory / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 16
    assert config["text_config"]["hidden_size"] == 64


def test_qwen_token_ids_are_the_tokenizers(tiny_qwen_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir)
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    tokenizer = processor.tokenizer
    ids = [tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(QWEN_SPECIAL_TOKENS)))  # consecutive, after the byte vocab
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.text_config.vocab_size >= len(tokenizer)
    # a special token is one token; plain text round-trips byte-exactly
    assert tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"] == [ids[1]]
    text = "Is there any defect in the object? Ünïcode ✓"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_qwen_image_tokens_follow_the_pixel_budget(tiny_qwen_dir):
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    text = "<|vision_start|><|image_pad|><|vision_end|>"
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 64 → 56×56 → 2×2 merged tokens; 112 → 4×4; 300 → scaled under the 112² budget and floored to 84×84 → 3×3
    for size, expected in [(64, 4), (112, 16), (300, 9)]:
        batch = processor(text=[text], images=[_image(size)], return_tensors="pt")
        t, h, w = batch["image_grid_thw"][0].tolist()
        assert (t, h * w // 4) == (1, expected)
        assert int((batch["input_ids"] == image_pad).sum()) == expected


def test_llava_has_sixteen_tokens_per_image(tiny_llava_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id
    assert all(processor.tokenizer.convert_tokens_to_ids(t) is not None for t in LLAVA_SPECIAL_TOKENS)
    batch = processor(
        text=["USER: <image>\n<image>\nhi ASSISTANT:"], images=[_image(), _image(90)], return_tensors="pt"
    )
    assert batch["pixel_values"].shape == (2, 3, TINY_LLAVA_IMAGE_SIZE, TINY_LLAVA_IMAGE_SIZE)
    assert int((batch["input_ids"] == image_id).sum()) == 2 * 16
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_same_seed_same_weights_other_seed_different(tmp_path):
    from safetensors.torch import load_file

    a = load_file(make_tiny_qwen2_5_vl(tmp_path / "a", num_layers=2, seed=3) / "model.safetensors")
    b = load_file(make_tiny_qwen2_5_vl(tmp_path / "b", num_layers=2, seed=3) / "model.safetensors")
    c = load_file(make_tiny_qwen2_5_vl(tmp_path / "c", num_layers=2, seed=4) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(a[key], c[key]) for key in a if a[key].ndim == 2)
    # fan-in scaled init: a 64-wide projection has std ≈ 1/8
    k_proj = a["model.layers.0.self_attn.k_proj.weight"]  # Qwen2.5-VL's on-disk (hub) key layout
    assert k_proj.std().item() == pytest.approx(1 / 8, rel=0.1)


def test_qwen_generates_greedily_and_deterministically(tiny_qwen_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir)
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there any defect?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    batch = processor(text=[text], images=[_image()], return_tensors="pt")
    first = model.generate(**batch, max_new_tokens=6, do_sample=False)
    second = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(first, second)
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
    top2 = logits.topk(2).values
    assert first[0, batch["input_ids"].shape[1]].item() == int(logits.argmax())
    assert (top2[0] - top2[1]).item() > 1e-3  # a clear greedy margin, not float noise
