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
  "Options", "type"}]}``. The class is the first two path parts (``MVTec-AD/bottle``). Every well-formed turn is
  kept (:class:`MmadQuestion`: question, options in the item's letter order, answer letter, type); the label is
  the ``Anomaly Detection`` turn's correct option TEXT (``Yes``/``Yes.`` = anomalous), whatever its letter.
  References (the bank): the ORIGINAL data set's normal training images (:data:`MMAD_ORIGINS`, given per prefix
  as ``bank_roots``: ``<DIR>/<class>/train/good``, VisA also its split CSV), else
  ``<root>/<prefix>/<class>/train/good``, else, only with ``bank_from_templates``, every normal template the json
  lists for the class; otherwise a :class:`DatasetError` names the path it expected and the flag. The MLLM's
  1-shot+ template of an image is its ``similar_templates[0]`` (the reference evaluation's choice).
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
        questions: every well-formed turn of the item's MMAD conversation (question, options, answer letter, type),
            in its order; empty for other data sets.
    """

    class_name: str
    path: Path
    rel_path: str
    label: int
    defect_type: str
    mask_path: Path | None = None
    template_paths: tuple[Path, ...] = ()
    question: str | None = None
    questions: tuple[MmadQuestion, ...] = ()

    @property
    def detection(self) -> MmadQuestion | None:
        """The MMAD item's ``Anomaly Detection`` turn (Yes/No options), ``None`` elsewhere."""
        return detection_question(self.questions)


@dataclass
class EvalDataset:
    """A data set read from disk: per class, reference images for the bank and test samples.

    ``bank_sources`` (MMAD) says per class where its bank images came from: ``source`` (one of
    :data:`BANK_SOURCES`), ``origin`` (the original data set), ``path`` and ``n_images``.
    """

    kind: str
    root: Path
    train: dict[str, list[Path]]
    test: dict[str, list[EvalSample]]
    notes: list[str] = field(default_factory=list)
    bank_sources: dict[str, dict] = field(default_factory=dict)

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


@dataclass(frozen=True)
class MmadOrigin:
    """The original data set an MMAD data set prefix was taken from, and where its normal training images are.

    Attributes:
        name: The original data set's name.
        layout: ``mvtec`` (``<DIR>/<class>/train/good``) or ``visa`` (VisA's ``split_csv/1cls.csv`` train rows
            labelled normal, or the MVTec-style reorganised ``<DIR>/<class>/train/good``).
    """

    name: str
    layout: Literal["mvtec", "visa"]

    def expected(self, directory: Path, class_name: str) -> str:
        """Where the training images of ``class_name`` are expected under ``directory`` (for messages)."""
        plain = directory / class_name / "train" / "good"
        if self.layout == "visa":
            return f"{directory / VISA_CSV} (train rows of {class_name!r}) or {plain}"
        return str(plain)


MMAD_ORIGINS: dict[str, MmadOrigin] = {
    "DS-MVTec": MmadOrigin("MVTec-AD", "mvtec"),
    "MVTec-AD": MmadOrigin("MVTec-AD", "mvtec"),
    "VisA": MmadOrigin("VisA", "visa"),
    "MVTec-LOCO": MmadOrigin("MVTec LOCO AD", "mvtec"),
    "GoodsAD": MmadOrigin("GoodsAD", "mvtec"),
}
"""MMAD's data set prefixes → the original data set whose normal TRAINING images build that prefix's banks.

MMAD ships test images and templates only; the reference evaluation builds each class's bank from the original
data set's training split (``--data_path_image``) and so does ``--bank-root PREFIX=DIR``.
"""

BANK_SOURCES = ("bank_root", "mmad_tree", "templates")
"""Where an MMAD class's bank came from: ``--bank-root``, ``<root>/<prefix>/<class>/train/good``, or the templates
mmad.json lists (only with ``--bank-from-templates``)."""


@dataclass(frozen=True)
class MmadQuestion:
    """One conversation turn of an MMAD item, as ``mmad.json`` states it.

    Attributes:
        index: The turn's position in the item's conversation (0-based; the prompt numbers it ``index + 1``).
        type: MMAD's question type (``Anomaly Detection``, ``Defect Classification``, ...).
        question: The question text, verbatim.
        options: ``(letter, text)`` pairs in the item's order, texts verbatim (``("A", "Yes.")``).
        answer: The correct option's letter.
    """

    index: int
    type: str
    question: str
    options: tuple[tuple[str, str], ...]
    answer: str

    @property
    def answer_text(self) -> str:
        """The correct option's text."""
        return dict(self.options)[self.answer]


def _yes_no(text: str) -> str | None:
    """``yes`` / ``no`` for an option text "Yes" / "No" (any case, with or without a final period), else ``None``."""
    normal = text.strip().rstrip(".!").strip().lower()
    return normal if normal in ("yes", "no") else None


def _mmad_questions(entry: dict) -> tuple[tuple[MmadQuestion, ...], int]:
    """The well-formed turns of an entry's conversation, and how many were skipped as malformed.

    A turn needs a text ``Question``, ``Options`` mapping single capital letters to texts, and an ``Answer`` that is
    one of those letters (MMAD's own summary drops the others too).
    """
    found: list[MmadQuestion] = []
    skipped = 0
    for index, turn in enumerate(entry.get("conversation") or []):
        options = turn.get("Options") if isinstance(turn, dict) else None
        if not isinstance(options, dict) or not isinstance(turn.get("Question"), str):
            skipped += 1
            continue
        pairs = tuple(sorted((str(k).strip(), str(v)) for k, v in options.items()))  # the item's letter order
        answer = str(turn.get("Answer", "")).strip()
        letters = [k for k, _ in pairs]
        if (
            len(pairs) < 2
            or any(len(k) != 1 or k not in "ABCDEFGH" for k in letters)
            or len(set(letters)) != len(letters)
            or answer not in letters
        ):
            skipped += 1
            continue
        found.append(MmadQuestion(index, str(turn.get("type") or ""), turn["Question"], pairs, answer))
    return tuple(found), skipped


def detection_question(questions: Sequence[MmadQuestion]) -> MmadQuestion | None:
    """The item's first ``Anomaly Detection`` turn whose options are a Yes/No pair, or ``None``."""
    for question in questions:
        if question.type == MMAD_DETECTION_TYPE and {_yes_no(t) for _, t in question.options} >= {"yes", "no"}:
            return question
    return None


def _mmad_label(questions: Sequence[MmadQuestion], rel: str) -> int:
    """Label from the detection turn's correct option TEXT (Yes = anomalous); without one, ``good`` in the path."""
    detection = detection_question(questions)
    if detection is not None:
        return int(_yes_no(detection.answer_text) == "yes")
    return int("good" not in PurePosixPath(rel).parts)


def _mmad_mask(root: Path, rel: str, mask_rel: str | None) -> Path | None:
    """Resolve ``mask_path`` against the root, the image's class folder, and its split folder (MMAD varies)."""
    if not mask_rel:
        return None
    parts = PurePosixPath(rel).parts
    bases = [root] + [root.joinpath(*parts[:k]) for k in (3, 2, 1) if len(parts) > k]
    return _find_mask([(base / mask_rel).resolve() for base in bases])


def _check_bank_roots(bank_roots: dict[str, Path]) -> None:
    for prefix, directory in bank_roots.items():
        if prefix not in MMAD_ORIGINS:
            raise DatasetError(f"--bank-root {prefix}=…: unknown MMAD data set; use one of {', '.join(MMAD_ORIGINS)}")
        if not Path(directory).is_dir():
            raise DatasetError(
                f"--bank-root {prefix}={directory}: not a directory (expected the {MMAD_ORIGINS[prefix].name} root)"
            )


def read_mmad(
    root: Path,
    classes: Sequence[str] | None = None,
    *,
    bank_roots: dict[str, Path] | None = None,
    bank_from_templates: bool = False,
) -> EvalDataset:
    """Read MMAD's ``mmad.json`` (``root`` is its folder or the file itself). See the module docstring.

    Args:
        root: the MMAD folder (or its ``mmad.json``).
        classes: classes (``<prefix>/<class>``) or data set prefixes to keep; all if empty.
        bank_roots: per MMAD data set prefix (:data:`MMAD_ORIGINS`), the ORIGINAL data set's root, whose normal
            training images build that prefix's banks.
        bank_from_templates: build a class's bank from the normal templates mmad.json lists when neither
            ``bank_roots`` nor the MMAD tree provides its training images (not the reference's banks).

    Raises:
        DatasetError: unreadable JSON, an entry of the wrong shape, listed images missing, an unknown or missing
            ``bank_roots`` folder, or a class whose training images are not found (the message names the path it
            expected and the flag that provides it).
    """
    root = Path(root)
    bank_roots = {k: Path(v) for k, v in (bank_roots or {}).items()}
    _check_bank_roots(bank_roots)
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
    skipped = 0
    for name in chosen:
        samples: list[EvalSample] = []
        for rel, entry in sorted(by_class[name]):
            image = root / rel
            if not image.is_file():
                missing.append(rel)
                continue
            questions, bad = _mmad_questions(entry)
            skipped += bad
            label = _mmad_label(questions, rel)
            detection = detection_question(questions)
            similar = [t for t in entry.get("similar_templates") or [] if isinstance(t, str)]
            defect = PurePosixPath(rel).parts[-2] if label else "good"
            mask = _mmad_mask(root, rel, entry.get("mask_path")) if label else None
            samples.append(
                EvalSample(
                    name,
                    image,
                    rel,
                    label,
                    defect,
                    mask,
                    tuple(root / t for t in similar),
                    detection.question if detection else None,
                    questions,
                )
            )
        dataset.test[name] = samples
    if missing:
        raise DatasetError(
            f"{json_path} lists {len(missing)} images missing under {root} (first: {missing[0]}); "
            "download that data set or restrict --classes (e.g. --classes MVTec-AD)"
        )
    for name in chosen:
        templates = {
            t
            for _, entry in by_class[name]
            for key in ("similar_templates", "random_templates")
            for t in entry.get(key) or []
            if isinstance(t, str)
        }
        tested = {s.rel_path for s in dataset.test[name]}
        references, source = _mmad_references(root, name, templates, tested, bank_roots, bank_from_templates)
        dataset.train[name] = references
        dataset.bank_sources[name] = source
        if source["source"] == "templates":
            dataset.notes.append(
                f"{name}: bank built from the {len(references)} normal templates mmad.json lists "
                "(--bank-from-templates), not from the original training images"
            )
    if skipped:
        dataset.notes.append(
            f"{skipped} malformed conversation turns skipped (no options, or an answer not among them)"
        )
    return dataset


def _original_training_images(origin: MmadOrigin, directory: Path, class_name: str) -> list[Path]:
    if origin.layout == "visa" and (directory / VISA_CSV).is_file():
        try:
            return read_visa(directory, [class_name]).train[class_name]
        except DatasetError as err:
            raise DatasetError(f"--bank-root VisA={directory}: {err}") from None
    return _images_in(directory / class_name / "train" / "good")


def _mmad_references(
    root: Path,
    class_name: str,
    templates: set[str],
    tested: set[str],
    bank_roots: dict[str, Path],
    from_templates: bool,
) -> tuple[list[Path], dict]:
    """A class's bank images and where they came from: ``--bank-root``, the MMAD tree, or (flagged) the templates."""
    prefix, object_name = class_name.split("/", 1)
    origin = MMAD_ORIGINS.get(prefix)
    if prefix in bank_roots and origin is not None:
        directory = bank_roots[prefix]
        references = _original_training_images(origin, directory, object_name)
        if not references:
            raise DatasetError(
                f"MMAD class {class_name!r}: no normal training images at {origin.expected(directory, object_name)} "
                f"(--bank-root {prefix}={directory} must be the {origin.name} root)"
            )
        where = origin.expected(directory, object_name)
        return references, {"source": "bank_root", "origin": origin.name, "path": where, "n_images": len(references)}
    in_tree = root / class_name / "train" / "good"
    references = _images_in(in_tree)
    if references:
        return references, {"source": "mmad_tree", "origin": None, "path": str(in_tree), "n_images": len(references)}
    if from_templates:
        references = sorted(root / t for t in templates if t not in tested and (root / t).is_file())
        if not references:
            raise DatasetError(f"MMAD class {class_name!r}: mmad.json lists no existing template images for a bank")
        where = f"{root / MMAD_JSON} (similar_templates + random_templates)"
        return references, {"source": "templates", "origin": None, "path": where, "n_images": len(references)}
    if origin is None:
        hint = f"MMAD data set {prefix!r} has no known original data set (known: {', '.join(MMAD_ORIGINS)})"
    else:
        hint = (
            f"give --bank-root {prefix}=<the {origin.name} root> "
            f"(expects {origin.expected(Path('<root>'), object_name)})"
        )
    raise DatasetError(
        f"MMAD class {class_name!r}: no training images for its bank at {in_tree} (MMAD ships none); {hint}, "
        "or --bank-from-templates to build it from the templates mmad.json lists (not the reference's banks)"
    )


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


def read_dataset(
    kind: str,
    root: Path,
    classes: Sequence[str] | None = None,
    *,
    bank_roots: dict[str, Path] | None = None,
    bank_from_templates: bool = False,
) -> EvalDataset:
    """Read a data set of layout ``kind`` (one of :data:`DATASET_KINDS`).

    Args:
        kind: ``mvtec``, ``visa``, ``mmad`` or ``folder``.
        root: the data set folder.
        classes: class names to keep (MMAD also accepts a data set prefix such as ``MVTec-AD``); all if empty.
        bank_roots: MMAD only: per data set prefix, the original data set's root (see :func:`read_mmad`).
        bank_from_templates: MMAD only: allow banks from the templates mmad.json lists.

    Raises:
        DatasetError: unknown ``kind``, MMAD-only options for another kind, or a layout problem (see the readers).
    """
    reader = _READERS.get(kind)
    if reader is None:
        raise DatasetError(f"unknown data set kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}")
    if kind == "mmad":
        return read_mmad(Path(root), classes, bank_roots=bank_roots, bank_from_templates=bank_from_templates)
    if bank_roots or bank_from_templates:
        raise DatasetError("--bank-root and --bank-from-templates apply to --dataset mmad only")
    return reader(Path(root), classes)
