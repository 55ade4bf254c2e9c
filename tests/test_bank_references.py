"""Reference copies a bank keeps: large enough for the MLLM's pixel budget; old thumbnail banks load with a hint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from eagle.settings import ExpertSettings
from expert.bank import load_bank, read_meta, save_bank
from expert.bank_schema import DEFAULT_REFERENCE_MAX_SIDE, LEGACY_REFERENCE_MAX_SIDE, compute_bank_id
from tests.bank_tamper import hash_bank
from tests.test_bank import _bank, write_fake_onnx

# (height, width): a VisA-like large image, an MVTec-like one exactly at the limit, a small one
SIZES = [(1000, 1500), (1024, 1024), (120, 200)]


def _references(sizes=SIZES) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _stored_sizes(bank_dir: Path) -> list[tuple[int, int]]:
    sizes = []
    for ref in read_meta(bank_dir).references:
        with Image.open(bank_dir / ref.file) as image:
            sizes.append(image.size)
    return sizes


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    return write_fake_onnx(tmp_path / "exported.onnx")


def test_references_are_kept_at_up_to_1024_px_never_upscaled(tmp_path, onnx_file):
    assert ExpertSettings().reference_max_side == DEFAULT_REFERENCE_MAX_SIDE == 1024
    bank_dir = save_bank(_bank(), tmp_path / "widget", onnx_source=onnx_file, reference_images=_references())
    assert _stored_sizes(bank_dir) == [(1024, 683), (1024, 1024), (200, 120)]
    loaded = load_bank(bank_dir, ExpertSettings(weights="random"))
    assert loaded.meta.reference_max_side == 1024 and loaded.notes == []
    assert np.array_equal(loaded.load_reference(2), _references()[2])  # small: kept as is, losslessly


def test_the_setting_may_raise_the_limit(tmp_path, onnx_file):
    bank_dir = save_bank(
        _bank(), tmp_path / "widget", onnx_source=onnx_file, reference_images=_references(), reference_max_side=2048
    )
    assert _stored_sizes(bank_dir) == [(1500, 1000), (1024, 1024), (200, 120)]
    assert read_meta(bank_dir).reference_max_side == 2048


def _id_as_before(tensors: dict[str, np.ndarray], meta) -> str:
    """The bank_id as EAGLE computed it before meta.json had reference_max_side (and threshold.search)."""
    described = meta.model_dump(
        mode="json", exclude={"bank_id", "created_utc", "reference_max_side", "mask", "embeddings"}
    )
    described["threshold"].pop("search", None)
    for later in ("precision", "quantization"):  # backbone fields added later still
        described["backbone"].pop(later, None)
    return hash_bank(tensors, described)


def _make_legacy(bank_dir: Path) -> None:
    """Turn a bank into one saved before reference_max_side existed, its bank_id computed as it was then."""
    raw = json.loads((bank_dir / "meta.json").read_text())
    del raw["reference_max_side"]
    del raw["mask"]  # format 1: no inspection mask either
    for later in ("precision", "quantization"):  # nor the backbone's precision
        del raw["backbone"][later]
    raw["format_version"] = 1
    (bank_dir / "meta.json").write_text(json.dumps(raw))
    raw["bank_id"] = _id_as_before(load_file(str(bank_dir / "bank.safetensors")), read_meta(bank_dir))
    (bank_dir / "meta.json").write_text(json.dumps(raw))


def test_an_old_thumbnail_bank_loads_with_a_rebuild_hint(tmp_path, onnx_file, caplog):
    bank_dir = save_bank(
        _bank(),
        tmp_path / "widget",
        onnx_source=onnx_file,
        reference_images=_references(),
        reference_max_side=LEGACY_REFERENCE_MAX_SIDE,
    )
    _make_legacy(bank_dir)
    assert "reference_max_side" not in json.loads((bank_dir / "meta.json").read_text())
    with caplog.at_level(logging.WARNING, logger="expert.bank"):
        loaded = load_bank(bank_dir, ExpertSettings(weights="random"))
    assert loaded.meta.reference_max_side is None
    (note,) = loaded.notes
    assert "longest side 512 px" in note and "eagle build-bank --normals <folder> --name widget-0" in note
    assert "up to 1024 px" in note
    assert note in caplog.text
    # without running settings too (default limit), and a raised limit is named in the hint
    assert load_bank(bank_dir).notes == [note]
    raised = load_bank(bank_dir, ExpertSettings(weights="random", reference_max_side=2048)).notes
    assert len(raised) == 1 and "up to 2048 px" in raised[0]


def test_an_old_bank_with_large_references_needs_no_hint(tmp_path, onnx_file):
    bank_dir = save_bank(_bank(), tmp_path / "widget", onnx_source=onnx_file, reference_images=_references())
    _make_legacy(bank_dir)
    assert load_bank(bank_dir, ExpertSettings(weights="random")).notes == []


def test_the_new_field_leaves_old_bank_ids_unchanged(tmp_path, onnx_file):
    bank = _bank()
    save_bank(bank, tmp_path / "widget", onnx_source=onnx_file, reference_images=_references())
    meta = bank.meta.model_copy(deep=True)
    with_field = compute_bank_id(bank.tensors(), meta)
    meta.reference_max_side = None  # a bank saved before the field existed
    assert compute_bank_id(bank.tensors(), meta) == _id_as_before(bank.tensors(), meta) != with_field
