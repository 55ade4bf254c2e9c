"""Inspection: one image through the bank's expert and, when asked for, the multimodal LLM.

:class:`Inspector` decodes a query (bounded in memory whatever its pixel count), scores it with the bank's
expert, renders the pictures at the bounded view and asks the MLLM (CAAS applied when the expert is unsure). A
line declared before its bank exists (:mod:`eagle.lines`) is asked of the MLLM alone, 0-shot
(:meth:`Inspector.inspect_mllm_only`).
It takes where the scorers come from (:class:`ScorerSource`, the bank store) and the MLLM's lifecycle, so tests
can give it a tiny scorer or model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from eagle import results
from eagle.images import DecodedImage, ImageError, decode_image, resize_rgb, view_size
from eagle.images import image_sha256 as sha256_of_image
from eagle.lines import BankEmptyError
from eagle.models import MLLMModel, MLLMUnavailableError
from eagle.records import InspectionResult, InspectOptions
from eagle.settings import Settings

if TYPE_CHECKING:
    from expert.scorer import ExpertResult, ExpertScorer
    from mllm.choices import MultipleChoice
    from mllm.inspector import MLLMAnswer


MLLM_ONLY_SETTING = "baseline"
"""The prompt of a declared line's MLLM-only inspection: no expert hints (and no template block, no CAAS)."""


class ScorerSource(Protocol):
    """Where an inspection gets a bank's expert and its templates (:class:`~eagle.banks.BankStore` is one)."""

    def load(self, name: str) -> Any:
        """The bank's current scorer: ``score``, ``reference_name`` and ``bank.meta.bank_id``."""
        ...

    def template_image(self, name: str, index: int, *, scorer: Any = None) -> np.ndarray:
        """The stored copy of reference ``index`` of the bank that ``scorer`` serves (RGB uint8)."""
        ...


class Inspector:
    """Inspects images against the banks of ``banks``, asking ``mllm`` when it is enabled and asked for.

    Args:
        settings: the settings tree (expert resize and boxes, prompt, CAAS, image pixel limit).
        banks: where each bank's scorer and templates come from.
        mllm: the multimodal LLM's lifecycle (loaded on the first inspection that asks for it).

    The expert part runs concurrently (onnxruntime and faiss are thread-safe for inference).
    """

    def __init__(self, settings: Settings, banks: ScorerSource, mllm: MLLMModel) -> None:
        self.settings = settings
        self.banks = banks
        self.mllm = mllm

    def view_limits(self) -> dict[str, int]:
        """What a query image is decoded and shown at: enough for the expert's resize and the MLLM's budget."""
        return {"min_short_side": self.settings.expert.resize, "min_pixels": self._mllm_pixel_budget()}

    def _mllm_pixel_budget(self) -> int:
        """Pixels per image the MLLM gets (the setting, else the preset's); 0 in expert-only mode."""
        if not self.mllm.enabled:
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
        height, width = view_size(*pixels.shape[:2], **self.view_limits())
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
        limits = self.view_limits()
        return decode_image(
            image,
            max_pixels=self.settings.max_image_pixels,
            name=image_name,
            min_short_side=limits["min_short_side"],
            min_view_pixels=limits["min_pixels"],
        )

    def run_expert(self, image: np.ndarray | DecodedImage, bank: str) -> ExpertResult:
        """Score one decoded image with the bank's expert (the evaluation calls this once per image)."""
        return _score(self.banks.load(bank), image)

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
        sha = sha256_of_image(decoded)
        decode_ms = (time.perf_counter() - t0) * 1000
        # One scorer for the whole request: a new bank version made current meanwhile (teach, rollback) is used
        # from the next request on, never half-way through this one (score, template and bank id agree).
        try:
            scorer = self.banks.load(bank)
        except BankEmptyError:  # a line declared before its bank exists: the MLLM alone, 0-shot, or refused
            result = self.inspect_mllm_only(decoded, bank, options, image_name=image_name, image_sha256=sha)
            result.timings_ms = {"decode": decode_ms, **result.timings_ms}
            result.timings_ms["total"] = (time.perf_counter() - t0) * 1000
            return result
        expert = _score(scorer, decoded)
        result = self.finish(decoded, expert, bank, options, image_name=image_name, image_sha256=sha, scorer=scorer)
        result.timings_ms = {"decode": decode_ms, **result.timings_ms}
        result.timings_ms["total"] = (time.perf_counter() - t0) * 1000
        return result

    def inspect_many(
        self,
        images: Sequence[tuple[np.ndarray | bytes | Path | DecodedImage, str | None]],
        bank: str,
        options: InspectOptions | None = None,
        *,
        batch_size: int = 4,
    ) -> list[InspectionResult | Exception]:
        """Inspect several images, the expert embedding up to ``batch_size`` of them in one forward pass.

        Each result equals :meth:`inspect`'s for that image (up to float rounding of the batched embedding);
        a failure of one image (undecodable, too odd to score, an MLLM error) is returned in its place and does
        not stop the others. A bank that cannot be loaded fails every image. Timings: ``decode`` and ``total``
        are the image's own; ``embed`` is its batch's embedding time divided by the batch's size.

        Args:
            images: ``(image, image_name)`` pairs, as :meth:`inspect` takes them.
            bank: the bank's name.
            options: as :meth:`inspect`'s, for every image.
            batch_size: images per forward pass (1 to ``expert.scorer.MAX_SCORE_BATCH``).
        """
        t0 = time.perf_counter()
        outcomes: list[InspectionResult | Exception | None] = [None] * len(images)
        decoded: list[tuple[int, DecodedImage, str, float]] = []
        for index, (image, name) in enumerate(images):
            began = time.perf_counter()
            try:
                picture = self.decode(image, image_name=name)
                decoded.append((index, picture, sha256_of_image(picture), (time.perf_counter() - began) * 1000))
            except Exception as exc:  # noqa: BLE001 - returned in the image's place
                outcomes[index] = exc
        if decoded:
            try:
                scorer = self.banks.load(bank)  # one scorer for the whole batch, as for one request
            except BankEmptyError:  # a declared line has no expert to batch: each image as alone (MLLM, 0-shot)
                return [self._inspect_or_error(image, bank, options, name) for image, name in images]
            except Exception as exc:  # noqa: BLE001 - the bank fails every image alike
                for index, *_ in decoded:
                    outcomes[index] = exc
                decoded = []
        experts = _score_batch(scorer, [picture for _, picture, _, _ in decoded], batch_size) if decoded else []
        for (index, picture, sha, decode_ms), expert in zip(decoded, experts, strict=True):
            if isinstance(expert, Exception):
                outcomes[index] = expert
                continue
            name = images[index][1]
            try:
                result = self.finish(picture, expert, bank, options, image_name=name, image_sha256=sha, scorer=scorer)
            except Exception as exc:  # noqa: BLE001 - returned in the image's place
                outcomes[index] = exc
                continue
            result.timings_ms = {"decode": decode_ms, **result.timings_ms}
            result.timings_ms["total"] = (time.perf_counter() - t0) * 1000
            outcomes[index] = result
        return [outcome for outcome in outcomes if outcome is not None]

    def _inspect_or_error(
        self,
        image: np.ndarray | bytes | Path | DecodedImage,
        bank: str,
        options: InspectOptions | None,
        name: str | None,
    ) -> InspectionResult | Exception:
        try:
            return self.inspect(image, bank, options, image_name=name)
        except Exception as exc:  # noqa: BLE001 - returned in the image's place
            return exc

    def inspect_mllm_only(
        self,
        image: DecodedImage,
        bank: str,
        options: InspectOptions | None = None,
        *,
        image_name: str | None = None,
        image_sha256: str | None = None,
    ) -> InspectionResult:
        """Inspect against a line declared before its bank exists: the MLLM alone, 0-shot.

        No template, no expert hints (the ``baseline`` prompt without its template block), no CAAS: not the
        paper's 1-shot+ baseline row, which shows a template. The record's ``mode`` is ``mllm-only-0shot``.

        Raises:
            BankEmptyError: the MLLM is disabled in settings or not asked for (``use_mllm`` off): only a bank can
                inspect then, so the message says to build one first.
            MLLMUnavailableError: the MLLM could not be loaded.
        """
        options = options or InspectOptions()
        if not self.mllm.enabled or not options.use_mllm:
            why = "the MLLM is disabled (EAGLE_MLLM__ENABLED=false)" if not self.mllm.enabled else "use_mllm is off"
            raise BankEmptyError(
                f"line {bank!r} has no bank yet and {why}: build a bank first (confirm good parts and build it in the "
                f"app, `eagle build-bank --name {bank} IMAGES...` or POST /v1/banks)"
            )
        from PIL import Image

        inspector = self.mllm.load()
        view = self.view(image)
        views: dict[str, Any] = {
            "query": Image.fromarray(view),
            "template": None,
            "boxed": None,
            "expert_anomalous": None,
        }
        answer: MLLMAnswer = inspector.ask(**views, setting=MLLM_ONLY_SETTING, caas=None)
        timings = {f"mllm_{k}": v for k, v in answer.timings_ms.items()}
        explanation = None
        explain = self.settings.prompt.explain if options.explain is None else options.explain
        if explain:
            t1 = time.perf_counter()
            explanation = "".join(inspector.explain_stream(**views, answer=answer, setting=MLLM_ONLY_SETTING)).strip()
            timings["mllm_explain"] = (time.perf_counter() - t1) * 1000
        result = results.mllm_only_result(
            image,
            view,
            answer,
            bank=bank,
            image_name=image_name,
            image_sha256=image_sha256,
            explanation=explanation,
            model_id=inspector.loaded.model_id,
            timings=timings,
        )
        if options.attention_map and result.images is not None:
            t1 = time.perf_counter()
            result.images.attention_overlay = inspector.attention_overlay(**views, setting=MLLM_ONLY_SETTING)
            result.timings_ms["mllm_attention"] = (time.perf_counter() - t1) * 1000
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
        scorer: ExpertScorer | None = None,
        question: MultipleChoice | None = None,
    ) -> InspectionResult:
        """Turn an expert result into the full record, asking the MLLM when enabled and requested.

        The evaluation reuses one ``expert`` result for several prompt settings by calling this repeatedly.
        ``image`` is the original or the decoded (possibly reduced) copy the expert scored; the pictures are made
        at its bounded :meth:`view`, the boxes and sizes in the record are the ORIGINAL image's.
        ``template`` (RGB uint8) replaces the bank's retrieved template (the evaluation passes MMAD's own
        ``similar_templates`` image); ``template_name`` is then recorded as the result's ``template``.
        ``scorer`` is the bank's expert that produced ``expert`` (default: the bank's current one).
        ``question`` (the evaluation's MMAD items) replaces the yes/no question with a data set's own
        multiple-choice question; ``mllm_letter`` is then one of its letters and ``mllm_answer`` the chosen option's
        text read as yes/no (``unknown`` when it is neither).
        """
        options = options or InspectOptions()
        scorer = scorer or self.banks.load(bank)
        timings = dict(expert.timings_ms)
        t0 = time.perf_counter()
        if template is None:
            template_img = self.banks.template_image(bank, expert.template_index, scorer=scorer)
            template_name = scorer.reference_name(expert.template_index)
        else:
            template_img = np.ascontiguousarray(template)
            template_name = template_name or "external template"
        view = self.view(image)
        use_mllm = options.use_mllm and self.mllm.enabled
        setting = options.prompt_setting or self.settings.prompt.setting
        drawn, images = results.pictures(
            view, expert, template_img, boxes_always=use_mllm and setting == "visual_all", settings=self.settings.expert
        )
        timings["render"] = (time.perf_counter() - t0) * 1000
        record = results.expert_record(
            image,
            expert,
            bank=bank,
            bank_id=scorer.bank.meta.bank_id,
            drawn=drawn,
            images=images,
            template_name=template_name,
            image_name=image_name,
            image_sha256=image_sha256,
        )
        if not use_mllm:
            return results.expert_only_result(record, expert, timings)

        inspector = self.mllm.load()
        caas = self._caas_config(options, expert)
        views = _mllm_views(view, template_img, images.boxed, expert)
        if not self.settings.prompt.template:  # 0-shot: the reference's published run sends no template
            views["template"] = None
        answer: MLLMAnswer = inspector.ask(**views, setting=setting, caas=caas, question=question)
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
        return results.mllm_result(
            record,
            answer,
            setting=setting,
            caas=caas,
            explanation=explanation,
            model_id=inspector.loaded.model_id,
            timings=timings,
        )

    def explain_stream(self, image: np.ndarray | DecodedImage, result: InspectionResult) -> Iterator[str]:
        """Stream the explanation turn for a finished MLLM inspection (the app shows it as it arrives).

        ``image`` is what was inspected (array or :class:`~eagle.images.DecodedImage`); the MLLM sees its
        :meth:`view`, as in the answer turn.
        """
        from PIL import Image

        from mllm.inspector import MLLMAnswer

        if result.mode == "expert-only" or result.images is None:
            raise MLLMUnavailableError("this result has no MLLM answer to explain")
        inspector = self.mllm.load()
        images = result.images
        answer = MLLMAnswer(
            letter=result.mllm_letter,
            answer=result.mllm_answer or "unknown",
            raw_text=result.mllm_raw or "",
            caas_applied=result.caas_applied,
            n_input_tokens=0,
            n_new_tokens=0,
        )
        # the same views as the answer turn: no template when the prompt sends none (0-shot, the reference profile)
        template = (
            Image.fromarray(images.template) if self.settings.prompt.template and images.template is not None else None
        )
        expert_anomalous = None if result.expert_decision is None else result.expert_decision == "anomalous"
        yield from inspector.explain_stream(
            query=Image.fromarray(self.view(image)),
            template=template,
            boxed=Image.fromarray(images.boxed) if images.boxed is not None else None,
            expert_anomalous=expert_anomalous,
            answer=answer,
            setting=result.prompt_setting or self.settings.prompt.setting,
        )


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


def _score(scorer: ExpertScorer, image: np.ndarray | DecodedImage) -> ExpertResult:
    """Score a query with ``scorer``; a reduced decode is scored with its ORIGINAL geometry."""
    if isinstance(image, DecodedImage):
        return scorer.score(image.pixels, original_size=image.original_size)
    return scorer.score(image)


def _score_batch(
    scorer: ExpertScorer, images: Sequence[DecodedImage], batch_size: int
) -> list[ExpertResult | Exception]:
    """Score decoded queries in batches; when a batch fails, its images are scored alone (one bad image fails alone)."""
    try:
        return list(
            scorer.score_many(
                [image.pixels for image in images],
                batch_size=batch_size,
                original_sizes=[image.original_size for image in images],
            )
        )
    except Exception:  # noqa: BLE001 - find which image fails, each on its own
        results: list[ExpertResult | Exception] = []
        for image in images:
            try:
                results.append(_score(scorer, image))
            except Exception as exc:  # noqa: BLE001 - returned in the image's place
                results.append(exc)
        return results
