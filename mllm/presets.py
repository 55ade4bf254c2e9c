"""Registry of the multimodal LLMs EAGLE runs on, and generic look-ups of their image token and decoder layers.

A preset names a checkpoint on the Hugging Face hub and what EAGLE needs to know about it: its family (how its
processor is given a pixel budget), default CAAS layers, per-image pixel budget, whether several images per
prompt are supported, and an approximate size for memory estimates. The five backbones of the paper
(Table 1) plus a small Qwen for hosts with little memory.

Look-ups are generic first (``config.image_token_id`` / ``image_token_index``, the processor's
``image_token_id``, the language model's layer list) so a ``model_id`` override pointing at a fine-tune or a
local copy works without a new preset.

Example:
    >>> preset = get_preset("qwen2.5-vl-7b")
    >>> preset.hub_id
    'Qwen/Qwen2.5-VL-7B-Instruct'
    >>> preset.caas_layers
    (9, 15)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from mllm.errors import MLLMError

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "Family",
    "ModelPreset",
    "PresetError",
    "apply_pixel_budget",
    "estimate_weight_memory_gib",
    "find_decoder_layers",
    "find_image_token_id",
    "get_preset",
]

Family = Literal["qwen2.5-vl", "internvl", "llava", "llava-next", "minicpm-v"]

# Qwen2.5-VL: one visual token per 28×28 pixels. 512 tokens per image (≈ 633×633 px): the reference code's
# min_pixels = max_pixels for every image. The three-image EAGLE prompt stays near 1.6k tokens: a 7B model in
# 4-bit then needs ≈ 7 GiB on the GPU, well inside 24 GB.
_QWEN_PIXELS = 512 * 28 * 28
_INTERNVL_TILE = 448  # InternVL3 tiles are 448×448 px, 256 visual tokens each.
_LLAVA_NEXT_BASE = 336


class PresetError(MLLMError, ValueError):
    """Unknown preset name, or a preset that needs an opt-in the settings do not give."""

    code = "invalid_preset"


@dataclass(frozen=True)
class ModelPreset:
    """What EAGLE needs to know about one multimodal LLM checkpoint.

    Attributes:
        name: Registry key (``EAGLE_MLLM__PRESET``).
        hub_id: Hugging Face hub repository of the weights.
        family: Architecture family; decides how the pixel budget is applied to the processor.
        description: One line for docs and UIs.
        params_billion: Total parameters (language model + vision tower), for memory estimates.
        unquantized_billion: Parameters bitsandbytes leaves in 16-bit (vision tower, projector, token embeddings,
            LM head), for the 4/8-bit memory estimate.
        num_decoder_layers: Decoder layers of the language model (CAAS layer indices must be below it).
        caas_layers: Default CAAS layer range, 0-based and inclusive (the paper: 9..15).
        max_pixels: Default per-image pixel budget; ``None`` when the processor resizes to a fixed size.
        multi_image: Whether the model accepts several images in one prompt (EAGLE sends up to three).
        trust_remote_code: The checkpoint needs ``trust_remote_code=True`` (an explicit opt-in).
        image_token: Image placeholder token string, the last resort of :func:`find_image_token_id`.
        quantization_skip_modules: Modules kept un-quantised under 4/8-bit (vision tower, projector, head); transformers
            5 matches each from the start of the full module name or as its suffix.
    """

    name: str
    hub_id: str
    family: Family
    description: str
    params_billion: float
    unquantized_billion: float
    num_decoder_layers: int
    caas_layers: tuple[int, int] = (9, 15)
    max_pixels: int | None = _QWEN_PIXELS
    multi_image: bool = True
    trust_remote_code: bool = False
    image_token: str | None = None
    quantization_skip_modules: tuple[str, ...] = ("lm_head",)


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="qwen2.5-vl-7b",
            hub_id="Qwen/Qwen2.5-VL-7B-Instruct",
            family="qwen2.5-vl",
            description="Qwen2.5-VL 7B Instruct — the paper's main backbone (default).",
            params_billion=8.3,
            unquantized_billion=1.77,
            num_decoder_layers=28,
            image_token="<|image_pad|>",
            quantization_skip_modules=("model.visual", "lm_head"),
        ),
        ModelPreset(
            name="qwen2.5-vl-3b",
            hub_id="Qwen/Qwen2.5-VL-3B-Instruct",
            family="qwen2.5-vl",
            description="Qwen2.5-VL 3B Instruct — small preset for hosts with little memory (CAAS layers untuned).",
            params_billion=3.8,
            unquantized_billion=0.98,
            num_decoder_layers=36,
            image_token="<|image_pad|>",
            quantization_skip_modules=("model.visual", "lm_head"),
        ),
        ModelPreset(
            name="internvl3-8b",
            hub_id="OpenGVLab/InternVL3-8B-hf",
            family="internvl",
            description="InternVL3 8B (transformers-native checkpoint).",
            params_billion=7.9,
            unquantized_billion=1.42,
            num_decoder_layers=28,
            max_pixels=2 * _INTERNVL_TILE * _INTERNVL_TILE,
            image_token="<IMG_CONTEXT>",
            quantization_skip_modules=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        ),
        ModelPreset(
            name="llava-1.5-7b",
            hub_id="llava-hf/llava-1.5-7b-hf",
            family="llava",
            description="LLaVA-1.5 7B — fixed 336×336 input, 576 visual tokens per image.",
            params_billion=7.1,
            unquantized_billion=0.58,
            num_decoder_layers=32,
            max_pixels=None,
            image_token="<image>",
            quantization_skip_modules=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        ),
        ModelPreset(
            name="llava-next-7b",
            hub_id="llava-hf/llava-v1.6-mistral-7b-hf",
            family="llava-next",
            description="LLaVA-NeXT (v1.6) Mistral 7B — any-resolution tiles of 336 px.",
            params_billion=7.6,
            unquantized_billion=0.58,
            num_decoder_layers=32,
            max_pixels=2 * _LLAVA_NEXT_BASE * _LLAVA_NEXT_BASE,
            image_token="<image>",
            quantization_skip_modules=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        ),
        ModelPreset(
            name="minicpm-v-4.5",
            hub_id="openbmb/MiniCPM-V-4_5",
            family="minicpm-v",
            description="MiniCPM-V 4.5 (8B) — runs the checkpoint's own remote code: needs an explicit opt-in.",
            params_billion=8.7,
            unquantized_billion=1.74,
            num_decoder_layers=36,
            max_pixels=None,
            trust_remote_code=True,
            image_token="<unk>",
            quantization_skip_modules=("vpm", "resampler", "lm_head"),
        ),
    )
}

DEFAULT_PRESET = "qwen2.5-vl-7b"


def get_preset(name: str, *, trust_remote_code: bool | None = None) -> ModelPreset:
    """Return the preset called ``name``.

    Args:
        name: A key of :data:`PRESETS` (case-insensitive).
        trust_remote_code: When given, a preset that needs remote code is refused unless this is true
            (pass ``settings.mllm.trust_remote_code``); ``None`` skips that check (look-up only).

    Raises:
        PresetError: unknown name (the message lists the known ones), or remote code not allowed.
    """
    preset = PRESETS.get(name.strip().lower())
    if preset is None:
        raise PresetError(f"unknown MLLM preset {name!r}; known presets: {', '.join(PRESETS)}")
    if preset.trust_remote_code and trust_remote_code is False:
        raise PresetError(
            f"preset {preset.name!r} ({preset.hub_id}) runs code downloaded with the checkpoint; "
            "allow it explicitly with EAGLE_MLLM__TRUST_REMOTE_CODE=true"
        )
    return preset


def _config_attr(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def find_image_token_id(model: torch.nn.Module, processor: Any, preset: ModelPreset | None = None) -> int:
    """Return the token id that marks visual positions in ``input_ids``.

    Order: ``model.config.image_token_id`` / ``image_token_index`` (what the model itself uses to place image
    features), then ``processor.image_token_id``, then the processor's ``image_token`` string, then the preset's
    ``image_token`` string, each converted with the tokenizer.

    Raises:
        PresetError: none of these gives an id.
    """
    found = _config_attr(getattr(model, "config", None), "image_token_id", "image_token_index")
    if found is not None:
        return found
    found = _config_attr(processor, "image_token_id")
    if found is not None:
        return found
    tokenizer = getattr(processor, "tokenizer", processor)
    unk = getattr(tokenizer, "unk_token_id", None)
    candidates = [getattr(processor, "image_token", None), preset.image_token if preset else None]
    for token in candidates:
        if isinstance(token, str) and hasattr(tokenizer, "convert_tokens_to_ids"):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and (token_id != unk or token == getattr(tokenizer, "unk_token", None)):
                return token_id
    raise PresetError(
        f"cannot find the image token id of {type(model).__name__}: no config.image_token_id / image_token_index "
        "and no image token in its processor"
    )


_LAYER_PATHS = (
    "model.language_model.layers",  # transformers 5: Qwen2.5-VL, LLaVA, LLaVA-NeXT, InternVL
    "model.language_model.model.layers",
    "language_model.model.layers",  # transformers 4 layouts
    "language_model.layers",
    "model.layers",
    "llm.model.layers",  # MiniCPM-V remote code
)


def _resolve(root: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def find_decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Return the language model's decoder layers (the ``ModuleList`` CAAS and the attention read-out hook into).

    Tries ``model.get_decoder().layers`` first (transformers' own accessor), then the known attribute paths.

    Raises:
        PresetError: no decoder layer list found.
    """
    candidates = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(getattr(get_decoder(), "layers", None))
        except (AttributeError, NotImplementedError, TypeError):
            pass
    candidates.extend(_resolve(model, path) for path in _LAYER_PATHS)
    for layers in candidates:
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0 and hasattr(layers[0], "self_attn"):
            return layers
    raise PresetError(f"cannot find the decoder layers of {type(model).__name__} (tried {', '.join(_LAYER_PATHS)})")


def apply_pixel_budget(preset: ModelPreset, model: torch.nn.Module, processor: Any, max_pixels: int | None) -> None:
    """Give every image the same pixel budget (hence visual tokens), in place, the way the preset's family allows.

    Every image of a prompt (template, query, boxed query) goes through the same processor, so one budget per model
    means one budget per image; pinning the lower bound too means a small image (an old bank's thumbnail) is
    brought UP to the budget instead of reaching the model with fewer pixels than the query.

    - ``qwen2.5-vl``: ``min_pixels = max_pixels = budget`` (the processor's ``shortest_edge`` and ``longest_edge``;
      one token per 28×28 px), as the reference code loads Qwen2.5-VL (512·28·28).
    - ``internvl``: ``min_patches = max_patches`` = number of 448-px tiles fitting the budget (at least 1).
    - ``llava-next``: only the any-resolution grid pinpoints within the budget are kept, in both the processor
      and the model config (they must agree or the feature count mismatches).
    - ``llava`` / ``minicpm-v``: fixed-size or model-managed input; the budget is not applicable (no-op).

    Args:
        preset: The model's preset.
        model: The loaded model (its config is edited for ``llava-next``).
        processor: The loaded processor.
        max_pixels: Pixels per image; ``None`` uses the preset's default.
    """
    budget = max_pixels if max_pixels is not None else preset.max_pixels
    if budget is None:
        return
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return
    if preset.family == "qwen2.5-vl":
        image_processor.size = {"shortest_edge": budget, "longest_edge": budget}
    elif preset.family == "internvl":
        tiles = max(1, budget // (_INTERNVL_TILE * _INTERNVL_TILE))
        image_processor.min_patches = image_processor.max_patches = tiles
    elif preset.family == "llava-next":
        pinpoints = [list(p) for p in getattr(image_processor, "image_grid_pinpoints", None) or []]
        if pinpoints:
            kept = [p for p in pinpoints if p[0] * p[1] <= budget] or [min(pinpoints, key=lambda p: p[0] * p[1])]
            image_processor.image_grid_pinpoints = kept
            cast(Any, model).config.image_grid_pinpoints = kept  # a transformers model (not a plain nn.Module)


def estimate_weight_memory_gib(preset: ModelPreset, quantization: str) -> float:
    """Rough memory for the weights alone, in GiB, rounded up to 0.1 (activations and the KV cache come on top).

    Bytes per parameter: 4bit 0.53 (NF4 + double-quantised block scales), 8bit 1.0, bf16 2, fp32 4; under 4/8-bit
    the preset's ``unquantized_billion`` parameters stay at 2 bytes. 5 % is added for buffers and fragmentation.

    Raises:
        ValueError: an unknown quantisation (``auto`` must be resolved first).
    """
    per_param = {"4bit": 0.53, "8bit": 1.0, "bf16": 2.0, "fp32": 4.0}
    if quantization not in per_param:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {', '.join(per_param)}")
    if quantization in ("4bit", "8bit"):
        kept = preset.unquantized_billion
        billions = (preset.params_billion - kept) * per_param[quantization] + kept * 2.0
    else:
        billions = preset.params_billion * per_param[quantization]
    return math.ceil(billions * 1e9 * 1.05 / 2**30 * 10) / 10
