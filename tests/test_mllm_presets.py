"""Preset registry and the generic image-token / decoder-layer look-ups."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mllm.presets import (
    DEFAULT_PRESET,
    PRESETS,
    PresetError,
    apply_pixel_budget,
    estimate_weight_memory_gib,
    find_decoder_layers,
    find_image_token_id,
    get_preset,
)

torch.set_num_threads(1)


def test_registry_has_the_papers_backbones_and_a_small_one():
    assert DEFAULT_PRESET == "qwen2.5-vl-7b"
    expected = {
        "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
        "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
        "internvl3-8b": "OpenGVLab/InternVL3-8B-hf",
        "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
        "llava-next-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
        "minicpm-v-4.5": "openbmb/MiniCPM-V-4_5",
    }
    assert {name: preset.hub_id for name, preset in PRESETS.items()} == expected
    for preset in PRESETS.values():
        start, end = preset.caas_layers
        assert 0 <= start <= end < preset.num_decoder_layers
        assert preset.trust_remote_code == (preset.family == "minicpm-v")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(PresetError) as err:
        get_preset("gpt-vision")
    message = str(err.value)
    assert "gpt-vision" in message and "\n" not in message
    assert all(name in message for name in PRESETS)


def test_lookup_is_case_insensitive():
    assert get_preset(" Qwen2.5-VL-3B ").name == "qwen2.5-vl-3b"


def test_remote_code_preset_needs_opt_in():
    with pytest.raises(PresetError, match="EAGLE_MLLM__TRUST_REMOTE_CODE=true"):
        get_preset("minicpm-v-4.5", trust_remote_code=False)
    assert get_preset("minicpm-v-4.5", trust_remote_code=True).family == "minicpm-v"
    assert get_preset("minicpm-v-4.5").name == "minicpm-v-4.5"  # plain look-up, no check
    assert get_preset("qwen2.5-vl-7b", trust_remote_code=False).name == "qwen2.5-vl-7b"


def test_qwen_pixel_budget_fits_three_images_in_a_modest_prompt():
    preset = get_preset("qwen2.5-vl-7b")
    tokens_per_image = preset.max_pixels // (28 * 28)
    assert tokens_per_image == 512
    assert 3 * tokens_per_image < 2048


def test_memory_estimates():
    preset = get_preset("qwen2.5-vl-7b")
    four, bf16 = estimate_weight_memory_gib(preset, "4bit"), estimate_weight_memory_gib(preset, "bf16")
    assert four == pytest.approx(((8.3 - 1.77) * 0.53 + 1.77 * 2) * 1e9 * 1.05 / 2**30, abs=0.1)
    assert bf16 == pytest.approx(8.3e9 * 2 * 1.05 / 2**30, abs=0.1)
    assert estimate_weight_memory_gib(preset, "fp32") == pytest.approx(2 * bf16, abs=0.2)
    assert four < 10 < bf16 < 24  # the goal: 7B in 4-bit under 10 GiB
    for other in PRESETS.values():
        assert estimate_weight_memory_gib(other, "4bit") < estimate_weight_memory_gib(other, "8bit") < 24
    with pytest.raises(ValueError, match="unknown quantization"):
        estimate_weight_memory_gib(preset, "auto")


@pytest.mark.parametrize(("fixture", "token"), [("tiny_qwen_dir", "<|image_pad|>"), ("tiny_llava_dir", "<image>")])
def test_generic_lookups_on_tiny_models(fixture, token, request):
    directory = request.getfixturevalue(fixture)
    model = AutoModelForImageTextToText.from_pretrained(directory)
    processor = AutoProcessor.from_pretrained(directory)
    assert find_image_token_id(model, processor) == processor.tokenizer.convert_tokens_to_ids(token)
    layers = find_decoder_layers(model)
    assert layers is model.model.language_model.layers
    assert len(layers) == 16


class _Bare(torch.nn.Module):
    """A model whose config has no image token id and whose layers sit at a legacy path."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {})()
        inner = torch.nn.Module()
        inner.model = torch.nn.Module()
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Identity()
        inner.model.layers = torch.nn.ModuleList([layer, layer])
        self.language_model = inner


def test_fallbacks_processor_token_then_preset_token(tiny_qwen_dir):
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    bare = _Bare()
    expected = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert find_image_token_id(bare, processor) == expected  # processor.image_token_id
    tokenizer_only = processor.tokenizer
    assert find_image_token_id(bare, tokenizer_only, get_preset("qwen2.5-vl-7b")) == expected  # preset token
    with pytest.raises(PresetError, match="image token id"):
        find_image_token_id(bare, tokenizer_only, get_preset("llava-1.5-7b"))  # "<image>" is unknown there
    assert find_decoder_layers(bare) is bare.language_model.model.layers
    with pytest.raises(PresetError, match="decoder layers"):
        find_decoder_layers(torch.nn.Linear(2, 2))


def test_pixel_budget_per_family(tiny_qwen_dir):
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    model = torch.nn.Module()
    apply_pixel_budget(get_preset("qwen2.5-vl-7b"), model, processor, 28 * 28 * 9)
    # min_pixels = max_pixels = budget: every image, small or large, reaches the model at the same budget
    assert processor.image_processor.size == {"shortest_edge": 28 * 28 * 9, "longest_edge": 28 * 28 * 9}

    class _Processor:
        pass

    next_processor = _Processor()
    next_processor.image_processor = _Processor()
    next_processor.image_processor.image_grid_pinpoints = [[336, 672], [672, 336], [672, 672], [336, 1008]]
    model.config = type("Config", (), {})()
    apply_pixel_budget(get_preset("llava-next-7b"), model, next_processor, None)  # preset: 2 × 336²
    kept = [[336, 672], [672, 336]]
    assert next_processor.image_processor.image_grid_pinpoints == kept
    assert model.config.image_grid_pinpoints == kept

    internvl = _Processor()
    internvl.image_processor = _Processor()
    internvl.image_processor.max_patches = 12
    apply_pixel_budget(get_preset("internvl3-8b"), model, internvl, 5 * 448 * 448 + 1)
    assert internvl.image_processor.max_patches == internvl.image_processor.min_patches == 5
    apply_pixel_budget(get_preset("internvl3-8b"), model, internvl, 1000)
    assert internvl.image_processor.max_patches == 1

    fixed = _Processor()
    fixed.image_processor = _Processor()
    apply_pixel_budget(get_preset("llava-1.5-7b"), model, fixed, None)  # fixed 336 px input: nothing to set
    assert vars(fixed.image_processor) == {}
