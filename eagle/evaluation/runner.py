"""The evaluation loop: per class build-or-load a bank, score every test image once, ask the MLLM per setting.

For each image the expert runs ONCE (``pipeline.run_expert``); every requested prompt setting reuses that
result (``pipeline.finish`` with ``InspectOptions(prompt_setting=…, caas=…)``). Records are appended to
``<out>/records.jsonl`` as each finishes, so a rerun with the same ``--out`` skips what is done. Anomaly maps
(with the ground-truth mask, both at the pixel-metric resolution) go to ``<out>/maps/`` as ``.npz`` files of
plain arrays, read back without pickle. At the end the report is written (see :mod:`eagle.evaluation.report`).

Settings are named ``baseline``, ``visual_all``, ``visual``, ``textual``, ``full`` (paper Table 3; ``visual_all`` is
its visual-only row, boxes on every image; ``visual`` ours, boxes only when the expert says anomalous) and any of
them with ``+caas`` (CAAS policy ``auto``: active iff τ ≤ s ≤ s_max; paper Table 4). Plain names run with CAAS ``off``.
With the MLLM disabled only the expert's metrics are computed, and the report says so.

Example:
    >>> config = EvalConfig(dataset="mvtec", root=Path("/data/mvtec"), out=Path("runs/mvtec"))  # doctest: +SKIP
    >>> report = EvalRunner(Pipeline(settings), settings, config).run()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common import atomic
from eagle.evaluation.aggregate import build_report
from eagle.evaluation.bankcache import BankCache, bank_settings
from eagle.evaluation.metrics import PAPER_UNPARSED_RULE, UNPARSED_RULES
from eagle.evaluation.profile import EvalProfile, resolve_profile
from eagle.evaluation.readers import EvalDataset, EvalSample, MmadQuestion, read_dataset
from eagle.evaluation.records import (
    RECORDS_FILE,
    AnswerRecord,
    ErrorRecord,
    ExpertRecord,
    QuestionRecord,
    RecordSet,
    RecordWriter,
    dump_json,
    read_records,
)
from eagle.evaluation.report import write_report
from eagle.evaluation.shards import Shard, stable_hash
from eagle.progress_bars import count_bar
from eagle.records import InspectOptions
from eagle.settings import Settings
from mllm.choices import MultipleChoice
from mllm.config import PROMPT_SETTINGS

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = "baseline,visual_all,visual,textual,full,full+caas"
RUN_FILE = "run.json"
RUN_FORMAT_VERSION = 1
DEFAULT_PIXEL_SIZE = 256
MMAD_QUESTION_MODES = ("detection", "all")
"""``--mmad-questions``: the item's ``Anomaly Detection`` turn only (the paper's), or every turn of its conversation."""


class EvalConfigError(ValueError):
    """The evaluation cannot start as asked (bad settings list, an output folder from another run, …)."""


MMAD_TEMPLATE_REASON = "MMAD's own 1-shot+ template for this image (similar_templates[0]), as the reference evaluation"
RETRIEVAL_REASON = "the bank's most similar normal reference (global-descriptor retrieval)"


@dataclass(frozen=True)
class TemplateChoice:
    """The template one test image is shown with, and why (recorded with every answer).

    Attributes:
        source: ``mmad_similar_templates`` or ``retrieval``.
        reason: One line saying why.
        image: The template (RGB uint8) when it does not come from the bank; ``None`` for retrieval.
        path: The template's path relative to the data set root (MMAD); ``None`` for retrieval.
    """

    source: str
    reason: str
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    path: str | None = None

    def finish_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Pipeline.finish`` (none for retrieval: the pipeline retrieves)."""
        if self.image is None:
            return {}
        return {"template": self.image, "template_name": self.path}


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


@dataclass(frozen=True)
class SettingSpec:
    """One evaluation setting: a prompt setting plus a CAAS policy (``+caas`` → ``auto``, else ``off``)."""

    name: str
    prompt_setting: str
    caas: str

    @property
    def options(self) -> InspectOptions:
        """The per-request options that realise this setting (no explanation turn: it is not scored)."""
        return InspectOptions(prompt_setting=self.prompt_setting, caas=self.caas, explain=False)


def parse_settings(text: str | Sequence[str]) -> list[SettingSpec]:
    """Parse ``"baseline,visual,textual,full,full+caas"`` (or a list of names) into setting specs.

    Raises:
        EvalConfigError: an unknown name, a duplicate, or an empty list.

    Example:
        >>> [(s.prompt_setting, s.caas) for s in parse_settings("full,full+caas")]
        [('full', 'off'), ('full', 'auto')]
    """
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise EvalConfigError("--settings is empty; expected e.g. " + DEFAULT_SETTINGS)
    specs, seen = [], set()
    for name in names:
        prompt, plus, suffix = name.partition("+")
        if prompt not in PROMPT_SETTINGS or (plus and suffix != "caas"):
            raise EvalConfigError(
                f"unknown setting {name!r}; use {', '.join(PROMPT_SETTINGS)}, each optionally with +caas"
            )
        if name in seen:
            raise EvalConfigError(f"setting {name!r} is listed twice")
        seen.add(name)
        specs.append(SettingSpec(name, prompt, "auto" if plus else "off"))
    return specs


@dataclass
class EvalConfig:
    """What to evaluate and where the results go.

    Attributes:
        dataset: layout (``mvtec``, ``visa``, ``mmad``, ``folder``).
        root: the data set folder.
        out: output folder (records, maps, banks, report); reusing it resumes the run.
        classes: class names to evaluate (all if ``None``).
        settings: evaluation settings (see :func:`parse_settings`).
        shard: which part of the images this run does.
        limit: at most this many test images per class (a stable-hash sample, taken before sharding).
        pixel_metrics: store anomaly maps and compute pixel AUROC / AUPRO where masks exist.
        pixel_size: longest side of maps and masks for pixel metrics (``None``: the mask's own resolution).
        bank_dir: where the bank cache lives (default ``<out>/cache``); shards on one machine may share it.
        progress: show progress bars.
        plots: draw the PNG plots with the report.
        unparsed: the rule for unparseable answers in the report's paper tables, ``drop`` (the paper's) or
            ``wrong`` (ours); the report's JSON carries both (see :mod:`eagle.evaluation.aggregate`).
        profile: the paper's reading or the reference code's choices (:mod:`eagle.evaluation.profile`); the caller
            applies it to the settings (``profile.apply``), the run records it in ``run.json``.
        mmad_questions: MMAD only: ``detection`` (the item's ``Anomaly Detection`` turn, the paper's) or ``all``
            (every turn of the item's conversation, each asked alone with the same prompt setting).
        bank_roots: MMAD only: per MMAD data set prefix, the ORIGINAL data set's root whose normal training
            images build the banks (:data:`eagle.evaluation.readers.MMAD_ORIGINS`).
        bank_from_templates: MMAD only: build a class's bank from the templates mmad.json lists when no training
            images are found (not the reference's banks; the report's heading says so).
    """

    dataset: str
    root: Path
    out: Path
    classes: list[str] | None = None
    settings: list[SettingSpec] = field(default_factory=lambda: parse_settings(DEFAULT_SETTINGS))
    shard: Shard = field(default_factory=Shard)
    limit: int | None = None
    pixel_metrics: bool = True
    pixel_size: int | None = DEFAULT_PIXEL_SIZE
    bank_dir: Path | None = None
    progress: bool = True
    plots: bool = True
    unparsed: str = PAPER_UNPARSED_RULE
    profile: EvalProfile = field(default_factory=resolve_profile)
    mmad_questions: str = "detection"
    bank_roots: dict[str, Path] = field(default_factory=dict)
    bank_from_templates: bool = False

    def __post_init__(self) -> None:
        self.root, self.out = Path(self.root), Path(self.out)
        self.bank_roots = {name: Path(directory) for name, directory in (self.bank_roots or {}).items()}
        if self.mmad_questions not in MMAD_QUESTION_MODES:
            raise EvalConfigError(
                f"--mmad-questions must be one of {', '.join(MMAD_QUESTION_MODES)}, got {self.mmad_questions!r}"
            )
        if self.dataset != "mmad" and (
            self.mmad_questions != "detection" or self.bank_roots or self.bank_from_templates
        ):
            raise EvalConfigError(
                "--mmad-questions, --bank-root and --bank-from-templates apply to --dataset mmad only"
            )
        if self.limit is not None and self.limit < 1:
            raise EvalConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.pixel_size is not None and self.pixel_size < 8:
            raise EvalConfigError(
                f"--pixel-size must be at least 8 (or 0 for the mask resolution), got {self.pixel_size}"
            )
        if self.unparsed not in UNPARSED_RULES:
            raise EvalConfigError(f"--unparsed must be one of {', '.join(UNPARSED_RULES)}, got {self.unparsed!r}")


def bank_root(config: EvalConfig) -> Path:
    """The data folder whose ``banks/`` holds this run's cached banks (``--bank-dir`` or ``<out>/cache``)."""
    return Path(config.bank_dir) if config.bank_dir else config.out / "cache"


def select_samples(samples: Sequence[EvalSample], *, limit: int | None, shard: Shard) -> list[EvalSample]:
    """Apply ``--limit`` (first ``limit`` images in stable-hash order) and then ``--shard``; keep path order."""
    chosen = list(samples)
    if limit is not None and len(chosen) > limit:
        chosen = sorted(chosen, key=lambda s: stable_hash(s.class_name, s.rel_path))[:limit]
    return sorted((s for s in chosen if shard.contains(s.class_name, s.rel_path)), key=lambda s: s.rel_path)


def load_mask(path: Path) -> np.ndarray:
    """A ground-truth mask as bool H×W: any non-zero value (any channel; palette index) is a defect.

    Raises:
        ValueError: the file is not a readable image.
    """
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: unreadable mask ({err})") from None
    return array.any(axis=2) if array.ndim == 3 else array > 0


def _resize(array: np.ndarray, height: int, width: int, *, nearest: bool) -> np.ndarray:
    import cv2

    if array.shape[:2] == (height, width):
        return array
    interpolation = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if height < array.shape[0] else cv2.INTER_LINEAR)
    return cv2.resize(array, (width, height), interpolation=interpolation)


def pixel_pair(amap: np.ndarray, mask: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Bring an anomaly map to its mask's resolution, then both to longest side ``size`` (only ever down).

    Returns:
        ``(map float32, mask uint8 0/1)`` of equal shape.
    """
    height, width = mask.shape
    amap = _resize(np.asarray(amap, np.float32), height, width, nearest=False)
    mask8 = mask.astype(np.uint8)
    if size is not None and max(height, width) > size:
        scale = size / max(height, width)
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        amap, mask8 = _resize(amap, h, w, nearest=False), _resize(mask8, h, w, nearest=True)
    return amap.astype(np.float32), mask8


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write plain numeric arrays atomically (:mod:`common.atomic`); read back with ``allow_pickle=False``."""
    with atomic.atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez(handle, **arrays)  # uncompressed: float maps barely compress and zlib costs ~40 ms per image


def _fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Refuse a second evaluation writing into the same folder at the same time."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no lock, documented
            pass
        except OSError:
            raise EvalConfigError(
                f"another `eagle eval` is writing to {out}; wait for it or use another --out"
            ) from None
        yield


class EvalRunner:
    """Run one evaluation (or one shard of it) into ``config.out``.

    Args:
        pipeline: an :class:`eagle.pipeline.Pipeline` whose bank store lives in :func:`bank_root`.
        settings: the settings the pipeline was built with.
        config: what to evaluate.
        dataset: an already-read data set (default: read ``config.dataset`` at ``config.root``).
    """

    def __init__(self, pipeline, settings: Settings, config: EvalConfig, dataset: EvalDataset | None = None):
        self.pipeline = pipeline
        self.settings = settings
        self.config = config
        self.dataset = dataset or read_dataset(
            config.dataset,
            config.root,
            config.classes,
            bank_roots=config.bank_roots or None,
            bank_from_templates=config.bank_from_templates,
        )
        self.mllm_enabled = bool(pipeline.mllm_enabled)
        self.specs = config.settings if self.mllm_enabled else []
        self.records_path = config.out / RECORDS_FILE

    # ------------------------------------------------------------------ run manifest
    def _identity(self) -> dict[str, Any]:
        s = self.settings
        scoring = {"gaussian_sigma": s.expert.gaussian_sigma, "max_boxes": s.expert.max_boxes}
        expert_all = {**bank_settings(s.expert), **scoring}
        mllm = {"mllm": s.mllm.model_dump(mode="json"), "caas": s.caas.model_dump(mode="json")}
        return {
            "dataset": self.dataset.kind,
            "shard": str(self.config.shard),
            "limit": self.config.limit,
            "pixel_size": self.config.pixel_size if self.config.pixel_metrics else "off",
            "expert": _fingerprint(expert_all),
            "mllm": _fingerprint(mllm) if self.mllm_enabled else None,
            "profile": self.config.profile.label,
        }

    def _write_run_file(self, planned: dict[str, int]) -> None:
        path = self.config.out / RUN_FILE
        identity = self._identity()
        old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        if old is not None:
            for key, value in identity.items():
                before = old.get("identity", {}).get(key)
                if key == "mllm" and (before is None or value is None):
                    continue  # expert-only runs and MLLM runs share expert records
                if key == "profile" and before is None:
                    before = "paper"  # run folders written before profiles existed ran the paper's reading
                if before != value:
                    raise EvalConfigError(
                        f"{self.config.out} holds a run with a different {key} ({before!r}, now {value!r}): "
                        "use another --out (records of different configurations must not mix)"
                    )
            planned = {**old.get("planned", {}), **planned}
            settings_run = list(dict.fromkeys(old.get("settings", []) + [s.name for s in self.specs]))
        else:
            settings_run = [s.name for s in self.specs]
        bank_sources = self._merged_bank_sources((old or {}).get("bank_sources") or {})
        if old is not None and old.get("identity", {}).get("mllm") and identity["mllm"] is None:
            identity["mllm"] = old["identity"]["mllm"]
        dump_json(
            path,
            {
                "format_version": RUN_FORMAT_VERSION,
                "identity": identity,
                "root": str(self.dataset.root),
                "settings": settings_run,
                "mllm_enabled": self.mllm_enabled or bool(old and old.get("mllm_enabled")),
                "model": (self.settings.mllm.model_id or self.settings.mllm.preset)
                if self.mllm_enabled
                else (old or {}).get("model"),
                "planned": dict(sorted(planned.items())),
                "notes": self.dataset.notes,
                "profile": self.config.profile.record(),
                "mmad_questions": self._mmad_questions_run(old),
                "bank_sources": bank_sources,
                "bank_from_templates": any(s.get("source") == "templates" for s in bank_sources.values()),
            },
        )

    def _merged_bank_sources(self, old: dict[str, dict]) -> dict[str, dict]:
        """The per-class bank sources of this run folder: the earlier runs' and this one's, which must agree."""
        merged = dict(old)
        for name, source in self.dataset.bank_sources.items():
            before = old.get(name)
            if before is not None and (before.get("source"), before.get("path")) != (source["source"], source["path"]):
                raise EvalConfigError(
                    f"{self.config.out} holds {name} answers scored with a bank from {before.get('path')} "
                    f"({before.get('source')}), now {source['path']} ({source['source']}): use another --out"
                )
            merged[name] = source
        return dict(sorted(merged.items()))

    def _mmad_questions_run(self, old: dict | None) -> str | None:
        """``run.json``'s ``mmad_questions``: ``all`` once any run into the folder asked every turn."""
        if self.dataset.kind != "mmad":
            return None
        before = (old or {}).get("mmad_questions")
        return "all" if "all" in (before, self.config.mmad_questions) else "detection"

    # ------------------------------------------------------------------ one image
    def _expert_record(self, sample: EvalSample, expert, bank: str, image: np.ndarray, timings: dict) -> ExpertRecord:
        map_file = None
        if self.config.pixel_metrics and (sample.mask_path is not None or sample.label == 0):
            t0 = time.perf_counter()
            mask = load_mask(sample.mask_path) if sample.mask_path else np.zeros(image.shape[:2], bool)
            amap, mask8 = pixel_pair(expert.anomaly_map, mask, self.config.pixel_size)
            name = hashlib.sha256(sample.rel_path.encode()).hexdigest()[:24]
            rel = Path("maps") / bank / f"{name}.npz"
            save_npz(self.config.out / rel, map=amap, mask=mask8)
            map_file = rel.as_posix()
            timings["pixel_map"] = (time.perf_counter() - t0) * 1000
        template = getattr(expert, "template_name", None)
        if template is None and getattr(expert, "template_index", None) is not None:
            template = self.pipeline.banks.reference_name(bank, expert.template_index)
        return ExpertRecord(
            key=sample.rel_path,
            class_name=sample.class_name,
            dataset=self.dataset.kind,
            label=sample.label,
            defect_type=sample.defect_type,
            score=float(expert.score),
            tau=float(expert.tau),
            s_max=float(expert.s_max),
            anomalous=bool(expert.anomalous),
            low_confidence=bool(expert.low_confidence),
            bank=bank,
            n_boxes=len(expert.boxes or []),
            template=template,
            image_size=(int(image.shape[1]), int(image.shape[0])),
            map_file=map_file,
            timings_ms=timings,
        )

    @staticmethod
    def _error(sample: EvalSample, stage: str, err: Exception) -> ErrorRecord:
        return ErrorRecord(key=sample.rel_path, class_name=sample.class_name, stage=stage, message=str(err))

    def _process(self, sample: EvalSample, bank: str, done: RecordSet, writer: RecordWriter) -> None:
        from eagle.images import ImageError, load_image

        t0 = time.perf_counter()
        try:
            image = load_image(sample.path, max_pixels=self.settings.max_image_pixels, name=sample.rel_path)
        except ImageError as err:
            writer.append(self._error(sample, "load", err))
            return
        timings = {"load": (time.perf_counter() - t0) * 1000}
        t1 = time.perf_counter()
        expert = self.pipeline.run_expert(image, bank)
        timings["expert"] = (time.perf_counter() - t1) * 1000
        timings.update({f"expert_{k}": float(v) for k, v in (getattr(expert, "timings_ms", None) or {}).items()})
        if sample.rel_path not in done.experts:
            try:
                record = self._expert_record(sample, expert, bank, image, timings)
            except ValueError as err:  # unreadable mask
                writer.append(self._error(sample, "mask", err))
                return
            writer.append(record)
        detection = self._detection_turn(sample)
        extra = self.extra_questions(sample)
        pending = [
            spec for spec in self.specs if not done.is_done(sample.rel_path, [spec.name], [q.index for q in extra])
        ]
        choice = self._template_for(sample) if pending else None
        for spec in pending:
            if (sample.rel_path, spec.name) not in done.answers:
                self._ask_detection(sample, image, expert, bank, spec, choice, detection, writer)
            self._ask_extra(sample, image, expert, bank, spec, choice, extra, done, writer)

    def _ask_detection(
        self,
        sample: EvalSample,
        image: np.ndarray,
        expert,
        bank: str,
        spec: SettingSpec,
        choice: TemplateChoice,
        detection: MmadQuestion | None,
        writer: RecordWriter,
    ) -> None:
        """Ask the detection question under ``spec`` (MMAD: the item's own turn) and record the answer."""
        asked = self._choice(detection)
        t2 = time.perf_counter()
        result = self.pipeline.finish(
            image,
            expert,
            bank,
            spec.options,
            image_name=sample.rel_path,
            **choice.finish_kwargs(),
            **({"question": asked} if asked is not None else {}),
        )
        answer_timings = {k: float(v) for k, v in result.timings_ms.items() if k.startswith("mllm_")}
        answer_timings["finish"] = (time.perf_counter() - t2) * 1000
        mmad_fields = (
            {
                "question_type": detection.type,
                "question_index": detection.index,
                "question": detection.question,
                "options": list(detection.options),
                "correct_letter": detection.answer,
            }
            if detection is not None
            else {}
        )
        writer.append(
            AnswerRecord(
                key=sample.rel_path,
                class_name=sample.class_name,
                setting=spec.name,
                label=sample.label,
                verdict=result.verdict,
                mllm_answer=result.mllm_answer,
                mllm_letter=result.mllm_letter,
                mllm_raw=result.mllm_raw,
                caas_applied=result.caas_applied,
                model_id=result.model_id,
                template_source=choice.source,
                template_path=choice.path or getattr(result, "template", None),
                template_reason=choice.reason,
                timings_ms=answer_timings,
                **mmad_fields,
            )
        )

    # ------------------------------------------------------------------ MMAD items
    def _detection_turn(self, sample: EvalSample) -> MmadQuestion | None:
        """The MMAD item's ``Anomaly Detection`` turn (asked in place of the fixed yes/no question), else ``None``."""
        return sample.detection if self.dataset.kind == "mmad" else None

    def extra_questions(self, sample: EvalSample) -> list[MmadQuestion]:
        """With ``--mmad-questions all``: the item's other well-formed turns, in conversation order; else none."""
        if self.dataset.kind != "mmad" or self.config.mmad_questions != "all" or not self.specs:
            return []
        detection = sample.detection
        return [q for q in sample.questions if detection is None or q.index != detection.index]

    def _choice(self, question: MmadQuestion | None) -> MultipleChoice | None:
        """The turn as the prompt shows it: verbatim, in the item's letter order, numbered as the reference does.

        The reference asks each turn alone and numbers it by its place in the conversation it keeps: ``Question 1``
        when only the detection turn is kept (``--task_type "Anomaly Detection"``), ``Question <index + 1>`` when
        every turn is (``--task_type all``).
        """
        if question is None:
            return None
        number = question.index + 1 if self.config.mmad_questions == "all" else 1
        return MultipleChoice(question.question, question.options, number=number)

    def _ask_extra(
        self,
        sample: EvalSample,
        image: np.ndarray,
        expert,
        bank: str,
        spec: SettingSpec,
        choice: TemplateChoice,
        extra: Sequence[MmadQuestion],
        done: RecordSet,
        writer: RecordWriter,
    ) -> None:
        """Ask the item's other turns (``--mmad-questions all``) under ``spec``, each alone, and record the letters."""
        for question in extra:
            if (sample.rel_path, spec.name, question.index) in done.questions:
                continue
            t0 = time.perf_counter()
            result = self.pipeline.finish(
                image,
                expert,
                bank,
                spec.options,
                image_name=sample.rel_path,
                question=self._choice(question),
                **choice.finish_kwargs(),
            )
            timings = {k: float(v) for k, v in result.timings_ms.items() if k.startswith("mllm_")}
            timings["finish"] = (time.perf_counter() - t0) * 1000
            writer.append(
                QuestionRecord(
                    key=sample.rel_path,
                    class_name=sample.class_name,
                    setting=spec.name,
                    question_index=question.index,
                    question_type=question.type,
                    question=question.question,
                    options=list(question.options),
                    correct_letter=question.answer,
                    mllm_letter=result.mllm_letter,
                    mllm_raw=result.mllm_raw,
                    model_id=result.model_id,
                    timings_ms=timings,
                )
            )

    def _template_for(self, sample: EvalSample) -> TemplateChoice:
        """The 1-shot+ template for ``sample``: MMAD's ``similar_templates[0]`` on MMAD, else the bank's retrieval.

        The reference evaluation reads MMAD's own template list (``similar_templates``) for every MMAD image; on
        MVTec-AD / VisA / folder layouts there is no such list and the bank retrieves its most similar reference.
        An MMAD image without a usable listed template falls back to retrieval, and the reason says so.
        """
        from eagle.images import ImageError, load_image

        if self.dataset.kind != "mmad":
            return TemplateChoice("retrieval", RETRIEVAL_REASON)
        if not sample.template_paths:
            return TemplateChoice(
                "retrieval", f"mmad.json lists no similar_templates for this image; {RETRIEVAL_REASON}"
            )
        path = sample.template_paths[0]
        rel = _relative(path, self.dataset.root)
        try:
            image = load_image(path, max_pixels=self.settings.max_image_pixels, name=rel)
        except ImageError as err:
            log.warning("%s: MMAD template unusable, falling back to retrieval: %s", sample.rel_path, err)
            return TemplateChoice("retrieval", f"MMAD template {rel} unusable ({err}); " + RETRIEVAL_REASON)
        return TemplateChoice("mmad_similar_templates", MMAD_TEMPLATE_REASON, image=image, path=rel)

    # ------------------------------------------------------------------ the loop
    def plan(self) -> dict[str, list[EvalSample]]:
        """Test images of this shard per class (after ``--limit``)."""
        return {
            name: select_samples(self.dataset.test[name], limit=self.config.limit, shard=self.config.shard)
            for name in self.dataset.classes
        }

    def run(self, *, report: bool = True) -> dict | None:
        """Evaluate everything not yet in the records, then write the report.

        Returns:
            The report dict (``None`` when ``report`` is False).
        """
        config = self.config
        with _exclusive(config.out):
            plan = self.plan()
            self._write_run_file({name: len(samples) for name, samples in plan.items()})
            done = RecordSet().add(read_records(self.records_path))
            names = [s.name for s in self.specs]
            todo = {
                c: [
                    s
                    for s in samples
                    if not done.is_done(s.rel_path, names, [q.index for q in self.extra_questions(s)])
                ]
                for c, samples in plan.items()
            }
            total = sum(len(s) for s in plan.values())
            remaining = sum(len(s) for s in todo.values())
            if not self.mllm_enabled:
                log.warning("MLLM disabled: computing the expert's metrics only")
            log.info("%d of %d images to evaluate (%d already done)", remaining, total, total - remaining)
            self._execute(todo, done, total=total)
        if not report:
            return None
        result = build_report([config.out], unparsed=config.unparsed)
        write_report(result, config.out, plots=config.plots)
        return result

    def _execute(self, todo: dict[str, list[EvalSample]], done: RecordSet, *, total: int) -> None:
        """Evaluate ``todo`` (per class, the images not yet done) in this process, appending to the records.

        The Ray executor (:mod:`eagle.evaluation.ray_executor`) overrides this with the same per-image
        :meth:`_process` fanned out over a cluster.
        """
        config = self.config
        remaining = sum(len(s) for s in todo.values())
        cache = BankCache(
            self.pipeline,
            self.settings.expert,
            manifest=config.out / "banks.json",
            progress=config.progress,
            prune=config.bank_dir is None,  # a shared --bank-dir may hold banks other runs still use
        )
        bar = count_bar(total, initial=total - remaining, desc="eval", enabled=config.progress)
        try:
            with RecordWriter(self.records_path) as writer:
                for class_name, samples in todo.items():
                    if not samples:
                        continue
                    bar.set_postfix_str(class_name, refresh=False)
                    bank = cache.get(class_name, self.dataset.train[class_name], root=self.dataset.root)
                    for sample in samples:
                        self._process(sample, bank, done, writer)
                        bar.update(1)
        finally:
            bar.close()
