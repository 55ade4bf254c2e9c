"""CAAS — Confidence-Aware Attention Scaling (paper §3.3.3, Eq. 9).

When the expert is unsure (``tau <= s_img <= s_max``), the attention that the language model's intermediate
decoder layers (default 9..15, 0-based, inclusive) pay to visual tokens is amplified by ``1 + alpha``. Three
readings of Eq. 9 are supported, each implemented without eager attention and without replacing model methods:

``logit`` (the reference code)
    Pre-softmax logits ``QK^T/sqrt(d)`` to visual keys × (1+α) — exactly the same as scaling the visual tokens'
    final KEY vectors by (1+α). The scale is applied to the key as the attention function sees it, minus RoPE:
    after ``k_proj`` and after any per-head key normalisation, before RoPE (a rotation, so it commutes with the
    scale). A forward hook on the module whose output is that key — ``k_norm`` where the attention has one (the
    Qwen3 language models of Qwen3-VL, InternVL3.5 and MiniCPM-V 4.5: ``k_norm(k_proj(x).view(..., heads,
    head_dim))``, an RMSNorm that would normalise a scale applied to ``k_proj``'s output away), ``k_proj``
    otherwise — scales it at visual positions of the prompt. The KV cache then holds the scaled keys, so decode
    steps see them too while the newly generated tokens are never scaled.
``weight`` (Eq. 9 with rows renormalised)
    Post-softmax weights to visual keys × (1+α), rows renormalised — the same as adding ``ln(1+α)`` to those
    logits. Installed as an additive ``position_bias`` through the attention function registered by
    :mod:`mllm.attention_edits`; the bias covers every visual key, cached ones included.
``weight_raw`` (Eq. 9 literally, rows not renormalised)
    Post-softmax weights × (1+α) without renormalising — the same as scaling the visual tokens' VALUE vectors by
    (1+α). A forward hook on each layer's ``v_proj`` (no attention layout normalises values).

Hooks on module outputs also work for bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` projections.

Attention layouts. The hooks are exact only for attention modules whose structure is known
(:data:`ATTENTION_LAYOUTS`): transformers' own attention classes with separate ``q_proj`` / ``k_proj`` /
``v_proj`` / ``o_proj`` and nothing else (Qwen2.5-VL, LLaVA-1.5's Llama, LLaVA-NeXT's Mistral, InternVL3's Qwen2),
or the same plus per-head ``q_norm`` / ``k_norm`` (Qwen3-VL, InternVL3.5 and MiniCPM-V 4.5's Qwen3). Anything
else — fused QKV, another key normalisation, an attention class from remote code — is refused with
:class:`CAASLayoutError`: by :func:`check_caas_support` when the model is loaded with CAAS enabled, and by
:func:`apply_caas` itself, never silently ignored.

Example:
    >>> config = CAASConfig(mode="logit", alpha=0.6)
    >>> mask = visual_token_mask(inputs["input_ids"], loaded.image_token_id)  # doctest: +SKIP
    >>> with apply_caas(loaded.model, loaded.decoder_layers, config, mask):  # doctest: +SKIP
    ...     output = loaded.model.generate(**inputs, max_new_tokens=8)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

import torch
from torch import nn

from mllm.attention_edits import (
    AttentionEdit,
    AttentionEditError,
    DecoderLayers,
    edited_attention,
    language_config_key,
)
from mllm.config import CAASMode, CAASPolicy, CAASTokens
from mllm.errors import MLLMError

if TYPE_CHECKING:
    from mllm.config import CAASSettings

__all__ = [
    "ATTENTION_LAYOUTS",
    "AttentionLayout",
    "CAASError",
    "CAASLayoutError",
    "CAASConfig",
    "CAASMode",
    "CAASPolicy",
    "CAASTokens",
    "should_apply",
    "visual_token_mask",
    "image_token_runs",
    "apply_caas",
    "apply_caas_if",
    "attention_layout",
    "check_caas_support",
]


class CAASError(MLLMError, ValueError):
    """CAAS cannot be configured or installed as asked (bad setting, layer range, mask or model layout)."""

    code = "caas_invalid"


class CAASLayoutError(CAASError):
    """The model's attention modules are not laid out as any of :data:`ATTENTION_LAYOUTS`: CAAS would be wrong."""

    code = "caas_unsupported_layout"


@dataclass(frozen=True)
class AttentionLayout:
    """One attention-module structure the CAAS hooks know.

    Attributes:
        name: Short description, for messages.
        modules: The exact set of direct child module names of the attention module.
        key_output: The child whose output is the key as the attention function receives it, before RoPE (and
            before the KV cache): where ``logit`` mode scales.
        value_output: The child whose output is the value: where ``weight_raw`` mode scales.
        models: The model families known to use it (documentation only).
    """

    name: str
    modules: frozenset[str]
    key_output: str
    value_output: str
    models: str


ATTENTION_LAYOUTS: tuple[AttentionLayout, ...] = (
    AttentionLayout(
        name="q_proj/k_proj/v_proj/o_proj",
        modules=frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}),
        key_output="k_proj",
        value_output="v_proj",
        models="Qwen2.5-VL, LLaVA-1.5 (Llama), LLaVA-NeXT (Mistral), InternVL3 (Qwen2)",
    ),
    AttentionLayout(
        name="q_proj/k_proj/v_proj/o_proj + per-head q_norm/k_norm",
        modules=frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}),
        key_output="k_norm",
        value_output="v_proj",
        models="Qwen3-VL, InternVL3.5 and MiniCPM-V 4.5 (Qwen3)",
    ),
)
"""The attention layouts CAAS supports (matched on the exact set of child modules of a transformers class)."""


@dataclass(frozen=True)
class CAASConfig:
    """What CAAS does when it is active.

    Attributes:
        mode: ``logit``, ``weight`` or ``weight_raw`` (see the module docstring).
        alpha: Scaling factor α ≥ 0; attention to visual tokens is multiplied by ``1 + alpha``.
        layer_start: First decoder layer edited (0-based, inclusive).
        layer_end: Last decoder layer edited (0-based, inclusive).
        tokens: ``all`` images' visual tokens, or only the ``query`` image's.
    """

    mode: CAASMode = "logit"
    alpha: float = 0.6
    layer_start: int = 9
    layer_end: int = 15
    tokens: CAASTokens = "all"

    def __post_init__(self) -> None:
        if self.mode not in get_args(CAASMode):
            raise CAASError(f"unknown CAAS mode {self.mode!r}; expected one of {get_args(CAASMode)}")
        if self.tokens not in get_args(CAASTokens):
            raise CAASError(f"unknown CAAS token selection {self.tokens!r}; expected one of {get_args(CAASTokens)}")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha >= 0):
            raise CAASError(f"CAAS alpha must be a finite number >= 0, got {self.alpha!r}")
        if not 0 <= self.layer_start <= self.layer_end:
            raise CAASError(f"CAAS layers must satisfy 0 <= start <= end, got {self.layer_start}..{self.layer_end}")

    @classmethod
    def from_settings(cls, settings: CAASSettings) -> CAASConfig:
        """Build from the ``caas`` settings group (``EAGLE_CAAS__*``); the policy is not part of it."""
        return cls(
            mode=settings.mode,
            alpha=settings.alpha,
            layer_start=settings.layer_start,
            layer_end=settings.layer_end,
            tokens=settings.tokens,
        )

    @property
    def layers(self) -> range:
        """The edited decoder layer indices."""
        return range(self.layer_start, self.layer_end + 1)

    @property
    def factor(self) -> float:
        """The multiplier ``1 + alpha``."""
        return 1.0 + float(self.alpha)


def should_apply(policy: CAASPolicy, score: float, tau: float, s_max: float) -> bool:
    """The CAAS gate: is the expert's image score in its low-confidence region?

    Args:
        policy: ``auto`` (active iff ``tau <= score <= s_max``, both ends inclusive), ``on`` or ``off``.
        score: The expert's image score ``s_img``.
        tau: The DBT threshold.
        s_max: The largest training (normal) score.

    Returns:
        True when CAAS must be applied. With ``auto`` and ``tau > s_max`` the region is empty: always False.

    Raises:
        CAASError: unknown policy, or (for ``auto``) a score/threshold that is not a finite number.

    Example:
        >>> should_apply("auto", 0.7, tau=0.5, s_max=0.9), should_apply("auto", 0.95, tau=0.5, s_max=0.9)
        (True, False)
    """
    if policy == "on":
        return True
    if policy == "off":
        return False
    if policy != "auto":
        raise CAASError(f"unknown CAAS policy {policy!r}; expected 'auto', 'on' or 'off'")
    for name, value in (("score", score), ("tau", tau), ("s_max", s_max)):
        if not math.isfinite(float(value)):
            raise CAASError(f"CAAS gate needs a finite {name}, got {value!r}")
    return float(tau) <= float(score) <= float(s_max)


def image_token_runs(row: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """Contiguous runs ``[start, end)`` of ``image_token_id`` in a 1-D id sequence: one run per image."""
    is_image = (row == image_token_id).to(torch.int8)
    edges = torch.diff(is_image, prepend=is_image.new_zeros(1), append=is_image.new_zeros(1))
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends, strict=True))


def visual_token_mask(
    input_ids: torch.Tensor,
    image_token_id: int,
    *,
    tokens: CAASTokens = "all",
    query_image_index: int = 1,
) -> torch.Tensor:
    """Which prompt positions are visual tokens that CAAS scales.

    Args:
        input_ids: ``[B, T]`` (or ``[T]``) token ids of the prompt, as given to the model.
        image_token_id: The model's image placeholder id (``LoadedMLLM.image_token_id``).
        tokens: ``all`` images, or the ``query`` image only.
        query_image_index: 0-based index of the query image among the images of each row (the EAGLE prompt is
            template, query, boxed query: the query is image 1; without a template it is image 0). Images are the
            contiguous runs of image tokens, separated by other tokens.

    Returns:
        Boolean tensor ``[B, T]`` on the device of ``input_ids``.

    Raises:
        CAASError: bad shape, no image token at all, or a row with too few images for ``query_image_index``.

    Example:
        >>> ids = torch.tensor([[5, 9, 9, 6, 9, 9, 9, 6, 7]])
        >>> visual_token_mask(ids, 9, tokens="query", query_image_index=1).int().tolist()
        [[0, 0, 0, 0, 1, 1, 1, 0, 0]]
    """
    if input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.ndim != 2:
        raise CAASError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if tokens not in get_args(CAASTokens):
        raise CAASError(f"unknown CAAS token selection {tokens!r}; expected one of {get_args(CAASTokens)}")
    everything = input_ids == image_token_id
    if not bool(everything.any()):
        raise CAASError(f"the prompt holds no image token (id {image_token_id}); CAAS has nothing to scale")
    if tokens == "all":
        return everything
    if query_image_index < 0:
        raise CAASError(f"query_image_index must be >= 0, got {query_image_index}")
    mask = torch.zeros_like(everything)
    for row_index, row in enumerate(input_ids):
        runs = image_token_runs(row, image_token_id)
        if query_image_index >= len(runs):
            raise CAASError(
                f"prompt row {row_index} has {len(runs)} image(s); query_image_index={query_image_index} needs more"
            )
        start, end = runs[query_image_index]
        mask[row_index, start:end] = True
    return mask


def _rows_for(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Match the mask's batch to a tensor's batch (generate expands rows with ``repeat_interleave``)."""
    if mask.shape[0] == batch:
        return mask
    if batch % mask.shape[0] == 0:
        return mask.repeat_interleave(batch // mask.shape[0], dim=0)
    raise CAASError(f"visual mask has {mask.shape[0]} row(s) but the model runs a batch of {batch}")


def _positions(mask: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Columns ``start .. start+length`` of ``mask``; positions past the prompt (generated tokens) are False."""
    window = mask[:, start : start + length]
    if window.shape[1] < length:
        window = torch.cat([window, window.new_zeros(mask.shape[0], length - window.shape[1])], dim=1)
    return window


def _cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a forward call's keyword arguments (its name varies by model), or ``None``."""
    for name in ("cache", "past_key_values", "past_key_value"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


class _ProjectionScaler:
    """Scales one module's output rows (a key or value, ``[B, T, ...]``) at visual positions of the prompt.

    A pre-hook on the attention module reads how many positions the KV cache already holds for this layer (the
    offset of the current chunk) and the chunk's shape; the forward hook on the projection (``k_proj``, ``k_norm``
    or ``v_proj``) multiplies the rows whose absolute position is visual. Generated tokens lie past the prompt and
    are never scaled.
    """

    def __init__(self, mask: torch.Tensor, factor: float, layer_index: int) -> None:
        self.mask = mask
        self.factor = factor
        self.layer_index = layer_index
        self.offset: int | None = None
        self.chunk: tuple[int, int] | None = None

    def before_attention(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = _cache_of(kwargs)
        self.offset = int(cache.get_seq_length(self.layer_index)) if cache is not None else 0
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.chunk = (
            (int(hidden.shape[0]), int(hidden.shape[1]))
            if isinstance(hidden, torch.Tensor) and hidden.ndim >= 2
            else None
        )

    def after_projection(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if self.offset is None:
            raise CAASError("a CAAS projection hook ran outside its attention module's forward")
        offset, self.offset = self.offset, None
        chunk, self.chunk = self.chunk, None
        if chunk is not None and tuple(output.shape[:2]) != chunk:
            raise CAASLayoutError(
                f"{type(module).__name__} returned shape {tuple(output.shape)}, expected [batch, tokens, ...] = "
                f"{list(chunk)} first: this attention layout is not one CAAS knows"
            )
        if offset >= self.mask.shape[1]:  # a decode step: only generated tokens, never visual
            return output
        if self.mask.device != output.device:
            self.mask = self.mask.to(output.device)
        visual = _positions(_rows_for(self.mask, output.shape[0]), offset, output.shape[1])
        scale = torch.where(visual, self.factor, 1.0).to(dtype=output.dtype)
        return output * scale.reshape(*scale.shape, *([1] * (output.ndim - 2)))


class _VisualKeyBias(AttentionEdit):
    """Adds ``ln(1 + alpha)`` to the logits of every visual key (the renormalised ``weight`` mode)."""

    def __init__(self, mask: torch.Tensor, bias: float) -> None:
        self.mask = mask
        self.bias = bias

    def key_bias(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        if self.mask.device != key.device:
            self.mask = self.mask.to(key.device)
        visual = _positions(_rows_for(self.mask, query.shape[0]), 0, key.shape[-2])
        bias = torch.where(visual, self.bias, 0.0).to(dtype=query.dtype)
        return bias[:, None, None, :]


def _attention_module(layer: nn.Module, index: int) -> nn.Module:
    attention = getattr(layer, "self_attn", None)
    if not isinstance(attention, nn.Module):
        raise CAASLayoutError(f"decoder layer {index} ({type(layer).__name__}) has no `self_attn` module")
    return attention


def _known_layouts() -> str:
    return "; ".join(f"[{layout.name}] ({layout.models})" for layout in ATTENTION_LAYOUTS)


def attention_layout(attention: nn.Module) -> AttentionLayout:
    """The :class:`AttentionLayout` of one decoder layer's attention module.

    The module must be one of transformers' own attention classes (they dispatch through ``AttentionInterface``
    and name their KV cache argument as CAAS expects) whose direct children are exactly one layout's ``modules``,
    with no parameter of its own (e.g. attention sinks) and a module at ``key_output`` / ``value_output``.

    Raises:
        CAASLayoutError: anything else (the message names the class, its children and the known layouts).
    """
    cls = type(attention)
    where = f"{cls.__module__}.{cls.__qualname__}"
    children = {name for name, _ in attention.named_children()}
    own_parameters = sorted(name for name, _ in attention.named_parameters(recurse=False))
    layout = next((layout for layout in ATTENTION_LAYOUTS if children == layout.modules), None)
    if layout is None:
        problem = f"its sub-modules are {sorted(children)}"
    elif own_parameters:
        problem = f"it holds parameters of its own ({', '.join(own_parameters)})"
    elif not cls.__module__.startswith("transformers."):
        problem = "it is not one of transformers' own attention classes (remote code?)"
    else:
        return layout
    raise CAASLayoutError(
        f"CAAS does not know the attention layout of {where}: {problem}; expected a transformers attention with "
        f"exactly one of these sets of sub-modules: {_known_layouts()}"
    )


def check_caas_support(model: nn.Module, decoder_layers: DecoderLayers, config: CAASConfig) -> None:
    """Check, without running the model, that :func:`apply_caas` with ``config`` is exact on ``model``.

    Called when a model is loaded with CAAS enabled (``mllm.loading.load_mllm``), so an unsupported backbone fails
    at start-up instead of silently running without CAAS.

    Raises:
        CAASLayoutError: a decoder layer of the range has no ``self_attn``, an attention layout CAAS does not know
            (the message names the model class), or (``weight`` mode) attention that cannot be switched to the
            editable SDPA function.
        CAASError: the layer range exceeds the model's decoder layers.
    """
    _check_range(decoder_layers, config)
    for index in config.layers:
        try:
            attention = _attention_module(decoder_layers[index], index)
            attention_layout(attention)
            if config.mode == "weight":
                language_config_key(model, attention)
        except (CAASLayoutError, AttentionEditError) as err:
            raise CAASLayoutError(
                f"CAAS ({config.mode} mode) cannot run on {type(model).__name__}, decoder layer {index}: {err}"
            ) from None


def _check_range(decoder_layers: DecoderLayers, config: CAASConfig) -> None:
    if config.layer_end >= len(decoder_layers):
        raise CAASError(
            f"CAAS layers {config.layer_start}..{config.layer_end} exceed the model's {len(decoder_layers)} decoder "
            "layers; set EAGLE_CAAS__LAYER_START/LAYER_END for this model"
        )


def _check_mask(visual_mask: torch.Tensor) -> None:
    if visual_mask.ndim != 2 or visual_mask.dtype != torch.bool:
        raise CAASError(
            f"visual_mask must be a bool [batch, tokens] tensor, got {visual_mask.dtype} {tuple(visual_mask.shape)}"
        )


@contextmanager
def apply_caas(
    model: nn.Module,
    decoder_layers: DecoderLayers,
    config: CAASConfig,
    visual_mask: torch.Tensor,
) -> Iterator[None]:
    """Activate CAAS on ``model`` for the ``with`` block only (removed afterwards, also on exceptions).

    Works for a forward pass and for ``generate`` with its KV cache (batched, left-padded prompts included), with
    SDPA attention and with bitsandbytes 4-/8-bit projections. ``logit`` and ``weight_raw`` act on the projections
    and so work with any attention implementation (FlashAttention included); ``weight`` runs the language model
    through SDPA for the duration of the block. The edit belongs to the model object: do not run the same model
    from another thread while a block is active.

    Args:
        model: The loaded multimodal model (``LoadedMLLM.model``).
        decoder_layers: Its language model's decoder layers (``LoadedMLLM.decoder_layers``).
        config: Mode, α, layer range and token selection.
        visual_mask: ``[B, T]`` boolean mask of the prompt's visual tokens to scale, built from the same
            ``input_ids`` the model is called with: ``visual_token_mask(input_ids, image_token_id,
            tokens=config.tokens, query_image_index=...)``.

    Raises:
        CAASError: layer range outside the model or bad mask.
        CAASLayoutError: a decoder layer whose attention layout is not one of :data:`ATTENTION_LAYOUTS`.
    """
    check_caas_support(model, decoder_layers, config)
    _check_mask(visual_mask)
    layers = {index: _attention_module(decoder_layers[index], index) for index in config.layers}
    with ExitStack() as stack:
        if config.mode == "weight":
            edit = _VisualKeyBias(visual_mask, math.log1p(config.alpha))
            stack.enter_context(edited_attention(model, dict.fromkeys(layers.values(), edit)))
        else:
            for index, attention in layers.items():
                layout = attention_layout(attention)
                name = layout.key_output if config.mode == "logit" else layout.value_output
                projection = getattr(attention, name)
                cache_index = getattr(attention, "layer_idx", None)
                scaler = _ProjectionScaler(visual_mask, config.factor, index if cache_index is None else cache_index)
                handles = (
                    attention.register_forward_pre_hook(scaler.before_attention, with_kwargs=True),
                    projection.register_forward_hook(scaler.after_projection),
                )
                for handle in handles:
                    stack.callback(handle.remove)
        yield


def apply_caas_if(
    active: bool,
    model: nn.Module,
    decoder_layers: DecoderLayers,
    config: CAASConfig,
    visual_mask: Callable[[], torch.Tensor] | torch.Tensor,
) -> AbstractContextManager[None]:
    """:func:`apply_caas` when ``active`` (the :func:`should_apply` gate), otherwise a context that installs nothing.

    ``visual_mask`` may be a callable, so a closed gate never builds the mask (nor fails on its errors).
    """
    if not active:
        return nullcontext()
    mask = visual_mask() if callable(visual_mask) else visual_mask
    return apply_caas(model, decoder_layers, config, mask)
