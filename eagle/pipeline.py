"""The one inspection pipeline behind the app, the edge service and the evaluation: its parts composed.

A :class:`Pipeline` composes the bank store (:class:`~eagle.banks.BankStore`), bank building and teaching
(:class:`~eagle.bank_service.BankService`), the model lifecycle (:class:`~eagle.models.BackboneGraph`,
:class:`~eagle.models.MLLMModel`, the MLLM loaded lazily on first need) and the inspection of one image
(:class:`~eagle.inspection.Inspector`, its record assembled by :mod:`eagle.results`). It turns an image into an
:class:`~eagle.records.InspectionResult`: expert score, τ, s_max, decision, boxes and heatmap, the template shown
to the model, the model's answer with CAAS applied when the expert is unsure, an optional explanation, and
per-stage timings. Each part can be injected (tests give the real pipeline a tiny scorer, builder or MLLM).

Example:
    >>> from eagle.settings import Settings
    >>> pipe = Pipeline(Settings(mllm={"enabled": False}))          # expert-only
    >>> pipe.build_bank(sorted(Path("normals").glob("*.png")), "bolts")  # doctest: +SKIP
    >>> pipe.inspect(Path("query.png"), "bolts").verdict                # doctest: +SKIP
    'defect'
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from common.progress import ProgressCallback
from eagle.bank_records import BankVersion, TeachResult
from eagle.bank_service import BankService
from eagle.banks import BankStore, BankSummary
from eagle.images import DecodedImage
from eagle.inspection import Inspector
from eagle.lines import LineStore
from eagle.models import BackboneGraph, MLLMLoader, MLLMModel
from eagle.records import InspectionResult, InspectOptions
from eagle.settings import Settings

if TYPE_CHECKING:
    from eagle.audit import AuditLog
    from eagle.line_health import LineHealth
    from eagle.lines import DeclaredLine
    from expert.scorer import ExpertResult, ExpertScorer
    from mllm.choices import MultipleChoice


class BankCatalog(Protocol):
    """The bank-store calls front ends make (:class:`~eagle.banks.BankStore` implements them)."""

    def exists(self, name: str) -> bool:
        """Whether a bank of that name is saved (raises ``BankNameError`` for a bad name)."""
        ...

    def list(self) -> list[BankSummary]:
        """The saved banks."""
        ...

    def load(self, name: str) -> object:
        """The bank's scorer, loaded and test-inspected (``BankNotFoundError``, ``BankError``)."""
        ...

    def delete(self, name: str) -> None:
        """Delete a saved bank."""
        ...

    def unusable(self) -> dict[str, str]:
        """Banks whose last load failed, name → one-line reason."""
        ...

    def loaded(self) -> list[str]:
        """The names of the banks loaded now, least recently used first."""
        ...

    def history(self, name: str) -> list[BankVersion]:
        """The kept versions of a bank, oldest first (``BankNotFoundError``)."""
        ...

    def is_declared(self, name: str) -> bool:
        """Whether ``name`` is a line declared without a bank (:class:`~eagle.lines.DeclaredLines`)."""
        ...

    def declare(self, name: str, *, note: str = "") -> DeclaredLine:
        """Declare a line before its bank exists (``LineExistsError`` when a bank or line of that name exists)."""
        ...

    def declared(self) -> list[DeclaredLine]:
        """The lines declared without a bank, newest first."""
        ...


@runtime_checkable
class InspectionPipeline(Protocol):
    """What the edge service (API, jobs, watcher) needs of a pipeline; :class:`Pipeline` is the implementation.

    Tests build the real :class:`Pipeline` with small injected parts (``tests/fake_pipeline.py``).
    Its failures are :class:`~eagle.errors.EagleError` subclasses or mapped by :func:`eagle.errors.as_eagle_error`.
    """

    @property
    def banks(self) -> BankCatalog:
        """The bank store."""
        ...

    @property
    def mllm_enabled(self) -> bool:
        """Whether settings ask for the MLLM (False: expert-only)."""
        ...

    def inspect(
        self,
        image: np.ndarray | bytes | Path | DecodedImage,
        bank: str,
        options: InspectOptions | None = None,
        *,
        image_name: str | None = None,
    ) -> InspectionResult:
        """Inspect one image (see :meth:`Pipeline.inspect`)."""
        ...

    def inspect_many(
        self,
        images: Sequence[tuple[np.ndarray | bytes | Path | DecodedImage, str | None]],
        bank: str,
        options: InspectOptions | None = None,
        *,
        batch_size: int = 4,
    ) -> list[InspectionResult | Exception]:
        """Inspect several images, the expert embedding them together (see :meth:`Pipeline.inspect_many`)."""
        ...

    def line_health(self, name: str, audit: AuditLog) -> LineHealth:
        """The drift check of a bank's current version (see :meth:`Pipeline.line_health`)."""
        ...

    def build_bank(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        name: str,
        *,
        names: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> BankSummary:
        """Build or rebuild a bank (see :meth:`Pipeline.build_bank`)."""
        ...

    def add_references(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        name: str,
        *,
        names: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> TeachResult:
        """Teach a bank that these images are normal, as a new version (see :meth:`Pipeline.add_references`)."""
        ...

    def check_mask(self, mask: bytes | str) -> None:
        """Refuse a bad inspection mask before a build is queued (see :meth:`Pipeline.check_mask`)."""
        ...

    def ready(self) -> dict[str, bool]:
        """Readiness facts (see :meth:`Pipeline.ready`)."""
        ...

    def load_mllm(self, progress: ProgressCallback | None = None) -> object:
        """Load the MLLM once (raises :class:`MLLMUnavailableError`)."""
        ...


class Pipeline:
    """Expert + (lazily loaded) MLLM, safe to call from several threads: a facade over the pipeline's parts.

    Args:
        settings: the validated settings tree.
        banks_dir: where the banks are (default ``settings.banks_dir``); ``eagle score --bank DIR`` uses the
            bank directory's parent.
        banks: the bank store to use instead of a :class:`~eagle.banks.BankStore` at ``banks_dir`` (a test's
            small store whose ``load`` gives a fake scorer).
        builder: what builds and teaches banks instead of a :class:`~eagle.bank_service.BankService` over
            ``banks`` (``build_bank``, ``add_references``, ``check_mask``, ``read_images``).
        mllm_loader: how the MLLM is loaded (default :func:`eagle.models.mllm_loader`).

    The expert part runs concurrently (onnxruntime and faiss are thread-safe for inference); the MLLM is
    one model on one device, loaded once under a lock.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        banks_dir: Path | None = None,
        banks: Any = None,
        builder: Any = None,
        mllm_loader: MLLMLoader | None = None,
    ) -> None:
        self.settings = settings
        if banks is None:
            banks = BankStore(
                settings.banks_dir if banks_dir is None else Path(banks_dir),
                settings.expert,
                versions_kept=settings.bank_versions_kept,
                max_loaded=settings.max_loaded_banks,
                lines=LineStore(
                    settings.banks_dir if banks_dir is None else Path(banks_dir),
                    min_references=settings.expert.min_references,
                    max_pixels=settings.max_image_pixels,
                    mllm_enabled=settings.mllm.enabled,
                ),
            )
            banks.sweep()  # what killed writers left under the banks folder (nothing that a live process owns)
        self.banks = banks
        self.backbone = BackboneGraph(settings)
        self.builder = builder if builder is not None else BankService(settings, banks, self.backbone)
        self.mllm = MLLMModel(settings, mllm_loader)
        self.inspector = Inspector(settings, banks, self.mllm)

    # ------------------------------------------------------------------ banks (BankService, BackboneGraph)
    @property
    def onnx_cache(self):
        """The :class:`~expert.onnx_cache.OnnxCache` every bank build uses (``settings.onnx_cache_path``)."""
        return self.backbone.onnx_cache

    def warm_onnx_cache(self, *, prune: bool = False) -> Path:
        """Put the backbone's ONNX graph in the cache (:meth:`~eagle.models.BackboneGraph.warm`).

        The app calls this in a background thread at start-up and ``eagle warm-cache`` runs it in the container
        build, so a bank build does not spend 10–20 s exporting. Returns the cached graph's path.
        """
        return self.backbone.warm(prune=prune)

    def read_images(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        names: Sequence[str] | None = None,
        *,
        skip_unreadable: bool = False,
        on_unreadable: Callable[[str], None] | None = None,
    ):
        """Decode reference images (:meth:`~eagle.bank_service.BankService.read_images`)."""
        return self.builder.read_images(images, names, skip_unreadable=skip_unreadable, on_unreadable=on_unreadable)

    def build_bank(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        name: str,
        *,
        names: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
        skip_unreadable: bool = False,
        on_unreadable: Callable[[str], None] | None = None,
        out_dir: Path | None = None,
        mask: object | None = None,
    ) -> BankSummary:
        """Build (or rebuild) the bank ``name`` (:meth:`~eagle.bank_service.BankService.build_bank`)."""
        return self.builder.build_bank(
            images,
            name,
            names=names,
            progress=progress,
            skip_unreadable=skip_unreadable,
            on_unreadable=on_unreadable,
            out_dir=out_dir,
            mask=mask,
        )

    def check_mask(self, mask: bytes | str) -> None:
        """Refuse a bad mask before a build is queued (:meth:`~eagle.bank_service.BankService.check_mask`)."""
        self.builder.check_mask(mask)

    def add_references(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        name: str,
        *,
        names: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> TeachResult:
        """Teach bank ``name`` that ``images`` are normal (:meth:`~eagle.bank_service.BankService.add_references`)."""
        return self.builder.add_references(images, name, names=names, progress=progress)

    def line_health(self, name: str, audit: AuditLog) -> LineHealth:
        """The drift check of bank ``name``'s current version over its latest audited inspections.

        The bank is loaded (and cached) for its DBT training scores and τ; the statistics and states are
        :func:`expert.drift.assess_drift`'s, with ``settings.health``'s windows and limits.

        Raises:
            BankNotFoundError: no bank named ``name``.
        """
        from eagle.line_health import line_health

        bank = self.banks.load(name).bank
        return line_health(
            name, bank.meta.bank_id, bank.train_scores, bank.meta.threshold.tau, audit, self.settings.health
        )

    # ------------------------------------------------------------------ MLLM (MLLMModel)
    @property
    def mllm_enabled(self) -> bool:
        """Whether settings ask for the MLLM at all (False: expert-only mode)."""
        return self.mllm.enabled

    def mllm_loaded(self) -> bool:
        """Whether the MLLM is loaded and ready."""
        return self.mllm.loaded()

    def mllm_status(self) -> str:
        """One line for people: what the LLM side is doing."""
        return self.mllm.status()

    def load_mllm(self, progress: ProgressCallback | None = None) -> Any:
        """Load the MLLM once (:meth:`~eagle.models.MLLMModel.load`; raises ``MLLMUnavailableError``).

        :meth:`inspect` raises it too when asked for the MLLM: every front end reports the same
        ``mllm_unavailable`` error rather than silently answering expert-only.
        """
        return self.mllm.load(progress)

    def ready(self) -> dict[str, bool]:
        """Readiness facts for health checks: any bank saved, MLLM loaded (or not needed)."""
        return {"banks": bool(self.banks.list()), "mllm": self.mllm.loaded() or not self.mllm.enabled}

    # ------------------------------------------------------------------ inspection (Inspector)
    def view(self, image: np.ndarray | DecodedImage) -> np.ndarray:
        """The bounded picture of a query that the MLLM sees (:meth:`~eagle.inspection.Inspector.view`)."""
        return self.inspector.view(image)

    def decode(self, image: np.ndarray | bytes | Path | DecodedImage, *, image_name: str | None = None) -> DecodedImage:
        """Decode one query image, reduced when large (:meth:`~eagle.inspection.Inspector.decode`)."""
        return self.inspector.decode(image, image_name=image_name)

    def run_expert(self, image: np.ndarray | DecodedImage, bank: str) -> ExpertResult:
        """Score one decoded image with the bank's expert (the evaluation calls this once per image)."""
        return self.inspector.run_expert(image, bank)

    def inspect(
        self,
        image: np.ndarray | bytes | Path | DecodedImage,
        bank: str,
        options: InspectOptions | None = None,
        *,
        image_name: str | None = None,
    ) -> InspectionResult:
        """Inspect one image end to end (:meth:`~eagle.inspection.Inspector.inspect`)."""
        return self.inspector.inspect(image, bank, options, image_name=image_name)

    def inspect_many(
        self,
        images: Sequence[tuple[np.ndarray | bytes | Path | DecodedImage, str | None]],
        bank: str,
        options: InspectOptions | None = None,
        *,
        batch_size: int = 4,
    ) -> list[InspectionResult | Exception]:
        """Inspect ``(image, name)`` pairs, the expert embedding them in batches; a failure is returned in its place.

        See :meth:`~eagle.inspection.Inspector.inspect_many`; the watched folder uses it when several images wait.
        """
        return self.inspector.inspect_many(images, bank, options, batch_size=batch_size)

    def finish(
        self,
        image: np.ndarray | DecodedImage,
        expert: ExpertResult,
        bank: str,
        options: InspectOptions | None = None,
        *,
        image_name: str | None = None,
        image_sha256: str | None = None,
        template: np.ndarray | None = None,
        template_name: str | None = None,
        scorer: ExpertScorer | None = None,
        question: MultipleChoice | None = None,
    ) -> InspectionResult:
        """Turn an expert result into the full record (:meth:`~eagle.inspection.Inspector.finish`)."""
        return self.inspector.finish(
            image,
            expert,
            bank,
            options,
            image_name=image_name,
            image_sha256=image_sha256,
            template=template,
            template_name=template_name,
            scorer=scorer,
            question=question,
        )

    def explain_stream(self, image: np.ndarray | DecodedImage, result: InspectionResult) -> Iterator[str]:
        """Stream the explanation turn of a finished MLLM inspection (:meth:`Inspector.explain_stream`)."""
        return self.inspector.explain_stream(image, result)
