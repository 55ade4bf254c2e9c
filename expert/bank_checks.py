"""Validating a bank's contents: tensors against meta.json, what the bank means, and the running settings.

:mod:`expert.bank` calls these while saving and loading; each failure is a one-line
:class:`~expert.bank_schema.BankError`. Nothing here reads a bank's files except ``backbone.onnx``'s graph
(read, never executed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from expert.bank_schema import (
    MASK_TENSOR,
    META_FILE,
    ONNX_FILE,
    PATCH_FEATURE_DIM,
    PATCH_STRIDE,
    SCORE_TOLERANCE,
    TENSOR_DTYPES,
    BankError,
    BankMeta,
    ThresholdMeta,
)
from expert.dbt import THRESHOLD_SETTINGS
from expert.preprocess import NormalizationError, expert_normalization

if TYPE_CHECKING:
    from expert.config import ExpertSettings


# ------------------------------------------------------------------------------------------- tensors


def check_consistency(tensors: dict[str, np.ndarray], meta: BankMeta, *, where: str) -> None:
    """Tensor dtypes and shapes against meta; finite values; image ids in range."""
    counts, dims = meta.counts, meta.dims
    expected = {
        "memory_bank": (counts.coreset, dims.feature_dim),
        "train_scores": (counts.used_for_dbt,),
        "coreset_image_ids": (counts.coreset,),
        "global_descriptors": (counts.references, dims.descriptor_dim),
    }
    for name, shape in expected.items():
        array = tensors[name]
        if array.dtype != TENSOR_DTYPES[name]:
            raise BankError(f"{where}: {name} dtype {array.dtype}, expected {np.dtype(TENSOR_DTYPES[name])}")
        if array.shape != shape:
            raise BankError(f"{where}: {name} shape {array.shape}, meta.json implies {shape}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BankError(f"{where}: {name} contains NaN or infinite values")
    ids = tensors["coreset_image_ids"]
    if ids.size and (ids.min() < 0 or ids.max() >= counts.references):
        raise BankError(f"{where}: coreset_image_ids outside [0, {counts.references})")
    if len(meta.references) != counts.references:
        raise BankError(f"{where}: {len(meta.references)} references listed, counts.references={counts.references}")
    used = sum(ref.used_for_dbt for ref in meta.references)
    if used != counts.used_for_dbt or counts.references - used != counts.skipped:
        raise BankError(
            f"{where}: references marked used_for_dbt ({used}) disagree with counts "
            f"(used_for_dbt={counts.used_for_dbt}, skipped={counts.skipped})"
        )
    if counts.patches != counts.references * dims.patches_per_image:
        raise BankError(f"{where}: counts.patches={counts.patches} != references x grid ({dims.patches_per_image})")
    _check_mask(tensors.get(MASK_TENSOR), meta, where=where)


def _check_mask(mask: np.ndarray | None, meta: BankMeta, *, where: str) -> None:
    """The inspection mask: present iff meta.json has ``mask`` (format 2 only), uint8 0/1 of the grid's shape."""
    if meta.mask is None:
        if mask is not None:
            raise BankError(f"{where}: {MASK_TENSOR} present but meta.json has no mask")
        return
    if meta.format_version < 2:
        raise BankError(f"{where}: format_version {meta.format_version} banks carry no inspection mask")
    if mask is None:
        raise BankError(f"{where}: meta.json has a mask but {MASK_TENSOR} is missing")
    grid = (meta.dims.grid_h, meta.dims.grid_w)
    if mask.dtype != np.uint8:
        raise BankError(f"{where}: {MASK_TENSOR} dtype {mask.dtype}, expected uint8")
    if mask.shape != grid:
        raise BankError(f"{where}: {MASK_TENSOR} shape {mask.shape}, the patch grid is {grid}")
    if not np.isin(mask, (0, 1)).all():
        raise BankError(f"{where}: {MASK_TENSOR} values must be 0 or 1")
    inside = int(mask.sum())
    if inside == 0:
        raise BankError(f"{where}: {MASK_TENSOR} is empty (no patch inspected)")
    if inside != meta.mask.patches:
        raise BankError(
            f"{where}: {MASK_TENSOR} has {inside} patches inside, meta.json mask.patches says {meta.mask.patches}"
        )


# ------------------------------------------------------------------------------------------- meaning


def expected_grid(crop: int) -> tuple[int, int]:
    """The patch grid of one image at network input ``crop`` × ``crop`` (28 × 28 at 224)."""
    return crop // PATCH_STRIDE, crop // PATCH_STRIDE


def check_meaning(root: Path, meta: BankMeta, tensors: dict[str, np.ndarray]) -> None:
    """Refuse a bank whose contents are consistent with meta.json but cannot score (one-line :class:`BankError`).

    The bank_id only proves the files were not changed after it was computed; anyone can recompute it. So:

    * ``dims`` against the backbone and crop: feature_dim and descriptor_dim = :data:`PATCH_FEATURE_DIM`,
      grid = crop // :data:`PATCH_STRIDE` (the ``layer2`` grid of the configured layers);
    * ``preprocessing.std``: every channel > 0 (the input is divided by it);
    * ``counts``: the memory bank holds at most every embedded patch;
    * ``threshold``: s_max = max(train_scores), and τ recomputed from train_scores with the recorded method
      and parameters equals the recorded τ (within :data:`SCORE_TOLERANCE`);
    * ``backbone.onnx`` (when present): a self-contained ONNX graph (no external data) whose one input is
      float32 ``[batch, 3, crop, crop]`` and whose output is float32 ``[batch, grid_h·grid_w, feature_dim]``.
      Read with ``onnx.load(load_external_data=False)``; nothing is executed.
    """
    where = str(root / META_FILE)
    dims, crop = meta.dims, meta.preprocessing.crop
    if not all(v > 0 for v in meta.preprocessing.std):
        raise BankError(f"{where}: preprocessing.std {list(meta.preprocessing.std)} must be > 0 in every channel")
    if dims.feature_dim != PATCH_FEATURE_DIM:
        raise BankError(
            f"{where}: dims.feature_dim {dims.feature_dim} does not fit the backbone {meta.backbone.id!r} "
            f"(its patch features have {PATCH_FEATURE_DIM} values)"
        )
    if dims.descriptor_dim != dims.feature_dim:
        raise BankError(f"{where}: dims.descriptor_dim {dims.descriptor_dim} != dims.feature_dim {dims.feature_dim}")
    grid = expected_grid(crop)
    if (dims.grid_h, dims.grid_w) != grid:
        raise BankError(
            f"{where}: dims grid {dims.grid_h}x{dims.grid_w} does not fit preprocessing.crop {crop} "
            f"(the backbone gives {grid[0]}x{grid[1]} patches)"
        )
    if meta.counts.coreset > meta.counts.patches:
        raise BankError(f"{where}: counts.coreset {meta.counts.coreset} > counts.patches {meta.counts.patches}")
    if meta.mask is not None and meta.counts.coreset > meta.counts.references * meta.mask.patches:
        raise BankError(
            f"{where}: counts.coreset {meta.counts.coreset} > references x mask.patches "
            f"({meta.counts.references} x {meta.mask.patches}): the memory bank holds only patches inside the mask"
        )
    _check_threshold(where, meta.threshold, tensors["train_scores"])
    if meta.backbone.precision != "fp32" and meta.backbone.onnx_sha256 is None:
        raise BankError(
            f"{where}: backbone.precision {meta.backbone.precision!r} but the bank has no backbone.onnx (its "
            "features came from the quantised graph, which only the bank carries)"
        )
    if meta.backbone.onnx_sha256 is not None:
        _check_onnx(
            root / ONNX_FILE,
            crop=crop,
            patches=grid[0] * grid[1],
            dim=dims.feature_dim,
            precision=meta.backbone.precision,
        )


def _check_threshold(where: str, threshold: ThresholdMeta, train_scores: np.ndarray) -> None:
    from expert.dbt import DBTError, compute_threshold

    scores = np.asarray(train_scores, dtype=np.float64)
    scale = max(abs(threshold.tau), abs(threshold.s_max), float(np.ptp(scores)) if scores.size else 0.0, 1e-12)
    tolerance = SCORE_TOLERANCE * scale
    highest = float(scores.max())
    if abs(threshold.s_max - highest) > tolerance:
        raise BankError(f"{where}: threshold.s_max {threshold.s_max:.6g} != max(train_scores) {highest:.6g}")
    try:
        recomputed = compute_threshold(scores, threshold.method, **threshold.params).tau
    except DBTError as err:
        raise BankError(f"{where}: threshold cannot be recomputed from train_scores ({err})") from None
    if abs(recomputed - threshold.tau) > tolerance:
        raise BankError(
            f"{where}: threshold.tau {threshold.tau:.6g} does not follow from train_scores "
            f"({threshold.method} with {threshold.params} gives {recomputed:.6g})"
        )


QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "QLinearMatMul"})
"""Operators whose presence marks a quantised (int8) graph."""


def _check_onnx(path: Path, *, crop: int, patches: int, dim: int, precision: str = "fp32") -> None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises several types; any of them means unreadable
        raise BankError(f"{path}: not a readable ONNX model ({type(err).__name__})") from None
    graph = model.graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise BankError(f"{path}: refers to external tensor data; a bank's ONNX graph must be self-contained")
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) < 1:
        raise BankError(f"{path}: expected one graph input and an output, found {len(inputs)} and {len(graph.output)}")
    _check_onnx_value(path, "input", inputs[0], [None, 3, crop, crop])
    _check_onnx_value(path, "output", graph.output[0], [None, patches, dim])
    quantized = any(node.op_type in QUANTIZED_OPS for node in graph.node)
    if quantized != (precision == "int8"):
        found = "a quantised (int8)" if quantized else "an fp32"
        raise BankError(f"{path}: {found} graph, but meta.json backbone.precision says {precision!r}")


def _check_onnx_value(path: Path, kind: str, value: Any, expected: list[int | None]) -> None:
    """One graph input/output: float32, the expected rank, fixed dims equal to ``expected`` (None: batch, 1 or free)."""
    import onnx

    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    shown = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
    wanted = "[batch, " + ", ".join(str(d) for d in expected[1:]) + "]"
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        raise BankError(f"{path}: graph {kind} {value.name!r} is not float32")
    batch_ok = bool(dims) and dims[0] in (None, 1)
    rest_ok = len(dims) == len(expected) and all(
        d is None or d == e for d, e in zip(dims[1:], expected[1:], strict=True)
    )
    if not (batch_ok and rest_ok):
        raise BankError(f"{path}: graph {kind} {value.name!r} has shape {shown}; the bank needs {wanted}")


# ------------------------------------------------------------------------------------------- settings

_FATAL_SETTINGS: dict[str, Any] = {
    "backbone": lambda m: m.backbone.id,
    "resize": lambda m: m.preprocessing.resize,
    "crop": lambda m: m.preprocessing.crop,
    "center_crop": lambda m: m.preprocessing.center_crop,
    "distance": lambda m: m.distance,
}


def settings_mismatches(meta: BankMeta, settings: ExpertSettings) -> list[str]:
    """Settings that would make the bank's features or scores wrong.

    backbone, resize, crop, center_crop, distance, the feature extractor's precision (:func:`precision_mismatch`)
    and the input normalisation (:func:`normalization_mismatch`).
    Each entry reads ``"setting crop: bank 224, running 256 (EAGLE_EXPERT__CROP)"``. Coreset settings only
    matter while building and are not compared; the backbone's weights are checked by
    :func:`check_weights` where the torch backbone is rebuilt (the ONNX file carries its own).
    """
    problems = []
    for key, read in _FATAL_SETTINGS.items():
        bank_value, running = read(meta), getattr(settings, key)
        if bank_value != running:
            problems.append(f"setting {key}: bank {bank_value!r}, running {running!r} (EAGLE_EXPERT__{key.upper()})")
    if meta.backbone.precision != settings.precision:
        problems.append(precision_mismatch(meta.backbone.precision, settings.precision))
    if meta.backbone.id == settings.backbone:  # another backbone is refused above; its statistics do not matter
        normalization = normalization_mismatch(meta, settings)
        if normalization is not None:
            problems.append(normalization)
    return problems


def precision_mismatch(bank: str, running: str) -> str:
    """The message for a bank built with one precision and inspected with another.

    Example:
        >>> precision_mismatch("int8", "fp32")[:60]
        "setting precision: bank 'int8', running 'fp32' (EAGLE_EXPERT"
    """
    return (
        f"setting precision: bank {bank!r}, running {running!r} (EAGLE_EXPERT__PRECISION); the bank's memory bank "
        f"and threshold were computed with its {bank} feature extractor and do not compare with {running} "
        f"features: set EAGLE_EXPERT__PRECISION={bank} to inspect with this bank, or rebuild it with {running}"
    )


def _shown(values: Sequence[float]) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def normalization_mismatch(meta: BankMeta, settings: ExpertSettings) -> str | None:
    """Why the bank's recorded normalisation differs from the running one, or ``None`` when they are equal.

    The running values are :func:`expert.preprocess.expert_normalization`'s (the backbone's timm
    ``pretrained_cfg``, or ``normalize_mean`` / ``normalize_std``); the bank's are ``preprocessing.mean`` /
    ``.std``, the values its features were computed with. Features of differently normalised inputs do not
    compare, so any difference is fatal; the message names both and the two ways out.
    """
    recorded = meta.preprocessing
    try:
        running = expert_normalization(settings)
    except NormalizationError as err:
        return f"setting normalisation: cannot tell the running backbone's input statistics ({err})"
    if (running.mean, running.std) == (recorded.mean, recorded.std):
        return None
    return (
        f"setting normalisation: bank mean {_shown(recorded.mean)} std {_shown(recorded.std)}, running mean "
        f"{_shown(running.mean)} std {_shown(running.std)} (from {running.source}); rebuild the bank with the "
        f"running settings, or set EAGLE_EXPERT__NORMALIZE_MEAN='{_shown(recorded.mean)}' and "
        f"EAGLE_EXPERT__NORMALIZE_STD='{_shown(recorded.std)}' to score with the bank's values"
    )


def threshold_differences(meta: BankMeta, settings: ExpertSettings) -> list[str]:
    """Non-fatal notes where the running threshold settings differ from the bank's (the bank's τ is used)."""
    notes = []
    if settings.dbt_search != meta.threshold.search:
        notes.append(
            f"dbt_search: bank {meta.threshold.search!r}, running {settings.dbt_search!r}; "
            f"using the bank's tau={meta.threshold.tau:.6g} (rebuild the bank to change it)"
        )
    method = meta.threshold.method
    if settings.threshold_method != method:
        notes.append(
            f"threshold_method: bank {method!r}, running {settings.threshold_method!r}; "
            f"using the bank's tau={meta.threshold.tau:.6g} (rebuild the bank to change it)"
        )
        return notes
    key = THRESHOLD_SETTINGS[method]
    bank_value, running = meta.threshold.params.get(key), float(getattr(settings, key))
    if bank_value != running:
        notes.append(
            f"{key}: bank {bank_value!r}, running {running!r}; using the bank's tau={meta.threshold.tau:.6g} "
            "(rebuild the bank to change it)"
        )
    return notes


def check_weights(meta: BankMeta, weights_info: Any) -> None:
    """Raise :class:`BankError` when a rebuilt backbone's weights differ from the bank's (torch runtime)."""
    if weights_info.checksum != meta.backbone.weights_checksum:
        raise BankError(
            f"backbone weights: bank {meta.backbone.weights_checksum[:19]}... ({meta.backbone.weights_source}), "
            f"running {weights_info.checksum[:19]}... ({weights_info.source}); use the bank's ONNX runtime or the "
            "same weights"
        )
