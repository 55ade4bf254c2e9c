"""Per-layer edits of a language model's attention through transformers' own ``AttentionInterface``.

CAAS's renormalised ``weight`` mode needs an additive bias on some keys, and the attention read-out needs the
attention weights of one query row; neither is available from a fused SDPA kernel. Instead of switching the model
to eager attention (or replacing any model method), this module registers ONE attention function,
:data:`EAGLE_ATTENTION`, with ``transformers.AttentionInterface`` (and its mask function with
``AttentionMaskInterface``, without which the model would build no causal mask for an unknown name). The function
calls the stock SDPA implementation for every attention module; only modules that have an :class:`AttentionEdit`
registered get an additive ``position_bias`` and/or are observed.

:func:`edited_attention` switches the language model (only its sub-config, so the vision tower is untouched) to
that function for the duration of a ``with`` block and restores the previous implementation afterwards, also when
the block raises. While active, the whole language model runs through PyTorch SDPA (also if it was loaded with
FlashAttention or eager attention): SDPA accepts an additive bias, FlashAttention does not.

Example:
    >>> with edited_attention(model, {layers[9].self_attn: my_edit}):  # doctest: +SKIP
    ...     model(**inputs)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeAlias, cast

import torch
from torch import nn

from mllm.errors import MLLMError

__all__ = ["EAGLE_ATTENTION", "AttentionEdit", "AttentionEditError", "edited_attention", "language_config_key"]

EAGLE_ATTENTION = "eagle_sdpa"
"""Name under which the editable SDPA attention function is registered with transformers."""


class AttentionEditError(MLLMError, RuntimeError):
    """An attention edit cannot be installed on this model (unsupported layout or conflicting state)."""

    code = "attention_edit_failed"


class AttentionEdit:
    """One edit of one attention module; subclasses override one or both hooks.

    Both hooks receive the tensors the stock attention function receives: ``query`` ``[B, H, Q, D]``, ``key``
    ``[B, H_kv, K, D]`` (after RoPE and after the KV cache update, so ``K`` counts cached positions too) and the
    ``attention_mask`` built by ``sdpa_mask`` (boolean ``[B, 1, Q, K]``, True = attend; ``None`` when plain causal).
    """

    def key_bias(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """Additive logit bias, broadcastable to ``[B, H, Q, K]``, or ``None`` for no bias."""
        return None

    def observe(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        bias: torch.Tensor | None,
        scaling: float,
    ) -> None:
        """Look at the attention inputs (``bias`` is the sum of all edits' biases for this call)."""


DecoderLayers: TypeAlias = "Sequence[nn.Module] | nn.ModuleList"
"""A language model's decoder layers: its ``nn.ModuleList``, or any sequence of the layer modules."""

_EDITS: dict[int, list[AttentionEdit]] = {}
_SWITCHED: dict[int, tuple[int, str | None, str]] = {}  # id(model) -> (depth, sub-config key, previous impl)
_LOCK = threading.RLock()


def _eagle_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    edits = _EDITS.get(id(module))
    if not edits:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bias = kwargs.pop("position_bias", None)
    for edit in edits:
        extra = edit.key_bias(module, query, key)
        if extra is not None:
            extra = extra.to(dtype=query.dtype, device=query.device)
            bias = extra if bias is None else bias + extra
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    for edit in edits:
        edit.observe(module, query, key, attention_mask, bias, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, position_bias=bias, **kwargs)


def _register() -> None:
    # transformers is imported here, not at module import: ``mllm.caas`` (and through it ``mllm.loading``) stays a
    # torch-only import until an edit is actually installed.
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if EAGLE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(EAGLE_ATTENTION, _eagle_attention_forward)
        AttentionMaskInterface.register(EAGLE_ATTENTION, sdpa_mask)


def language_config_key(model: nn.Module, attention_module: nn.Module) -> str | None:
    """The name of the sub-config (e.g. ``"text_config"``) that ``attention_module`` reads its settings from.

    Returns ``None`` when the attention module uses the model's top-level config (a text-only model).

    Raises:
        AttentionEditError: when the attention module's config is neither the top-level config nor a sub-config.
    """
    config = getattr(attention_module, "config", None)
    top = getattr(model, "config", None)
    if config is None or top is None:
        raise AttentionEditError(f"{type(attention_module).__name__} has no `config`; cannot switch its attention")
    if config is top:
        return None
    for key in getattr(top, "sub_configs", {}):
        if getattr(top, key, None) is config:
            return str(key)
    raise AttentionEditError(
        f"the config of {type(attention_module).__name__} is not a sub-config of {type(model).__name__}"
    )


def _current_implementation(model: nn.Module, key: str | None) -> str:
    top: Any = cast(Any, model).config  # a transformers model: nn.Module's attribute typing does not know it
    config = top if key is None else getattr(top, key)
    implementation: str = config._attn_implementation
    return implementation


def _set_implementation(model: nn.Module, key: str | None, implementation: str) -> None:
    cast(Any, model).set_attn_implementation(implementation if key is None else {key: implementation})
    if _current_implementation(model, key) != implementation:
        raise AttentionEditError(
            f"{type(model).__name__} refused attention implementation {implementation!r} "
            f"(it does not dispatch through transformers' AttentionInterface)"
        )


@contextmanager
def edited_attention(model: nn.Module, edits: Mapping[nn.Module, AttentionEdit]) -> Iterator[None]:
    """Run the language model through :data:`EAGLE_ATTENTION` with ``edits`` installed, inside the block only.

    Contexts nest (CAAS together with the attention read-out): the implementation is switched by the outermost
    one and restored when it exits; each context removes exactly the edits it added.

    Args:
        model: A transformers ``PreTrainedModel`` (e.g. ``Qwen2_5_VLForConditionalGeneration``).
        edits: Attention module (a decoder layer's ``self_attn``) → edit. All modules must share one config.

    Raises:
        AttentionEditError: no edits, modules from different configs, or a model that cannot switch attention.
    """
    if not edits:
        raise AttentionEditError("edited_attention needs at least one attention module to edit")
    keys = {language_config_key(model, module) for module in edits}
    if len(keys) != 1:
        raise AttentionEditError(f"edited modules belong to several configs: {sorted(map(str, keys))}")
    key = keys.pop()
    _register()
    with _LOCK:
        depth, _, previous = _SWITCHED.get(id(model), (0, key, ""))
        if depth == 0:
            previous = _current_implementation(model, key)
            _set_implementation(model, key, EAGLE_ATTENTION)
        _SWITCHED[id(model)] = (depth + 1, key, previous)
        for module, edit in edits.items():
            _EDITS.setdefault(id(module), []).append(edit)
    try:
        yield
    finally:
        with _LOCK:
            for module, edit in edits.items():
                installed = _EDITS.get(id(module), [])
                if edit in installed:
                    installed.remove(edit)
                if not installed:
                    _EDITS.pop(id(module), None)
            depth, key, previous = _SWITCHED[id(model)]
            if depth == 1:
                del _SWITCHED[id(model)]
                _set_implementation(model, key, previous)
            else:
                _SWITCHED[id(model)] = (depth - 1, key, previous)
