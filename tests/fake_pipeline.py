"""The one test double of :class:`eagle.pipeline.Pipeline`, for the edge service and the evaluation tests alike.

:class:`FakePipeline` implements :class:`eagle.pipeline.InspectionPipeline` (``banks``, ``mllm_enabled``,
``inspect``, ``build_bank``, ``ready``, ``load_mllm``) and the stages the evaluation calls one by one
(``decode``, ``run_expert``, ``finish``); :meth:`FakePipeline.inspect` composes them exactly as the real pipeline
does: decode → run_expert → finish. It is small and fast:

* banks live on disk, one folder with a ``meta.json`` each (:class:`FakeBankStore`), so a bank cache can be
  tested across pipeline instances; without ``data_dir`` the store is a temporary folder of its own;
* the expert scores an image by its mean absolute grey-level difference from the bank's reference mean, over 255.
  A seeded bank (``banks=("widget",)``) has no references, mean 0, τ = 0.5 and s_max = 0.7: its score is the
  image's mean intensity / 255. A built bank's τ and s_max come from its references' scores;
* with the MLLM enabled and asked for, each prompt setting gets a deterministic answer (``baseline``: a hash of
  image name and setting, some ``unknown``; otherwise the expert's decision, flipped by CAAS when unsure);
* hooks for tests: ``gate`` (a ``threading.Event``) blocks the expert stage until released and ``entered``
  counts entries into it (the deterministic "slow stage" of the 429 and graceful-shutdown tests); ``fail_with``
  is raised by the expert stage once ``fail_after`` images were scored (a crash, or ``KeyboardInterrupt`` as a
  simulated kill); ``expert_calls``, ``finish_calls``, ``questions``, ``templates`` and ``builds`` record what was
  called.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from common import atomic
from common.progress import ProgressCallback
from eagle.audit import AuditLog
from eagle.bank_records import BankSummary, BankVersion, TaughtImage, TeachResult
from eagle.bank_service import BUILD_STAGES, ReferenceImagesError
from eagle.bank_versions import BankVersionNotFoundError
from eagle.banks import BankNotFoundError, validate_bank_name
from eagle.errors import EagleError
from eagle.images import DecodedImage, ImageError, decode_image, load_image
from eagle.images import image_sha256 as sha256_of_image
from eagle.line_health import LineHealth, line_health
from eagle.models import MLLMUnavailableError
from eagle.records import BoxRecord, InspectionImages, InspectionResult, InspectOptions
from expert.bank_schema import BankError
from expert.drift import DriftSettings
from mllm.choices import MultipleChoice, option_answer

SEEDED_TAU, SEEDED_S_MAX = 0.5, 0.7
"""τ and s_max of a seeded bank (one made without references): its score is the mean intensity / 255."""


def _summary(name: str, meta: dict) -> BankSummary:
    """The fake bank's :class:`eagle.bank_records.BankSummary`: name, id, references, τ and s_max (the rest fixed)."""
    return BankSummary(
        name=name,
        bank_id=meta["bank_id"],
        created="",
        n_references=meta["n_references"],
        n_patches=0,
        coreset_size=0,
        coreset_ratio=0.0,
        threshold_method="fake",
        tau=meta["tau"],
        s_max=meta["s_max"],
        backbone="fake",
        weights_source="random",
        distance="sqeuclidean",
    )


def _bank_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]


class FakeBankStore:
    """Banks as ``<root>/<name>/meta.json``: the :class:`eagle.pipeline.BankCatalog` calls, plus ``path`` and
    ``reference_name`` (the evaluation's). ``load`` returns the bank's meta (the fake "scorer")."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / validate_bank_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / "meta.json").is_file()

    def save(self, name: str, meta: dict) -> BankSummary:
        self.path(name).mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.path(name) / "meta.json", json.dumps(meta))  # readers never see half a bank
        return _summary(name, meta)

    def load(self, name: str) -> dict:
        if not self.exists(name):
            raise BankNotFoundError(f"no bank named {name!r}")
        try:
            return json.loads((self.path(name) / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BankError(f"bank {name} unreadable: {err}") from None

    def list(self) -> list[BankSummary]:
        summaries = []
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            try:
                meta = self.load(folder.name)
            except (BankError, BankNotFoundError):
                continue
            summaries.append(_summary(folder.name, meta))
        return summaries

    def delete(self, name: str) -> None:
        if not self.exists(name):
            raise BankNotFoundError(f"no bank named {name!r}")
        shutil.rmtree(self.path(name))

    def loaded(self) -> list[str]:
        """The fake keeps nothing in memory: every saved bank counts as loaded."""
        return [summary.name for summary in self.list()]

    def unusable(self) -> dict[str, str]:
        return {}

    def reference_name(self, name: str, index: int) -> str:
        return self.load(name)["names"][index]

    def rollback(self, name: str, version: int) -> BankSummary:
        """Only the current version is kept by the fake: rolling back to it changes nothing, any other is unknown."""
        meta = self.load(name)
        if version != meta.get("version", 0):
            raise BankVersionNotFoundError(f"bank {name!r} has no kept version {version}")
        return _summary(name, meta)

    def history(self, name: str) -> list[BankVersion]:
        """Only the current version is kept by the fake."""
        meta = self.load(name)
        return [
            BankVersion(
                version=meta.get("version", 0),
                current=True,
                bank_id=meta["bank_id"],
                created="",
                tau=meta["tau"],
                s_max=meta["s_max"],
                n_references=meta["n_references"],
                action="build",
                note="",
            )
        ]


@dataclass
class FakeExpertResult:
    """The :class:`expert.scorer.ExpertResult` fields ``finish`` and the evaluation runner read."""

    score: float
    tau: float
    s_max: float
    anomalous: bool
    low_confidence: bool
    anomaly_map: np.ndarray
    valid_mask: np.ndarray
    boxes: list[BoxRecord]
    template_index: int | None
    original_size: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)


def _pixels(image: np.ndarray | DecodedImage) -> np.ndarray:
    return image.pixels if isinstance(image, DecodedImage) else image


def _bank_meta(name: str, greys: list[float], names: list[str], version: int) -> dict:
    """The fake bank: the references' mean grey level; τ and s_max from their spread (in 1/255 units)."""
    if not greys:
        return {
            "bank_id": _bank_id(name),
            "mean": 0.0,
            "tau": SEEDED_TAU,
            "s_max": SEEDED_S_MAX,
            "n_references": len(names),
            "names": names,
            "greys": [],
            "version": version,
        }
    scores = [abs(g - float(np.mean(greys))) for g in greys]
    return {
        "bank_id": _bank_id(f"{name}@{version}"),
        "mean": float(np.mean(greys)),
        "tau": float(np.mean(scores) + 3 * np.std(scores) + 1.0) / 255.0,
        "s_max": float(max(scores) + 2.0) / 255.0,
        "n_references": len(greys),
        "names": names,
        "greys": greys,
        "version": version,
    }


def _score(image: np.ndarray, meta: dict) -> float:
    """The fake expert's score: mean absolute grey-level difference from the bank's mean, in 1/255 units."""
    return float((np.abs(_grey(image) - meta["mean"]) / 255.0).mean())


def _grey(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64).mean(axis=2)


class FakePipeline:
    """A fast, contract-faithful :class:`eagle.pipeline.InspectionPipeline` (see the module's docstring).

    Args:
        data_dir: banks go to ``<data_dir>/banks`` (like ``settings.banks_dir``); default: a temporary folder.
        mllm_enabled: whether "settings" enable the MLLM (``finish`` then answers when asked to).
        banks: names of reference-less banks to seed (score = mean intensity / 255, τ = 0.5).
        max_pixels: the decoder's pixel limit.
        fail_with: raised by :meth:`run_expert` once ``fail_after`` images were scored.
        fail_after: how many images :meth:`run_expert` scores before raising ``fail_with``.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        mllm_enabled: bool = False,
        banks: Sequence[str] = (),
        max_pixels: int = 64_000_000,
        fail_with: BaseException | None = None,
        fail_after: int = 0,
    ) -> None:
        if data_dir is None:
            data_dir = Path(tempfile.mkdtemp(prefix="eagle-fake-pipeline-"))
            weakref.finalize(self, shutil.rmtree, data_dir, ignore_errors=True)
        self.data_dir = Path(data_dir)
        self._banks = FakeBankStore(self.data_dir / "banks")
        self._mllm_enabled = mllm_enabled
        self._mllm_loaded = False
        self.max_pixels = max_pixels
        self.fail_with = fail_with
        self.fail_after = fail_after
        self.gate: threading.Event | None = None
        self.entered = threading.Semaphore(0)
        self.expert_calls: list[str] = []  # sha256 of each scored image's pixels
        self.finish_calls: list[tuple[str | None, str | None, str | None]] = []  # (image, setting, caas)
        self.questions: list[tuple[str | None, str | None, MultipleChoice | None]] = []  # (image, setting, q)
        self.templates: list[tuple[str | None, str | None, tuple[int, ...] | None]] = []  # (image, name, shape)
        self.builds: list[str] = []  # names of the banks built
        self.health_settings = DriftSettings()  # the line-health limits (the real pipeline's settings.health)
        for name in banks:
            meta = {"mean": 0.0, "tau": SEEDED_TAU, "s_max": SEEDED_S_MAX, "n_references": 3, "names": [], "version": 1}
            self._banks.save(name, {"bank_id": _bank_id(name), **meta})

    # ------------------------------------------------------------------ the protocol's properties
    @property
    def banks(self) -> FakeBankStore:
        return self._banks

    @property
    def mllm_enabled(self) -> bool:
        return self._mllm_enabled

    # ------------------------------------------------------------------ banks
    def build_bank(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        name: str,
        *,
        names: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
        mask: Path | None = None,
    ) -> BankSummary:
        validate_bank_name(name)
        if mask is not None:
            self.check_mask(Path(mask).read_bytes() if Path(mask).suffix == ".png" else Path(mask).read_text())
        if progress:
            progress("read", 0.0)
        decoded, problems = [], []
        for item in images:
            try:
                decoded.append(item if isinstance(item, np.ndarray) else load_image(item, max_pixels=self.max_pixels))
            except ImageError as err:
                problems.append(str(err))
        if problems:
            raise ReferenceImagesError(
                f"{len(problems)} of {len(images)} reference images could not be read", problems=problems
            )
        greys = [float(_grey(image).mean()) for image in decoded]
        names = list(names) if names is not None else [_name(item, i) for i, item in enumerate(images)]
        try:
            version = self._banks.load(name).get("version", 0) + 1 if self._banks.exists(name) else 1
        except BankError:  # an unreadable bank is replaced, as the real store does
            version = 1
        for stage in BUILD_STAGES:
            if progress:
                progress(stage, 1.0)
        self.builds.append(name)
        return self._banks.save(name, _bank_meta(name, greys, names, version))

    def add_references(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        name: str,
        *,
        names: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> TeachResult:
        """Rebuild the bank from its references' grey levels plus these images', as the next version."""
        before = self._banks.load(validate_bank_name(name))
        if not images:
            raise ReferenceImagesError("no images to add: give at least one image of a good part")
        decoded = [
            item if isinstance(item, np.ndarray) else load_image(item, max_pixels=self.max_pixels) for item in images
        ]
        new_names = list(names) if names is not None else [_name(item, i) for i, item in enumerate(images)]
        greys = [*before.get("greys", []), *(float(_grey(image).mean()) for image in decoded)]
        after = _bank_meta(name, greys, [*before["names"], *new_names], before.get("version", 0) + 1)
        self._banks.save(name, after)
        taught = []
        for image, image_name in zip(decoded, new_names, strict=True):
            score_before, score_after = _score(image, before), _score(image, after)
            taught.append(
                TaughtImage(
                    name=image_name,
                    score_before=score_before,
                    score_after=score_after,
                    passed_before=score_before < before["tau"],
                    passes_now=score_after < after["tau"],
                )
            )
        return TeachResult(
            bank=name,
            version_before=before.get("version"),
            version=after["version"],
            tau_before=before["tau"],
            tau_after=after["tau"],
            s_max_before=before["s_max"],
            s_max_after=after["s_max"],
            references_before=before["n_references"],
            references_after=after["n_references"],
            taught=taught,
        )

    def check_mask(self, mask: bytes | str) -> None:
        """A mask must be an image (PNG bytes) or JSON text, as the real check's first step."""
        try:
            if isinstance(mask, bytes):
                Image.open(io.BytesIO(mask)).verify()
            else:
                json.loads(mask)
        except Exception as err:  # noqa: BLE001 - any parse failure is the same client error
            raise EagleError(f"mask: {err}", code="invalid_mask", http_status=422) from None

    # ------------------------------------------------------------------ MLLM
    def mllm_loaded(self) -> bool:
        return self._mllm_loaded

    def load_mllm(self, progress: ProgressCallback | None = None) -> str:
        if not self.mllm_enabled:
            raise MLLMUnavailableError("the MLLM is disabled (EAGLE_MLLM__ENABLED=false): expert-only mode")
        self._mllm_loaded = True
        return "fake-mllm"

    def ready(self) -> dict[str, bool]:
        return {"banks": bool(self.banks.list()), "mllm": self.mllm_loaded() or not self.mllm_enabled}

    def line_health(self, name: str, audit: AuditLog) -> LineHealth:
        """The real drift check over the fake bank's training scores (each reference's grey-level score)."""
        meta = self._banks.load(name)
        train = [abs(g - meta["mean"]) / 255.0 for g in meta.get("greys", [])]
        return line_health(name, meta["bank_id"], train, meta["tau"], audit, self.health_settings)

    # ------------------------------------------------------------------ inspection: decode → run_expert → finish
    def decode(self, image: np.ndarray | bytes | Path | DecodedImage, *, image_name: str | None = None) -> DecodedImage:
        if isinstance(image, DecodedImage):
            return image
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ImageError(f"{image_name or 'image'}: expected an RGB uint8 array, got {image.shape}")
            return DecodedImage.of(image)
        return decode_image(image, max_pixels=self.max_pixels, name=image_name)

    def run_expert(self, image: np.ndarray | DecodedImage, bank: str) -> FakeExpertResult:
        self.entered.release()
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail_with is not None and len(self.expert_calls) >= self.fail_after:
            raise self.fail_with
        meta = self.banks.load(bank)
        pixels = _pixels(image)
        if isinstance(image, DecodedImage):
            width, height = image.original_size
        else:
            height, width = pixels.shape[:2]
        diff = np.abs(_grey(pixels) - meta["mean"]) / 255.0
        score, tau, s_max = _score(pixels, meta), float(meta["tau"]), float(meta["s_max"])
        anomalous = score >= tau
        boxes = [BoxRecord(x0=1, y0=1, x1=max(2, width // 2), y1=max(2, height // 2), peak=score)] if anomalous else []
        self.expert_calls.append(hashlib.sha256(pixels.tobytes()).hexdigest())
        return FakeExpertResult(
            score=score,
            tau=tau,
            s_max=s_max,
            anomalous=anomalous,
            low_confidence=tau <= score <= s_max,
            anomaly_map=diff,
            valid_mask=np.ones(diff.shape, bool),
            boxes=boxes,
            template_index=0 if meta["names"] else None,
            original_size=(int(width), int(height)),
            timings_ms={"embed": 2.0, "search": 0.5},  # the service metrics test counts 2 ms per embed
        )

    def inspect(
        self,
        image: np.ndarray | bytes | Path | DecodedImage,
        bank: str,
        options: InspectOptions | None = None,
        *,
        image_name: str | None = None,
    ) -> InspectionResult:
        t0 = time.perf_counter()
        if image_name is None and isinstance(image, Path):
            image_name = image.name
        decoded = self.decode(image, image_name=image_name)
        sha = sha256_of_image(decoded)
        decode_ms = (time.perf_counter() - t0) * 1000
        expert = self.run_expert(decoded, bank)
        result = self.finish(decoded, expert, bank, options, image_name=image_name, image_sha256=sha)
        result.timings_ms = {"decode": decode_ms, **result.timings_ms}
        result.timings_ms["total"] = (time.perf_counter() - t0) * 1000
        return result

    def finish(
        self,
        image: np.ndarray | DecodedImage,
        expert: FakeExpertResult,
        bank: str,
        options: InspectOptions | None = None,
        *,
        image_name: str | None = None,
        image_sha256: str | None = None,
        template: np.ndarray | None = None,
        template_name: str | None = None,
        question: MultipleChoice | None = None,
    ) -> InspectionResult:
        options = options or InspectOptions()
        meta = self.banks.load(bank)
        self.finish_calls.append((image_name, options.prompt_setting, options.caas))
        self.questions.append((image_name, options.prompt_setting, question))
        self.templates.append((image_name, template_name, None if template is None else tuple(template.shape)))
        if template is not None:
            template_name = template_name or "external template"
        elif expert.template_index is not None:
            template_name = self.banks.reference_name(bank, expert.template_index)
        pixels = _pixels(image)
        overlay = (pixels.astype(np.float32) * 0.5 + 60).clip(0, 255).astype(np.uint8)
        width, height = expert.original_size
        record = dict(
            image_name=image_name,
            image_sha256=image_sha256 or sha256_of_image(image),
            image_size=(width, height),
            bank=bank,
            bank_id=meta["bank_id"],
            score=expert.score,
            tau=expert.tau,
            s_max=expert.s_max,
            expert_decision="anomalous" if expert.anomalous else "normal",
            low_confidence=expert.low_confidence,
            boxes=list(expert.boxes),
            inspected_region=(0, 0, width, height),
            template=template_name,
            images=InspectionImages(heatmap_overlay=overlay, boxed=None, template=template),
        )
        if not (options.use_mllm and self.mllm_enabled):
            verdict = "defect" if expert.anomalous else "no_defect"
            return InspectionResult(**record, mode="expert-only", verdict=verdict, timings_ms=dict(expert.timings_ms))
        self.load_mllm()
        digest = int(hashlib.sha256(f"{image_name}|{options.prompt_setting}".encode()).hexdigest(), 16)
        caas_applied = options.caas == "auto" and expert.low_confidence
        if options.prompt_setting == "baseline":
            answer = ("yes", "no", "unknown")[digest % 3]
        else:
            answer = "yes" if expert.anomalous else "no"
            if caas_applied:
                answer = "no" if answer == "yes" else "yes"
        letter = {"yes": "A", "no": "B"}.get(answer)
        if question is not None:  # a data set's own question: the verdict's option, or a hashed one
            by_text = {option_answer(question, x): x for x in question.letters}
            if {"yes", "no"} <= set(by_text):
                letter = by_text.get(answer)
            else:
                letter = question.letters[digest % len(question.letters)]
            answer = option_answer(question, letter)
        return InspectionResult(
            **record,
            mode="expert+mllm",
            prompt_setting=options.prompt_setting,
            caas_applied=caas_applied,
            mllm_letter=letter,
            mllm_answer=answer,
            mllm_raw=answer if question is None else (letter or "?"),
            verdict={"yes": "defect", "no": "no_defect"}.get(answer, "unknown"),
            model_id="fake-mllm",
            timings_ms={**expert.timings_ms, "mllm_generate": 2.0},
        )


def _name(item: Path | bytes | np.ndarray, index: int) -> str:
    return Path(item).name if isinstance(item, Path | str) else f"image_{index:04d}.png"
