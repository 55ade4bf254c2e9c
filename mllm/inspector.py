"""Ask a loaded multimodal LLM the EAGLE question, optionally with CAAS, and stream an explanation.

:class:`MLLMInspector` owns no policy: the caller decides the prompt setting and whether CAAS is active (the gate
``tau <= s_img <= s_max`` is :func:`mllm.caas.should_apply`); the inspector builds the prompt, runs greedy
decoding under a lock (one model, many request threads), parses the letter and reports timings.

Example:
    >>> inspector = MLLMInspector(load_mllm(settings.mllm), settings)  # doctest: +SKIP
    >>> answer = inspector.ask(query=q, template=t, boxed=b, expert_anomalous=True, setting="full")  # doctest: +SKIP
    >>> answer.answer, answer.letter  # doctest: +SKIP
    ('yes', 'A')
    >>> for chunk in inspector.explain_stream(query=q, template=t, boxed=b, expert_anomalous=True,
    ...                                       answer=answer, setting="full"):  # doctest: +SKIP
    ...     print(chunk, end="")
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from mllm.answers import Answer, AnswerSource, ParsedAnswer, parse_answer_reference, parse_with
from mllm.choices import MultipleChoice, option_answer, parse_choice
from mllm.config import PromptSettings
from mllm.errors import MLLMError
from mllm.prompts import (
    Setting,
    build_explanation_messages,
    build_prompt,
    image_token_counts,
    prompt_texts,
    render_inputs,
)

if TYPE_CHECKING:
    from mllm.caas import CAASConfig
    from mllm.config import InspectorSettings
    from mllm.loading import LoadedMLLM

__all__ = ["MLLMAnswer", "MLLMInspector", "MLLMInferenceError"]

# Longest wait for the next streamed chunk before the stream is declared stuck (seconds; CPU hosts are slow).
_STREAM_TIMEOUT_S = 600.0


class MLLMInferenceError(MLLMError, RuntimeError):
    """Generation failed (e.g. out of memory); one-line message."""

    code = "mllm_inference_failed"


@dataclass
class MLLMAnswer:
    """The model's answer to the defect question.

    Attributes:
        letter: Option letter parsed (``"A"``/``"B"``) or ``None``.
        answer: ``yes`` (defect), ``no`` or ``unknown`` (see :mod:`mllm.answers`).
        raw_text: The decoded reply, special tokens skipped.
        caas_applied: Whether CAAS was active during generation.
        n_input_tokens: Prompt length in tokens (visual tokens included).
        n_new_tokens: Tokens generated.
        timings_ms: ``prepare`` (prompt + preprocessing), ``generate`` and ``total`` wall times in ms.
        setting: The prompt setting used.
        boxed_included: Whether the boxed query image was sent.
        image_tokens: Visual tokens per image sent, in prompt order ((template), query, (boxed)); equal counts mean
            every image reached the model at the same pixel budget.
    """

    letter: str | None
    answer: Answer
    raw_text: str
    caas_applied: bool
    n_input_tokens: int
    n_new_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    setting: Setting = "full"
    boxed_included: bool = False
    image_tokens: list[int] = field(default_factory=list)


def _parse_reply(raw: str, question: MultipleChoice | None, parser: str) -> ParsedAnswer:
    """Read a reply with the configured parser (``settings.prompt.answer_parser``).

    The yes/no question: :func:`mllm.answers.parse_with`. A data set's own question: the ``reference`` parser reads
    it against the item's options (:func:`mllm.answers.parse_answer_reference`); ``eagle`` and ``keyword`` use
    :func:`mllm.choices.parse_choice` (letter, option text, then keywords).
    """
    if question is None:
        return parse_with(parser, raw)
    if parser == "reference":
        found = parse_answer_reference(raw, dict(question.options))
        return ParsedAnswer(found.letter, option_answer(question, found.letter), found.source)
    return _parse_choice_answer(raw, question)


def _parse_choice_answer(raw: str, question: MultipleChoice) -> ParsedAnswer:
    """The reply to a data set's own question: its option letter, and yes/no from that option's text."""
    choice = parse_choice(raw, question)
    source: AnswerSource = "letter" if choice.source == "letter" else ("keyword" if choice.letter else "none")
    return ParsedAnswer(choice.letter, option_answer(question, choice.letter), source)


class _Cancelled(StoppingCriteria):
    """Stops generation once ``event`` is set (a stream consumer went away); counts the tokens generated."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.tokens = 0  # generate() asks once per new token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.tokens += 1
        stop = torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, stop)  # transformers' annotation; the tensor is a bool tensor


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


class MLLMInspector:
    """Runs the EAGLE question (and the optional explanation turn) on one loaded model, one call at a time.

    Args:
        loaded: The model from :func:`mllm.loading.load_mllm`.
        settings: The whole settings tree (``mllm.max_new_tokens``, ``mllm.explanation_max_new_tokens``).
    """

    def __init__(self, loaded: LoadedMLLM, settings: InspectorSettings) -> None:
        self.loaded = loaded
        self.settings = settings
        self._lock = threading.Lock()

    @property
    def prompt_settings(self) -> PromptSettings:
        """The prompt group of the settings (instruction, answer parser); defaults when the settings have none."""
        return getattr(self.settings, "prompt", None) or PromptSettings()

    def _prompt_options(self) -> dict[str, Any]:
        """``build_prompt`` keywords fixed by the settings and the model: the instruction and the family's texts."""
        preset = getattr(self.loaded, "preset", None)
        return {
            "instruction": self.prompt_settings.instruction,
            "texts": prompt_texts(getattr(preset, "family", None)),
        }

    def _generation_config(self, max_new_tokens: int) -> GenerationConfig:
        """Greedy decoding with the model's own end-of-turn / padding ids (sampling settings of the hub ignored)."""
        own = self.loaded.model.generation_config
        eos = own.eos_token_id if own.eos_token_id is not None else self.loaded.tokenizer.eos_token_id
        pad = own.pad_token_id if own.pad_token_id is not None else self.loaded.tokenizer.pad_token_id
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
        )

    def ask(
        self,
        *,
        query: Image.Image,
        template: Image.Image | None,
        boxed: Image.Image | None,
        expert_anomalous: bool | None,
        setting: Setting,
        caas: CAASConfig | None = None,
        question: MultipleChoice | None = None,
    ) -> MLLMAnswer:
        """Ask "Is there any defect in the object?" with the EAGLE prompt for ``setting``.

        Args:
            query: The image under inspection.
            template: The 1-shot+ normal template (``None``: no template block).
            boxed: The query with the expert's red boxes (sent only in ``visual``/``full`` when anomalous).
            expert_anomalous: The expert's verdict; ``None`` allowed for ``baseline``.
            setting: ``baseline``, ``visual``, ``textual`` or ``full``.
            caas: When given, CAAS is active for this call (the caller applied the gate); ``None``: off.
            question: A data set's own multiple-choice question (MMAD) asked instead of the yes/no one; the reply
                is parsed against its options (:func:`mllm.choices.parse_choice`) and ``answer`` is the chosen
                option's text read as yes/no (``unknown`` for other options).

        Returns:
            The parsed :class:`MLLMAnswer` with timings.

        Raises:
            mllm.prompts.PromptError: inputs the setting cannot use.
            mllm.caas.CAASError: a CAAS configuration the model cannot take (e.g. layers beyond its depth).
            MLLMInferenceError: generation ran out of memory.
        """
        start = time.perf_counter()
        prompt = build_prompt(
            query=query,
            template=template,
            boxed=boxed,
            expert_anomalous=expert_anomalous,
            setting=setting,
            question=question,
            **self._prompt_options(),
        )
        with self._lock:
            inputs = render_inputs(self.loaded, prompt.messages, prompt.images)
            prepared = time.perf_counter()
            n_input = int(inputs["input_ids"].shape[1])
            context = nullcontext() if caas is None else self._caas_context(caas, inputs["input_ids"], prompt)
            try:
                with context:
                    output = self.loaded.model.generate(
                        **inputs, generation_config=self._generation_config(self.settings.mllm.max_new_tokens)
                    )
            except torch.OutOfMemoryError:
                raise MLLMInferenceError(
                    f"out of memory generating with a {n_input}-token prompt; lower EAGLE_MLLM__MAX_PIXELS"
                ) from None
            generated_ms = _ms(prepared)
        new_tokens = output[0, n_input:]
        raw = self.loaded.tokenizer.decode(new_tokens, skip_special_tokens=True)
        parsed = _parse_reply(raw, question, self.prompt_settings.answer_parser)
        return MLLMAnswer(
            letter=parsed.letter,
            answer=parsed.answer,
            raw_text=raw,
            caas_applied=caas is not None,
            n_input_tokens=n_input,
            n_new_tokens=int(new_tokens.numel()),
            timings_ms={
                "prepare": round((prepared - start) * 1000.0, 3),
                "generate": generated_ms,
                "total": _ms(start),
            },
            setting=setting,
            boxed_included=prompt.boxed_included,
            image_tokens=image_token_counts(inputs["input_ids"], self.loaded.image_token_id),
        )

    def _caas_context(self, caas: CAASConfig, input_ids: torch.Tensor, prompt: Any) -> Any:
        """Engineer E's CAAS context manager over this prompt's visual tokens (imported lazily: torch-only path)."""
        from mllm.caas import apply_caas, visual_token_mask

        mask = visual_token_mask(
            input_ids, self.loaded.image_token_id, tokens=caas.tokens, query_image_index=prompt.query_index
        )
        return apply_caas(self.loaded.model, self.loaded.decoder_layers, caas, mask)

    def explain_stream(
        self,
        *,
        query: Image.Image,
        template: Image.Image | None,
        boxed: Image.Image | None,
        expert_anomalous: bool | None,
        answer: MLLMAnswer,
        setting: Setting,
        stats: dict[str, int] | None = None,
    ) -> Iterator[str]:
        """Stream a 2–3 sentence explanation of ``answer`` as a second chat turn.

        For a ``yes`` the model is asked for the defect's type, location and likely cause; for a ``no``, what it
        compared and why the object looks normal; for ``unknown``, the question is asked openly. Greedy, at most
        ``settings.mllm.explanation_max_new_tokens`` tokens, without CAAS. Text arrives in chunks from
        transformers' ``TextIteratorStreamer`` while a background thread generates; the model stays locked until
        the stream ends. Closing the iterator early stops generation at the next token.

        Args:
            query: The image under inspection (as given to :meth:`ask`).
            template: The normal template image or ``None`` (as given to :meth:`ask`).
            boxed: The boxed query image or ``None`` (as given to :meth:`ask`).
            expert_anomalous: The expert's verdict (as given to :meth:`ask`).
            answer: The first-turn answer (its raw text becomes the assistant turn).
            setting: The prompt setting (as given to :meth:`ask`).
            stats: When given, ``n_input_tokens`` and ``n_new_tokens`` (tokens generated) are stored in it once
                the stream ends (for tokens-per-second figures).

        Yields:
            Decoded text chunks; their concatenation is the whole explanation.

        Raises:
            MLLMInferenceError: generation failed in the background thread.
        """
        prompt = build_prompt(
            query=query,
            template=template,
            boxed=boxed,
            expert_anomalous=expert_anomalous,
            setting=setting,
            **self._prompt_options(),
        )
        messages = build_explanation_messages(prompt, answer.raw_text, answer.answer)
        self._lock.acquire()
        cancel = threading.Event()
        failure: list[BaseException] = []
        worker: threading.Thread | None = None
        try:
            inputs = render_inputs(self.loaded, messages, prompt.images)
            streamer = TextIteratorStreamer(
                self.loaded.tokenizer, skip_prompt=True, timeout=_STREAM_TIMEOUT_S, skip_special_tokens=True
            )
            config = self._generation_config(self.settings.mllm.explanation_max_new_tokens)
            counter = _Cancelled(cancel)

            def run() -> None:
                try:
                    self.loaded.model.generate(
                        **inputs,
                        generation_config=config,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([counter]),
                    )
                except BaseException as err:  # noqa: BLE001 - handed to the consumer thread below
                    failure.append(err)
                    streamer.end()

            worker = threading.Thread(target=run, name="mllm-explain", daemon=True)
            worker.start()
            for chunk in streamer:
                if chunk:
                    yield chunk
            worker.join()
            if stats is not None:
                stats.update(n_input_tokens=int(inputs["input_ids"].shape[1]), n_new_tokens=counter.tokens)
            if failure:
                error = failure[0]
                raise MLLMInferenceError(f"explanation failed: {type(error).__name__}: {error}".splitlines()[0])
        finally:
            cancel.set()
            if worker is not None:
                worker.join()
            self._lock.release()

    def explain(self, **kwargs: Any) -> str:
        """The whole explanation as one string (same arguments as :meth:`explain_stream`)."""
        return "".join(self.explain_stream(**kwargs))

    def attention_overlay(
        self,
        *,
        query: Image.Image,
        template: Image.Image | None,
        boxed: Image.Image | None,
        expert_anomalous: bool | None,
        setting: Setting,
        layers: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Where the model looked: the answering position's attention to the query image, over the image.

        The attention is read from ``layers`` (default: the CAAS layer range of the settings, clipped to the
        model's depth) without switching the model to eager attention, averaged over those layers and drawn
        as a heat map on the ORIGINAL query image (the paper's Fig. 1/9).

        Returns:
            RGB uint8 array of the query image's size.
        """
        from mllm.attention_readout import attention_overlay, image_attention_maps, processor_view_box

        depth = len(self.loaded.decoder_layers)
        if layers is None:
            caas = self.settings.caas
            layers = [i for i in range(caas.layer_start, caas.layer_end + 1) if i < depth] or [depth - 1]
        prompt = build_prompt(
            query=query,
            template=template,
            boxed=boxed,
            expert_anomalous=expert_anomalous,
            setting=setting,
            **self._prompt_options(),
        )
        with self._lock:
            inputs = render_inputs(self.loaded, prompt.messages, prompt.images)
            maps = image_attention_maps(
                self.loaded.model,
                self.loaded.decoder_layers,
                inputs,
                self.loaded.image_token_id,
                layers=list(layers),
                image_index=prompt.query_index,
            )
        grid = np.mean(np.stack(list(maps.values())), axis=0)
        view = processor_view_box(getattr(self.loaded.processor, "image_processor", None), query.size)
        return attention_overlay(query, grid, view_box=view)
