"""The bank format: its constants, the ``meta.json`` models, the in-memory :class:`Bank` and the bank id.

A bank is a directory (format described for users in ``docs/bank-format.md``)::

    <bank>/
      bank.safetensors   memory_bank [M, D] f32, train_scores [U] f32, coreset_image_ids [M] i64,
                         global_descriptors [N, Dg] f32, optional inspection_mask [grid_h, grid_w] u8 (format 2)
      meta.json          BankMeta: versions, settings it was built with, tau, counts, references
      backbone.onnx      the exported feature extractor (optional: see BackboneMeta.onnx_sha256)
      embeddings.safetensors  optional: patch_embeddings [N, P, D] f32, every reference's patch features from
                         backbone.onnx (EmbeddingsMeta); teaching reuses them instead of re-embedding
      references/        downscaled PNG copies of the N reference images (0000.png, 0001.png, ...)

This module says what a bank is; :mod:`expert.bank` reads and writes the directories and
:mod:`expert.bank_checks` validates what they hold.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from expert.config import Precision, WeightsSource
from expert.coreset import StartMethod
from expert.dbt import DBTSearch, ThresholdMethod
from expert.errors import ExpertError
from expert.preprocess import Normalization, expert_normalization
from expert.search import Distance

if TYPE_CHECKING:
    from expert.config import ExpertSettings
    from expert.dbt import Threshold

BANK_FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = frozenset({1, 2})
"""Format 2 added the optional inspection mask (``mask`` in meta.json, ``inspection_mask`` tensor); format-1 banks
(no mask) still load."""
TENSORS_FILE = "bank.safetensors"
META_FILE = "meta.json"
ONNX_FILE = "backbone.onnx"
REFERENCES_DIR = "references"
TENSOR_DTYPES = {
    "memory_bank": np.float32,
    "train_scores": np.float32,
    "coreset_image_ids": np.int64,
    "global_descriptors": np.float32,
}
EMBEDDINGS_FILE = "embeddings.safetensors"
"""Optional file: the references' patch embeddings (:class:`EmbeddingsMeta`), read only when a bank is taught."""
EMBEDDINGS_TENSOR = "patch_embeddings"
"""The one tensor of :data:`EMBEDDINGS_FILE`: float32 [N, P, D] (every patch, the inspection mask not applied)."""
MASK_TENSOR = "inspection_mask"
"""Optional tensor (format 2): uint8 [grid_h, grid_w], 1 = the patch is inspected; present iff meta.json's ``mask``."""
DEFAULT_REFERENCE_MAX_SIDE = 1024
"""Longest side of the stored reference copies (``expert.reference_max_side``): large enough for the MLLM's budget."""
LEGACY_REFERENCE_MAX_SIDE = 512
"""Longest side of the reference thumbnails banks kept before ``reference_max_side`` was recorded."""
PATCH_FEATURE_DIM = 1024
"""Length of one patch feature for every supported backbone (``expert.backbone.EMBED_DIM``; kept equal by a test)."""
PATCH_STRIDE = 8
"""Pixels per patch-grid cell: the stride of ``layer2``, the grid the patch embedder works on (grid = crop // 8)."""
SCORE_TOLERANCE = 1e-4
"""Relative tolerance when τ and s_max are recomputed from ``train_scores`` at load."""


class BankError(ExpertError, ValueError):
    """A bank cannot be written or read, or does not fit the running settings (one-line message)."""

    code = "bank_unusable"


# ----------------------------------------------------------------------------------------------- meta


class _Meta(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class QuantizationMeta(_Meta):
    """How an int8 bank's graph was quantised (:mod:`expert.quantize`)."""

    tool: str = Field(description="the quantiser and its version, e.g. 'onnxruntime.quantization 1.31.1'")
    format: str = Field(description="qdq or qoperator")
    activations: str = Field(description="activation type, e.g. uint8 (per tensor)")
    weights: str = Field(description="weight type, e.g. int8 per channel")
    method: str = Field(description="calibration method, e.g. minmax")
    calibration_images: int = Field(ge=1, description="reference images the activation ranges were calibrated on")
    calibration_sha256: str = Field(description="sha256 over the calibration tensors (part of the graph's cache key)")
    quantized_ops: Literal["all", "conv"] = Field(
        "all", description="which operators were quantised: all (every one onnxruntime can) or conv (Conv nodes only)"
    )
    fp32_first_convs: int = Field(0, ge=0, description="how many of the graph's first Conv nodes were kept float32")
    fp32_last_convs: int = Field(0, ge=0, description="how many of its last Conv nodes were kept float32")
    symmetric_activations: bool = Field(False, description="activation ranges symmetric around zero")
    flip_augment: bool = Field(False, description="calibrated also on the mirror image of every calibration image")


class BackboneMeta(_Meta):
    """The feature extractor a bank was built with."""

    id: str = Field(description="timm model name, e.g. wide_resnet50_2.tv_in1k")
    weights: WeightsSource
    weights_source: str = Field(description="hub:<name>, file:<path> or random:seed=<n>")
    weights_checksum: str = Field(description="sha256:<hex> over the state dict")
    onnx_sha256: str | None = Field(None, description="sha256 of backbone.onnx; None: the bank has no ONNX file")
    precision: Precision = Field(
        "fp32",
        description="precision of backbone.onnx: fp32, or int8 (statically quantised on the bank's own references; "
        "the bank's features, τ and s_max come from that graph). Absent in older banks: they are all fp32",
    )
    quantization: QuantizationMeta | None = Field(None, description="how the int8 graph was made (null for fp32)")


class PreprocessingMeta(_Meta):
    """How images were prepared for the backbone: resize shorter side, crop, and the normalisation used.

    ``mean`` / ``std`` are the values the bank's features were computed with (the backbone's timm
    ``pretrained_cfg``, or the ``normalize_mean`` / ``normalize_std`` settings). Every bank format has recorded
    them; banks saved before they followed the backbone hold ImageNet's, which is what they were built with.
    """

    resize: int
    crop: int
    center_crop: bool
    mean: tuple[float, float, float] = Field(description="RGB mean: input = (pixel / 255 - mean) / std")
    std: tuple[float, float, float] = Field(description="RGB std of the input normalisation (all > 0)")

    @property
    def normalization(self) -> Normalization:
        """The recorded statistics as a :class:`~expert.preprocess.Normalization` (for :func:`preprocess`)."""
        return Normalization(mean=self.mean, std=self.std, source="the bank's meta.json")


class DimsMeta(_Meta):
    """Patch grid of one image, patch feature size and global descriptor size."""

    grid_h: int = Field(ge=1)
    grid_w: int = Field(ge=1)
    feature_dim: int = Field(ge=1)
    descriptor_dim: int = Field(ge=1)

    @property
    def patches_per_image(self) -> int:
        """grid_h x grid_w."""
        return self.grid_h * self.grid_w


class CoresetMeta(_Meta):
    """Coreset settings the memory bank was selected with (informational: they only matter at build time)."""

    ratio: float
    projection_dim: int
    num_starts: int
    start_method: StartMethod
    seed: int


class ThresholdMeta(_Meta):
    """The DBT threshold: method, its parameters, τ, s_max, fitted statistics and the DBT skip rule."""

    method: ThresholdMethod
    params: dict[str, float]
    tau: float
    s_max: float
    stats: dict[str, float] = Field(default_factory=dict)
    min_unsampled_patches: int = Field(ge=1)
    search: DBTSearch = Field(
        "leave_own_out", description="DBT search bank (absent in older banks: they were all leave-own-out)"
    )


class EmbeddingsMeta(_Meta):
    """The stored patch embeddings of the references (``embeddings.safetensors``): what they are and where from.

    They are float32, bit for bit what the bank's features were computed as, so a teach that reuses them gives
    the coreset, τ and s_max of a full rebuild. They are reused only while the graph that computed them is the
    one that will embed the new images (``graph_sha256``): an int8 bank is re-calibrated on every teach, so its
    new graph differs and every reference is embedded again.
    """

    sha256: str = Field(description="sha256 of embeddings.safetensors (covered by the bank id through meta.json)")
    dtype: Literal["float32"] = "float32"
    graph_sha256: str = Field(description="sha256 of the ONNX graph that computed them (the bank's backbone.onnx)")


class MaskMeta(_Meta):
    """The bank's inspection mask (format 2): how many patches it keeps, the rule and where it came from."""

    patches: int = Field(ge=1, description="grid patches inside the mask (= sum of the inspection_mask tensor)")
    rule: Literal["patch_centre"] = Field(
        "patch_centre", description="a patch counts iff the original pixel under its centre is inside"
    )
    source: str = Field("", description="where the mask came from, e.g. 'png:mask.png 640x480' or 'polygons:2 ...'")


class CountsMeta(_Meta):
    """References, how many were used/skipped by DBT, patches embedded, memory-bank rows."""

    references: int = Field(ge=1)
    used_for_dbt: int = Field(ge=1)
    skipped: int = Field(ge=0)
    patches: int = Field(ge=1)
    coreset: int = Field(ge=1)


class ReferenceMeta(_Meta):
    """One reference image: original name, stored copy, checksum and DBT status."""

    name: str = Field(description="original file name of the reference image")
    file: str = Field(description="path of the downscaled copy, relative to the bank directory")
    sha256: str = Field("", description="sha256 of that file (filled in by save_bank)")
    used_for_dbt: bool = True
    skip_reason: str | None = None


class BankMeta(_Meta):
    """Everything ``meta.json`` holds. ``bank_id`` and checksums are filled in by :func:`save_bank`."""

    format_version: int = BANK_FORMAT_VERSION
    name: str
    bank_id: str = Field("", description="first 16 hex digits of a sha256 over tensors and meta")
    created_utc: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    backbone: BackboneMeta
    preprocessing: PreprocessingMeta
    dims: DimsMeta
    coreset: CoresetMeta
    distance: Distance
    threshold: ThresholdMeta
    counts: CountsMeta
    references: list[ReferenceMeta]
    warnings: list[str] = Field(default_factory=list, description="build warnings, e.g. few reference images")
    versions: dict[str, str] = Field(default_factory=dict)
    reference_max_side: int | None = Field(
        None,
        ge=1,
        description="longest side the reference copies were stored at, at most (never upscaled); absent in banks "
        "saved before references were kept large (they hold 512-px thumbnails)",
    )
    mask: MaskMeta | None = Field(
        None, description="the inspection mask (format 2; null or absent: every patch is inspected)"
    )
    embeddings: EmbeddingsMeta | None = Field(
        None, description="the stored patch embeddings of the references (null or absent: none are stored)"
    )


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a bank depends on (``"not installed"`` when absent)."""
    candidates = {
        "eagle": ["eagle-inspect"],
        "numpy": ["numpy"],
        "torch": ["torch"],
        "timm": ["timm"],
        "faiss": ["faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss"],
        "onnxruntime": ["onnxruntime", "onnxruntime-gpu"],
        "safetensors": ["safetensors"],
    }
    found = {}
    for key, names in candidates.items():
        found[key] = "not installed"
        for name in names:
            try:
                found[key] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def make_meta(
    *,
    name: str,
    settings: ExpertSettings,
    weights_info: Any,
    threshold: Threshold,
    reference_names: Sequence[str],
    used_for_dbt: np.ndarray,
    skip_reasons: dict[int, str],
    grid: tuple[int, int],
    feature_dim: int,
    descriptor_dim: int,
    coreset_size: int,
    normalization: Normalization | None = None,
) -> BankMeta:
    """Assemble a :class:`BankMeta` from the build's settings and results (one place for the mapping).

    Args:
        name: the bank's name.
        settings: the ``ExpertSettings`` the bank is built with.
        weights_info: an ``expert.weights.WeightsInfo`` (``source``, ``checksum``).
        threshold: the DBT :class:`~expert.dbt.Threshold`.
        reference_names: original file names of the N reference images, in bank order.
        used_for_dbt: [N] bool mask from :func:`expert.dbt.leave_own_out_scores`.
        skip_reasons: {image index: reason} from :func:`expert.dbt.skip_reasons`.
        grid: patch grid (rows, cols) of one image, e.g. (28, 28).
        feature_dim: patch feature size (1024).
        descriptor_dim: global descriptor size.
        coreset_size: memory-bank rows.
        normalization: the input statistics the features were computed with; None: those ``settings`` give
            (:func:`expert.preprocess.expert_normalization`).
    """
    used = np.asarray(used_for_dbt, dtype=bool)
    normalization = normalization or expert_normalization(settings)
    n = len(reference_names)
    if len(used) != n:
        raise BankError(f"used_for_dbt has {len(used)} entries for {n} reference images")
    references = [
        ReferenceMeta(
            name=str(reference_names[i]),
            file=f"{REFERENCES_DIR}/{i:04d}.png",
            used_for_dbt=bool(used[i]),
            skip_reason=None if used[i] else skip_reasons.get(i, "skipped"),
        )
        for i in range(n)
    ]
    return BankMeta(
        name=name,
        backbone=BackboneMeta(
            id=settings.backbone,
            weights=settings.weights,
            weights_source=weights_info.source,
            weights_checksum=weights_info.checksum,
            precision=settings.precision,
        ),
        preprocessing=PreprocessingMeta(
            resize=settings.resize,
            crop=settings.crop,
            center_crop=settings.center_crop,
            mean=normalization.mean,
            std=normalization.std,
        ),
        dims=DimsMeta(grid_h=grid[0], grid_w=grid[1], feature_dim=feature_dim, descriptor_dim=descriptor_dim),
        coreset=CoresetMeta(
            ratio=settings.coreset_ratio,
            projection_dim=settings.coreset_projection_dim,
            num_starts=settings.coreset_starts,
            start_method=settings.coreset_start_method,
            seed=settings.seed,
        ),
        distance=settings.distance,
        threshold=ThresholdMeta(
            method=threshold.method,
            params=dict(threshold.params),
            tau=threshold.tau,
            s_max=threshold.s_max,
            stats=dict(threshold.stats),
            min_unsampled_patches=settings.min_unsampled_patches,
            search=settings.dbt_search,
        ),
        counts=CountsMeta(
            references=n,
            used_for_dbt=int(used.sum()),
            skipped=int(n - used.sum()),
            patches=n * grid[0] * grid[1],
            coreset=coreset_size,
        ),
        references=references,
        versions=library_versions(),
    )


# ----------------------------------------------------------------------------------------------- bank


@dataclass
class Bank:
    """A loaded (or about to be saved) bank.

    Attributes:
        memory_bank: [M, D] float32 coreset patch features.
        train_scores: [U] float32 DBT training scores of the U used references, in reference order
            (``meta.references[i].used_for_dbt``); skipped references have no score.
        coreset_image_ids: [M] int64 index of the reference image each memory-bank row came from.
        global_descriptors: [N, Dg] float32 L2-normalised retrieval descriptors, one per reference.
        meta: the :class:`BankMeta`.
        directory: where the bank lives (None until saved).
        notes: non-fatal differences between the bank and the running settings found by :func:`load_bank`.
        inspection_mask: bool [grid_h, grid_w], True where patches are inspected; None: every patch (no mask).
            Patches outside never count: the memory bank, ``train_scores`` and query scores only use those inside.
        patch_embeddings: float32 [N, P, D] every reference's patch features, to store in ``embeddings.safetensors``
            (set by a build; :func:`expert.bank.load_bank` leaves it None and :func:`expert.bank.load_embeddings`
            reads the file on demand, so inspecting never holds them in memory).
        embeddings_graph: sha256 of the ONNX graph ``patch_embeddings`` came from (None: not from a saved graph,
            they are not stored).
    """

    memory_bank: np.ndarray
    train_scores: np.ndarray
    coreset_image_ids: np.ndarray
    global_descriptors: np.ndarray
    meta: BankMeta
    directory: Path | None = None
    notes: list[str] = field(default_factory=list)
    inspection_mask: np.ndarray | None = None
    patch_embeddings: np.ndarray | None = field(default=None, repr=False)
    embeddings_graph: str | None = None

    def tensors(self) -> dict[str, np.ndarray]:
        """The tensors by their file names, as contiguous arrays of their file dtypes (the mask only when set)."""
        tensors = {
            name: np.ascontiguousarray(getattr(self, name), dtype=dtype) for name, dtype in TENSOR_DTYPES.items()
        }
        if self.inspection_mask is not None:
            tensors[MASK_TENSOR] = np.ascontiguousarray(self.inspection_mask, dtype=np.uint8)
        return tensors

    @property
    def mask(self) -> np.ndarray | None:
        """The inspection mask as bool [grid_h, grid_w], or None when every patch is inspected."""
        return None if self.inspection_mask is None else np.asarray(self.inspection_mask, dtype=bool)

    def _require_directory(self) -> Path:
        if self.directory is None:
            raise BankError(f"bank {self.meta.name!r} has not been saved to a directory yet")
        return self.directory

    def reference_path(self, index: int) -> Path:
        """Path of reference image ``index``'s downscaled PNG copy."""
        if not 0 <= index < len(self.meta.references):
            raise BankError(f"reference index {index} out of range [0, {len(self.meta.references)})")
        return self._require_directory() / self.meta.references[index].file

    def load_reference(self, index: int) -> np.ndarray:
        """Reference image ``index`` (downscaled copy) as an RGB uint8 array."""
        path = self.reference_path(index)
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except OSError as err:
            raise BankError(f"{path}: cannot read reference image ({err})") from None

    @property
    def onnx_path(self) -> Path:
        """Path of the bank's ``backbone.onnx`` (check :attr:`has_onnx` first)."""
        return self._require_directory() / ONNX_FILE

    @property
    def has_onnx(self) -> bool:
        """Whether the bank carries an exported backbone."""
        return self.meta.backbone.onnx_sha256 is not None

    @property
    def tau(self) -> float:
        """The bank's decision threshold τ."""
        return self.meta.threshold.tau

    @property
    def s_max(self) -> float:
        """The largest DBT training score."""
        return self.meta.threshold.s_max


# ------------------------------------------------------------------------------------------------- id

_LATER_FIELDS: dict[tuple[str, str], Any] = {
    ("threshold", "search"): "leave_own_out",
    ("", "reference_max_side"): None,
    ("", "mask"): None,
    ("backbone", "precision"): "fp32",
    ("backbone", "quantization"): None,
    ("", "embeddings"): None,
    ("backbone.quantization", "quantized_ops"): "all",
    ("backbone.quantization", "fp32_first_convs"): 0,
    ("backbone.quantization", "fp32_last_convs"): 0,
    ("backbone.quantization", "symmetric_activations"): False,
    ("backbone.quantization", "flip_augment"): False,
}
"""(meta group, field) added to format 1 after banks were saved without it, with its default.

The group is a dotted path into the meta ("": top level; ``backbone.quantization``: a nested group, skipped
where it is null, as in an fp32 bank)."""


def _later_field_holder(described: dict[str, Any], group: str) -> dict[str, Any] | None:
    """The dict of ``described`` that the dotted ``group`` names, or None where a step is missing or null."""
    holder: Any = described
    for step in group.split(".") if group else ():
        holder = holder.get(step) if isinstance(holder, dict) else None
    return holder if isinstance(holder, dict) else None


def compute_bank_id(tensors: dict[str, np.ndarray], meta: BankMeta) -> str:
    """16 hex digits of a sha256 over the tensors (name, dtype, shape, bytes) and meta.

    meta's ``bank_id`` and ``created_utc`` are left out, so the same contents give the same id; meta
    holds the ONNX and reference-file checksums, so the id covers every file of the bank. Fields added to
    format 1 later (:data:`_LATER_FIELDS`) are left out while they hold their default, so banks saved
    before they existed keep their id.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.data.cast("B"))
    described = meta.model_dump(mode="json", exclude={"bank_id", "created_utc"})
    for (group, key), default in _LATER_FIELDS.items():
        holder = _later_field_holder(described, group)
        if holder is not None and holder.get(key, default) == default:
            holder.pop(key, None)
    digest.update(json.dumps(described, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()[:16]
