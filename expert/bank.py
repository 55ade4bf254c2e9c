"""Reading and writing bank directories (the format: :mod:`expert.bank_schema`, ``docs/bank-format.md``).

This module is the one place that reads and writes them. Tensors use safetensors only (no pickle).
:func:`save_bank` writes into a temporary sibling directory and renames it into place, so a failed
write never leaves a half-written bank and never damages the bank it was replacing. :func:`load_bank`
checks the files, the format version, every checksum and the bank id here, and with :mod:`expert.bank_checks`
the tensor names/shapes/dtypes against meta.json, what the bank means and (given the running settings) that
the settings that change features or scores match the bank.
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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from common import atomic
from expert.bank_checks import check_consistency, check_meaning, settings_mismatches, threshold_differences
from expert.bank_schema import (
    BANK_FORMAT_VERSION,
    DEFAULT_REFERENCE_MAX_SIDE,
    EMBEDDINGS_FILE,
    EMBEDDINGS_TENSOR,
    LEGACY_REFERENCE_MAX_SIDE,
    MASK_TENSOR,
    META_FILE,
    ONNX_FILE,
    REFERENCES_DIR,
    SUPPORTED_FORMAT_VERSIONS,
    TENSOR_DTYPES,
    TENSORS_FILE,
    Bank,
    BankError,
    BankMeta,
    EmbeddingsMeta,
    compute_bank_id,
)

if TYPE_CHECKING:
    from expert.config import ExpertSettings

_CHUNK = 1 << 20

log = logging.getLogger(__name__)


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
    check_consistency(tensors, meta, where="bank to save")
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = atomic.staging_dir(target.parent, f".{target.name}.tmp-")  # a killed save's is removed by the next
    try:
        _write_references(staging, bank, meta, reference_images, reference_max_side)
        meta.backbone.onnx_sha256 = _write_onnx(staging, bank, onnx_source)
        meta.embeddings = _write_embeddings(staging, bank, meta)
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


def _write_embeddings(staging: Path, bank: Bank, meta: BankMeta) -> EmbeddingsMeta | None:
    """Store the references' patch embeddings when they came from the graph the bank now carries, else none.

    A bank loaded from a directory (no embeddings in memory) keeps its stored file while it still describes the
    same references and graph; embeddings from another graph, or a bank without one, store nothing.
    """
    graph = meta.backbone.onnx_sha256
    if graph is None:
        return None
    out = staging / EMBEDDINGS_FILE
    if bank.patch_embeddings is not None:
        if bank.embeddings_graph != graph:
            return None
        features = np.ascontiguousarray(bank.patch_embeddings, dtype=np.float32)
        expected = (len(meta.references), meta.dims.patches_per_image, meta.dims.feature_dim)
        if features.shape != expected:
            raise BankError(f"patch embeddings of shape {features.shape} for a bank of shape {expected}")
        save_file({EMBEDDINGS_TENSOR: features}, str(out), metadata={"eagle_bank_format": str(BANK_FORMAT_VERSION)})
        return EmbeddingsMeta(sha256=file_sha256(out), graph_sha256=graph)
    old = bank.meta.embeddings
    if bank.directory is None or old is None or old.graph_sha256 != graph:
        return None
    source = bank.directory / EMBEDDINGS_FILE
    if not source.is_file():
        return None
    atomic.link_or_copy(source, out)
    return old.model_copy()


def _write_meta(path: Path, meta: BankMeta) -> None:
    path.write_text(meta.model_dump_json(indent=2) + "\n", encoding="utf-8")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
    check_consistency(tensors, meta, where=str(root / TENSORS_FILE))
    _check_files(root, meta)
    actual_id = compute_bank_id(tensors, meta)
    if actual_id != meta.bank_id:
        raise BankError(
            f"{root}: bank_id mismatch (meta.json {meta.bank_id!r}, contents {actual_id!r}): "
            "the bank was modified or corrupted after it was written; rebuild it"
        )
    check_meaning(root, meta, tensors)
    _check_embeddings_header(root, meta)  # after the meaning: a forged bank is refused for what it claims first
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


def _embeddings_file(root: Path, meta: BankMeta) -> Path | None:
    """The stored embeddings file meta.json names, or None: none listed, or the file left out (a copy without it).

    The file only saves teaching time, so a bank copied without it still loads (teaching then re-embeds every
    reference), as do embeddings listed for another graph than the bank's (never reused); a file meta.json does
    not list is refused.
    """
    path = root / EMBEDDINGS_FILE
    if meta.embeddings is None:
        if path.exists():
            raise BankError(f"{path}: stored embeddings present but meta.json lists none")
        return None
    if meta.backbone.onnx_sha256 is None or meta.embeddings.graph_sha256 != meta.backbone.onnx_sha256:
        return None  # not from the bank's own graph: never reused (what the graph itself means is checked apart)
    if not path.is_file():
        log.info("bank %s: %s is missing; teaching will embed every reference again", meta.name, EMBEDDINGS_FILE)
        return None
    return path


def _check_embeddings_header(root: Path, meta: BankMeta) -> None:
    """The stored embeddings' name, dtype and shape from the file's header (the data is read only by teaching)."""
    path = _embeddings_file(root, meta)
    if path is None:
        return
    expected = (len(meta.references), meta.dims.patches_per_image, meta.dims.feature_dim)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            names = list(handle.keys())
            if names != [EMBEDDINGS_TENSOR]:
                raise BankError(f"{path}: expected the one tensor {EMBEDDINGS_TENSOR!r}, found {sorted(names)[:5]}")
            info = handle.get_slice(EMBEDDINGS_TENSOR)
            dtype, shape = info.get_dtype(), tuple(info.get_shape())
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, BankError):
            raise
        raise BankError(f"{path}: unreadable safetensors file ({one_line_error(err)})") from None
    if dtype != "F32":
        raise BankError(f"{path}: {EMBEDDINGS_TENSOR} dtype {dtype}, expected F32")
    if shape != expected:
        raise BankError(f"{path}: {EMBEDDINGS_TENSOR} shape {shape}, meta.json implies {expected}")


def load_embeddings(bank: Bank) -> np.ndarray | None:
    """The references' stored patch embeddings, float32 [N, P, D], or None when there are none (or no file).

    Read on demand (teaching), checked in full: the file's sha256 against meta.json (so the bank id covers it),
    its one tensor's name, dtype and shape against meta.json, and finite values.

    Raises:
        BankError: the bank was never saved, or the file is missing, corrupted or does not fit the bank.
    """
    if bank.patch_embeddings is not None:
        return bank.patch_embeddings
    if bank.meta.embeddings is None:
        return None
    if bank.directory is None:
        raise BankError(f"bank {bank.meta.name!r} has not been saved to a directory yet")
    path = _embeddings_file(bank.directory, bank.meta)
    if path is None:
        return None
    if file_sha256(path) != bank.meta.embeddings.sha256:
        raise BankError(f"{path}: checksum differs from meta.json (corrupted or replaced); rebuild the bank")
    _check_embeddings_header(bank.directory, bank.meta)
    try:
        features = load_file(str(path))[EMBEDDINGS_TENSOR]
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise BankError(f"{path}: unreadable safetensors file ({one_line_error(err)})") from None
    if not np.isfinite(features).all():
        raise BankError(f"{path}: {EMBEDDINGS_TENSOR} contains NaN or infinite values")
    return features


def one_line_error(err: BaseException) -> str:
    """The first line of an exception's message (never file contents: these come from the libraries)."""
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


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


# ------------------------------------------------------------------------------------------- names


def bank_file_pattern() -> re.Pattern[str]:
    """The relative paths a bank directory may hold (docs/bank-format.md); anything else is not part of a bank."""
    names = "|".join(re.escape(n) for n in (TENSORS_FILE, META_FILE, ONNX_FILE, EMBEDDINGS_FILE))
    return re.compile(rf"^(?:{names}|{re.escape(REFERENCES_DIR)}/[0-9]{{4,}}\.png)$")


def is_bank_file(relative: str) -> bool:
    """Whether ``relative`` (a POSIX path inside a bank directory) is one of the bank format's files."""
    return bank_file_pattern().fullmatch(relative) is not None
