"""Where the model looks: the answering position's attention to the query image (paper Fig. 1/9 and §4.4).

For chosen decoder layers, the attention weights of the answering position (the last prompt token, the one whose
output is the answer letter) over the visual tokens of one image, averaged over heads, reshaped to that image's
token grid and drawn over the image; plus the paper's attention ratio

    AR(l) = Σ_{p ∈ G} A_p(l) / Σ_{p ∈ I} A_p(l)

with ``I`` the image's visual tokens and ``G`` those covering the ground-truth defect.

The weights are computed WITHOUT switching the model to eager attention: an :class:`~mllm.attention_edits.
AttentionEdit` on the chosen layers recomputes ``softmax(q_last · Kᵀ · scale + mask + bias)`` for the last query
row only (one row of ``[1, K]`` per head), while the layer itself still runs stock SDPA. Used inside
:func:`mllm.caas.apply_caas`, the read-out shows the attention with CAAS (``logit`` and ``weight`` modes change
these weights; ``weight_raw`` scales values, so its weights read out unchanged).

Example:
    >>> maps = image_attention_maps(loaded.model, loaded.decoder_layers, inputs, loaded.image_token_id,
    ...                             layers=[9, 12, 15])  # doctest: +SKIP
    >>> overlay = attention_overlay(query_image, maps[12])  # doctest: +SKIP
    >>> attention_ratio(maps[12], defect_mask)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from mllm.attention_edits import AttentionEdit, DecoderLayers, edited_attention
from mllm.caas import image_token_runs
from mllm.errors import MLLMError

__all__ = [
    "AttentionReadoutError",
    "AnswerAttentionRecorder",
    "record_answer_attention",
    "answer_attention",
    "image_token_grid",
    "image_attention_maps",
    "processor_view_box",
    "attention_overlay",
    "defect_token_mask",
    "attention_ratio",
]

Box = tuple[int, int, int, int]


class AttentionReadoutError(MLLMError, ValueError):
    """The attention read-out cannot be computed for these inputs (bad layer, image index, grid or mask)."""

    code = "attention_readout_failed"


class _LastRowAttention(AttentionEdit):
    """Records the head-averaged attention of the last query row of the FIRST call (the prompt's prefill)."""

    def __init__(self, recorder: AnswerAttentionRecorder, layer: int) -> None:
        self.recorder = recorder
        self.layer = layer

    def observe(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        bias: torch.Tensor | None,
        scaling: float,
    ) -> None:
        if self.layer in self.recorder.weights:
            return
        q_length, kv_length = query.shape[-2], key.shape[-2]
        if attention_mask is None and 1 < q_length < kv_length:  # empty static cache: SDPA crops keys the same way
            key = key[:, :, :q_length]
        heads, kv_heads = query.shape[1], key.shape[1]
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        logits = query[:, :, -1:, :].float() @ key.float().transpose(-1, -2) * scaling  # [B, H, 1, K]
        if bias is not None:
            logits = logits + bias[..., -1:, : key.shape[-2]].float()
        if attention_mask is not None:
            row = attention_mask[..., -1:, : key.shape[-2]]
            logits = logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row.float()
        weights = torch.softmax(logits, dim=-1).mean(dim=1)[:, 0, :]  # [B, K]
        if weights.shape[-1] < kv_length:
            weights = torch.nn.functional.pad(weights, (0, kv_length - weights.shape[-1]))
        self.recorder.weights[self.layer] = weights.detach().cpu()


class AnswerAttentionRecorder:
    """Collects, per layer, the answering position's attention over all key positions.

    Attributes:
        layers: The decoder layers recorded.
        weights: ``{layer: float32 tensor [B, K]}`` — head-averaged softmax weights of the last prompt token over
            the ``K`` key positions of the first forward call inside the recording (the prefill; later decode
            steps are ignored). Rows sum to 1.
    """

    def __init__(self, layers: Sequence[int]) -> None:
        self.layers = tuple(layers)
        self.weights: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the recorded weights so the next forward call is recorded."""
        self.weights.clear()


def _checked_layers(decoder_layers: DecoderLayers, layers: Sequence[int]) -> list[int]:
    chosen = sorted(set(layers))
    if not chosen:
        raise AttentionReadoutError("choose at least one decoder layer to read attention from")
    bad = [layer for layer in chosen if not 0 <= layer < len(decoder_layers)]
    if bad:
        raise AttentionReadoutError(f"layers {bad} do not exist; the model has {len(decoder_layers)} decoder layers")
    return chosen


@contextmanager
def record_answer_attention(
    model: nn.Module, decoder_layers: DecoderLayers, layers: Sequence[int]
) -> Iterator[AnswerAttentionRecorder]:
    """Record the answering position's attention in ``layers`` during the ``with`` block (removed afterwards).

    Raises:
        AttentionReadoutError: a layer index outside the model.
    """
    chosen = _checked_layers(decoder_layers, layers)
    recorder = AnswerAttentionRecorder(chosen)
    edits: dict[nn.Module, AttentionEdit] = {
        cast(nn.Module, decoder_layers[layer].self_attn): _LastRowAttention(recorder, layer) for layer in chosen
    }
    with edited_attention(model, edits):
        yield recorder


def answer_attention(
    model: nn.Module,
    decoder_layers: DecoderLayers,
    inputs: Mapping[str, Any],
    layers: Sequence[int],
) -> dict[int, torch.Tensor]:
    """One forward pass of the prompt; the answering position's attention per layer (``{layer: [B, T]}``).

    ``inputs`` is the processor's output (``input_ids``, ``attention_mask``, ``pixel_values``, …).
    """
    with record_answer_attention(model, decoder_layers, layers) as recorder, torch.inference_mode():
        model(**inputs, use_cache=False, logits_to_keep=1)
    return dict(recorder.weights)


def image_token_grid(
    inputs: Mapping[str, Any], model_config: Any, image_number: int, token_count: int
) -> tuple[int, int]:
    """The (rows, columns) grid of one image's visual tokens.

    Qwen2.5-VL: ``image_grid_thw`` (patch units) divided by the vision tower's ``spatial_merge_size``; other models
    (LLaVA-1.5): the square root of the token count.

    Args:
        inputs: The processor's output.
        model_config: The model's config (``model.config``).
        image_number: Index of the image among ALL images of the batch (the order of ``image_grid_thw``).
        token_count: How many visual tokens this image has in ``input_ids`` (a check).

    Raises:
        AttentionReadoutError: when no grid fits the token count (e.g. LLaVA-NeXT's any-resolution tiling).
    """
    grid_thw = inputs.get("image_grid_thw")
    if grid_thw is not None:
        merge = int(getattr(getattr(model_config, "vision_config", None), "spatial_merge_size", 1) or 1)
        t, h, w = (int(v) for v in grid_thw[image_number])
        rows, cols = h // merge, w // merge
        if t * rows * cols != token_count:
            raise AttentionReadoutError(
                f"image {image_number}: grid {t}×{h}×{w} / merge {merge} does not match its {token_count} tokens"
            )
        if t != 1:
            raise AttentionReadoutError(f"image {image_number} has {t} temporal patches; only still images map")
        return rows, cols
    side = math.isqrt(token_count)
    if side * side != token_count:
        raise AttentionReadoutError(
            f"{token_count} visual tokens do not form a square grid (tiled any-resolution input?); pass grid= "
        )
    return side, side


def image_attention_maps(
    model: nn.Module,
    decoder_layers: DecoderLayers,
    inputs: Mapping[str, Any],
    image_token_id: int,
    *,
    layers: Sequence[int],
    image_index: int = 1,
    row: int = 0,
    grid: tuple[int, int] | None = None,
) -> dict[int, np.ndarray]:
    """Attention of the answering position to one image's visual tokens, per layer, on the image's token grid.

    Args:
        model: The loaded model (SDPA attention is fine; it is never switched to eager).
        decoder_layers: Its decoder layers.
        inputs: The processor's output for the prompt (one forward pass is run).
        image_token_id: The image placeholder id.
        layers: Decoder layers to read (0-based).
        image_index: Which image of the prompt row (EAGLE: 0 template, 1 query, 2 boxed query).
        row: Batch row.
        grid: Token grid (rows, columns); inferred (:func:`image_token_grid`) when omitted.

    Returns:
        ``{layer: float32 array [rows, columns]}`` of raw attention weights (they sum to the share of the
        answering position's attention that went to this image).

    Raises:
        AttentionReadoutError: bad row/image index, or a grid that does not fit the image's tokens.
    """
    input_ids = inputs["input_ids"]
    if not 0 <= row < input_ids.shape[0]:
        raise AttentionReadoutError(f"row {row} is outside the batch of {input_ids.shape[0]}")
    runs = image_token_runs(input_ids[row], image_token_id)
    if not 0 <= image_index < len(runs):
        raise AttentionReadoutError(f"prompt row {row} has {len(runs)} image(s); image_index={image_index} is missing")
    start, end = runs[image_index]
    if grid is None:
        earlier = sum(len(image_token_runs(input_ids[r], image_token_id)) for r in range(row))
        grid = image_token_grid(inputs, model.config, earlier + image_index, end - start)
    elif grid[0] * grid[1] != end - start:
        raise AttentionReadoutError(f"grid {grid} does not hold the image's {end - start} tokens")
    weights = answer_attention(model, decoder_layers, inputs, layers)
    return {layer: w[row, start:end].reshape(grid).numpy().astype(np.float32) for layer, w in weights.items()}


def processor_view_box(image_processor: Any, image_size: tuple[int, int]) -> Box:
    """The part ``(left, top, right, bottom)`` of an original ``(width, height)`` image the visual tokens see.

    CLIP-style processors (LLaVA-1.5) resize the shorter side and center-crop, so the tokens cover a centred
    region; Qwen2.5-VL resizes the whole image (to multiples of 28 px), so they cover all of it.
    """
    width, height = image_size
    if not getattr(image_processor, "do_center_crop", False):
        return 0, 0, width, height
    size = getattr(image_processor, "size", {}) or {}
    crop = getattr(image_processor, "crop_size", {}) or {}
    shortest = size.get("shortest_edge")
    if shortest is None or "height" not in crop or "width" not in crop:
        return 0, 0, width, height
    scale = shortest / min(width, height)
    box_w, box_h = min(width, crop["width"] / scale), min(height, crop["height"] / scale)
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return round(left), round(top), round(left + box_w), round(top + box_h)


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise AttentionReadoutError(f"image must be RGB uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return array


def _view(box: Box | None, height: int, width: int) -> Box:
    left, top, right, bottom = box if box is not None else (0, 0, width, height)
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise AttentionReadoutError(f"view box {box} is not inside the {width}×{height} image")
    return left, top, right, bottom


def attention_overlay(
    image: Image.Image | np.ndarray,
    attention_grid: np.ndarray,
    *,
    view_box: Box | None = None,
    opacity: float = 0.5,
    smooth: bool = True,
) -> np.ndarray:
    """Draw a token-grid attention map over the image as a JET heat map (red = most attention).

    Args:
        image: The ORIGINAL image (PIL or RGB uint8 array).
        attention_grid: ``[rows, columns]`` weights (:func:`image_attention_maps`); normalised by its own range.
        view_box: The region the tokens see (:func:`processor_view_box`); the rest is shown dimmed. Whole image
            when omitted.
        opacity: Weight of the heat map in the blend (0..1).
        smooth: Bilinear upsampling (True) or one flat block per token (False).

    Returns:
        RGB uint8 array of the image's size.
    """
    rgb = _as_rgb(image)
    grid = np.asarray(attention_grid, dtype=np.float32)
    if grid.ndim != 2 or not np.all(np.isfinite(grid)):
        raise AttentionReadoutError(f"attention grid must be a finite 2-D array, got shape {grid.shape}")
    if not 0.0 <= opacity <= 1.0:
        raise AttentionReadoutError(f"opacity must be in [0, 1], got {opacity}")
    height, width = rgb.shape[:2]
    left, top, right, bottom = _view(view_box, height, width)
    span = float(grid.max() - grid.min())
    normalised = (grid - grid.min()) / span if span > 0 else np.zeros_like(grid)
    interpolation = cv2.INTER_LINEAR if smooth else cv2.INTER_NEAREST
    heat = cv2.resize(normalised, (right - left, bottom - top), interpolation=interpolation)
    colour = cv2.applyColorMap(np.clip(heat * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
    out = rgb.astype(np.float32) * 0.5  # outside the view box: dimmed (not seen by the model)
    inside = rgb[top:bottom, left:right].astype(np.float32)
    out[top:bottom, left:right] = (1.0 - opacity) * inside + opacity * colour
    blended: np.ndarray = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return blended


def defect_token_mask(
    defect_mask: np.ndarray,
    grid_shape: tuple[int, int],
    *,
    view_box: Box | None = None,
    min_coverage: float = 0.0,
) -> np.ndarray:
    """The set G of the paper's AR: visual tokens whose image cell is covered by the defect.

    The view region of ``defect_mask`` is split into ``rows × columns`` cells (pixel ``(y, x)`` belongs to cell
    ``(⌊y·rows/H⌋, ⌊x·columns/W⌋)``); a token is in G when the defect covers MORE than ``min_coverage`` of its
    cell's pixels (default: any overlap). A mask already of grid shape is used as is.

    Raises:
        AttentionReadoutError: a mask that is not 2-D, smaller than the grid, or a coverage outside [0, 1).
    """
    mask = np.asarray(defect_mask).astype(bool)
    rows, cols = grid_shape
    if mask.ndim != 2:
        raise AttentionReadoutError(f"defect mask must be 2-D, got shape {mask.shape}")
    if not 0.0 <= min_coverage < 1.0:
        raise AttentionReadoutError(f"min_coverage must be in [0, 1), got {min_coverage}")
    if mask.shape == (rows, cols) and view_box is None:
        return mask
    left, top, right, bottom = _view(view_box, *mask.shape)
    region = mask[top:bottom, left:right]
    height, width = region.shape
    if height < rows or width < cols:
        raise AttentionReadoutError(f"defect mask region {height}×{width} is smaller than the token grid {rows}×{cols}")
    cell_y = np.arange(height) * rows // height
    cell_x = np.arange(width) * cols // width
    covered = np.zeros((rows, cols), dtype=np.int64)
    np.add.at(covered, (cell_y[:, None], cell_x[None, :]), region.astype(np.int64))
    total = np.bincount(cell_y, minlength=rows)[:, None] * np.bincount(cell_x, minlength=cols)[None, :]
    return covered / total > min_coverage


def attention_ratio(
    attention_grid: np.ndarray,
    defect_mask: np.ndarray,
    *,
    view_box: Box | None = None,
    min_coverage: float = 0.0,
) -> float:
    """The paper's attention ratio AR = Σ_{p∈G} A_p / Σ_{p∈I} A_p for one layer (§4.4).

    Args:
        attention_grid: ``[rows, columns]`` attention weights to the image's tokens (the set I).
        defect_mask: Ground-truth defect mask, at the original image's resolution (or at grid shape).
        view_box: The region the tokens see, as for :func:`attention_overlay`.
        min_coverage: See :func:`defect_token_mask`.

    Returns:
        AR in [0, 1]; 0.0 when no token covers the defect.

    Raises:
        AttentionReadoutError: negative or non-finite weights, or no attention on the image at all.

    Example:
        >>> round(attention_ratio(np.array([[0.1, 0.3], [0.2, 0.4]]), np.array([[0, 1], [0, 1]])), 6)
        0.7
    """
    grid = np.asarray(attention_grid, dtype=np.float64)
    if grid.ndim != 2 or not np.all(np.isfinite(grid)) or np.any(grid < 0):
        raise AttentionReadoutError("attention grid must be a 2-D array of finite, non-negative weights")
    total = grid.sum()
    if total <= 0:
        raise AttentionReadoutError("the image received no attention; AR is undefined")
    inside = defect_token_mask(defect_mask, grid.shape, view_box=view_box, min_coverage=min_coverage)
    return float(grid[inside].sum() / total)
