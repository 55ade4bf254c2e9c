"""Attention read-out (mllm.attention_readout): equals eager attention weights, maps onto the image, AR per §4.4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eagle.settings import MLLMSettings
from mllm.attention_readout import (
    AttentionReadoutError,
    answer_attention,
    attention_overlay,
    attention_ratio,
    defect_token_mask,
    image_attention_maps,
    image_token_grid,
    processor_view_box,
    record_answer_attention,
)
from mllm.caas import CAASConfig, apply_caas, image_token_runs, visual_token_mask
from mllm.loading import LoadedMLLM, load_mllm
from tests.fixtures_mllm import tiny_llava_dir, tiny_qwen_dir  # noqa: F401
from tests.tiny_models import TINY_QWEN_MAX_PIXELS

LAYERS = (0, 9, 15)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core box, two threads spin against other jobs and run ~40× slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _load(directory, preset: str, attn_implementation: str = "sdpa") -> LoadedMLLM:
    return load_mllm(
        MLLMSettings(
            preset=preset,
            model_id=str(directory),
            device="cpu",
            quantization="fp32",
            max_pixels=TINY_QWEN_MAX_PIXELS,
            attn_implementation=attn_implementation,
        )
    )


@pytest.fixture(scope="module", params=["qwen", "llava"])
def pair(request, tiny_qwen_dir, tiny_llava_dir) -> tuple[LoadedMLLM, LoadedMLLM]:  # noqa: F811
    """(SDPA model, eager model) of the same checkpoint."""
    directory, preset = {
        "qwen": (tiny_qwen_dir, "qwen2.5-vl-7b"),
        "llava": (tiny_llava_dir, "llava-1.5-7b"),
    }[request.param]
    return _load(directory, preset), _load(directory, preset, "eager")


def _inputs(loaded: LoadedMLLM, size=(56, 112), rows: int = 1) -> dict:
    """Three images (template, query, boxed query) of ``size`` (height, width) and a question, per row."""
    processor = loaded.processor
    processor.tokenizer.padding_side = "left"
    rng = np.random.default_rng(1)
    prompts, images = [], []
    for row in range(rows):
        text = "Is there any defect in the object?" + " Answer." * row
        content = [{"type": "image"}] * 3 + [{"type": "text", "text": text}]
        prompts.append(
            processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        )
        images += [Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    return dict(processor(text=prompts, images=images, return_tensors="pt", padding=True))


def _eager_last_row(eager: LoadedMLLM, inputs: dict) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        attentions = eager.model(**inputs, output_attentions=True).attentions
    return tuple(a[:, :, -1, :].mean(dim=1) for a in attentions)  # head-mean, last query row: [B, T]


# ---------------------------------------------------------------------------------------------------------------
# Read-out == eager attention weights, without switching the model to eager
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2])
def test_readout_equals_eager_attention(pair, rows):
    sdpa, eager = pair
    inputs = _inputs(sdpa, rows=rows)
    weights = answer_attention(sdpa.model, sdpa.decoder_layers, inputs, LAYERS)
    expected = _eager_last_row(eager, inputs)
    assert sorted(weights) == list(LAYERS)
    for layer in LAYERS:
        assert weights[layer].shape == inputs["input_ids"].shape
        torch.testing.assert_close(weights[layer], expected[layer], rtol=0, atol=1e-5)
        torch.testing.assert_close(weights[layer].sum(-1), torch.ones(rows), rtol=0, atol=1e-5)
    assert sdpa.model.config.text_config._attn_implementation == "sdpa"


def test_readout_does_not_change_the_forward(pair):
    sdpa, _ = pair
    inputs = _inputs(sdpa)
    with torch.inference_mode():
        plain = sdpa.model(**inputs).logits
        with record_answer_attention(sdpa.model, sdpa.decoder_layers, [9]) as recorder:
            recorded = sdpa.model(**inputs).logits
            assert sdpa.model.config.text_config._attn_implementation != "eager"
    assert torch.equal(plain, recorded)  # the same SDPA calls, only observed
    assert set(recorder.weights) == {9}
    assert sdpa.model.config.text_config._attn_implementation == "sdpa"


def test_readout_keeps_the_prefill_during_generate(pair):
    sdpa, eager = pair
    inputs = _inputs(sdpa)
    with record_answer_attention(sdpa.model, sdpa.decoder_layers, [9]) as recorder, torch.inference_mode():
        sdpa.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    torch.testing.assert_close(recorder.weights[9], _eager_last_row(eager, inputs)[9], rtol=0, atol=1e-5)


def test_readout_under_caas_weight_mode_sees_the_bias(pair):
    """Layer 9 is the first CAAS layer: its inputs are unchanged, so the read-out must equal the eager weights of
    the plain model with ln(1+α) added to the visual logits, i.e. visual weights ×(1+α), renormalised."""
    sdpa, eager = pair
    inputs = _inputs(sdpa)
    mask = visual_token_mask(inputs["input_ids"], sdpa.image_token_id)
    with apply_caas(sdpa.model, sdpa.decoder_layers, CAASConfig(mode="weight", alpha=0.6), mask):
        weights = answer_attention(sdpa.model, sdpa.decoder_layers, inputs, [9])[9]
    assert sdpa.model.config.text_config._attn_implementation == "sdpa"
    with torch.inference_mode():
        per_head = eager.model(**inputs, output_attentions=True).attentions[9][:, :, -1, :]  # [B, H, T]
    boosted = torch.where(mask[:, None, :], per_head * 1.6, per_head)
    expected = (boosted / boosted.sum(-1, keepdim=True)).mean(dim=1)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-5)


def test_bad_layers_are_refused(pair):
    sdpa, _ = pair
    with pytest.raises(AttentionReadoutError, match="do not exist"):
        answer_attention(sdpa.model, sdpa.decoder_layers, _inputs(sdpa), [16])
    with pytest.raises(AttentionReadoutError, match="at least one"):
        answer_attention(sdpa.model, sdpa.decoder_layers, _inputs(sdpa), [])


# ---------------------------------------------------------------------------------------------------------------
# Token grid
# ---------------------------------------------------------------------------------------------------------------


def test_maps_have_the_image_grid_and_hold_its_weights(pair):
    sdpa, eager = pair
    inputs = _inputs(sdpa, size=(56, 112))  # height 56, width 112
    maps = image_attention_maps(sdpa.model, sdpa.decoder_layers, inputs, sdpa.image_token_id, layers=LAYERS)
    is_qwen = "image_grid_thw" in inputs
    # Qwen: 56×112 px is brought UP to the 112² budget (min = max pixels) → 84×168 px → 6×12 patches of 14 px →
    # merged 2×2 → 3×6 tokens; LLaVA: 16 tokens of a 56×56 crop → 4×4.
    assert all(m.shape == ((3, 6) if is_qwen else (4, 4)) for m in maps.values())
    start, end = image_token_runs(inputs["input_ids"][0], sdpa.image_token_id)[1]
    expected = _eager_last_row(eager, inputs)
    for layer in LAYERS:
        flat = expected[layer][0, start:end].numpy()
        np.testing.assert_allclose(maps[layer].reshape(-1), flat, rtol=0, atol=1e-5)  # row-major grid


def test_qwen_grid_follows_image_grid_thw():
    config = type("C", (), {"vision_config": type("V", (), {"spatial_merge_size": 2})()})()
    inputs = {"image_grid_thw": torch.tensor([[1, 4, 4], [1, 6, 10]])}
    assert image_token_grid(inputs, config, 1, 15) == (3, 5)
    with pytest.raises(AttentionReadoutError, match="does not match"):
        image_token_grid(inputs, config, 1, 16)


def test_square_grid_and_its_refusal():
    assert image_token_grid({}, object(), 0, 576) == (24, 24)
    with pytest.raises(AttentionReadoutError, match="square"):
        image_token_grid({}, object(), 0, 2928)  # LLaVA-NeXT any-resolution tiling


def test_image_index_errors(pair):
    sdpa, _ = pair
    inputs = _inputs(sdpa)
    with pytest.raises(AttentionReadoutError, match="image_index=3"):
        image_attention_maps(sdpa.model, sdpa.decoder_layers, inputs, sdpa.image_token_id, layers=[9], image_index=3)
    with pytest.raises(AttentionReadoutError, match="does not hold"):
        image_attention_maps(sdpa.model, sdpa.decoder_layers, inputs, sdpa.image_token_id, layers=[9], grid=(3, 3))


# ---------------------------------------------------------------------------------------------------------------
# Attention ratio (paper §4.4) on hand-made examples
# ---------------------------------------------------------------------------------------------------------------


def test_attention_ratio_hand_example():
    grid = np.array([[0.10, 0.20, 0.00, 0.05], [0.05, 0.30, 0.10, 0.00], [0.00, 0.00, 0.10, 0.10]])
    defect = np.zeros((60, 80), dtype=bool)  # 3×4 cells of 20×20 px
    defect[25:35, 25:35] = True  # inside cell (1, 1) only
    defect[45:46, 79:80] = True  # one pixel of cell (2, 3)
    # G = {(1, 1), (2, 3)}: (0.30 + 0.10) / 1.00
    assert attention_ratio(grid, defect) == pytest.approx(0.4)
    # Cell (1, 1) is 100/400 = 25 % covered, cell (2, 3) 1/400: a 10 % coverage rule keeps only (1, 1).
    assert attention_ratio(grid, defect, min_coverage=0.1) == pytest.approx(0.30)
    assert attention_ratio(grid, defect, min_coverage=0.25) == 0.0  # strictly more than 25 % needed
    assert attention_ratio(grid, np.zeros((60, 80))) == 0.0
    assert attention_ratio(grid, np.ones((60, 80))) == pytest.approx(1.0)


def test_attention_ratio_with_a_view_box_and_a_grid_shaped_mask():
    grid = np.array([[1.0, 3.0], [0.0, 4.0]])
    assert attention_ratio(grid, np.array([[0, 1], [0, 1]])) == pytest.approx(7 / 8)
    defect = np.zeros((40, 80), dtype=bool)
    defect[:, :20] = True  # left of the view box: not seen by the model
    defect[0, 60] = True  # just right of the box (it spans x 20..59)
    assert attention_ratio(grid, defect, view_box=(20, 0, 60, 40)) == 0.0
    defect[0, 45] = True
    assert attention_ratio(grid, defect, view_box=(20, 0, 60, 40)) == pytest.approx(3 / 8)


def test_defect_token_mask_matches_brute_force():
    rng = np.random.default_rng(3)
    defect = rng.random((37, 53)) > 0.97
    rows, cols = 5, 7
    for coverage in (0.0, 0.02, 0.1):
        expected = np.zeros((rows, cols), dtype=bool)
        for r in range(rows):
            for c in range(cols):
                ys = [y for y in range(37) if y * rows // 37 == r]
                xs = [x for x in range(53) if x * cols // 53 == c]
                expected[r, c] = defect[np.ix_(ys, xs)].mean() > coverage
        np.testing.assert_array_equal(defect_token_mask(defect, (rows, cols), min_coverage=coverage), expected)


def test_attention_ratio_errors():
    with pytest.raises(AttentionReadoutError, match="no attention"):
        attention_ratio(np.zeros((2, 2)), np.ones((2, 2)))
    with pytest.raises(AttentionReadoutError, match="non-negative"):
        attention_ratio(np.array([[1.0, -1.0]]), np.ones((1, 2)))
    with pytest.raises(AttentionReadoutError, match="smaller than the token grid"):
        attention_ratio(np.ones((4, 4)), np.ones((3, 8)))


# ---------------------------------------------------------------------------------------------------------------
# Overlay onto the original image
# ---------------------------------------------------------------------------------------------------------------


def test_overlay_marks_the_most_attended_cell_red():
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    grid = np.array([[0.0, 0.1, 0.0], [0.0, 0.0, 0.9]])  # cells 20×20 px
    overlay = attention_overlay(image, grid, smooth=False, opacity=1.0)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    hot, cold = overlay[30, 50], overlay[10, 10]
    assert hot[0] > 100 and hot[2] < 50  # JET maximum: red
    assert cold[2] > 100 and cold[0] < 50  # JET minimum: blue
    half = attention_overlay(image, grid, smooth=False, opacity=0.5)
    np.testing.assert_allclose(half.astype(int), (image.astype(int) + overlay.astype(int)) / 2, atol=1)


def test_overlay_dims_what_the_model_did_not_see():
    image = Image.fromarray(np.full((56, 112, 3), 200, dtype=np.uint8))
    overlay = attention_overlay(image, np.ones((4, 4)), view_box=(28, 0, 84, 56))
    assert (overlay[:, :28] == 100).all() and (overlay[:, 84:] == 100).all()
    assert not (overlay[:, 28:84] == 100).all()


def test_view_box_of_the_processors(pair):
    sdpa, _ = pair
    box = processor_view_box(sdpa.processor.image_processor, (112, 56))
    if "qwen" in type(sdpa.model).__name__.lower():
        assert box == (0, 0, 112, 56)  # Qwen resizes the whole image
    else:
        assert box == (28, 0, 84, 56)  # LLaVA: shorter side → 56, centre crop 56×56


def test_overlay_refuses_bad_inputs():
    with pytest.raises(AttentionReadoutError, match="RGB uint8"):
        attention_overlay(np.zeros((4, 4, 3), dtype=np.float32), np.ones((2, 2)))
    with pytest.raises(AttentionReadoutError, match="view box"):
        attention_overlay(np.zeros((4, 4, 3), dtype=np.uint8), np.ones((2, 2)), view_box=(0, 0, 5, 4))
