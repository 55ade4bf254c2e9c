"""CAAS (mllm.caas): each production mode equals an eager reference of Eq. 9, and nothing leaks outside it.

The reference (``tests/caas_reference.py``, tests only) is an attention function that computes
``softmax(QKᵀ·s + mask)`` explicitly and scales, per the paper, either the logits (``logit``) or the weights
(``weight``: renormalised, ``weight_raw``: not) to the visual keys in layers 9..15. The production modes never do
that: they scale key or value projections with hooks, or add an SDPA bias. Models are the tiny random-weight
Qwen2.5-VL and LLaVA-1.5, loaded through the production loader ``mllm.loading.load_mllm``; the Qwen3-VL (per-head
``k_norm``) proofs are in ``tests/test_caas_knorm.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from eagle.settings import CAASSettings
from mllm.caas import (
    CAASConfig,
    CAASError,
    apply_caas,
    apply_caas_if,
    image_token_runs,
    should_apply,
    visual_token_mask,
)
from mllm.loading import LoadedMLLM
from tests.caas_reference import (
    MODES,
    check_4bit_within_bf16_noise,
    reference_caas,
)
from tests.caas_reference import assert_untouched as _assert_untouched
from tests.caas_reference import check_against_reference as _check_against_reference
from tests.caas_reference import forward as _forward
from tests.caas_reference import generate as _generate
from tests.caas_reference import hook_count as _hook_count
from tests.caas_reference import load_tiny as _load
from tests.caas_reference import prompt as _prompt
from tests.fixtures_mllm import tiny_llava_dir, tiny_qwen_dir  # noqa: F401


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core box, two threads spin against other jobs and run ~40× slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir) -> LoadedMLLM:  # noqa: F811
    return _load(tiny_qwen_dir, "qwen2.5-vl-7b")


@pytest.fixture(scope="module")
def llava(tiny_llava_dir) -> LoadedMLLM:  # noqa: F811
    return _load(tiny_llava_dir, "llava-1.5-7b")


# ---------------------------------------------------------------------------------------------------------------
# Configuration, gate, visual mask
# ---------------------------------------------------------------------------------------------------------------


def test_config_from_settings_and_defaults():
    assert CAASConfig() == CAASConfig(mode="logit", alpha=0.6, layer_start=9, layer_end=15, tokens="all")
    settings = CAASSettings(mode="weight", alpha=0.3, layer_start=2, layer_end=4, tokens="query", policy="on")
    config = CAASConfig.from_settings(settings)
    assert config == CAASConfig(mode="weight", alpha=0.3, layer_start=2, layer_end=4, tokens="query")
    assert list(config.layers) == [2, 3, 4]
    assert config.factor == pytest.approx(1.3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "softmax"},
        {"tokens": "text"},
        {"alpha": -0.1},
        {"alpha": math.nan},
        {"layer_start": 5, "layer_end": 4},
        {"layer_start": -1},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(CAASError):
        CAASConfig(**kwargs)


@pytest.mark.parametrize(
    ("policy", "score", "expected"),
    [
        ("auto", 0.49, False),
        ("auto", 0.5, True),  # tau: inclusive
        ("auto", 0.7, True),
        ("auto", 0.9, True),  # s_max: inclusive
        ("auto", 0.91, False),
        ("on", 0.1, True),
        ("on", 5.0, True),
        ("off", 0.7, False),
    ],
)
def test_gate_is_the_closed_low_confidence_interval(policy, score, expected):
    assert should_apply(policy, score, tau=0.5, s_max=0.9) is expected


def test_gate_edge_cases():
    assert should_apply("auto", 0.95, tau=1.0, s_max=0.9) is False  # tau above s_max: the region is empty
    assert should_apply("auto", 0.9, tau=0.9, s_max=0.9) is True
    with pytest.raises(CAASError, match="finite score"):
        should_apply("auto", math.nan, tau=0.5, s_max=0.9)
    with pytest.raises(CAASError, match="policy"):
        should_apply("sometimes", 0.7, tau=0.5, s_max=0.9)


def test_visual_token_mask_all_and_query():
    ids = torch.tensor([[1, 9, 9, 2, 9, 9, 9, 2, 9, 3], [0, 0, 1, 9, 2, 9, 9, 2, 9, 3]])
    everything = visual_token_mask(ids, 9)
    assert torch.equal(everything, ids == 9)
    query = visual_token_mask(ids, 9, tokens="query")  # image 1 of each row
    assert query.int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]]
    first = visual_token_mask(ids, 9, tokens="query", query_image_index=0)
    assert first.int().tolist() == [[0, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]]
    assert visual_token_mask(ids[0], 9).shape == (1, 10)
    assert image_token_runs(ids[0], 9) == [(1, 3), (4, 7), (8, 9)]


def test_visual_token_mask_errors():
    ids = torch.tensor([[1, 9, 9, 2]])
    with pytest.raises(CAASError, match="no image token"):
        visual_token_mask(ids, 7)
    with pytest.raises(CAASError, match="has 1 image"):
        visual_token_mask(ids, 9, tokens="query", query_image_index=1)
    with pytest.raises(CAASError, match=r"\[batch, tokens\]"):
        visual_token_mask(ids[None], 9)


# ---------------------------------------------------------------------------------------------------------------
# Production == eager reference (logits within 1e-4, identical greedy tokens over 8 steps, KV cache)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", ["all", "query"])
@pytest.mark.parametrize("mode", MODES)
def test_qwen_matches_eager_reference(qwen, mode, tokens):
    inputs = _prompt(qwen, [3])
    config = CAASConfig(mode=mode, tokens=tokens)
    mask = visual_token_mask(inputs["input_ids"], qwen.image_token_id, tokens=tokens)
    _check_against_reference(qwen, inputs, config, mask)


@pytest.mark.parametrize("mode", MODES)
def test_llava_matches_eager_reference(llava, mode):
    inputs = _prompt(llava, [3])
    mask = visual_token_mask(inputs["input_ids"], llava.image_token_id)
    _check_against_reference(llava, inputs, CAASConfig(mode=mode), mask)


@pytest.mark.parametrize("mode", MODES)
def test_left_padded_batch_matches_eager_reference(qwen, mode):
    inputs = _prompt(qwen, [3, 2], texts=["Is there any defect in the object?", "Defect?"])
    assert (inputs["attention_mask"] == 0).any()  # really padded
    mask = visual_token_mask(inputs["input_ids"], qwen.image_token_id, tokens="query")
    _check_against_reference(qwen, inputs, CAASConfig(mode=mode, alpha=1.0, layer_start=4, layer_end=12), mask)


def test_reference_without_caas_is_the_plain_model(qwen):
    """Sanity of the reference itself: with nothing edited it reproduces SDPA."""
    inputs = _prompt(qwen, [3])
    tokens, logits = _generate(qwen, inputs)
    with reference_caas(qwen, None, None):
        ref_tokens, ref_logits = _generate(qwen, inputs)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# No effect outside the layer range, the call, the gate; removed on exceptions
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_layers_before_the_range_are_unchanged(qwen, mode):
    inputs = _prompt(qwen, [3])
    config = CAASConfig(mode=mode)
    mask = visual_token_mask(inputs["input_ids"], qwen.image_token_id)
    base = _forward(qwen, inputs, output_hidden_states=True).hidden_states
    with apply_caas(qwen.model, qwen.decoder_layers, config, mask):
        edited = _forward(qwen, inputs, output_hidden_states=True).hidden_states
    # hidden_states[i] is the input of decoder layer i: everything up to layer_start's input is bit-identical.
    for index in range(config.layer_start + 1):
        assert torch.equal(base[index], edited[index]), index
    assert (base[config.layer_start + 1] - edited[config.layer_start + 1]).abs().max().item() > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_nothing_remains_after_the_call(qwen, mode):
    inputs = _prompt(qwen, [3])
    mask = visual_token_mask(inputs["input_ids"], qwen.image_token_id)
    before = _forward(qwen, inputs).logits
    with apply_caas(qwen.model, qwen.decoder_layers, CAASConfig(mode=mode), mask):
        assert _hook_count(qwen) > 0 or qwen.model.config.text_config._attn_implementation != "sdpa"
        during = _forward(qwen, inputs).logits
    after = _forward(qwen, inputs).logits
    _assert_untouched(qwen)
    assert torch.equal(before, after)
    assert not torch.equal(before, during)


def test_closed_gate_installs_nothing(qwen):
    inputs = _prompt(qwen, [3])
    before = _forward(qwen, inputs).logits
    gate = should_apply("auto", 0.2, tau=0.5, s_max=0.9)

    def never_built():
        raise AssertionError("the mask must not be built when the gate is closed")

    for mode in MODES:
        with apply_caas_if(gate, qwen.model, qwen.decoder_layers, CAASConfig(mode=mode), never_built):
            _assert_untouched(qwen)
            assert torch.equal(_forward(qwen, inputs).logits, before)
    mask = visual_token_mask(inputs["input_ids"], qwen.image_token_id)
    with apply_caas_if(True, qwen.model, qwen.decoder_layers, CAASConfig(), lambda: mask):
        assert _hook_count(qwen) == 2 * len(CAASConfig().layers)


@pytest.mark.parametrize("mode", MODES)
def test_removed_when_the_block_raises(qwen, mode):
    inputs = _prompt(qwen, [3])
    mask = visual_token_mask(inputs["input_ids"], qwen.image_token_id)
    before = _forward(qwen, inputs).logits
    with pytest.raises(RuntimeError, match="boom"):
        with apply_caas(qwen.model, qwen.decoder_layers, CAASConfig(mode=mode), mask):
            _forward(qwen, inputs)
            raise RuntimeError("boom")
    _assert_untouched(qwen)
    assert torch.equal(_forward(qwen, inputs).logits, before)


@pytest.mark.parametrize("mode", MODES)
def test_removed_when_the_forward_fails(qwen, mode):
    inputs = _prompt(qwen, [3])
    wrong_batch = visual_token_mask(inputs["input_ids"], qwen.image_token_id).repeat(2, 1)
    with pytest.raises(CAASError, match="2 row"):
        with apply_caas(qwen.model, qwen.decoder_layers, CAASConfig(mode=mode), wrong_batch):
            _forward(qwen, inputs)
    _assert_untouched(qwen)


def test_layer_range_outside_the_model_is_refused(qwen):
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(CAASError, match="exceed the model's 16 decoder layers"):
        with apply_caas(qwen.model, qwen.decoder_layers, CAASConfig(layer_start=9, layer_end=16), mask):
            pass
    with pytest.raises(CAASError, match="bool"):
        with apply_caas(qwen.model, qwen.decoder_layers, CAASConfig(), mask.int()):
            pass
    _assert_untouched(qwen)


# ---------------------------------------------------------------------------------------------------------------
# Which tokens are scaled
# ---------------------------------------------------------------------------------------------------------------


def _projection_outputs(loaded: LoadedMLLM, inputs: dict, layer: int, name: str) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []
    projection = getattr(loaded.decoder_layers[layer].self_attn, name)
    handle = projection.register_forward_hook(lambda module, args, output: captured.append(output.detach().clone()))
    try:
        with torch.inference_mode():
            loaded.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    return captured


@pytest.mark.parametrize(("mode", "name"), [("logit", "k_proj"), ("weight_raw", "v_proj")])
@pytest.mark.parametrize("tokens", ["all", "query"])
def test_exactly_the_selected_visual_tokens_are_scaled(qwen, mode, name, tokens):
    inputs = _prompt(qwen, [3])
    ids = inputs["input_ids"]
    mask = visual_token_mask(ids, qwen.image_token_id, tokens=tokens)
    runs = image_token_runs(ids[0], qwen.image_token_id)
    assert len(runs) == 3
    if tokens == "query":
        assert mask[0].nonzero().flatten().tolist() == list(range(*runs[1]))
    config = CAASConfig(mode=mode, alpha=0.6)
    plain = _projection_outputs(qwen, inputs, 9, name)
    with apply_caas(qwen.model, qwen.decoder_layers, config, mask):
        # Registered after CAAS's hook, so it sees the scaled output. Layer 8 is outside the range.
        scaled = _projection_outputs(qwen, inputs, 9, name)
        outside = _projection_outputs(qwen, inputs, 8, name)
    assert len(scaled) == 3  # prefill + 2 decode steps
    prefill_ratio = scaled[0] / plain[0]
    expected = torch.where(mask, 1.6, 1.0)[..., None].expand_as(prefill_ratio)
    torch.testing.assert_close(prefill_ratio, expected, rtol=1e-6, atol=0)
    assert torch.equal(outside[0], _projection_outputs(qwen, inputs, 8, name)[0])


def test_decode_tokens_are_not_scaled(qwen):
    """At decode steps the k_proj output equals the projection of that step's input, unscaled."""
    inputs = _prompt(qwen, [3])
    mask = visual_token_mask(inputs["input_ids"], qwen.image_token_id)
    attention = qwen.decoder_layers[9].self_attn
    inputs_of_kproj: list[tuple[torch.Tensor, torch.Tensor]] = []
    with apply_caas(qwen.model, qwen.decoder_layers, CAASConfig(mode="logit"), mask):
        handle = attention.k_proj.register_forward_hook(
            lambda module, args, output: inputs_of_kproj.append((args[0].detach().clone(), output.detach().clone()))
        )
        try:
            with torch.inference_mode():
                qwen.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        finally:
            handle.remove()
    assert [x.shape[1] for x, _ in inputs_of_kproj] == [inputs["input_ids"].shape[1], 1, 1, 1]
    with torch.inference_mode():
        for hidden, output in inputs_of_kproj[1:]:
            torch.testing.assert_close(output, attention.k_proj(hidden), rtol=0, atol=0)
        hidden, output = inputs_of_kproj[0]
        raw = attention.k_proj(hidden)
        torch.testing.assert_close(output, raw * torch.where(mask, 1.6, 1.0)[..., None], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes 4-bit (NF4, bf16 compute) on the CPU
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_4bit(tiny_qwen_dir) -> LoadedMLLM:  # noqa: F811
    pytest.importorskip("bitsandbytes")
    return _load(tiny_qwen_dir, "qwen2.5-vl-7b", quantization="4bit")


@pytest.mark.parametrize(("mode", "name"), [("logit", "k_proj"), ("weight_raw", "v_proj")])
def test_4bit_projections_are_scaled_exactly(qwen_4bit, mode, name):
    import bitsandbytes as bnb

    loaded = qwen_4bit
    assert isinstance(getattr(loaded.decoder_layers[9].self_attn, name), bnb.nn.Linear4bit)
    inputs = _prompt(loaded, [3])
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    mask = visual_token_mask(inputs["input_ids"], loaded.image_token_id)
    plain = _projection_outputs(loaded, inputs, 9, name)
    with apply_caas(loaded.model, loaded.decoder_layers, CAASConfig(mode=mode), mask):
        scaled = _projection_outputs(loaded, inputs, 9, name)
    _assert_untouched(loaded)
    expected = plain[0] * torch.where(mask, 1.6, 1.0)[..., None].to(plain[0].dtype)
    torch.testing.assert_close(scaled[0], expected, rtol=0, atol=0)  # the same bf16 multiply
    for step in (1, 2):  # decode steps: the generated token's projection is never scaled
        assert scaled[step].shape[1] == 1


@pytest.mark.parametrize("mode", MODES)
def test_4bit_matches_eager_reference_to_bf16_noise(qwen_4bit, mode):
    check_4bit_within_bf16_noise(qwen_4bit, mode)
