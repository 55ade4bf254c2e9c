"""Data set readers: MVTec-AD, VisA (its CSV layout and the MVTec-style one), MMAD and plain folders.

Each reader turns a data set on disk into one :class:`EvalDataset`: per class, the normal reference
images a bank is built from (``train``) and the test images with their ground truth (``test``, a list of
:class:`EvalSample`). Paths are checked while reading, so a wrong ``--root`` fails at once with a
:class:`DatasetError` naming what is missing, never hours later.

Layouts (``<root>`` is ``--root``):

* ``mvtec``: ``<class>/train/good/*``, ``<class>/test/<type>/*`` (``good`` = normal), masks in
  ``<class>/ground_truth/<type>/<stem>_mask.png``. A ``<root>`` that is itself one class folder works too.
* ``visa``: ``split_csv/1cls.csv`` (columns ``object,split,label,image,mask``; label ``normal``/``anomaly``;
  paths relative to ``<root>``), defect names from ``<class>/image_anno.csv`` when present. Without the CSV,
  the MVTec-style reorganised layout (``<class>/train/good``, ``test/good``, ``test/bad``,
  ``ground_truth/bad/<stem>.png``) is read like ``mvtec``.
* ``mmad``: ``mmad.json`` maps an image path (relative to ``<root>``, e.g. ``MVTec-AD/bottle/test/crack/000.png``)
  to ``{"mask_path", "similar_templates", "random_templates", "conversation": [{"Question", "Answer",
  "Options", "type"}]}``. The class is the first two path parts (``MVTec-AD/bottle``); the label comes from
  the ``Anomaly Detection`` question's answer (``Yes`` = anomalous). References: ``<dataset>/<class>/train/good``
  when it exists, otherwise every normal template listed for the class. The MLLM's 1-shot+ template of an image
  is its ``similar_templates[0]`` (the reference evaluation's choice), not the bank's retrieval.
* ``folder``: ``good/`` and ``bad/`` (sub-folders of ``bad/`` name the defect types), optional ``reference/``
  with the normal images for the bank and optional ``masks/`` mirroring ``bad/``; one class, or one class per
  sub-folder of ``<root>``. Without ``reference/``, half of ``good/`` (chosen by a stable hash of the file
  name) becomes the references and the other half is tested.

Example:
    >>> ds = read_dataset("mvtec", Path("/data/mvtec"), classes=["bottle"])  # doctest: +SKIP
    >>> ds.test["bottle"][0].label, len(ds.train["bottle"])  # doctest: +SKIP
    (0, 209)
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from eagle.evaluation.shards import stable_hash
from eagle.images import IMAGE_EXTENSIONS

DatasetKind = Literal["mvtec", "visa", "mmad", "folder"]
DATASET_KINDS: tuple[str, ...] = ("mvtec", "visa", "mmad", "folder")

VISA_CSV = PurePosixPath("split_csv/1cls.csv")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
MMAD_JSON = "mmad.json"
MMAD_DETECTION_TYPE = "Anomaly Detection"


class DatasetError(ValueError):
    """The data set on disk does not match the layout asked for; the message says what is missing."""


@dataclass(frozen=True)
class EvalSample:
    """One test image and its ground truth.

    Attributes:
        class_name: the product class (one bank per class).
        path: the image file.
        rel_path: ``path`` relative to the data set root, POSIX style: the image's identity in records.
        label: 1 anomalous, 0 normal.
        defect_type: ``good`` for normal images, else the defect's name.
        mask_path: pixel ground truth (non-zero = defect), ``None`` when the data set has none.
        template_paths: normal templates the data set pairs with this image (MMAD ``similar_templates``, in
            MMAD's order); the evaluation shows the first as the 1-shot+ template, as the reference code does.
        question: the data set's own yes/no question text (MMAD), for the record.
    """

    class_name: str
    path: Path
    rel_path: str
    label: int
    defect_type: str
    mask_path: Path | None = None
    template_paths: tuple[Path, ...] = ()
    question: str | None = None


@dataclass
class EvalDataset:
    """A data set read from disk: per class, reference images for the bank and test samples."""

    kind: str
    root: Path
    train: dict[str, list[Path]]
    test: dict[str, list[EvalSample]]
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """Class names, sorted."""
        return sorted(self.test)

    @property
    def has_masks(self) -> bool:
        """Whether any anomalous test image has a pixel mask (pixel metrics are possible)."""
        return any(s.mask_path is not None for samples in self.test.values() for s in samples)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _images_in(directory: Path, *, recursive: bool = False) -> list[Path]:
    """Image files in ``directory`` (by extension, case-insensitive; hidden files skipped), sorted by path."""
    if not directory.is_dir():
        return []
    found = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(
        p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _select_classes(available: Sequence[str], wanted: Sequence[str] | None, root: Path) -> list[str]:
    available = sorted(available)
    if not available:
        raise DatasetError(f"no classes found under {root}")
    if not wanted:
        return available
    chosen: list[str] = []
    for name in wanted:
        matches = [c for c in available if c == name or c.startswith(name.rstrip("/") + "/")]
        if not matches:
            raise DatasetError(f"class {name!r} not found under {root}; available: {', '.join(available)}")
        chosen.extend(m for m in matches if m not in chosen)
    return sorted(chosen)


def _find_mask(candidates: Sequence[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


# ---------------------------------------------------------------------------------------------- MVTec


def _is_mvtec_class(directory: Path) -> bool:
    return (directory / "train" / "good").is_dir() and (directory / "test").is_dir()


def _read_mvtec_class(class_dir: Path, class_name: str, root: Path) -> tuple[list[Path], list[EvalSample], int]:
    train = _images_in(class_dir / "train" / "good")
    if not train:
        raise DatasetError(f"{class_dir / 'train' / 'good'} holds no images: a bank needs normal references")
    samples: list[EvalSample] = []
    missing_masks = 0
    for type_dir in sorted(p for p in (class_dir / "test").iterdir() if p.is_dir()):
        defect = type_dir.name
        label = 0 if defect == "good" else 1
        for image in _images_in(type_dir):
            mask = None
            if label:
                gt = class_dir / "ground_truth" / defect
                mask = _find_mask([gt / f"{image.stem}_mask.png", gt / f"{image.stem}.png", gt / image.name])
                missing_masks += mask is None
            samples.append(EvalSample(class_name, image, _rel(image, root), label, defect, mask))
    if not samples:
        raise DatasetError(f"{class_dir / 'test'} holds no test images")
    return train, samples, missing_masks


def read_mvtec(root: Path, classes: Sequence[str] | None = None, *, kind: str = "mvtec") -> EvalDataset:
    """Read the MVTec-AD layout (also VisA reorganised MVTec-style). See the module docstring.

    Raises:
        DatasetError: missing root, no class folders, an unknown class, a class without references or tests.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data set root {root} is not a directory")
    if _is_mvtec_class(root):
        class_dirs = {root.name: root}
        base = root.parent
    else:
        class_dirs = {p.name: p for p in root.iterdir() if p.is_dir() and _is_mvtec_class(p)}
        base = root
    if not class_dirs:
        raise DatasetError(f"no MVTec-style class folders (<class>/train/good and <class>/test) under {root}")
    dataset = EvalDataset(kind=kind, root=base, train={}, test={})
    for name in _select_classes(list(class_dirs), classes, root):
        train, samples, missing = _read_mvtec_class(class_dirs[name], name, base)
        dataset.train[name], dataset.test[name] = train, samples
        if missing:
            dataset.notes.append(f"{name}: {missing} anomalous test images have no mask (excluded from pixel metrics)")
    return dataset


# ---------------------------------------------------------------------------------------------- VisA


def _visa_defect_names(root: Path, class_name: str) -> dict[str, str]:
    anno = root / class_name / "image_anno.csv"
    if not anno.is_file():
        return {}
    with anno.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            return {}
        return {row["image"].strip(): row["label"].strip() for row in reader if row.get("image")}


def read_visa(root: Path, classes: Sequence[str] | None = None) -> EvalDataset:
    """Read VisA: ``split_csv/1cls.csv`` when present, else the MVTec-style reorganised layout.

    Raises:
        DatasetError: CSV columns missing, an unknown label, a listed file missing, an unknown class.
    """
    root = Path(root)
    csv_path = root / VISA_CSV
    if not csv_path.is_file():
        return read_mvtec(root, classes, kind="visa")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing_cols = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing_cols:
            raise DatasetError(f"{csv_path}: missing columns {', '.join(missing_cols)} (expected {VISA_COLUMNS})")
        rows = list(reader)
    available = sorted({row["object"].strip() for row in rows if row["object"].strip()})
    chosen = set(_select_classes(available, classes, root))
    dataset = EvalDataset(kind="visa", root=root, train={c: [] for c in chosen}, test={c: [] for c in chosen})
    defect_names = {c: _visa_defect_names(root, c) for c in chosen}
    missing_files: list[str] = []
    for line_no, row in enumerate(rows, start=2):
        name = row["object"].strip()
        if name not in chosen:
            continue
        label_text = row["label"].strip().lower()
        if label_text not in ("normal", "anomaly"):
            raise DatasetError(f"{csv_path}:{line_no}: label must be normal or anomaly, got {row['label']!r}")
        rel = row["image"].strip()
        image = root / rel
        if not image.is_file():
            missing_files.append(rel)
            continue
        split = row["split"].strip().lower()
        if split == "train":
            if label_text == "normal":
                dataset.train[name].append(image)
            continue
        if split != "test":
            raise DatasetError(f"{csv_path}:{line_no}: split must be train or test, got {row['split']!r}")
        label = int(label_text == "anomaly")
        mask_rel = (row["mask"] or "").strip()
        mask = root / mask_rel if label and mask_rel and (root / mask_rel).is_file() else None
        defect = "good" if not label else defect_names[name].get(rel, "anomaly") or "anomaly"
        dataset.test[name].append(EvalSample(name, image, PurePosixPath(rel).as_posix(), label, defect, mask))
    if missing_files:
        raise DatasetError(
            f"{csv_path} lists {len(missing_files)} images that do not exist under {root} "
            f"(first: {missing_files[0]}); is --root the VisA folder that holds split_csv/?"
        )
    for name in sorted(chosen):
        if not dataset.train[name]:
            raise DatasetError(f"{csv_path}: class {name!r} has no normal training images")
        if not dataset.test[name]:
            raise DatasetError(f"{csv_path}: class {name!r} has no test images")
        dataset.train[name].sort()
        dataset.test[name].sort(key=lambda s: s.rel_path)
    return dataset


# ---------------------------------------------------------------------------------------------- MMAD


def _mmad_label(entry: dict, rel: str) -> tuple[int, str | None]:
    """Label from the ``Anomaly Detection`` question (answer text yes/no); fall back to ``good`` in the path."""
    for turn in entry.get("conversation") or []:
        if not isinstance(turn, dict) or turn.get("type") != MMAD_DETECTION_TYPE:
            continue
        options = turn.get("Options") or {}
        answer_text = str(options.get(str(turn.get("Answer", "")).strip(), "")).strip().lower()
        if answer_text.startswith("yes"):
            return 1, turn.get("Question")
        if answer_text.startswith("no"):
            return 0, turn.get("Question")
    return int("good" not in PurePosixPath(rel).parts), None


def _mmad_mask(root: Path, rel: str, mask_rel: str | None) -> Path | None:
    """Resolve ``mask_path`` against the root, the image's class folder, and its split folder (MMAD varies)."""
    if not mask_rel:
        return None
    parts = PurePosixPath(rel).parts
    bases = [root] + [root.joinpath(*parts[:k]) for k in (3, 2, 1) if len(parts) > k]
    return _find_mask([(base / mask_rel).resolve() for base in bases])


def read_mmad(root: Path, classes: Sequence[str] | None = None) -> EvalDataset:
    """Read MMAD's ``mmad.json`` (``root`` is its folder or the file itself). See the module docstring.

    Raises:
        DatasetError: unreadable JSON, an entry of the wrong shape, listed images missing, no references.
    """
    root = Path(root)
    json_path = root if root.is_file() else root / MMAD_JSON
    root = json_path.parent
    if not json_path.is_file():
        raise DatasetError(f"{json_path} not found: --root must be the MMAD folder holding {MMAD_JSON}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{json_path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{json_path}: expected an object mapping image paths to entries")
    by_class: dict[str, list[tuple[str, dict]]] = {}
    for rel, entry in data.items():
        parts = PurePosixPath(rel).parts
        if len(parts) < 3 or not isinstance(entry, dict):
            raise DatasetError(f"{json_path}: entry {rel!r} must be <dataset>/<class>/.../<image> mapped to an object")
        by_class.setdefault(f"{parts[0]}/{parts[1]}", []).append((rel, entry))
    chosen = _select_classes(list(by_class), classes, root)
    dataset = EvalDataset(kind="mmad", root=root, train={}, test={})
    missing: list[str] = []
    for name in chosen:
        samples: list[EvalSample] = []
        templates: set[str] = set()
        for rel, entry in sorted(by_class[name]):
            image = root / rel
            if not image.is_file():
                missing.append(rel)
                continue
            label, question = _mmad_label(entry, rel)
            similar = [t for t in entry.get("similar_templates") or [] if isinstance(t, str)]
            templates.update(similar)
            templates.update(t for t in entry.get("random_templates") or [] if isinstance(t, str))
            defect = PurePosixPath(rel).parts[-2] if label else "good"
            mask = _mmad_mask(root, rel, entry.get("mask_path")) if label else None
            samples.append(
                EvalSample(name, image, rel, label, defect, mask, tuple(root / t for t in similar), question)
            )
        dataset.test[name] = samples
        dataset.train[name] = _mmad_references(root, name, templates, {s.rel_path for s in samples}, dataset.notes)
    if missing:
        raise DatasetError(
            f"{json_path} lists {len(missing)} images missing under {root} (first: {missing[0]}); "
            "download that data set or restrict --classes (e.g. --classes MVTec-AD)"
        )
    return dataset


def _mmad_references(
    root: Path, class_name: str, templates: set[str], tested: set[str], notes: list[str]
) -> list[Path]:
    train_dir = root / class_name / "train" / "good"
    references = _images_in(train_dir)
    if references:
        return references
    references = sorted(root / t for t in templates if t not in tested and (root / t).is_file())
    if not references:
        raise DatasetError(f"MMAD class {class_name!r}: no {train_dir} and no existing template images to build a bank")
    notes.append(f"{class_name}: bank built from the {len(references)} normal templates mmad.json lists")
    return references


# ---------------------------------------------------------------------------------------------- folder


def _is_folder_class(directory: Path) -> bool:
    return (directory / "good").is_dir() and (directory / "bad").is_dir()


def _read_folder_class(class_dir: Path, class_name: str, root: Path, notes: list[str]):
    good = _images_in(class_dir / "good", recursive=True)
    bad = _images_in(class_dir / "bad", recursive=True)
    references = _images_in(class_dir / "reference", recursive=True)
    if not references:
        ordered = sorted(good, key=lambda p: stable_hash(class_name, p.name))
        half = math.ceil(len(ordered) / 2)
        references, good = sorted(ordered[:half]), sorted(ordered[half:])
        notes.append(
            f"{class_name}: no reference/ folder; {len(references)} of good/ used as references, {len(good)} tested"
        )
    if not references:
        raise DatasetError(f"{class_dir}: no normal images for the bank (add reference/ or more images to good/)")
    samples = [EvalSample(class_name, p, _rel(p, root), 0, "good") for p in good]
    for image in bad:
        sub = image.relative_to(class_dir / "bad")
        defect = sub.parts[0] if len(sub.parts) > 1 else "bad"
        masks = class_dir / "masks" / sub.parent
        mask = _find_mask([masks / f"{image.stem}.png", masks / f"{image.stem}_mask.png"])
        samples.append(EvalSample(class_name, image, _rel(image, root), 1, defect, mask))
    if not samples:
        raise DatasetError(f"{class_dir}: good/ and bad/ hold no test images")
    return references, samples


def read_folder(root: Path, classes: Sequence[str] | None = None) -> EvalDataset:
    """Read a factory's own ``good/`` + ``bad/`` folder(s). See the module docstring.

    Raises:
        DatasetError: no ``good/`` and ``bad/`` folders, no images, an unknown class.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data set root {root} is not a directory")
    if _is_folder_class(root):
        class_dirs, base = {root.name: root}, root.parent
    else:
        class_dirs, base = {p.name: p for p in root.iterdir() if p.is_dir() and _is_folder_class(p)}, root
    if not class_dirs:
        raise DatasetError(f"{root} has no good/ and bad/ folders (nor sub-folders that do)")
    dataset = EvalDataset(kind="folder", root=base, train={}, test={})
    for name in _select_classes(list(class_dirs), classes, root):
        dataset.train[name], dataset.test[name] = _read_folder_class(class_dirs[name], name, base, dataset.notes)
    return dataset


_READERS = {"mvtec": read_mvtec, "visa": read_visa, "mmad": read_mmad, "folder": read_folder}


def read_dataset(kind: str, root: Path, classes: Sequence[str] | None = None) -> EvalDataset:
    """Read a data set of layout ``kind`` (one of :data:`DATASET_KINDS`).

    Args:
        kind: ``mvtec``, ``visa``, ``mmad`` or ``folder``.
        root: the data set folder.
        classes: class names to keep (MMAD also accepts a data set prefix such as ``MVTec-AD``); all if empty.

    Raises:
        DatasetError: unknown ``kind`` or a layout problem (see the readers).
    """
    reader = _READERS.get(kind)
    if reader is None:
        raise DatasetError(f"unknown data set kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}")
    return reader(Path(root), classes)
