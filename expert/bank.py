"""Bank directories: the expert's saved memory bank, threshold, backbone and reference images.

A bank is a directory (format described for users in ``docs/bank-format.md``)::

    <bank>/
      bank.safetensors   memory_bank [M, D] f32, train_scores [U] f32, coreset_image_ids [M] i64,
                         global_descriptors [N, Dg] f32, optional inspection_mask [grid_h, grid_w] u8 (format 2)
      meta.json          BankMeta: versions, settings it was built with, tau, counts, references
      backbone.onnx      the exported feature extractor (optional: see BackboneMeta.onnx_sha256)
      references/        downscaled PNG copies of the N reference images (0000.png, 0001.png, ...)

This module is the one place that reads and writes them. Tensors use safetensors only (no pickle).
:func:`save_bank` writes into a temporary sibling directory and renames it into place, so a failed
write never leaves a half-written bank and never damages the bank it was replacing. :func:`load_bank`
checks the files, the format version, tensor names/shapes/dtypes against meta.json, every checksum,
and (given the running settings) that the settings that change features or scores match the bank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from common import atomic
from expert.config import WeightsSource
from expert.coreset import StartMethod
from expert.dbt import THRESHOLD_SETTINGS, DBTSearch, ThresholdMethod
from expert.errors import ExpertError
from expert.preprocess import Normalization, NormalizationError, expert_normalization
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
MASK_TENSOR = "inspection_mask"
"""Optional tensor (format 2): uint8 [grid_h, grid_w], 1 = the patch is inspected; present iff meta.json's ``mask``."""
_CHUNK = 1 << 20
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

log = logging.getLogger(__name__)


class BankError(ExpertError, ValueError):
    """A bank cannot be written or read, or does not fit the running settings (one-line message)."""

    code = "bank_unusable"


# ----------------------------------------------------------------------------------------------- meta


class _Meta(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class BackboneMeta(_Meta):
    """The feature extractor a bank was built with."""

    id: str = Field(description="timm model name, e.g. wide_resnet50_2.tv_in1k")
    weights: WeightsSource
    weights_source: str = Field(description="hub:<name>, file:<path> or random:seed=<n>")
    weights_checksum: str = Field(description="sha256:<hex> over the state dict")
    onnx_sha256: str | None = Field(None, description="sha256 of backbone.onnx; None: the bank has no ONNX file")


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
    """

    memory_bank: np.ndarray
    train_scores: np.ndarray
    coreset_image_ids: np.ndarray
    global_descriptors: np.ndarray
    meta: BankMeta
    directory: Path | None = None
    notes: list[str] = field(default_factory=list)
    inspection_mask: np.ndarray | None = None

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


# ----------------------------------------------------------------------------------------------- save


def save_bank(
    bank: Bank,
    directory: str | Path,
    *,
    onnx_source: str | Path | None = None,
    reference_images: Sequence[np.ndarray] | None = None,
    reference_max_side: int = DEFAULT_REFERENCE_MAX_SIDE,
) -> Path:
    """Write ``bank`` to ``directory`` atomically and return the directory.

    The bank is written into a temporary directory next to ``directory`` and renamed into place; an
    existing bank there is renamed away first and deleted only after the new one is in place (a failure
    at any point leaves the old bank as it was). A non-empty directory that is not a bank is refused.

    Args:
        bank: the tensors and meta (``meta.bank_id``, checksums and ``onnx_sha256`` are (re)computed).
        directory: target bank directory.
        onnx_source: ``backbone.onnx`` to hard-link in (copied where a link is impossible); None links the
            bank's own when it was loaded from a directory with one, else the bank has no ONNX file.
        reference_images: the N reference images (RGB uint8), stored as PNG downscaled to
            ``reference_max_side`` pixels on the longest side (never upscaled); None copies the bank's own
            reference files.
        reference_max_side: longest side of the stored reference copies. They are the MLLM's template images,
            which reach the model at the same pixel budget as the full-resolution query, so keep it large.

    Returns:
        The bank directory; ``bank.directory`` and ``bank.meta`` are updated to the saved state.

    Raises:
        BankError: inconsistent bank, missing references or ONNX source, or an unwritable target.
    """
    target = Path(directory).expanduser().absolute()
    meta = bank.meta.model_copy(deep=True)
    meta.format_version = BANK_FORMAT_VERSION
    tensors = bank.tensors()
    _check_consistency(tensors, meta, where="bank to save")
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = atomic.staging_dir(target.parent, f".{target.name}.tmp-")  # a killed save's is removed by the next
    try:
        _write_references(staging, bank, meta, reference_images, reference_max_side)
        meta.backbone.onnx_sha256 = _write_onnx(staging, bank, onnx_source)
        meta.format_version = BANK_FORMAT_VERSION
        meta.bank_id = compute_bank_id(tensors, meta)
        save_file(tensors, str(staging / TENSORS_FILE), metadata={"eagle_bank_format": str(BANK_FORMAT_VERSION)})
        _write_meta(staging / META_FILE, meta)
        atomic.fsync_tree(staging)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    bank.meta = meta
    bank.directory = target
    return target


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise BankError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / META_FILE).is_file():
        raise BankError(f"{target}: refusing to overwrite a non-empty directory that is not an EAGLE bank")


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing target is moved aside first and removed afterwards."""
    if not target.exists():
        os.rename(staging, target)
        atomic.fsync_dir(target.parent)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    atomic.fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _write_references(
    staging: Path, bank: Bank, meta: BankMeta, images: Sequence[np.ndarray] | None, max_side: int
) -> None:
    (staging / REFERENCES_DIR).mkdir()
    n = len(meta.references)
    if images is not None and len(images) != n:
        raise BankError(f"{len(images)} reference images given for {n} references in meta")
    if images is None and bank.directory is None:
        raise BankError("reference_images are required when the bank was not loaded from a directory")
    for i, ref in enumerate(meta.references):
        ref.file = f"{REFERENCES_DIR}/{i:04d}.png"
        out = staging / ref.file
        if images is not None:
            meta.reference_max_side = max_side
            _write_reference(images[i], out, max_side, ref.name)
        else:
            source = bank.reference_path(i)
            if not source.is_file():
                raise BankError(f"{source}: reference image file missing, cannot copy the bank")
            atomic.link_or_copy(source, out)
        ref.sha256 = file_sha256(out)


def _write_reference(image: np.ndarray, path: Path, longest: int, name: str) -> None:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise BankError(f"reference {name!r}: expected an RGB uint8 array H x W x 3, got {array.dtype} {array.shape}")
    picture = Image.fromarray(array, mode="RGB")
    if max(picture.size) > longest:
        scale = longest / max(picture.size)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    picture.save(path, format="PNG")


def _write_onnx(staging: Path, bank: Bank, onnx_source: str | Path | None) -> str | None:
    if onnx_source is None:
        if bank.directory is None or not bank.has_onnx:
            return None
        onnx_source = bank.onnx_path
    source = Path(onnx_source)
    if not source.is_file():
        raise BankError(f"{source}: ONNX backbone file not found")
    atomic.link_or_copy(source, staging / ONNX_FILE)  # the file is ~100 MB and never changed in place
    return file_sha256(staging / ONNX_FILE)


def _write_meta(path: Path, meta: BankMeta) -> None:
    path.write_text(meta.model_dump_json(indent=2) + "\n", encoding="utf-8")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_LATER_FIELDS: dict[tuple[str, str], Any] = {
    ("threshold", "search"): "leave_own_out",
    ("", "reference_max_side"): None,
    ("", "mask"): None,
}
"""(meta group, field) added to format 1 after banks were saved without it, with its default ("": top level)."""


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
        holder = described.get(group, {}) if group else described
        if holder.get(key, default) == default:
            holder.pop(key, None)
    digest.update(json.dumps(described, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- load


def load_bank(directory: str | Path, settings: ExpertSettings | None = None) -> Bank:
    """Read and validate a bank directory.

    Checks, each failing with a one-line :class:`BankError`: the directory and every file exist;
    meta.json is valid and its format version supported; the tensors have the names, dtypes and shapes
    meta.json implies and are finite; the ONNX and reference checksums and the bank_id match the files;
    and what the bank means (:func:`check_meaning`: dims against the backbone and crop, τ and s_max against
    ``train_scores``, the ONNX graph's input and output shapes), since anyone can recompute a bank_id.
    With ``settings``, the settings that change features or scores must equal the bank's, the input
    normalisation included (see :func:`settings_mismatches`); differences in the threshold settings are not
    fatal (the bank's own τ is used) and are reported in ``bank.notes`` and the log.
    """
    root = Path(directory).expanduser().absolute()
    if not root.is_dir():
        raise BankError(f"{root}: bank directory not found")
    meta = read_meta(root)
    tensors = _read_tensors(root)
    _check_consistency(tensors, meta, where=str(root / TENSORS_FILE))
    _check_files(root, meta)
    actual_id = compute_bank_id(tensors, meta)
    if actual_id != meta.bank_id:
        raise BankError(
            f"{root}: bank_id mismatch (meta.json {meta.bank_id!r}, contents {actual_id!r}): "
            "the bank was modified or corrupted after it was written; rebuild it"
        )
    check_meaning(root, meta, tensors)
    bank = Bank(
        memory_bank=tensors["memory_bank"],
        train_scores=tensors["train_scores"],
        coreset_image_ids=tensors["coreset_image_ids"],
        global_descriptors=tensors["global_descriptors"],
        meta=meta,
        directory=root,
        inspection_mask=tensors.get(MASK_TENSOR),
    )
    if settings is not None:
        fatal = settings_mismatches(meta, settings)
        if fatal:
            raise BankError(f"{root}: {fatal[0]}" + (f" (and {len(fatal) - 1} more)" if len(fatal) > 1 else ""))
        bank.notes = threshold_differences(meta, settings)
        for note in bank.notes:
            log.warning("bank %s: %s", meta.name, note)
    wanted = settings.reference_max_side if settings is not None else DEFAULT_REFERENCE_MAX_SIDE
    small = small_references_note(root, meta, wanted)
    if small is not None:
        bank.notes.append(small)
        log.warning("bank %s: %s", meta.name, small)
    return bank


def small_references_note(root: Path, meta: BankMeta, wanted: int) -> str | None:
    """A rebuild hint for a bank saved before reference copies were kept large, or ``None``.

    Such a bank (no ``reference_max_side`` in meta.json) stored its references as 512-px thumbnails. They still
    load and work, but the template image then reaches the MLLM upscaled to the query's pixel budget, blurrier
    than the query. Only the stored files' headers are read.
    """
    if meta.reference_max_side is not None or not meta.references:
        return None
    longest = 0
    for ref in meta.references:
        try:
            with Image.open(root / ref.file) as image:
                longest = max(longest, *image.size)
        except OSError:
            continue
    if longest == 0 or longest >= wanted:
        return None
    return (
        f"reference images are stored small (longest side {longest} px; banks saved before references were kept "
        f"at up to {wanted} px hold {LEGACY_REFERENCE_MAX_SIDE}-px thumbnails), so the MLLM's template image is "
        f"blurrier than the query: rebuild the bank from its original reference images "
        f"(eagle build-bank --normals <folder> --name {meta.name}) to store them at up to {wanted} px"
    )


def read_meta(root: Path) -> BankMeta:
    """Parse and validate ``meta.json`` (format version first, so a newer bank gets a version error)."""
    path = root / META_FILE
    if not path.is_file():
        raise BankError(f"{path}: file missing (not an EAGLE bank directory?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BankError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise BankError(f"{path}: expected a JSON object")
    version = raw.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_FORMAT_VERSIONS))
        hint = "upgrade EAGLE" if isinstance(version, int) and version > BANK_FORMAT_VERSION else "rebuild the bank"
        raise BankError(f"{path}: format_version {version!r} is not supported (supported: {supported}); {hint}")
    try:
        return BankMeta.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BankError(f"{path}: invalid field {where!r}: {first['msg']}") from None


def _read_tensors(root: Path) -> dict[str, np.ndarray]:
    path = root / TENSORS_FILE
    if not path.is_file():
        raise BankError(f"{path}: file missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BankError(f"{path}: unreadable safetensors file ({err})") from None
    names = set(tensors) - {MASK_TENSOR}
    if names != set(TENSOR_DTYPES):
        missing, extra = sorted(set(TENSOR_DTYPES) - names), sorted(names - set(TENSOR_DTYPES))
        raise BankError(f"{path}: tensors missing {missing} / unexpected {extra}")
    return tensors


def _check_consistency(tensors: dict[str, np.ndarray], meta: BankMeta, *, where: str) -> None:
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


def _check_files(root: Path, meta: BankMeta) -> None:
    if meta.backbone.onnx_sha256 is not None:
        onnx = root / ONNX_FILE
        if not onnx.is_file():
            raise BankError(f"{onnx}: file missing")
        if file_sha256(onnx) != meta.backbone.onnx_sha256:
            raise BankError(f"{onnx}: checksum differs from meta.json (corrupted or replaced); rebuild the bank")
    for ref in meta.references:
        path = root / ref.file
        if not path.resolve().is_relative_to(root.resolve()):
            raise BankError(f"{root / META_FILE}: reference path {ref.file!r} points outside the bank")
        if not path.is_file():
            raise BankError(f"{path}: reference image missing")
        if file_sha256(path) != ref.sha256:
            raise BankError(f"{path}: checksum differs from meta.json (corrupted or replaced)")


# ------------------------------------------------------------------------------------------- meaning


def bank_file_pattern() -> re.Pattern[str]:
    """The relative paths a bank directory may hold (docs/bank-format.md); anything else is not part of a bank."""
    names = "|".join(re.escape(n) for n in (TENSORS_FILE, META_FILE, ONNX_FILE))
    return re.compile(rf"^(?:{names}|{re.escape(REFERENCES_DIR)}/[0-9]{{4,}}\.png)$")


def is_bank_file(relative: str) -> bool:
    """Whether ``relative`` (a POSIX path inside a bank directory) is one of the bank format's files."""
    return bank_file_pattern().fullmatch(relative) is not None


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
    if meta.backbone.onnx_sha256 is not None:
        _check_onnx(root / ONNX_FILE, crop=crop, patches=grid[0] * grid[1], dim=dims.feature_dim)


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


def _check_onnx(path: Path, *, crop: int, patches: int, dim: int) -> None:
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

    backbone, resize, crop, center_crop, distance, and the input normalisation (:func:`normalization_mismatch`).
    Each entry reads ``"setting crop: bank 224, running 256 (EAGLE_EXPERT__CROP)"``. Coreset settings only
    matter while building and are not compared; the backbone's weights are checked by
    :func:`check_weights` where the torch backbone is rebuilt (the ONNX file carries its own).
    """
    problems = []
    for key, read in _FATAL_SETTINGS.items():
        bank_value, running = read(meta), getattr(settings, key)
        if bank_value != running:
            problems.append(f"setting {key}: bank {bank_value!r}, running {running!r} (EAGLE_EXPERT__{key.upper()})")
    if meta.backbone.id == settings.backbone:  # another backbone is refused above; its statistics do not matter
        normalization = normalization_mismatch(meta, settings)
        if normalization is not None:
            problems.append(normalization)
    return problems


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
