"""Bank building and teaching: reference images read and checked, banks built, new versions taught.

:class:`BankService` turns reference images into a bank of the store (a new version) with the expert's
:func:`expert.build.build_bank`, teaches an existing bank more normal images (a rebuild with the bank's own
settings, as the next version) and checks inspection masks before a build is queued.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.progress import ProgressCallback
from eagle.bank_records import TaughtImage, TeachResult
from eagle.banks import BankError, BankStore, BankSummary, summarize_bank, validate_bank_name
from eagle.errors import EagleError, one_line
from eagle.images import ImageError, load_image
from eagle.models import BackboneGraph
from eagle.settings import Settings
from expert.progress import BUILD_STAGES as EXPERT_BUILD_STAGES

if TYPE_CHECKING:
    from expert.bank_schema import BankMeta
    from expert.config import ExpertSettings

BUILD_STAGES: tuple[str, ...] = ("read", *EXPERT_BUILD_STAGES)
"""The stages :meth:`BankService.build_bank` reports, in order: reading the images, then the expert's."""


def _unique_names(new: Sequence[str], taken: Sequence[str]) -> list[str]:
    """``new`` with a ``-taught-N`` suffix where a name is already in ``taken`` (bank names must be unique)."""
    used, out = set(taken), []
    for original in new:
        candidate, n = original, 1
        while candidate in used:
            stem, dot, suffix = original.rpartition(".")
            candidate = f"{stem}-taught-{n}.{suffix}" if dot else f"{original}-taught-{n}"
            n += 1
        used.add(candidate)
        out.append(candidate)
    return out


def _settings_of_bank(running: ExpertSettings, meta: BankMeta) -> ExpertSettings:
    """The running expert settings with the bank's own coreset, seed, threshold and reference-size settings.

    A rebuild (teach) must derive τ the way the bank's first build did, whatever the running threshold settings.
    """
    from expert.dbt import THRESHOLD_PARAMETERS

    update = {
        "coreset_ratio": meta.coreset.ratio,
        "coreset_projection_dim": meta.coreset.projection_dim,
        "coreset_starts": meta.coreset.num_starts,
        "coreset_start_method": meta.coreset.start_method,
        "seed": meta.coreset.seed,
        "threshold_method": meta.threshold.method,
        "min_unsampled_patches": meta.threshold.min_unsampled_patches,
        "dbt_search": meta.threshold.search,
        "reference_max_side": meta.reference_max_side or running.reference_max_side,
    }
    update.update({k: float(v) for k, v in meta.threshold.params.items() if k in THRESHOLD_PARAMETERS})
    return running.model_copy(update=update)


class ReferenceImagesError(ImageError):
    """Some reference images could not be read; the message lists every one of them.

    ``problems`` holds each image's one-line message, ``total`` the number of images given.
    """

    def __init__(self, message: str, *, problems: Sequence[str] = (), total: int = 0) -> None:
        super().__init__(message)
        self.problems = list(problems)
        self.total = total


class BankService:
    """Builds and teaches the banks of one store with the configured backbone.

    Args:
        settings: the settings tree (``expert`` for the build, ``max_image_pixels`` for the reading).
        banks: the store the banks are written to as versions.
        backbone: the backbone's weights and cached ONNX graph.
    """

    def __init__(self, settings: Settings, banks: BankStore, backbone: BackboneGraph) -> None:
        self.settings = settings
        self.banks = banks
        self.backbone = backbone

    def read_images(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        names: Sequence[str] | None = None,
        *,
        skip_unreadable: bool = False,
        on_unreadable: Callable[[str], None] | None = None,
    ):
        """Decode reference images, collecting every failure before raising one :class:`ReferenceImagesError`.

        ``on_unreadable(message)`` is called with each failure's one line; with ``skip_unreadable`` the readable
        images are returned instead of raising.
        """
        decoded, kept_names, problems = [], [], []
        for i, item in enumerate(images):
            name = names[i] if names is not None else (item.name if isinstance(item, Path) else f"image_{i:04d}.png")
            try:
                array = (
                    item
                    if isinstance(item, np.ndarray)
                    else load_image(item, max_pixels=self.settings.max_image_pixels, name=name)
                )
            except ImageError as err:
                problems.append(str(err))
                if on_unreadable is not None:
                    on_unreadable(str(err))
                continue
            decoded.append(array)
            kept_names.append(name)
        if problems and not skip_unreadable:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise ReferenceImagesError(
                f"{len(problems)} of {len(images)} reference images could not be read "
                f"(remove or replace them and build again):\n{listing}",
                problems=problems,
                total=len(images),
            )
        return decoded, kept_names

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
        """Build (or rebuild) the bank ``name`` from normal reference images.

        Args:
            images: files, raw bytes or decoded RGB arrays of GOOD parts.
            name: bank name (validated: letters, digits, ``._-``).
            names: display names for bytes/arrays (defaults to file names).
            progress: ``progress(stage, fraction)`` with stages ``read``, ``embed``, ``coreset``, ``dbt``, ``save``.
            skip_unreadable: build from the readable images instead of raising (``eagle build-bank
                --skip-unreadable``); the summary's ``n_references`` says how many were used.
            on_unreadable: called with each unreadable image's one-line message.
            out_dir: write the bank there instead of ``<banks_dir>/<name>`` (``eagle build-bank --out``).
            mask: the inspection mask (:mod:`expert.mask`): a ``.png`` / ``.json`` path, PNG bytes, a polygons
                dict or list (JSON form), an ``H × W`` picture in original-image pixels (bool, or RGB/RGBA: white and
                opaque = inspected), or a bool array of the patch grid's shape (an existing bank's ``bank.mask``,
                taken as is). Polygons without a size are sized like the first reference image. None: no mask.

        Raises:
            ReferenceImagesError: some images are unreadable (all are listed; nothing is built).
            BankNameError: the name is not allowed.
            EagleError: ``invalid_mask`` (422): the mask cannot be read or covers no patch.
        """
        from expert.build import build_bank

        target = self.banks.path(name) if out_dir is None else Path(out_dir)  # validates the name before any work
        validate_bank_name(name)
        if progress:
            progress("read", 0.0)
        decoded, kept_names = self.read_images(
            images, names, skip_unreadable=skip_unreadable, on_unreadable=on_unreadable
        )
        grid_mask, mask_source = self._grid_mask(mask, decoded)
        if progress:
            progress("read", 1.0)
        weights_info, backbone = self.backbone.weights()  # waits for a start-up warm-up exporting the graph

        def write(directory: Path) -> None:
            build_bank(
                decoded,
                kept_names,
                settings=self.settings.expert,
                backbone=backbone,
                weights_info=weights_info,
                out_dir=directory,
                name=name,
                progress=progress,
                onnx_cache=self.backbone.onnx_cache,
                mask=grid_mask,
                mask_source=mask_source,
            )

        if out_dir is not None:
            write(target)
            return summarize_bank(target, self.settings.expert, name=name)
        self.banks.write_version(name, write, action="build", note=f"{len(decoded)} reference images")
        self.banks.forget(name)
        return self.banks.summary(name)

    def check_mask(self, mask: bytes | str) -> None:
        """Check a mask before a background build (PNG bytes, or polygons JSON text) so it fails now, not later.

        Polygons without a size are only parsed here; they are mapped once the references give the size.

        Raises:
            EagleError: ``invalid_mask`` (422).
        """
        import json

        from expert.mask import MaskError, parse_polygons

        if isinstance(mask, bytes):
            self._grid_mask(mask, [])
            return
        try:
            spec = json.loads(mask)
        except json.JSONDecodeError as err:
            raise EagleError(f"mask polygons: not valid JSON ({err})", code="invalid_mask", http_status=422) from None
        try:
            parse_polygons(spec, default_size=(1, 1))
        except MaskError as err:
            raise EagleError(one_line(err), code="invalid_mask", http_status=422) from None
        if isinstance(spec, dict) and "width" in spec:
            self._grid_mask(spec, [])

    def _grid_mask(self, mask: object | None, decoded: Sequence[np.ndarray]) -> tuple[np.ndarray | None, str]:
        """The bank's grid mask and its description from any mask source :meth:`build_bank` accepts."""
        if mask is None:
            return None, ""
        from expert.bank_checks import expected_grid
        from expert.mask import MaskError, grid_mask_from_source

        expert = self.settings.expert
        grid = expected_grid(expert.crop)
        if isinstance(mask, np.ndarray) and mask.ndim == 2 and mask.shape == grid:  # a grid mask (e.g. a bank's own)
            return np.asarray(mask, dtype=bool), "grid"
        default_size = (decoded[0].shape[1], decoded[0].shape[0]) if decoded else None
        try:
            return grid_mask_from_source(
                mask,
                resize=expert.resize,
                crop=expert.crop,
                center_crop=expert.center_crop,
                grid=grid,
                default_size=default_size,
            )
        except MaskError as err:
            raise EagleError(one_line(err), code="invalid_mask", http_status=422) from None

    def add_references(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        name: str,
        *,
        names: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> TeachResult:
        """Teach bank ``name`` that ``images`` are normal: rebuild it from its references plus these, as a new version.

        The bank is rebuilt from its stored reference copies (at their stored size, up to
        ``expert.reference_max_side`` px) followed by the new images, with the bank's own coreset, seed and
        threshold settings, so τ and s_max are recomputed the way they were first derived. The new version is
        written completely, then made current atomically (:meth:`~eagle.banks.BankStore.write_version`); the
        previous one stays in the history. Each taught image is scored against the old and the new bank.

        Raises:
            BankNotFoundError: no such bank. ReferenceImagesError: some images are unreadable (nothing changes).
            BankError: the bank cannot be loaded, or the running backbone weights are not the bank's.
        """
        from expert.build import build_bank, stored_embeddings

        validate_bank_name(name)
        if not images:
            raise ReferenceImagesError("no images to add: give at least one image of a good part")
        decoded, new_names = self.read_images(images, names)
        weights_info, backbone = self.backbone.weights()
        before: dict = {}

        def write(directory: Path) -> None:
            scorer = self.banks.load(name)  # the current version, read under the store's write lock
            bank = scorer.bank
            meta = bank.meta
            if weights_info.checksum != meta.backbone.weights_checksum:
                raise BankError(
                    f"bank {name!r} was built with other backbone weights ({meta.backbone.weights_source}) than the "
                    f"running ones ({weights_info.source}); rebuild it from its images instead"
                )
            before.update(
                version=self.banks.current_version(name),
                tau=bank.tau,
                s_max=bank.s_max,
                n=len(meta.references),
                scores=[float(scorer.score(image).score) for image in decoded],
            )
            stored = [bank.load_reference(i) for i in range(len(meta.references))]
            stored_names = [ref.name for ref in meta.references]
            build_bank(
                [*stored, *decoded],
                [*stored_names, *_unique_names(new_names, stored_names)],
                settings=_settings_of_bank(self.settings.expert, meta),
                backbone=backbone,
                weights_info=weights_info,
                out_dir=directory,
                name=meta.name,
                progress=progress,
                onnx_cache=self.backbone.onnx_cache,
                mask=bank.mask,  # the inspection mask stays
                mask_source=meta.mask.source if meta.mask is not None else "",
                stored=stored_embeddings(bank),  # the references' own embeddings: only the new images are embedded
            )

        shown = ", ".join(new_names[:3]) + (f" and {len(new_names) - 3} more" if len(new_names) > 3 else "")
        version = self.banks.write_version(name, write, action="teach", note=f"added {shown}")
        scorer = self.banks.load(name)
        taught = []
        for image_name, image, old_score in zip(new_names, decoded, before["scores"], strict=True):
            now = scorer.score(image)
            taught.append(
                TaughtImage(
                    name=image_name,
                    score_before=old_score,
                    score_after=float(now.score),
                    passed_before=old_score < before["tau"],
                    passes_now=not now.anomalous,
                )
            )
        return TeachResult(
            bank=name,
            version_before=before["version"],
            version=version,
            tau_before=float(before["tau"]),
            tau_after=float(scorer.bank.tau),
            s_max_before=float(before["s_max"]),
            s_max_after=float(scorer.bank.s_max),
            references_before=int(before["n"]),
            references_after=len(scorer.bank.meta.references),
            taught=taught,
        )
