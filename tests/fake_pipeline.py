"""The one test double of the pipeline: the REAL :class:`eagle.pipeline.Pipeline` with three tiny parts injected.

Decoding, inspection, result assembly, the CAAS gate, verdicts, readiness and line health are the real code; only
the parts behind them are small and fast:

* :class:`FakeBankStore`: banks as ``<root>/<name>/meta.json``; ``load`` gives a :class:`FakeScorer`, whose score is
  an image's mean absolute grey-level difference from the bank's reference mean, over 255. A seeded bank
  (``banks=("widget",)``) has mean 0, τ = 0.5, s_max = 0.7: its score is the mean intensity / 255;
* :class:`FakeBuilder`: the real reading of images and masks, each build or teach writing the next version's meta;
* :class:`FakeMLLM`: ``baseline`` answers a hash of the query's pixels and the setting (some ``unknown``), the other
  settings the expert's decision, flipped when the real gate turns CAAS on; a data set's own question gets the
  verdict's option, or a hashed one.

Hooks: ``gate`` (a ``threading.Event``) holds every scoring until set, ``entered`` counts the scorings begun;
``fail_with`` is raised once ``fail_after`` images were scored. Recorded: ``expert_calls`` (sha256 of each scored
image), ``finish_calls`` / ``questions`` / ``templates`` (per record: image name, setting, CAAS policy, question,
template name and shape) and ``builds``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from common import atomic
from eagle.bank_records import BankSummary, BankVersion, TaughtImage, TeachResult
from eagle.bank_service import BUILD_STAGES, BankService, ReferenceImagesError
from eagle.bank_versions import BankVersionNotFoundError
from eagle.banks import BankNotFoundError, validate_bank_name
from eagle.lines import BankEmptyError, DeclaredLines, LineStore
from eagle.pipeline import Pipeline
from eagle.records import InspectOptions
from eagle.settings import Settings
from expert.bank_schema import BankError
from mllm.choices import option_answer

SEEDED_TAU, SEEDED_S_MAX = 0.5, 0.7
"""τ and s_max of a seeded bank (one made without references): its score is the mean intensity / 255."""


_SUMMARY = dict(created="", n_patches=0, coreset_size=0, coreset_ratio=0.0, threshold_method="fake", backbone="fake")
_SUMMARY.update(weights_source="random", distance="sqeuclidean")


def _grey(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64).mean(axis=2)


def _score(image: np.ndarray, meta: dict) -> float:
    return float((np.abs(_grey(image) - meta["mean"]) / 255.0).mean())


def _facts(meta: dict) -> dict:
    """What a bank's summary and its version share."""
    return {key: meta[key] for key in ("bank_id", "n_references", "tau", "s_max")}


def _meta(name: str, greys: list[float], names: list[str], version: int) -> dict:
    """A bank: its references' mean grey level; τ and s_max from their spread (in 1/255 units)."""
    scores = [abs(g - float(np.mean(greys))) for g in greys]
    return {
        "bank_id": hashlib.sha256(f"{name}@{version}".encode() if greys else name.encode()).hexdigest()[:16],
        "mean": float(np.mean(greys)) if greys else 0.0,
        "tau": float(np.mean(scores) + 3 * np.std(scores) + 1.0) / 255.0 if greys else SEEDED_TAU,
        "s_max": float(max(scores) + 2.0) / 255.0 if greys else SEEDED_S_MAX,
        **{"n_references": len(names), "names": names, "greys": greys, "version": version},
    }


class FakeScorer:
    """A bank's expert: ``score`` gives a real :class:`expert.scorer.ExpertResult`; ``bank`` and ``reference_name``
    as the pipeline reads them. ``hooks`` (the :class:`FakePipeline`) holds the gate, the failure and the record."""

    def __init__(self, meta: dict, hooks: Any = None) -> None:
        self.meta, self.hooks = meta, hooks
        threshold = SimpleNamespace(tau=meta["tau"], s_max=meta["s_max"], method="fake")
        train = [abs(g - meta["mean"]) / 255.0 for g in meta["greys"]]
        self.bank = SimpleNamespace(
            meta=SimpleNamespace(bank_id=meta["bank_id"], threshold=threshold), train_scores=train
        )

    def reference_name(self, index: int | None) -> str | None:
        return None if index is None else self.meta["names"][index]

    def score(self, image: np.ndarray, *, original_size: tuple[int, int] | None = None):
        from expert.boxes import Box
        from expert.preprocess import Geometry
        from expert.scorer import ExpertResult

        if (hooks := self.hooks) is not None:
            hooks.entered.release()
            if hooks.gate is not None:
                hooks.gate.wait(30)
            if hooks.fail_with is not None and len(hooks.expert_calls) >= hooks.fail_after:
                raise hooks.fail_with
            hooks.expert_calls.append(hashlib.sha256(image.tobytes()).hexdigest())
        diff = (np.abs(_grey(image) - self.meta["mean"]) / 255.0).astype(np.float32)
        (height, width), (orig_w, orig_h) = image.shape[:2], original_size or image.shape[1::-1]
        score, tau, s_max, names = _score(image, self.meta), self.meta["tau"], self.meta["s_max"], self.meta["names"]
        return ExpertResult(
            score=score,
            tau=tau,
            s_max=s_max,
            anomalous=score >= tau,
            low_confidence=tau <= score <= s_max,
            patch_scores=diff,
            crop_map=diff,
            boxes=[Box(1, 1, max(2, orig_w // 2), max(2, orig_h // 2), score)] if score >= tau else [],
            template_index=0 if names else None,
            template_name=names[0] if names else None,
            geometry=Geometry(orig_h, orig_w, height, width, 0, 0, height, width),
            timings_ms={"embed": 2.0, "search": 0.5},  # the service metrics test counts 2 ms per embed
        )

    def score_many(self, images, *, batch_size: int = 4, original_sizes=None):
        sizes = list(original_sizes) if original_sizes is not None else [None] * len(images)
        return [self.score(image, original_size=size) for image, size in zip(images, sizes, strict=True)]


class FakeBankStore(DeclaredLines):
    """Banks as ``<root>/<name>/meta.json``: the :class:`~eagle.pipeline.BankCatalog` and
    :class:`~eagle.inspection.ScorerSource` calls, plus ``path``, ``save``, ``seed`` and the evaluation's
    ``reference_name``. Only the current version is kept."""

    def __init__(self, root: Path, hooks: Any = None) -> None:
        self.root, self.hooks = Path(root), hooks
        self.lines = LineStore(self.root, min_references=2)

    def path(self, name: str) -> Path:
        return self.root / validate_bank_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / "meta.json").is_file()

    def meta(self, name: str) -> dict:
        if not self.exists(name):
            if self.is_declared(name):
                raise BankEmptyError(f"line {name!r} is declared but has no bank yet: build a bank first")
            raise BankNotFoundError(f"no bank named {name!r}")
        try:
            return json.loads((self.path(name) / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BankError(f"bank {name} unreadable: {err}") from None

    def save(self, name: str, meta: dict) -> BankSummary:
        self.path(name).mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.path(name) / "meta.json", json.dumps(meta))  # readers never see half a bank
        return self.summary(name)

    def seed(self, name: str) -> BankSummary:
        """A reference-less bank (score = mean intensity / 255) that says it has 3 references."""
        return self.save(name, {**_meta(name, [], [], 1), "n_references": 3})

    def load(self, name: str) -> FakeScorer:
        return FakeScorer(self.meta(name), self.hooks)

    def summary(self, name: str) -> BankSummary:
        return BankSummary(name=name, **_facts(self.meta(name)), **_SUMMARY)

    def list(self) -> list[BankSummary]:
        names = sorted(p.parent.name for p in self.root.glob("*/meta.json"))
        return [self.summary(name) for name in names if self._readable(name)]

    def _readable(self, name: str) -> bool:
        try:
            return bool(self.meta(name))
        except BankError:
            return False

    def delete(self, name: str) -> None:
        if self.is_declared(name):
            return self.lines.delete(name)
        self.meta(name)  # BankNotFoundError
        shutil.rmtree(self.path(name))

    def loaded(self) -> list[str]:
        """Nothing is kept in memory: every saved bank counts as loaded."""
        return [summary.name for summary in self.list()]

    def unusable(self) -> dict[str, str]:
        return {}

    def reference_name(self, name: str, index: int) -> str:
        return self.meta(name)["names"][index]

    def template_image(self, name: str, index: int | None, *, scorer: Any = None) -> np.ndarray:
        """The "stored reference": a grey picture at the bank's mean level."""
        return np.full((16, 16, 3), round((scorer.meta if scorer else self.meta(name))["mean"]), np.uint8)

    def history(self, name: str) -> list[BankVersion]:
        meta = self.meta(name)
        return [BankVersion(version=meta["version"], current=True, created="", action="build", note="", **_facts(meta))]

    def rollback(self, name: str, version: int) -> BankSummary:
        """Rolling back to the current version changes nothing; any other is unknown."""
        if version != self.meta(name)["version"]:
            raise BankVersionNotFoundError(f"bank {name!r} has no kept version {version}")
        return self.summary(name)


class FakeBuilder(BankService):
    """The real image reading and mask checks; a build or teach writes the bank's next version as a meta."""

    def build_bank(
        self,
        images,
        name,
        *,
        names=None,
        progress=None,
        skip_unreadable=False,
        on_unreadable=None,
        out_dir=None,
        mask=None,
    ) -> BankSummary:
        """Like :meth:`BankService.build_bank`, into the store (``out_dir`` is not supported)."""
        validate_bank_name(name)
        if out_dir is not None:
            raise NotImplementedError("the fake builds into its store only")
        if progress:
            progress("read", 0.0)
        decoded, kept = self.read_images(images, names, skip_unreadable=skip_unreadable, on_unreadable=on_unreadable)
        self._grid_mask(mask, decoded)  # the real mask check (invalid_mask)
        try:
            version = self.banks.meta(name)["version"] + 1 if self.banks.exists(name) else 1
        except BankError:  # an unreadable bank is replaced, as the real store does
            version = 1
        for stage in BUILD_STAGES:
            if progress:
                progress(stage, 1.0)
        self.banks.hooks.builds.append(name)
        return self.banks.save(name, _meta(name, [float(_grey(x).mean()) for x in decoded], kept, version))

    def add_references(self, images, name, *, names=None, progress=None) -> TeachResult:
        validate_bank_name(name)
        if not images:
            raise ReferenceImagesError("no images to add: give at least one image of a good part")
        decoded, new_names = self.read_images(images, names)
        b = self.banks.meta(name)
        greys = [*b["greys"], *(float(_grey(x).mean()) for x in decoded)]
        a = _meta(name, greys, [*b["names"], *new_names], b["version"] + 1)
        self.banks.save(name, a)
        taught = []
        for image, image_name in zip(decoded, new_names, strict=True):
            before, after = _score(image, b), _score(image, a)
            taught.append(
                TaughtImage(
                    name=image_name,
                    score_before=before,
                    score_after=after,
                    passed_before=before < b["tau"],
                    passes_now=after < a["tau"],
                )
            )
        return TeachResult(
            bank=name,
            version_before=b["version"],
            version=a["version"],
            tau_before=b["tau"],
            tau_after=a["tau"],
            s_max_before=b["s_max"],
            s_max_after=a["s_max"],
            references_before=b["n_references"],
            references_after=a["n_references"],
            taught=taught,
        )


class FakeMLLM:
    """The loaded MLLM as the inspection calls it: ``ask``, ``explain_stream``, ``attention_overlay``, ``loaded``."""

    loaded = SimpleNamespace(model_id="fake-mllm", quantization="none")

    def ask(self, *, query, template, boxed, expert_anomalous, setting, caas=None, question=None):
        from mllm.inspector import MLLMAnswer

        digest = int(hashlib.sha256(np.asarray(query).tobytes() + setting.encode()).hexdigest(), 16)
        if setting == "baseline":
            answer = ("yes", "no", "unknown")[digest % 3]
        else:  # the expert's decision; CAAS (on only when the real gate says so) flips it
            answer = "yes" if expert_anomalous != (caas is not None) else "no"
        letter = {"yes": "A", "no": "B"}.get(answer)
        if question is not None:  # a data set's own question: the verdict's option, or a hashed one
            by_text = {option_answer(question, x): x for x in question.letters}
            letter = by_text.get(answer) if {"yes", "no"} <= set(by_text) else question.letters[digest % len(by_text)]
            answer = option_answer(question, letter)
        raw = answer if question is None else (letter or "?")
        return MLLMAnswer(letter, answer, raw, caas is not None, 10, 1, {"generate": 2.0}, setting=setting)

    def explain_stream(self, *, query, template, boxed, expert_anomalous, answer, setting, stats=None):
        yield from ("The fake ", "explanation.")

    def attention_overlay(self, *, query, template, boxed, expert_anomalous, setting, layers=None) -> np.ndarray:
        return np.asarray(query)


class FakePipeline(Pipeline):
    """The real :class:`~eagle.pipeline.Pipeline` over :class:`FakeBankStore`, :class:`FakeBuilder`, :class:`FakeMLLM`.

    Args:
        data_dir: banks go to ``<data_dir>/banks`` (``settings.banks_dir``); default: a temporary folder.
        mllm_enabled: ``settings.mllm.enabled``.
        banks: names of reference-less banks to seed (score = mean intensity / 255, τ = 0.5).
        max_pixels: ``settings.max_image_pixels``, the decoder's pixel limit.
        fail_with: raised by the expert once ``fail_after`` images were scored.
        fail_after: how many images the expert scores before raising ``fail_with``.
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
        self.data_dir, self.fail_with, self.fail_after = Path(data_dir), fail_with, fail_after
        self.gate: threading.Event | None = None
        self.entered = threading.Semaphore(0)
        self.expert_calls: list[str] = []
        self.finish_calls: list[tuple[str | None, str | None, str | None]] = []  # (image, setting, caas)
        self.questions: list[tuple[str | None, str | None, Any]] = []  # (image, setting, question)
        self.templates: list[tuple[str | None, str | None, tuple[int, ...] | None]] = []  # (image, name, shape)
        self.builds: list[str] = []
        settings = Settings(data_dir=self.data_dir, max_image_pixels=max_pixels, mllm={"enabled": mllm_enabled})
        store = FakeBankStore(settings.banks_dir, hooks=self)
        builder = FakeBuilder(settings, store, None)
        super().__init__(settings, banks=store, builder=builder, mllm_loader=lambda _progress: FakeMLLM())
        for name in banks:
            store.seed(name)
        self.inspector.finish = self._recorded(self.inspector.finish)  # inspect's finish is recorded too

    def _recorded(self, finish):
        def recorded(image, expert, bank, options=None, **kwargs):
            setting, caas = (options or InspectOptions()).prompt_setting, (options or InspectOptions()).caas
            name, template = kwargs.get("image_name"), kwargs.get("template")
            self.finish_calls.append((name, setting, caas))
            self.questions.append((name, setting, kwargs.get("question")))
            self.templates.append((name, kwargs.get("template_name"), None if template is None else template.shape))
            return finish(image, expert, bank, options, **kwargs)

        return recorded
