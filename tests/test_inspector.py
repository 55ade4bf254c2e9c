"""MLLMInspector on the tiny Qwen: greedy answers, CAAS integration, streamed explanations."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

import mllm.caas
from eagle.settings import Settings
from mllm.answers import parse_answer
from mllm.caas import CAASConfig
from mllm.inspector import MLLMAnswer, MLLMInspector
from mllm.loading import load_mllm
from mllm.prompts import build_explanation_messages, build_prompt, render_inputs

torch.set_num_threads(1)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


IMAGES = {"query": _image(2), "template": _image(1), "boxed": _image(3)}


@pytest.fixture(scope="module")
def settings():
    # 56·56 px per image (min = max): every 64-px test image is one 2×2 token grid
    return Settings(mllm={"max_new_tokens": 6, "explanation_max_new_tokens": 12, "max_pixels": 56 * 56})


@pytest.fixture(scope="module")
def inspector(tiny_qwen_dir, settings):
    loaded = load_mllm(settings.mllm.model_copy(update={"model_id": str(tiny_qwen_dir)}))
    return MLLMInspector(loaded, settings)


def _greedy(inspector, messages, images, max_new_tokens):
    inputs = render_inputs(inspector.loaded, messages, images)
    output = inspector.loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize(
    ("setting", "anomalous", "images"), [("full", True, 3), ("full", False, 2), ("baseline", None, 2)]
)
def test_ask_returns_the_greedy_reply_parsed(inspector, setting, anomalous, images):
    answer = inspector.ask(**IMAGES, expert_anomalous=anomalous, setting=setting)
    assert isinstance(answer, MLLMAnswer)
    prompt = build_prompt(**IMAGES, expert_anomalous=anomalous, setting=setting)
    reference = _greedy(inspector, prompt.messages, prompt.images, 6)
    assert answer.raw_text == inspector.loaded.tokenizer.decode(reference, skip_special_tokens=True)
    assert answer.n_new_tokens == reference.numel() <= 6
    parsed = parse_answer(answer.raw_text)
    assert (answer.letter, answer.answer) == (parsed.letter, parsed.answer)
    inputs = render_inputs(inspector.loaded, prompt.messages, prompt.images)
    assert answer.n_input_tokens == inputs["input_ids"].shape[1]
    assert int((inputs["input_ids"] == inspector.loaded.image_token_id).sum()) == 4 * images
    assert answer.image_tokens == [4] * images  # one budget for every image of the prompt
    assert answer.boxed_included == (images == 3) and answer.setting == setting and not answer.caas_applied
    assert set(answer.timings_ms) == {"prepare", "generate", "total"}
    assert all(value >= 0 for value in answer.timings_ms.values())
    assert answer.timings_ms["total"] >= answer.timings_ms["generate"]


def test_ask_is_deterministic(inspector):
    first = inspector.ask(**IMAGES, expert_anomalous=True, setting="visual")
    second = inspector.ask(**IMAGES, expert_anomalous=True, setting="visual")
    assert first.raw_text == second.raw_text


@pytest.mark.parametrize(("tokens", "expected_visual"), [("all", 12), ("query", 4)])
def test_ask_with_caas_scales_the_prompts_visual_tokens_then_removes_itself(
    inspector, monkeypatch, tokens, expected_visual
):
    calls = []
    original = mllm.caas.apply_caas

    def spy(model, layers, config, mask):
        calls.append((config, mask.clone()))
        return original(model, layers, config, mask)

    monkeypatch.setattr(mllm.caas, "apply_caas", spy)
    config = CAASConfig(mode="logit", alpha=0.6, tokens=tokens)
    answer = inspector.ask(**IMAGES, expert_anomalous=True, setting="full", caas=config)
    assert answer.caas_applied
    ((used, mask),) = calls
    assert used is config
    assert mask.shape == (1, answer.n_input_tokens) and int(mask.sum()) == expected_visual
    if tokens == "query":  # the second run of image tokens is the query image (template, query, boxed)
        positions = torch.nonzero(mask[0]).flatten()
        prompt = build_prompt(**IMAGES, expert_anomalous=True, setting="full")
        ids = render_inputs(inspector.loaded, prompt.messages, prompt.images)["input_ids"][0]
        image_positions = torch.nonzero(ids == inspector.loaded.image_token_id).flatten()
        assert torch.equal(positions, image_positions[4:8])
    for layer in inspector.loaded.decoder_layers:
        assert not layer.self_attn.k_proj._forward_hooks and not layer.self_attn._forward_pre_hooks


def test_caas_really_changes_the_computation(inspector):
    """With a huge alpha the greedy reply or at least the first-step logits must move; hooks gone afterwards."""
    prompt = build_prompt(**IMAGES, expert_anomalous=True, setting="full")
    inputs = render_inputs(inspector.loaded, prompt.messages, prompt.images)
    with torch.no_grad():
        plain = inspector.loaded.model(**inputs).logits[0, -1]
    config = CAASConfig(mode="logit", alpha=5.0)
    mask = inputs["input_ids"] == inspector.loaded.image_token_id
    with torch.no_grad(), mllm.caas.apply_caas(inspector.loaded.model, inspector.loaded.decoder_layers, config, mask):
        scaled = inspector.loaded.model(**inputs).logits[0, -1]
    with torch.no_grad():
        again = inspector.loaded.model(**inputs).logits[0, -1]
    assert (plain - scaled).abs().max() > 1e-3
    torch.testing.assert_close(again, plain)


def test_caas_layers_beyond_the_model_are_refused(inspector):
    with pytest.raises(mllm.caas.CAASError, match="exceed"):
        inspector.ask(**IMAGES, expert_anomalous=True, setting="full", caas=CAASConfig(layer_start=9, layer_end=40))
    assert not inspector._lock.locked()


@pytest.mark.parametrize("answer_text", ["A", "B", "hmm"])
def test_explain_stream_matches_a_non_streamed_greedy_generation(inspector, settings, answer_text):
    parsed = parse_answer(answer_text)
    answer = MLLMAnswer(parsed.letter, parsed.answer, answer_text, False, 0, 1)
    chunks = list(inspector.explain_stream(**IMAGES, expert_anomalous=True, answer=answer, setting="full"))
    assert all(isinstance(chunk, str) and chunk for chunk in chunks)
    prompt = build_prompt(**IMAGES, expert_anomalous=True, setting="full")
    messages = build_explanation_messages(prompt, answer_text, parsed.answer)
    reference = _greedy(inspector, messages, prompt.images, settings.mllm.explanation_max_new_tokens)
    assert reference.numel() <= settings.mllm.explanation_max_new_tokens
    assert "".join(chunks) == inspector.loaded.tokenizer.decode(reference, skip_special_tokens=True)
    assert not inspector._lock.locked()


def test_closing_the_stream_early_stops_and_unlocks(inspector):
    answer = MLLMAnswer("A", "yes", "A", False, 0, 1)
    stream = inspector.explain_stream(**IMAGES, expert_anomalous=True, answer=answer, setting="full")
    next(stream, None)
    assert inspector._lock.locked()
    stream.close()
    assert not inspector._lock.locked()
    assert not [t for t in threading.enumerate() if t.name == "mllm-explain"]


def test_generation_failure_surfaces_in_the_consumer(inspector, monkeypatch):
    from mllm.inspector import MLLMInferenceError

    def broken(**kwargs):
        raise RuntimeError("device lost\nsecond line")

    monkeypatch.setattr(inspector.loaded.model, "generate", broken)
    answer = MLLMAnswer("A", "yes", "A", False, 0, 1)
    with pytest.raises(MLLMInferenceError, match="^explanation failed: RuntimeError: device lost$"):
        list(inspector.explain_stream(**IMAGES, expert_anomalous=True, answer=answer, setting="full"))
    assert not inspector._lock.locked()


def test_calls_from_two_threads_are_serialised(inspector):
    results = []
    active = []
    peak = []
    generate = inspector.loaded.model.generate

    def counting(**kwargs):
        active.append(1)
        peak.append(len(active))
        try:
            return generate(**kwargs)
        finally:
            active.pop()

    inspector.loaded.model.generate = counting
    try:
        threads = [
            threading.Thread(
                target=lambda: results.append(inspector.ask(**IMAGES, expert_anomalous=False, setting="full"))
            )
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        del inspector.loaded.model.generate
    assert max(peak) == 1 and len(results) == 2
    assert results[0].raw_text == results[1].raw_text


def test_attention_overlay_is_the_mean_read_out_drawn_on_the_query(inspector):
    from mllm.attention_readout import attention_overlay, image_attention_maps

    query = Image.fromarray(np.random.default_rng(5).integers(0, 256, (56, 112, 3), dtype=np.uint8))
    images = {**IMAGES, "query": query}
    overlay = inspector.attention_overlay(**images, expert_anomalous=True, setting="full", layers=[9, 15])
    assert overlay.shape == (56, 112, 3) and overlay.dtype == np.uint8
    prompt = build_prompt(**images, expert_anomalous=True, setting="full")
    inputs = render_inputs(inspector.loaded, prompt.messages, prompt.images)
    maps = image_attention_maps(
        inspector.loaded.model,
        inspector.loaded.decoder_layers,
        inputs,
        inspector.loaded.image_token_id,
        layers=[9, 15],
        image_index=prompt.query_index,
    )
    expected = attention_overlay(query, (maps[9] + maps[15]) / 2)
    assert np.abs(overlay.astype(int) - expected.astype(int)).max() <= 1


def test_attention_overlay_defaults_to_the_caas_layers(inspector):
    overlay = inspector.attention_overlay(**IMAGES, expert_anomalous=False, setting="baseline")
    assert overlay.shape == (64, 64, 3)
