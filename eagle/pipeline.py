"""The one inspection pipeline behind the app, the edge service and the evaluation.

A :class:`Pipeline` holds the bank store and, loaded lazily on first need, one multimodal LLM. It turns
an image into an :class:`~eagle.records.InspectionResult`: expert score, τ, s_max, decision, boxes and
heatmap, the template shown to the model, the model's answer with CAAS applied when the expert is
unsure, an optional explanation, and per-stage timings.

Example:
    >>> from eagle.settings import Settings
    >>> pipe = Pipeline(Settings(mllm={"enabled": False}))          # expert-only
    >>> pipe.build_bank(sorted(Path("normals").glob("*.png")), "bolts")  # doctest: +SKIP
    >>> pipe.inspect(Path("query.png"), "bolts").verdict                # doctest: +SKIP
    'defect'
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eagle.banks import BankStore, BankSummary
from eagle.images import DecodedImage, ImageError, decode_image, load_image, resize_rgb, view_size
from eagle.records import BoxRecord, InspectionImages, InspectionResult, InspectOptions
from eagle.settings import Settings

if TYPE_CHECKING:  # the MLLM stack is imported only when it is used
    from expert.model import ExpertResult
    from mllm.inspector import MLLMAnswer, MLLMInspector

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float], None]


class MLLMUnavailableError(RuntimeError):
    """The multimodal LLM is disabled or could not be loaded; the message says why and what to do."""


class ReferenceImagesError(ImageError):
    """Some reference images could not be read; the message lists every one of them."""


def _sha256_of(image: np.ndarray | bytes | Path | DecodedImage) -> str:
    if isinstance(image, DecodedImage):
        return image.sha256 or hashlib.sha256(np.ascontiguousarray(image.pixels).tobytes()).hexdigest()
    if isinstance(image, Path):
        return hashlib.sha256(image.read_bytes()).hexdigest()
    if isinstance(image, bytes):
        return hashlib.sha256(image).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def _mllm_views(image: np.ndarray, template: np.ndarray, boxed: np.ndarray | None, expert: ExpertResult) -> dict:
    """The MLLM's image arguments as PIL images, plus the expert's verdict.

    The query is the pipeline's view of the image (its original resolution, or at most 1024 px on the longest side
    but never below the MLLM's pixel budget), the boxed query is drawn on that same picture, the template is the
    bank's stored reference (kept at up to ``expert.reference_max_side`` = 1024 px) or MMAD's own template. The
    prompt brings the template to the query's size when they have the same shape (:func:`mllm.prompts.fit_template`)
    and the processor gives every image the preset's pixel budget (:func:`mllm.presets.apply_pixel_budget`), so all
    three reach the model on the same token grid.
    """
    from PIL import Image

    return {
        "query": Image.fromarray(image),
        "template": Image.fromarray(template),
        "boxed": Image.fromarray(boxed) if boxed is not None else None,
        "expert_anomalous": bool(expert.anomalous),
    }


class Pipeline:
    """Expert + (lazily loaded) MLLM, safe to call from several threads.

    Args:
        settings: the validated settings tree.

    The expert part runs concurrently (onnxruntime and faiss are thread-safe for inference); the MLLM is
    one model on one device, so its calls are serialised by a lock.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.banks = BankStore(settings.banks_dir, settings.expert)
        self._weights_info = None  # WeightsInfo once the weights were loaded; the torch module is not kept
        self._backbone_lock = threading.Lock()
        self._inspector: MLLMInspector | None = None
        self._mllm_lock = threading.Lock()
        self._mllm_error: str | None = None

    # ------------------------------------------------------------------ banks
    @property
    def onnx_cache(self):
        """The :class:`~expert.onnx_cache.OnnxCache` under ``<data_dir>/cache/onnx`` every bank build uses."""
        from expert.onnx_cache import OnnxCache

        return OnnxCache(self.settings.onnx_cache_dir)

    def _export_key(self, weights_info):
        from expert.onnx_cache import ExportKey

        expert = self.settings.expert
        return ExportKey.create(expert.backbone, weights_info.checksum, crop=expert.crop)

    def _weights(self):
        """``(weights_info, backbone loader)`` for a build; call with ``_backbone_lock`` held.

        The pipeline keeps only the weights' :class:`~expert.weights.WeightsInfo` (the graph's cache key), never
        the torch module (~300 MB). The first call loads the weights (their checksum needs them), puts the graph
        in :attr:`onnx_cache` while they are loaded (a cache hit costs a sha256 check) and drops them; the
        loader it returns is called by the cache only when it must export again (e.g. a corrupted entry).
        """
        from expert.weights import BackboneWeightsError, load_backbone

        if self._weights_info is None:
            module, info = load_backbone(self.settings.expert)
            self.onnx_cache.get(self._export_key(info), module)
            del module
            self._weights_info = info
        expected = self._weights_info

        def load():
            module, info = load_backbone(self.settings.expert)
            if info.checksum != expected.checksum:
                raise BackboneWeightsError(
                    f"the backbone weights changed since they were first loaded ({expected.checksum[:19]} → "
                    f"{info.checksum[:19]}); restart to use the new weights"
                )
            return module

        return expected, load

    def warm_onnx_cache(self, *, prune: bool = False) -> Path:
        """Make sure the configured backbone's ONNX graph is in :attr:`onnx_cache` (exported once if not).

        The app calls this in a background thread at start-up and ``eagle warm-cache`` runs it in the container
        build, so a bank build does not spend 10–20 s exporting. Returns the cached graph's path.

        Args:
            prune: also remove the cached graphs of other keys (older torch, other weights or crops).

        Raises:
            BackboneWeightsError: the weights cannot be loaded (the message says how to provide them).
        """
        with self._backbone_lock:
            weights_info, load = self._weights()
            key = self._export_key(weights_info)
            path = self.onnx_cache.get(key, load)
            if prune:
                for removed in self.onnx_cache.prune(key):
                    log.info("removed cached ONNX graph %s (another key)", removed)
            return path

    def read_images(self, images: Sequence[Path | bytes | np.ndarray], names: Sequence[str] | None = None):
        """Decode reference images, collecting every failure before raising one :class:`ReferenceImagesError`."""
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
                continue
            decoded.append(array)
            kept_names.append(name)
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise ReferenceImagesError(
                f"{len(problems)} of {len(images)} reference images could not be read "
                f"(remove or replace them and build again):\n{listing}"
            )
        return decoded, kept_names

    def build_bank(
        self,
        images: Sequence[Path | bytes | np.ndarray],
        name: str,
        *,
        names: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> BankSummary:
        """Build (or rebuild) the bank ``name`` from normal reference images.

        Args:
            images: files, raw bytes or decoded RGB arrays of GOOD parts.
            name: bank name (validated: letters, digits, ``._-``).
            names: display names for bytes/arrays (defaults to file names).
            progress: ``progress(stage, fraction)`` with stages ``read``, ``embed``, ``coreset``, ``dbt``, ``save``.

        Raises:
            ReferenceImagesError: some images are unreadable (all are listed; nothing is built).
            BankNameError: the name is not allowed.
        """
        from expert.model import build_bank

        out_dir = self.banks.path(name)  # validates the name before any work
        if progress:
            progress("read", 0.0)
        decoded, kept_names = self.read_images(images, names)
        if progress:
            progress("read", 1.0)
        with self._backbone_lock:  # waits for a start-up warm-up that is exporting the graph right now
            weights_info, backbone = self._weights()
        build_bank(
            decoded,
            kept_names,
            settings=self.settings.expert,
            backbone=backbone,
            weights_info=weights_info,
            out_dir=out_dir,
            name=name,
            progress=progress,
            onnx_cache=self.onnx_cache,
        )
        self.banks.forget(name)
        return self.banks.summary(name)

    # ------------------------------------------------------------------ MLLM
    @property
    def mllm_enabled(self) -> bool:
        """Whether settings ask for the MLLM at all (False: expert-only mode)."""
        return self.settings.mllm.enabled

    def mllm_loaded(self) -> bool:
        """Whether the MLLM is loaded and ready."""
        return self._inspector is not None

    def mllm_status(self) -> str:
        """One line for people: what the LLM side is doing."""
        if not self.mllm_enabled:
            return "expert-only mode (MLLM disabled in settings)"
        if self._inspector is not None:
            return f"MLLM loaded: {self._inspector.loaded.model_id} ({self._inspector.loaded.quantization})"
        if self._mllm_error:
            return f"expert-only mode: {self._mllm_error}"
        return "MLLM not loaded yet (loads on the first inspection)"

    def load_mllm(self, progress: ProgressCallback | None = None) -> MLLMInspector:
        """Load the MLLM once (later calls return the same inspector).

        Raises:
            MLLMUnavailableError: disabled in settings, or loading failed (the message says how to fix it).
        """
        if not self.mllm_enabled:
            raise MLLMUnavailableError("the MLLM is disabled (EAGLE_MLLM__ENABLED=false): expert-only mode")
        with self._mllm_lock:
            if self._inspector is not None:
                return self._inspector
            from mllm.inspector import MLLMInspector
            from mllm.loading import MLLMLoadError, load_mllm

            try:
                report = (lambda fraction, message: progress(message, fraction)) if progress else None
                loaded = load_mllm(self.settings.mllm, progress=report, caas=self.settings.caas)
            except MLLMLoadError as err:
                self._mllm_error = str(err)
                raise MLLMUnavailableError(str(err)) from None
            self._inspector = MLLMInspector(loaded, self.settings)
            self._mllm_error = None
            return self._inspector

    def ready(self) -> dict[str, bool]:
        """Readiness facts for health checks: any bank saved, MLLM loaded (or not needed)."""
        return {
            "banks": bool(self.banks.list()),
            "mllm": self.mllm_loaded() or not self.mllm_enabled,
        }

    # ------------------------------------------------------------------ inspection
    def _view_limits(self) -> dict[str, int]:
        """What a query image is decoded and shown at: enough for the expert's resize and the MLLM's budget."""
        return {"min_short_side": self.settings.expert.resize, "min_pixels": self._mllm_pixel_budget()}

    def _mllm_pixel_budget(self) -> int:
        """Pixels per image the MLLM gets (the setting, else the preset's); 0 in expert-only mode."""
        if not self.mllm_enabled:
            return 0
        if self.settings.mllm.max_pixels is not None:
            return self.settings.mllm.max_pixels
        from mllm.presets import PresetError, get_preset

        try:
            return get_preset(self.settings.mllm.preset).max_pixels or 0
        except PresetError:
            return 0  # the load reports the unknown preset; the view falls back to its own bound

    def view(self, image: np.ndarray | DecodedImage) -> np.ndarray:
        """The bounded picture of a query (RGB uint8) that the MLLM sees and the boxes and heatmap are drawn on.

        At most :data:`~eagle.images.VIEW_MAX_SIDE` (1024) px on the longest side unless the expert's resize or
        the MLLM's pixel budget need more; an image already that small (or decoded reduced) is used as it is.
        """
        pixels = image.pixels if isinstance(image, DecodedImage) else image
        height, width = view_size(*pixels.shape[:2], **self._view_limits())
        return resize_rgb(pixels, height, width)

    def decode(self, image: np.ndarray | bytes | Path | DecodedImage, *, image_name: str | None = None) -> DecodedImage:
        """Decode one query image, reduced to its bounded view when larger (:func:`eagle.images.decode_image`).

        The result records the original size: the expert, the boxes and the record are in ORIGINAL pixels.
        Arrays pass through (after a shape check) at their own resolution.
        """
        if isinstance(image, DecodedImage):
            return image
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ImageError(
                    f"{image_name or 'image'}: expected an RGB uint8 array, got {image.shape} {image.dtype}"
                )
            return DecodedImage.of(image)
        limits = self._view_limits()
        return decode_image(
            image,
            max_pixels=self.settings.max_image_pixels,
            name=image_name,
            min_short_side=limits["min_short_side"],
            min_view_pixels=limits["min_pixels"],
        )

    def run_expert(self, image: np.ndarray | DecodedImage, bank: str) -> ExpertResult:
        """Score one decoded image with the bank's expert (the evaluation calls this once per image)."""
        if isinstance(image, DecodedImage):
            return self.banks.load(bank).score(image.pixels, original_size=image.original_size)
        return self.banks.load(bank).score(image)

    def inspect(
        self,
        image: np.ndarray | bytes | Path | DecodedImage,
        bank: str,
        options: InspectOptions | None = None,
        *,
        image_name: str | None = None,
    ) -> InspectionResult:
        """Inspect one image end to end: decode, expert, then the MLLM when enabled and asked for.

        Memory and time are bounded whatever the image's pixel count: large images are decoded reduced
        (:meth:`decode`) and everything after the expert's input works at the bounded :meth:`view`.
        """
        t0 = time.perf_counter()
        if image_name is None and isinstance(image, Path):
            image_name = image.name
        decoded = self.decode(image, image_name=image_name)
        sha = decoded.sha256 or _sha256_of(image)
        decode_ms = (time.perf_counter() - t0) * 1000
        expert = self.run_expert(decoded, bank)
        result = self.finish(decoded, expert, bank, options, image_name=image_name, image_sha256=sha)
        result.timings_ms = {"decode": decode_ms, **result.timings_ms}
        result.timings_ms["total"] = (time.perf_counter() - t0) * 1000
        return result

    def _caas_config(self, options: InspectOptions, expert: ExpertResult):
        from mllm.caas import CAASConfig, should_apply

        policy = options.caas or self.settings.caas.policy
        if not should_apply(policy, expert.score, expert.tau, expert.s_max):
            return None
        config = CAASConfig.from_settings(self.settings.caas)
        if options.alpha is not None:
            config = CAASConfig(**{**config.__dict__, "alpha": options.alpha})
        return config

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
    ) -> InspectionResult:
        """Turn an expert result into the full record, asking the MLLM when enabled and requested.

        The evaluation reuses one ``expert`` result for several prompt settings by calling this repeatedly.
        ``image`` is the original or the decoded (possibly reduced) copy the expert scored; the pictures are made
        at its bounded :meth:`view`, the boxes and sizes in the record are the ORIGINAL image's.
        ``template`` (RGB uint8) replaces the bank's retrieved template (the evaluation passes MMAD's own
        ``similar_templates`` image); ``template_name`` is then recorded as the result's ``template``.
        """
        from expert.boxes import draw_boxes, heatmap_overlay

        options = options or InspectOptions()
        scorer = self.banks.load(bank)
        timings = dict(expert.timings_ms)
        t0 = time.perf_counter()
        if template is None:
            template_img = self.banks.template_image(bank, expert.template_index)
            template_name = self.banks.reference_name(bank, expert.template_index)
        else:
            template_img = np.ascontiguousarray(template)
            template_name = template_name or "external template"
        # Pictures at the bounded view (never the original's pixel count; issue 11): boxes (ORIGINAL pixels) are
        # scaled onto it, the map is sampled onto it from the expert's crop-resolution map.
        view = self.view(image)
        view_h, view_w = view.shape[:2]
        orig_w, orig_h = expert.geometry.orig_w, expert.geometry.orig_h
        sx, sy = view_w / orig_w, view_h / orig_h
        view_boxes = [b.scaled(sx, sy, width=view_w, height=view_h) for b in expert.boxes]
        # The boxed view exists whenever the expert says anomalous (the prompt promises it); in the rare case that
        # every region was too small to box, it is the plain image.
        boxed = draw_boxes(view, view_boxes) if expert.anomalous else None
        view_map, view_valid = expert.map_at(view_h, view_w)
        images = InspectionImages(
            heatmap_overlay=heatmap_overlay(view, view_map, view_valid, vmin=0.0, vmax=expert.s_max),
            boxed=boxed,
            template=template_img,
        )
        del view_map, view_valid
        timings["render"] = (time.perf_counter() - t0) * 1000
        record = dict(
            image_name=image_name,
            image_sha256=image_sha256 or _sha256_of(image),
            image_size=(int(orig_w), int(orig_h)),
            bank=bank,
            bank_id=scorer.bank.meta.bank_id,
            score=float(expert.score),
            tau=float(expert.tau),
            s_max=float(expert.s_max),
            expert_decision="anomalous" if expert.anomalous else "normal",
            low_confidence=bool(expert.low_confidence),
            boxes=[BoxRecord(x0=b.x0, y0=b.y0, x1=b.x1, y1=b.y1, peak=float(b.peak)) for b in expert.boxes],
            inspected_region=expert.geometry.inspected_region(),
            template=template_name,
            images=images,
        )
        use_mllm = options.use_mllm and self.mllm_enabled
        if not use_mllm:
            return InspectionResult(
                **record, mode="expert-only", verdict="defect" if expert.anomalous else "no_defect", timings_ms=timings
            )

        inspector = self.load_mllm()
        setting = options.prompt_setting or self.settings.prompt.setting
        caas = self._caas_config(options, expert)
        views = _mllm_views(view, template_img, boxed, expert)
        answer: MLLMAnswer = inspector.ask(**views, setting=setting, caas=caas)
        timings.update({f"mllm_{k}": v for k, v in answer.timings_ms.items()})
        explanation = None
        explain = self.settings.prompt.explain if options.explain is None else options.explain
        if explain:
            t1 = time.perf_counter()
            explanation = "".join(inspector.explain_stream(**views, answer=answer, setting=setting)).strip()
            timings["mllm_explain"] = (time.perf_counter() - t1) * 1000
        if options.attention_map:
            t1 = time.perf_counter()
            images.attention_overlay = inspector.attention_overlay(**views, setting=setting)
            timings["mllm_attention"] = (time.perf_counter() - t1) * 1000
        verdict = {"yes": "defect", "no": "no_defect"}.get(answer.answer, "unknown")
        return InspectionResult(
            **record,
            mode="expert+mllm",
            prompt_setting=setting,
            caas_applied=answer.caas_applied,
            caas_alpha=caas.alpha if caas is not None else None,
            mllm_letter=answer.letter,
            mllm_answer=answer.answer,
            mllm_raw=answer.raw_text,
            explanation=explanation,
            verdict=verdict,
            model_id=inspector.loaded.model_id,
            timings_ms=timings,
        )

    def explain_stream(self, image: np.ndarray | DecodedImage, result: InspectionResult) -> Iterator[str]:
        """Stream the explanation turn for a finished MLLM inspection (the app shows it as it arrives).

        ``image`` is what was inspected (array or :class:`~eagle.images.DecodedImage`); the MLLM sees its
        :meth:`view`, as in the answer turn.
        """
        from PIL import Image

        from mllm.inspector import MLLMAnswer

        if result.mode != "expert+mllm" or result.images is None:
            raise MLLMUnavailableError("this result has no MLLM answer to explain")
        inspector = self.load_mllm()
        images = result.images
        answer = MLLMAnswer(
            letter=result.mllm_letter,
            answer=result.mllm_answer or "unknown",
            raw_text=result.mllm_raw or "",
            caas_applied=result.caas_applied,
            n_input_tokens=0,
            n_new_tokens=0,
        )
        yield from inspector.explain_stream(
            query=Image.fromarray(self.view(image)),
            template=Image.fromarray(images.template),
            boxed=Image.fromarray(images.boxed) if images.boxed is not None else None,
            expert_anomalous=result.expert_decision == "anomalous",
            answer=answer,
            setting=result.prompt_setting or self.settings.prompt.setting,
        )
