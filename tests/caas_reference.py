"""The eager reference of CAAS (tests only) and the helpers the CAAS tests share.

The reference is an attention function that computes ``softmax(QKᵀ·s + mask)`` explicitly and scales, per the
paper, either the logits (``logit``) or the weights (``weight``: renormalised, ``weight_raw``: not) to the visual
keys in the chosen layers. It receives the query and key exactly as the attention function does — after
``k_proj``, any per-head ``k_norm`` and RoPE — so it is independent of where the production hooks sit. The
production modes never do that: they scale key or value projections with hooks, or add an SDPA bias.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from eagle.settings import MLLMSettings
from mllm.caas import CAASConfig, apply_caas, visual_token_mask
from mllm.loading import LoadedMLLM, load_mllm
from tests.tiny_models import TINY_QWEN_MAX_PIXELS

MODES = ("logit", "weight", "weight_raw")
STEPS = 8

# ---------------------------------------------------------------------------------------------------------------
# The eager reference (tests only)
# ---------------------------------------------------------------------------------------------------------------

REFERENCE = "caas_eager_reference_for_tests"
_REFERENCE_STATE: dict = {}


def _padded(mask: torch.Tensor, length: int, batch: int) -> torch.Tensor:
    """The prompt's visual mask over ``length`` keys (generated keys are not visual), as ``[B, 1, 1, K]``."""
    visual = torch.zeros(mask.shape[0], length, dtype=torch.bool)
    keep = min(length, mask.shape[1])
    visual[:, :keep] = mask[:, :keep]
    return visual.repeat_interleave(batch // mask.shape[0], dim=0)[:, None, None, :]


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with Eq. 9 applied literally in the chosen layers."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = query @ key.transpose(-1, -2) * scaling  # A = QKᵀ/√d
    config = _REFERENCE_STATE.get("config")
    edited = config is not None and id(module) in _REFERENCE_STATE["modules"]
    if edited:
        visual = _padded(_REFERENCE_STATE["mask"], key.shape[-2], query.shape[0])
        if config.mode == "logit":
            logits = torch.where(visual, logits * (1 + config.alpha), logits)
    if attention_mask is not None:
        logits = logits + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    if edited and config.mode in ("weight", "weight_raw"):
        weights = torch.where(visual, weights * (1 + config.alpha), weights)
        if config.mode == "weight":
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights @ value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, eager_mask)


@contextlib.contextmanager
def reference_caas(loaded: LoadedMLLM, config: CAASConfig | None, mask: torch.Tensor | None):
    """Run the text model through the eager reference (with CAAS per ``config``, or none)."""
    modules = {id(loaded.decoder_layers[i].self_attn) for i in config.layers} if config else set()
    _REFERENCE_STATE.update(config=config, mask=mask, modules=modules)
    previous = loaded.model.config.text_config._attn_implementation
    loaded.model.set_attn_implementation({"text_config": REFERENCE})
    try:
        yield
    finally:
        loaded.model.set_attn_implementation({"text_config": previous})
        _REFERENCE_STATE.clear()


# ---------------------------------------------------------------------------------------------------------------
# Models, prompts, checks
# ---------------------------------------------------------------------------------------------------------------


def load_tiny(directory, preset: str, **overrides) -> LoadedMLLM:
    """Load a tiny model through the production loader (CPU, fp32, the tiny Qwen pixel budget by default)."""
    settings = MLLMSettings(
        preset=preset, model_id=str(directory), device="cpu", quantization="fp32", max_pixels=TINY_QWEN_MAX_PIXELS
    )
    return load_mllm(settings.model_copy(update=overrides))


def random_images(count: int, seed: int, size=(64, 64)) -> list[Image.Image]:
    """``count`` random RGB images, a function of ``seed``."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)) for _ in range(count)]


def prompt(loaded: LoadedMLLM, images_per_row: list[int], texts: list[str] | None = None) -> dict:
    """A batch of chat prompts (left-padded), each with the given number of images followed by a question."""
    processor = loaded.processor
    processor.tokenizer.padding_side = "left"
    texts = texts or ["Is there any defect in the object?"] * len(images_per_row)
    prompts, images = [], []
    for row, (count, text) in enumerate(zip(images_per_row, texts, strict=True)):
        content = [{"type": "image"}] * count + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        images.extend(random_images(count, seed=row))
    return dict(processor(text=prompts, images=images, return_tensors="pt", padding=True))


def generate(loaded: LoadedMLLM, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation of exactly :data:`STEPS` tokens with the KV cache: ``(sequences, logits [B, STEPS, V])``."""
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits, dim=1)  # [B, STEPS, vocab]


def forward(loaded: LoadedMLLM, inputs: dict, **kwargs):
    """One forward pass without gradients."""
    with torch.inference_mode():
        return loaded.model(**inputs, **kwargs)


def hook_count(loaded: LoadedMLLM) -> int:
    """Hooks installed by EAGLE's modules on the attention modules and their children (``*_proj``, ``k_norm`` …).

    transformers installs output-recording hooks of its own; only those defined in ``mllm.*`` are counted.
    """
    hooks = []
    for layer in loaded.decoder_layers:
        for module in layer.self_attn.modules():
            hooks += [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return sum(getattr(hook, "__module__", "").startswith("mllm.") for hook in hooks)


def assert_untouched(loaded: LoadedMLLM) -> None:
    """No EAGLE hook left and the language model back on SDPA."""
    assert hook_count(loaded) == 0
    assert loaded.model.config.text_config._attn_implementation == "sdpa"


def check_against_reference(loaded: LoadedMLLM, inputs: dict, config: CAASConfig, mask: torch.Tensor) -> None:
    """Production CAAS == the eager reference over :data:`STEPS` greedy steps with KV cache, and the edit is real."""
    base_tokens, base_logits = generate(loaded, inputs)
    with apply_caas(loaded.model, loaded.decoder_layers, config, mask):
        tokens, logits = generate(loaded, inputs)
    with reference_caas(loaded, config, mask):
        ref_tokens, ref_logits = generate(loaded, inputs)
    assert_untouched(loaded)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    # ... and the edit is real: far above the tolerance.
    assert (logits - base_logits).abs().max().item() > 1e-2


def check_4bit_within_bf16_noise(loaded: LoadedMLLM, mode: str) -> None:
    """A 4-bit model (bf16 compute): CAAS equals the eager reference to within bf16 rounding.

    SDPA and the eager reference differ by bf16 rounding (|Δ| ≈ 0.1 on the logits whatever α), so α = 2 makes
    the CAAS effect several times that noise; production must sit within the noise.
    """
    inputs = prompt(loaded, [3])
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    mask = visual_token_mask(inputs["input_ids"], loaded.image_token_id)
    config = CAASConfig(mode=mode, alpha=2.0)
    with apply_caas(loaded.model, loaded.decoder_layers, config, mask):
        logits = forward(loaded, inputs).logits.float()
    with reference_caas(loaded, config, mask):
        reference = forward(loaded, inputs).logits.float()
    with reference_caas(loaded, None, None):
        reference_without = forward(loaded, inputs).logits.float()
    assert_untouched(loaded)
    noise = (logits - reference).norm().item()
    effect = (reference - reference_without).norm().item()
    assert (logits - reference).abs().max().item() < 0.2
    assert noise < effect / 3, (noise, effect)
