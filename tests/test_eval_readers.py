"""Data set readers: a small fixture in every layout (MVTec, VisA CSV, VisA reorganised, MMAD json, folder)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eagle.evaluation.readers import DatasetError, read_dataset


def _png(path: Path, value: int = 128, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path


def _mask(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 255
    Image.fromarray(mask).save(path)
    return path


# ------------------------------------------------------------------------------------------------ MVTec


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec"
    for i in range(3):
        _png(root / "bottle" / "train" / "good" / f"{i:03d}.png")
    _png(root / "bottle" / "test" / "good" / "000.png")
    _png(root / "bottle" / "test" / "broken_large" / "000.png")
    _png(root / "bottle" / "test" / "broken_large" / "001.png")
    _mask(root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png")
    _mask(root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png")
    _png(root / "cable" / "train" / "good" / "000.png")
    _png(root / "cable" / "test" / "good" / "000.png")
    _png(root / "cable" / "test" / "cut" / "000.png")  # no mask on purpose
    (root / "license.txt").write_text("not a class")
    return root


def test_mvtec_reads_classes_labels_masks(mvtec_root: Path) -> None:
    ds = read_dataset("mvtec", mvtec_root)
    assert ds.classes == ["bottle", "cable"]
    assert [p.name for p in ds.train["bottle"]] == ["000.png", "001.png", "002.png"]
    bottle = {s.rel_path: s for s in ds.test["bottle"]}
    assert set(bottle) == {
        "bottle/test/good/000.png",
        "bottle/test/broken_large/000.png",
        "bottle/test/broken_large/001.png",
    }
    good, bad = bottle["bottle/test/good/000.png"], bottle["bottle/test/broken_large/001.png"]
    assert (good.label, good.defect_type, good.mask_path) == (0, "good", None)
    assert (bad.label, bad.defect_type) == (1, "broken_large")
    assert bad.mask_path == mvtec_root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png"
    cut = next(s for s in ds.test["cable"] if s.label == 1)
    assert cut.mask_path is None
    assert any("cable" in note and "no mask" in note for note in ds.notes)


def test_mvtec_class_selection_and_errors(mvtec_root: Path, tmp_path: Path) -> None:
    assert read_dataset("mvtec", mvtec_root, ["cable"]).classes == ["cable"]
    with pytest.raises(DatasetError, match="class 'screw' not found.*available: bottle, cable"):
        read_dataset("mvtec", mvtec_root, ["screw"])
    with pytest.raises(DatasetError, match="is not a directory"):
        read_dataset("mvtec", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no MVTec-style class folders"):
        read_dataset("mvtec", tmp_path)
    with pytest.raises(DatasetError, match="unknown data set kind"):
        read_dataset("kitti", mvtec_root)


def test_mvtec_single_class_root(mvtec_root: Path) -> None:
    ds = read_dataset("mvtec", mvtec_root / "bottle")
    assert ds.classes == ["bottle"]
    assert ds.test["bottle"][0].rel_path.startswith("bottle/test/")


def test_mvtec_class_without_references(mvtec_root: Path) -> None:
    for p in (mvtec_root / "cable" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="holds no images: a bank needs normal references"):
        read_dataset("mvtec", mvtec_root, ["cable"])


# ------------------------------------------------------------------------------------------------ VisA


def _visa_csv(root: Path, rows: list[list[str]], header=("object", "split", "label", "image", "mask")) -> None:
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def visa_root(tmp_path: Path) -> Path:
    root = tmp_path / "VisA"
    images = root / "candle" / "Data" / "Images"
    rows = []
    for i in range(3):
        _png(images / "Normal" / f"{i:04d}.JPG")
        rows.append(["candle", "train", "normal", f"candle/Data/Images/Normal/{i:04d}.JPG", ""])
    _png(images / "Normal" / "0100.JPG")
    rows.append(["candle", "test", "normal", "candle/Data/Images/Normal/0100.JPG", ""])
    _png(images / "Anomaly" / "000.JPG")
    _mask(root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png")
    rows.append(
        ["candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"]
    )
    _png(root / "pcb1" / "Data" / "Images" / "Normal" / "0000.JPG")
    _png(root / "pcb1" / "Data" / "Images" / "Anomaly" / "000.JPG")
    rows.append(["pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""])
    rows.append(["pcb1", "test", "anomaly", "pcb1/Data/Images/Anomaly/000.JPG", ""])
    _visa_csv(root, rows)
    with (root / "candle" / "image_anno.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["image", "label", "mask"], ["candle/Data/Images/Anomaly/000.JPG", "chunk of wax missing", ""]]
        )
    return root


def test_visa_csv_layout(visa_root: Path) -> None:
    ds = read_dataset("visa", visa_root)
    assert ds.kind == "visa" and ds.classes == ["candle", "pcb1"]
    assert [p.name for p in ds.train["candle"]] == ["0000.JPG", "0001.JPG", "0002.JPG"]
    candle = {s.rel_path: s for s in ds.test["candle"]}
    normal = candle["candle/Data/Images/Normal/0100.JPG"]
    anomaly = candle["candle/Data/Images/Anomaly/000.JPG"]
    assert (normal.label, normal.defect_type, normal.mask_path) == (0, "good", None)
    assert (anomaly.label, anomaly.defect_type) == (1, "chunk of wax missing")
    assert anomaly.mask_path == visa_root / "candle/Data/Masks/Anomaly/000.png"
    pcb = ds.test["pcb1"][0]
    assert (pcb.label, pcb.defect_type, pcb.mask_path) == (1, "anomaly", None)
    assert read_dataset("visa", visa_root, ["pcb1"]).classes == ["pcb1"]


def test_visa_csv_errors(visa_root: Path, tmp_path: Path) -> None:
    (visa_root / "candle/Data/Images/Anomaly/000.JPG").unlink()
    with pytest.raises(DatasetError, match="lists 1 images that do not exist.*Anomaly/000.JPG"):
        read_dataset("visa", visa_root)
    bad = tmp_path / "bad"
    _visa_csv(bad, [["candle", "test", "normal", "x.JPG"]], header=("object", "split", "label", "image"))
    with pytest.raises(DatasetError, match="missing columns mask"):
        read_dataset("visa", bad)
    odd = tmp_path / "odd"
    _png(odd / "a.JPG")
    _visa_csv(odd, [["candle", "test", "broken", "a.JPG", ""]])
    with pytest.raises(DatasetError, match="1cls.csv:2: label must be normal or anomaly"):
        read_dataset("visa", odd)


def test_visa_reorganised_mvtec_style(tmp_path: Path) -> None:
    root = tmp_path / "visa_pytorch"
    for i in range(2):
        _png(root / "candle" / "train" / "good" / f"{i:03d}.JPG")
    _png(root / "candle" / "test" / "good" / "000.JPG")
    _png(root / "candle" / "test" / "bad" / "000.JPG")
    _mask(root / "candle" / "ground_truth" / "bad" / "000.png")  # same stem, no _mask suffix
    ds = read_dataset("visa", root)
    assert ds.kind == "visa" and ds.classes == ["candle"]
    bad = next(s for s in ds.test["candle"] if s.label)
    assert (bad.defect_type, bad.mask_path) == ("bad", root / "candle" / "ground_truth" / "bad" / "000.png")


# ------------------------------------------------------------------------------------------------ MMAD


def _turn(answer: str) -> dict:
    return {
        "Question": "Is there any defect in the object?",
        "Answer": answer,
        "Options": {"A": "Yes", "B": "No"},
        "type": "Anomaly Detection",
        "annotation": True,
    }


@pytest.fixture
def mmad_root(tmp_path: Path) -> Path:
    root = tmp_path / "MMAD"
    for i in range(2):
        _png(root / "MVTec-AD" / "bottle" / "train" / "good" / f"{i:03d}.png")
    _png(root / "MVTec-AD" / "bottle" / "test" / "good" / "000.png")
    _png(root / "MVTec-AD" / "bottle" / "test" / "broken_large" / "000.png")
    _mask(root / "MVTec-AD" / "bottle" / "ground_truth" / "broken_large" / "000_mask.png")
    for i in range(3):
        _png(root / "DS-VisA" / "candle" / "image" / "good" / f"{i:03d}.png")
    _png(root / "DS-VisA" / "candle" / "image" / "wax" / "000.png")
    defect_question = {"Question": "What kind of defect?", "Answer": "C", "Options": {"C": "crack"}, "type": "Defect"}
    data = {
        "MVTec-AD/bottle/test/broken_large/000.png": {
            "mask_path": "ground_truth/broken_large/000_mask.png",
            "similar_templates": ["MVTec-AD/bottle/train/good/001.png", "MVTec-AD/bottle/train/good/000.png"],
            "random_templates": ["MVTec-AD/bottle/train/good/000.png"],
            "conversation": [_turn("A"), defect_question],
        },
        "MVTec-AD/bottle/test/good/000.png": {
            "similar_templates": ["MVTec-AD/bottle/train/good/000.png"],
            "conversation": [_turn("B")],
        },
        "DS-VisA/candle/image/wax/000.png": {
            "similar_templates": ["DS-VisA/candle/image/good/000.png", "DS-VisA/candle/image/good/001.png"],
            "random_templates": ["DS-VisA/candle/image/good/002.png"],
            "conversation": [_turn("A")],
        },
        "DS-VisA/candle/image/good/002.png": {
            "similar_templates": ["DS-VisA/candle/image/good/000.png"],
            "conversation": [],  # no detection question: label from the path ("good")
        },
    }
    (root / "mmad.json").write_text(json.dumps(data))
    return root


def test_mmad_json(mmad_root: Path) -> None:
    with pytest.raises(DatasetError, match=r"DS-VisA/candle.*train/good.*--bank-from-templates"):
        read_dataset("mmad", mmad_root)  # no training images for DS-VisA/candle: never silently from templates
    ds = read_dataset("mmad", mmad_root, bank_from_templates=True)
    assert ds.classes == ["DS-VisA/candle", "MVTec-AD/bottle"]
    bottle = {s.rel_path: s for s in ds.test["MVTec-AD/bottle"]}
    bad = bottle["MVTec-AD/bottle/test/broken_large/000.png"]
    good = bottle["MVTec-AD/bottle/test/good/000.png"]
    assert (bad.label, bad.defect_type, good.label, good.defect_type) == (1, "broken_large", 0, "good")
    assert bad.question == "Is there any defect in the object?"
    assert bad.template_paths == (
        mmad_root / "MVTec-AD/bottle/train/good/001.png",
        mmad_root / "MVTec-AD/bottle/train/good/000.png",
    )
    assert bad.mask_path == (mmad_root / "MVTec-AD/bottle/ground_truth/broken_large/000_mask.png").resolve()
    assert [p.name for p in ds.train["MVTec-AD/bottle"]] == ["000.png", "001.png"]  # train/good exists
    candle = {s.rel_path: s for s in ds.test["DS-VisA/candle"]}
    assert candle["DS-VisA/candle/image/good/002.png"].label == 0
    # no train/good: references are the listed templates, minus images that are themselves tested
    assert [p.name for p in ds.train["DS-VisA/candle"]] == ["000.png", "001.png"]
    assert any("DS-VisA/candle" in n and "templates" in n for n in ds.notes)
    assert ds.bank_sources["DS-VisA/candle"]["source"] == "templates"
    assert ds.bank_sources["MVTec-AD/bottle"]["source"] == "mmad_tree"


def test_mmad_prefix_selection_and_errors(mmad_root: Path, tmp_path: Path) -> None:
    assert read_dataset("mmad", mmad_root, ["MVTec-AD"]).classes == ["MVTec-AD/bottle"]
    candle = read_dataset("mmad", mmad_root / "mmad.json", ["DS-VisA/candle"], bank_from_templates=True)
    assert candle.classes == ["DS-VisA/candle"]
    (mmad_root / "MVTec-AD/bottle/test/good/000.png").unlink()
    with pytest.raises(DatasetError, match="lists 1 images missing.*restrict --classes"):
        read_dataset("mmad", mmad_root)
    with pytest.raises(DatasetError, match="mmad.json not found"):
        read_dataset("mmad", tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mmad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not readable JSON"):
        read_dataset("mmad", broken)


# ------------------------------------------------------------------------------------------------ folder


def test_folder_with_reference_dir(tmp_path: Path) -> None:
    root = tmp_path / "widget"
    for i in range(2):
        _png(root / "reference" / f"r{i}.png")
    _png(root / "good" / "g0.png")
    _png(root / "bad" / "b0.png")
    _png(root / "bad" / "scratch" / "s0.png")
    _mask(root / "masks" / "scratch" / "s0.png")
    ds = read_dataset("folder", root)
    assert ds.classes == ["widget"]
    assert [p.name for p in ds.train["widget"]] == ["r0.png", "r1.png"]
    samples = {s.rel_path: s for s in ds.test["widget"]}
    assert set(samples) == {"widget/good/g0.png", "widget/bad/b0.png", "widget/bad/scratch/s0.png"}
    assert (samples["widget/bad/b0.png"].defect_type, samples["widget/bad/b0.png"].mask_path) == ("bad", None)
    scratch = samples["widget/bad/scratch/s0.png"]
    assert (scratch.label, scratch.defect_type, scratch.mask_path) == (1, "scratch", root / "masks/scratch/s0.png")


def test_folder_splits_good_half_by_stable_hash(tmp_path: Path) -> None:
    for name in ("a", "b"):
        for i in range(5):
            _png(tmp_path / "lines" / name / "good" / f"{i}.png")
        _png(tmp_path / "lines" / name / "bad" / "x.png")
    ds = read_dataset("folder", tmp_path / "lines")
    assert ds.classes == ["a", "b"]
    for name in ("a", "b"):
        references = {p.name for p in ds.train[name]}
        tested = {s.path.name for s in ds.test[name] if s.label == 0}
        assert len(references) == 3 and len(tested) == 2 and not references & tested
    again = read_dataset("folder", tmp_path / "lines")
    assert again.train == ds.train  # deterministic
    with pytest.raises(DatasetError, match="no good/ and bad/ folders"):
        read_dataset("folder", tmp_path / "lines" / "a" / "good")
