"""Bank directories: round trip, atomic overwrite, validation errors, settings compatibility."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import expert.bank as bank_module
from eagle.settings import ExpertSettings
from expert.bank import load_bank, save_bank
from expert.bank_checks import check_weights
from expert.bank_schema import BANK_FORMAT_VERSION, Bank, BankError, BankMeta, make_meta
from expert.dbt import compute_threshold
from tests.bank_tamper import overwrite

N_REFS, GRID, DIM, M = 3, (28, 28), 1024, 10  # dims of the default backbone at crop 224 (check_meaning)


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(60, 90), (90, 60), (50, 50)]]


def _bank(seed: int = 0, settings: ExpertSettings | None = None) -> Bank:
    rng = np.random.default_rng(seed)
    settings = settings or ExpertSettings(weights="random")
    train_scores = np.array([4.5, 5.5], np.float32) + seed
    threshold = compute_threshold(train_scores, "k_sigma", kappa=3.0)  # tau = 6.5 + seed, s_max = 5.5 + seed
    meta = make_meta(
        name=f"widget-{seed}",
        settings=settings,
        weights_info=SimpleNamespace(source="random:seed=0", checksum="sha256:" + "ab" * 32),
        threshold=threshold,
        reference_names=["a.png", "b.png", "c.png"],
        used_for_dbt=np.array([True, False, True]),
        skip_reasons={1: "too_few_unsampled"},
        grid=GRID,
        feature_dim=DIM,
        descriptor_dim=DIM,
        coreset_size=M,
    )
    return Bank(
        memory_bank=rng.standard_normal((M, DIM)).astype(np.float32),
        train_scores=train_scores,
        coreset_image_ids=rng.integers(0, N_REFS, M).astype(np.int64),
        global_descriptors=rng.standard_normal((N_REFS, DIM)).astype(np.float32),
        meta=meta,
    )


def write_fake_onnx(path: Path, *, input_dims=("batch", 3, 224, 224), output_dims=("batch", 784, DIM)) -> Path:
    """A tiny ONNX graph with the patch embedder's input/output signature (never run: loading checks shapes only)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["patch_features"])],
        "fake",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(input_dims))],
        [helper.make_tensor_value_info("patch_features", TensorProto.FLOAT, list(output_dims))],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    return write_fake_onnx(tmp_path / "exported.onnx")


@pytest.fixture
def saved(tmp_path, onnx_file) -> Path:
    return save_bank(
        _bank(), tmp_path / "banks" / "widget", onnx_source=onnx_file, reference_images=_images(), reference_max_side=64
    )


def test_round_trip(saved, onnx_file):
    original = _bank()
    loaded = load_bank(saved, ExpertSettings(weights="random"))
    for name in ("memory_bank", "train_scores", "coreset_image_ids", "global_descriptors"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(original, name))
        assert getattr(loaded, name).dtype == getattr(original, name).dtype
    assert loaded.directory == saved and loaded.notes == []
    assert loaded.meta.format_version == BANK_FORMAT_VERSION and len(loaded.meta.bank_id) == 16
    assert loaded.tau == pytest.approx(6.5) and loaded.s_max == 5.5
    assert [r.name for r in loaded.meta.references] == ["a.png", "b.png", "c.png"]
    assert [r.skip_reason for r in loaded.meta.references] == [None, "too_few_unsampled", None]
    assert loaded.meta.counts.model_dump() == {
        "references": 3,
        "used_for_dbt": 2,
        "skipped": 1,
        "patches": 3 * 784,
        "coreset": 10,
    }
    assert loaded.has_onnx and loaded.onnx_path.read_bytes() == onnx_file.read_bytes()
    assert sorted(p.name for p in saved.iterdir()) == ["backbone.onnx", "bank.safetensors", "meta.json", "references"]


def test_reference_copies_are_downscaled_pngs(saved):
    loaded = load_bank(saved)
    for i, (h, w) in enumerate([(60, 90), (90, 60), (50, 50)]):
        path = loaded.reference_path(i)
        assert path.suffix == ".png" and path.parent.name == "references"
        image = loaded.load_reference(i)
        scale = min(1.0, 64 / max(h, w))
        assert image.shape == (round(h * scale), round(w * scale), 3) and image.dtype == np.uint8
    assert np.array_equal(loaded.load_reference(2), _images()[2])  # 50x50 is kept as is, losslessly
    with pytest.raises(BankError, match="out of range"):
        loaded.reference_path(3)


def test_meta_records_settings_and_versions(saved):
    raw = json.loads((saved / "meta.json").read_text())
    assert raw["backbone"]["id"] == "wide_resnet50_2.tv_in1k" and raw["backbone"]["weights"] == "random"
    assert raw["preprocessing"] == {
        "resize": 256,
        "crop": 224,
        "center_crop": True,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    assert raw["coreset"] == {
        "ratio": 0.1,
        "projection_dim": 128,
        "num_starts": 10,
        "start_method": "center_farthest",
        "seed": 0,
    }
    assert raw["distance"] == "sqeuclidean" and raw["threshold"]["min_unsampled_patches"] == 32
    assert raw["threshold"]["search"] == "leave_own_out"
    assert {"torch", "timm", "faiss", "onnxruntime", "numpy", "eagle"} <= set(raw["versions"])
    assert raw["created_utc"].endswith("+00:00") and raw["warnings"] == []


def test_bank_id_depends_on_contents_only(tmp_path, onnx_file):
    a = save_bank(_bank(0), tmp_path / "a", onnx_source=onnx_file, reference_images=_images())
    b = save_bank(_bank(0), tmp_path / "b", onnx_source=onnx_file, reference_images=_images())
    c = save_bank(_bank(1), tmp_path / "c", onnx_source=onnx_file, reference_images=_images())
    ids = [load_bank(p).meta.bank_id for p in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]


def test_resave_a_loaded_bank_copies_its_files(saved, tmp_path):
    copy = save_bank(load_bank(saved), tmp_path / "copy")
    loaded = load_bank(copy)
    assert loaded.meta.bank_id == load_bank(saved).meta.bank_id
    assert loaded.onnx_path.read_bytes() == (saved / "backbone.onnx").read_bytes()


def test_bank_without_onnx(tmp_path):
    loaded = load_bank(save_bank(_bank(), tmp_path / "b", reference_images=_images()))
    assert not loaded.has_onnx and not (tmp_path / "b" / "backbone.onnx").exists()


# --------------------------------------------------------------------------------------------- atomicity


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_overwrite_replaces_the_bank_and_cleans_up(saved, onnx_file):
    save_bank(_bank(1), saved, onnx_source=onnx_file, reference_images=_images(1))
    assert load_bank(saved).tau == pytest.approx(7.5)
    assert _leftovers(saved.parent) == []


def test_failure_while_writing_keeps_the_old_bank(saved, onnx_file, monkeypatch):
    before = load_bank(saved).meta.bank_id

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bank_module, "_write_meta", broken)
    with pytest.raises(OSError, match="disk full"):
        save_bank(_bank(1), saved, onnx_source=onnx_file, reference_images=_images(1))
    assert load_bank(saved).meta.bank_id == before
    assert _leftovers(saved.parent) == []


def test_failure_at_the_final_rename_restores_the_old_bank(saved, onnx_file, monkeypatch):
    before = load_bank(saved).meta.bank_id
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(bank_module.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_bank(_bank(1), saved, onnx_source=onnx_file, reference_images=_images(1))
    monkeypatch.undo()
    assert load_bank(saved).meta.bank_id == before
    assert _leftovers(saved.parent) == []


def test_refuses_to_overwrite_a_directory_that_is_not_a_bank(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(BankError, match="not an EAGLE bank"):
        save_bank(_bank(), other, reference_images=_images())
    assert (other / "holiday.jpg").exists()


def test_save_validates_the_bank(tmp_path):
    bad = _bank()
    bad.train_scores = np.array([1.0, np.nan], np.float32)
    with pytest.raises(BankError, match="train_scores contains NaN"):
        save_bank(bad, tmp_path / "b", reference_images=_images())
    with pytest.raises(BankError, match="reference_images are required"):
        save_bank(_bank(), tmp_path / "b")
    with pytest.raises(BankError, match="2 reference images given for 3"):
        save_bank(_bank(), tmp_path / "b", reference_images=_images()[:2])
    with pytest.raises(BankError, match="RGB uint8"):
        save_bank(_bank(), tmp_path / "b", reference_images=[np.zeros((4, 4), np.uint8)] * 3)
    assert not (tmp_path / "b").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- load errors


def _rewrite_meta(bank_dir: Path, edit) -> None:
    raw = json.loads((bank_dir / "meta.json").read_text())
    edit(raw)
    (bank_dir / "meta.json").write_text(json.dumps(raw))


def test_missing_directory(tmp_path):
    with pytest.raises(BankError, match="bank directory not found"):
        load_bank(tmp_path / "nope")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "meta.json").unlink(), "meta.json: file missing"),
        (lambda d: (d / "meta.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "bank.safetensors").unlink(), "bank.safetensors: file missing"),
        (lambda d: (d / "bank.safetensors").write_bytes((d / "bank.safetensors").read_bytes()[:100]), "unreadable"),
        (lambda d: (d / "backbone.onnx").unlink(), "backbone.onnx: file missing"),
        (lambda d: overwrite(d / "backbone.onnx", b"other"), "backbone.onnx: checksum differs"),
        (lambda d: (d / "references" / "0001.png").unlink(), "0001.png: reference image missing"),
        (lambda d: overwrite(d / "references" / "0001.png", b"x"), "0001.png: checksum differs"),
    ],
)
def test_damaged_files(saved, damage, message):
    damage(saved)
    with pytest.raises(BankError, match=message):
        load_bank(saved)


def _edit_tensors(bank_dir: Path, edit) -> None:
    tensors = load_file(str(bank_dir / "bank.safetensors"))
    edit(tensors)
    save_file(tensors, str(bank_dir / "bank.safetensors"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("global_descriptors"), r"missing \['global_descriptors'\]"),
        (lambda t: t.update(extra=np.zeros(1, np.float32)), r"unexpected \['extra'\]"),
        (lambda t: t.update(memory_bank=t["memory_bank"].astype(np.float16)), "memory_bank dtype float16"),
        (lambda t: t.update(train_scores=np.zeros(3, np.float32)), r"train_scores shape \(3,\)"),
        (lambda t: t.update(coreset_image_ids=np.full(10, 7, np.int64)), "coreset_image_ids outside"),
        (lambda t: t["memory_bank"].__setitem__((0, 0), 1.5), "bank_id mismatch"),
    ],
)
def test_tensor_problems(saved, edit, message):
    _edit_tensors(saved, edit)
    with pytest.raises(BankError, match=message):
        load_bank(saved)


@pytest.mark.parametrize(
    ("version", "hint"), [(3, "upgrade EAGLE"), (0, "rebuild the bank"), ("1", "rebuild the bank")]
)
def test_unsupported_format_version(saved, version, hint):
    _rewrite_meta(saved, lambda raw: raw.update(format_version=version))
    with pytest.raises(BankError, match=rf"format_version .* is not supported \(supported: 1, 2\); {hint}"):
        load_bank(saved)


def test_invalid_meta_field_is_named(saved):
    _rewrite_meta(saved, lambda raw: raw["threshold"].update(method="p99"))
    with pytest.raises(BankError, match="invalid field 'threshold.method'"):
        load_bank(saved)


def test_nan_tau_in_meta_is_rejected(saved):
    text = (saved / "meta.json").read_text().replace('"tau": 6.5', '"tau": NaN')
    (saved / "meta.json").write_text(text)
    with pytest.raises(BankError, match="invalid field 'threshold.tau'"):
        load_bank(saved)


def test_edited_meta_breaks_the_bank_id(saved):
    _rewrite_meta(saved, lambda raw: raw["threshold"].update(tau=0.1))
    with pytest.raises(BankError, match="bank_id mismatch"):
        load_bank(saved)


# ------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"crop": 192}, r"setting crop: bank 224, running 192 \(EAGLE_EXPERT__CROP\)"),
        ({"resize": 320}, "setting resize: bank 256, running 320"),
        ({"center_crop": False}, "setting center_crop: bank True, running False"),
        ({"distance": "euclidean"}, "setting distance: bank 'sqeuclidean', running 'euclidean'"),
        ({"backbone": "resnet18"}, "setting backbone: bank 'wide_resnet50_2.tv_in1k', running 'resnet18'"),
    ],
)
def test_settings_mismatch_is_an_error(saved, change, message):
    with pytest.raises(BankError, match=message):
        load_bank(saved, ExpertSettings(weights="random", **change))


def test_threshold_and_coreset_differences_are_not_fatal(saved, caplog):
    loaded = load_bank(saved, ExpertSettings(kappa=2.0, coreset_ratio=0.5))
    assert loaded.tau == pytest.approx(6.5)  # the bank's own tau
    assert len(loaded.notes) == 1 and "kappa: bank 3.0, running 2.0" in loaded.notes[0]
    assert "kappa" in caplog.text
    other = load_bank(saved, ExpertSettings(threshold_method="evt"))
    assert "threshold_method: bank 'k_sigma', running 'evt'" in other.notes[0]


def test_check_weights(saved):
    meta = load_bank(saved).meta
    check_weights(meta, SimpleNamespace(source="random:seed=0", checksum="sha256:" + "ab" * 32))
    with pytest.raises(BankError, match="backbone weights"):
        check_weights(meta, SimpleNamespace(source="hub:x", checksum="sha256:" + "cd" * 32))


def test_meta_model_rejects_unknown_keys():
    raw = _bank().meta.model_dump()
    raw["surprise"] = 1
    with pytest.raises(ValueError, match="surprise"):
        BankMeta.model_validate(raw)
