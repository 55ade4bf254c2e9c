"""CAAS on a backbone with per-head key normalisation (Qwen3's ``k_norm``), and refusal of unknown layouts.

In the Qwen3 language models (Qwen3-VL, InternVL3.5, MiniCPM-V 4.5) every attention computes
``k_norm(k_proj(x).view(..., heads, head_dim))``: an RMSNorm per head that removes any scale applied to the
``k_proj`` output. ``logit`` mode therefore scales the ``k_norm`` output (after the norm, before RoPE). The tiny
random-weight Qwen3-VL below is loaded through the production loader and every mode is compared with the
independent eager reference of ``tests/caas_reference.py`` (explicit ``QKᵀ``/softmax on the keys the attention
function receives), over 8 greedy steps with the KV cache, for a left-padded batch and with bitsandbytes 4-bit.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from eagle.settings import CAASSettings, MLLMSettings
from mllm.caas import (
    ATTENTION_LAYOUTS,
    CAASConfig,
    CAASError,
    CAASLayoutError,
    apply_caas,
    attention_layout,
    check_caas_support,
    visual_token_mask,
)
from mllm.loading import CAASUnsupportedError, LoadedMLLM, MLLMLoadError, load_mllm
from tests.caas_reference import (
    MODES,
    assert_untouched,
    check_4bit_within_bf16_noise,
    check_against_reference,
    forward,
    generate,
    load_tiny,
    prompt,
    reference_caas,
)
from tests.fixtures_mllm import tiny_llava_dir, tiny_qwen_dir  # noqa: F401
from tests.tiny_models import TINY_QWEN3_MAX_PIXELS, make_tiny_qwen3_vl

PRESET = "qwen2.5-vl-7b"  # no Qwen3-VL preset: a local model_id overrides the preset's checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core box, two threads spin against other jobs and run much slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"))


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_dir) -> LoadedMLLM:
    return load_tiny(tiny_qwen3_dir, PRESET, max_pixels=TINY_QWEN3_MAX_PIXELS)


@pytest.fixture(scope="module")
def qwen3_4bit(tiny_qwen3_dir) -> LoadedMLLM:
    pytest.importorskip("bitsandbytes")
    return load_tiny(tiny_qwen3_dir, PRESET, max_pixels=TINY_QWEN3_MAX_PIXELS, quantization="4bit")


@contextlib.contextmanager
def old_k_proj_placement(loaded: LoadedMLLM, config: CAASConfig, mask: torch.Tensor):
    """The placement CAAS used before: scale the ``k_proj`` output at visual positions of the prefill.

    Kept here only to document why it was wrong on ``k_norm`` models (the RMSNorm that follows undoes it).
    """
    handles = []

    def scale(module, args, output):
        if output.shape[1] != mask.shape[1]:  # decode steps: generated tokens are never visual
            return output
        return output * torch.where(mask, config.factor, 1.0).to(output.dtype)[..., None]

    try:
        for index in config.layers:
            handles.append(loaded.decoder_layers[index].self_attn.k_proj.register_forward_hook(scale))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# The model really has per-head k_norm, and CAAS knows its layout
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_qwen3_vl_has_per_head_k_norm(qwen3):
    attention = qwen3.decoder_layers[9].self_attn
    assert type(qwen3.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(attention).__name__ == "Qwen3VLTextAttention"
    assert attention.k_norm.weight.shape == (attention.head_dim,)  # per head, not over the whole projection
    layout = attention_layout(attention)
    assert layout is ATTENTION_LAYOUTS[1]
    assert (layout.key_output, layout.value_output) == ("k_norm", "v_proj")
    assert attention_layout(qwen3.decoder_layers[0].self_attn) is layout


def test_layouts_of_the_other_backbones(tiny_qwen_dir, tiny_llava_dir):  # noqa: F811
    for directory, preset in ((tiny_qwen_dir, "qwen2.5-vl-7b"), (tiny_llava_dir, "llava-1.5-7b")):
        loaded = load_tiny(directory, preset)
        layout = attention_layout(loaded.decoder_layers[9].self_attn)
        assert (layout.key_output, layout.value_output) == ("k_proj", "v_proj"), preset


# ---------------------------------------------------------------------------------------------------------------
# Why: the old k_proj placement is a no-op on this model; the new one is not
# ---------------------------------------------------------------------------------------------------------------


def test_old_k_proj_placement_was_a_no_op(qwen3):
    inputs = prompt(qwen3, [3])
    config = CAASConfig(mode="logit", alpha=0.6)
    mask = visual_token_mask(inputs["input_ids"], qwen3.image_token_id)
    base = forward(qwen3, inputs).logits
    with old_k_proj_placement(qwen3, config, mask):
        old = forward(qwen3, inputs).logits
    with apply_caas(qwen3.model, qwen3.decoder_layers, config, mask):
        new = forward(qwen3, inputs).logits
    with reference_caas(qwen3, config, mask):
        reference = forward(qwen3, inputs).logits
    assert (old - base).abs().max().item() < 1e-4  # k_norm normalised the scale away: CAAS silently did nothing
    assert (new - base).abs().max().item() > 1e-2
    assert (new - reference).abs().max().item() < 1e-4


def test_logit_mode_scales_the_k_norm_output_and_not_k_proj(qwen3):
    """The key the attention function sees (k_norm output) is × 1.6 at visual positions; k_proj is left alone."""
    inputs = prompt(qwen3, [3])
    mask = visual_token_mask(inputs["input_ids"], qwen3.image_token_id)
    attention = qwen3.decoder_layers[9].self_attn
    captured: dict[str, list[torch.Tensor]] = {"k_proj": [], "k_norm": []}

    def capture(name):
        return lambda module, args, output: captured[name].append(output.detach().clone())

    def run() -> dict[str, torch.Tensor]:
        for values in captured.values():
            values.clear()
        handles = [getattr(attention, name).register_forward_hook(capture(name)) for name in captured]
        try:
            forward(qwen3, inputs)
        finally:
            for handle in handles:
                handle.remove()
        return {name: values[0] for name, values in captured.items()}

    plain = run()
    with apply_caas(qwen3.model, qwen3.decoder_layers, CAASConfig(mode="logit"), mask):
        scaled = run()  # hooks registered after CAAS's: they see its output
    assert torch.equal(scaled["k_proj"], plain["k_proj"])
    expected = plain["k_norm"] * torch.where(mask, 1.6, 1.0)[..., None, None]  # [B, T, heads, head_dim]
    torch.testing.assert_close(scaled["k_norm"], expected, rtol=1e-6, atol=0)
    assert_untouched(qwen3)


# ---------------------------------------------------------------------------------------------------------------
# Production == eager reference on the k_norm model: all modes, KV cache, batch, 4-bit
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", ["all", "query"])
@pytest.mark.parametrize("mode", MODES)
def test_qwen3_matches_eager_reference(qwen3, mode, tokens):
    inputs = prompt(qwen3, [3])
    config = CAASConfig(mode=mode, tokens=tokens)
    mask = visual_token_mask(inputs["input_ids"], qwen3.image_token_id, tokens=tokens)
    check_against_reference(qwen3, inputs, config, mask)


@pytest.mark.parametrize("mode", MODES)
def test_qwen3_without_kv_cache_matches_eager_reference(qwen3, mode):
    """Greedy decoding by full forward passes (no cache): every step re-runs the whole sequence through CAAS."""
    inputs = prompt(qwen3, [3])
    mask = visual_token_mask(inputs["input_ids"], qwen3.image_token_id)
    config = CAASConfig(mode=mode)

    def decode() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            out = qwen3.model.generate(
                **inputs,
                max_new_tokens=4,
                min_new_tokens=4,
                do_sample=False,
                use_cache=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return out.sequences, torch.stack(out.logits, dim=1)

    cached_tokens, _ = generate(qwen3, inputs)
    with apply_caas(qwen3.model, qwen3.decoder_layers, config, mask):
        tokens, logits = decode()
        with_cache, _ = generate(qwen3, inputs)
    with reference_caas(qwen3, config, mask):
        ref_tokens, ref_logits = decode()
    assert_untouched(qwen3)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert torch.equal(with_cache[:, : tokens.shape[1]], tokens)  # the cached run decodes the same tokens


@pytest.mark.parametrize("mode", MODES)
def test_qwen3_left_padded_batch_matches_eager_reference(qwen3, mode):
    inputs = prompt(qwen3, [3, 2], texts=["Is there any defect in the object?", "Defect?"])
    assert (inputs["attention_mask"] == 0).any()  # really padded
    mask = visual_token_mask(inputs["input_ids"], qwen3.image_token_id, tokens="query")
    check_against_reference(qwen3, inputs, CAASConfig(mode=mode, alpha=1.0, layer_start=4, layer_end=12), mask)


def test_qwen3_4bit_k_norm_output_is_scaled_exactly(qwen3_4bit):
    import bitsandbytes as bnb

    loaded = qwen3_4bit
    attention = loaded.decoder_layers[9].self_attn
    assert isinstance(attention.k_proj, bnb.nn.Linear4bit)
    assert attention_layout(attention).key_output == "k_norm"
    inputs = prompt(loaded, [3])
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    mask = visual_token_mask(inputs["input_ids"], loaded.image_token_id)
    captured: list[torch.Tensor] = []

    def run() -> torch.Tensor:
        captured.clear()
        handle = attention.k_norm.register_forward_hook(lambda m, a, output: captured.append(output.clone()))
        try:
            forward(loaded, inputs)
        finally:
            handle.remove()
        return captured[0]

    plain = run()
    with apply_caas(loaded.model, loaded.decoder_layers, CAASConfig(mode="logit"), mask):
        scaled = run()
    assert_untouched(loaded)
    expected = plain * torch.where(mask, 1.6, 1.0)[..., None, None].to(plain.dtype)
    torch.testing.assert_close(scaled, expected, rtol=0, atol=0)  # the same bf16 multiply


@pytest.mark.parametrize("mode", MODES)
def test_qwen3_4bit_matches_eager_reference_to_bf16_noise(qwen3_4bit, mode):
    check_4bit_within_bf16_noise(qwen3_4bit, mode)


# ---------------------------------------------------------------------------------------------------------------
# Unknown attention layouts: refused at load time (and by apply_caas), never silently ignored
# ---------------------------------------------------------------------------------------------------------------


class _FusedQKV(nn.Module):
    """An attention with one fused QKV projection (as in Phi-3 / InternLM2): not a layout CAAS knows."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.layer_idx = original.layer_idx
        self.config = original.config
        self.qkv_proj = nn.Linear(8, 24)
        self.o_proj = original.o_proj


def _with_unknown_layout(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Make ``AutoModelForImageTextToText.from_pretrained`` return a model with an unknown attention layout."""
    from transformers import AutoModelForImageTextToText

    original = AutoModelForImageTextToText.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        for layer in model.model.language_model.layers:
            if kind == "fused":
                layer.self_attn = _FusedQKV(layer.self_attn)
            else:  # an extra key normalisation under a name CAAS does not know
                layer.self_attn.k_layernorm = nn.LayerNorm(8)
        return model

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(from_pretrained))


def _settings(directory, **overrides) -> MLLMSettings:
    return MLLMSettings(preset=PRESET, model_id=str(directory), device="cpu", quantization="fp32", **overrides)


@pytest.mark.parametrize("kind", ["fused", "extra_norm"])
@pytest.mark.parametrize("mode", MODES)
def test_unknown_attention_layout_is_refused_at_load_time(monkeypatch, tiny_qwen_dir, kind, mode):  # noqa: F811
    _with_unknown_layout(monkeypatch, kind)
    with pytest.raises(CAASError) as caught:
        load_mllm(_settings(tiny_qwen_dir), caas=CAASSettings(policy="auto", mode=mode))
    error = caught.value
    assert isinstance(error, CAASLayoutError) and isinstance(error, MLLMLoadError)  # fallback paths catch it too
    assert isinstance(error, CAASUnsupportedError)
    message = str(error)
    assert "Qwen2_5_VLForConditionalGeneration" in message  # the model class
    assert "decoder layer 9" in message
    found = "qkv_proj" if kind == "fused" else "k_layernorm"
    assert found in message  # what it found
    assert "k_proj" in message and "k_norm" in message  # what was expected
    assert "EAGLE_CAAS__POLICY=off" in message


def test_unknown_layout_loads_when_caas_is_off_but_apply_caas_refuses(monkeypatch, tiny_qwen_dir):  # noqa: F811
    _with_unknown_layout(monkeypatch, "extra_norm")
    loaded = load_mllm(_settings(tiny_qwen_dir), caas=CAASSettings(policy="off"))
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(CAASLayoutError, match="k_layernorm"):
        with apply_caas(loaded.model, loaded.decoder_layers, CAASConfig(), mask):
            pass
    assert_untouched(loaded)


def test_remote_code_attention_is_refused(qwen3):
    """Same sub-modules, but a class from a checkpoint's own code: CAAS cannot know where it normalises keys."""
    attention = copy.copy(qwen3.decoder_layers[9].self_attn)
    attention.__class__ = type(
        "Qwen3Attention", (type(attention),), {"__module__": "transformers_modules.some_repo.modeling"}
    )
    with pytest.raises(CAASLayoutError, match="remote code"):
        attention_layout(attention)


def test_known_layouts_load_with_caas_on(tiny_qwen3_dir, tiny_qwen_dir, tiny_llava_dir):  # noqa: F811
    for directory, preset, pixels in (
        (tiny_qwen3_dir, PRESET, TINY_QWEN3_MAX_PIXELS),
        (tiny_qwen_dir, "qwen2.5-vl-7b", None),
        (tiny_llava_dir, "llava-1.5-7b", None),
    ):
        settings = MLLMSettings(preset=preset, model_id=str(directory), device="cpu", max_pixels=pixels)
        loaded = load_mllm(settings, caas=CAASSettings(policy="on", mode="weight"))
        for mode in MODES:
            check_caas_support(loaded.model, loaded.decoder_layers, CAASConfig(mode=mode))


def test_layer_range_beyond_the_model_is_refused_at_load_time(tiny_qwen3_dir):
    caas = CAASSettings(policy="auto", layer_start=9, layer_end=16)
    settings = _settings(tiny_qwen3_dir, max_pixels=TINY_QWEN3_MAX_PIXELS)
    with pytest.raises(CAASUnsupportedError, match="exceed the model's 16 decoder layers"):
        load_mllm(settings, caas=caas)
    load_mllm(settings, caas=caas.model_copy(update={"policy": "off"}))
