r"""Evaluation profiles: one switch for the choices where the paper's reading and the reference code differ.

``eagle eval --profile paper`` (the default) runs what ``docs/fidelity.md`` calls the paper's reading;
``--profile reference`` runs the reference code's published choices where they differ from it:

===============  ==========================================  ==================================================
choice           ``paper``                                   ``reference``
===============  ==========================================  ==================================================
template image   sent (1-shot+, §4.1)                        none (``qwen.yaml``: ``few_shot_model`` 0; the
                                                             template block is built and dropped)
instruction      the paper's (``instruction_P``)             ``instruction_sample``, what ``QwenQuery.get_query``
                                                             passes (:data:`mllm.prompts.INSTRUCTION_REFERENCE`)
box merge        ours (:func:`expert.boxes.merge_boxes`)     one pass, IoU > 0.3 or centres < 20 px
                                                             (:func:`expert.boxes.merge_boxes_reference`)
answer parser    ours (:func:`mllm.answers.parse_answer`)    last ``\b[A-E]\b``, else the closest option text
                                                             (:func:`mllm.answers.parse_answer_reference`)
===============  ==========================================  ==================================================

``--parser eagle|reference|keyword`` replaces the profile's parser (``keyword``: the paper's text read literally,
:func:`mllm.answers.parse_answer_keyword`). A profile is applied to the settings the pipeline is built with
(``EAGLE_PROMPT__TEMPLATE``, ``EAGLE_PROMPT__INSTRUCTION``, ``EAGLE_EXPERT__BOX_MERGE``,
``EAGLE_PROMPT__ANSWER_PARSER``), so every executor, the Ray one included, runs it; ``run.json`` records it.

Example:
    >>> profile = resolve_profile("reference")
    >>> profile.template, profile.instruction, profile.box_merge, profile.answer_parser
    (False, 'reference', 'reference', 'reference')
    >>> resolve_profile("paper", parser="keyword").label
    'paper+parser=keyword'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from mllm.config import ANSWER_PARSERS

if TYPE_CHECKING:
    from eagle.settings import Settings

__all__ = ["DEFAULT_PROFILE", "PROFILES", "EvalProfile", "ProfileError", "resolve_profile"]


class ProfileError(ValueError):
    """An unknown profile or parser name."""


@dataclass(frozen=True)
class EvalProfile:
    """The choices one profile makes.

    Attributes:
        name: ``paper`` or ``reference``.
        template: Whether the 1-shot+ normal template is sent.
        instruction: ``paper`` or ``reference`` (:data:`mllm.prompts.INSTRUCTIONS`).
        box_merge: ``eagle`` or ``reference`` (:data:`expert.boxes.MERGE_RULES`).
        answer_parser: ``eagle``, ``reference`` or ``keyword`` (:data:`mllm.config.ANSWER_PARSERS`).
        parser_overridden: ``--parser`` replaced the profile's own parser.
    """

    name: str
    template: bool
    instruction: str
    box_merge: str
    answer_parser: str
    parser_overridden: bool = False

    @property
    def label(self) -> str:
        """``paper``, ``reference``, or e.g. ``paper+parser=keyword`` when the parser was replaced."""
        return f"{self.name}+parser={self.answer_parser}" if self.parser_overridden else self.name

    def record(self) -> dict[str, Any]:
        """The profile as ``run.json`` stores it."""
        return {"label": self.label, **asdict(self)}

    def apply(self, settings: Settings) -> Settings:
        """A copy of ``settings`` with this profile's choices (the original is not changed)."""
        out = settings.model_copy(deep=True)
        out.prompt.template = self.template
        out.prompt.instruction = self.instruction
        out.prompt.answer_parser = self.answer_parser
        out.expert.box_merge = self.box_merge
        return out


PROFILES: dict[str, EvalProfile] = {
    "paper": EvalProfile("paper", template=True, instruction="paper", box_merge="eagle", answer_parser="eagle"),
    "reference": EvalProfile(
        "reference", template=False, instruction="reference", box_merge="reference", answer_parser="reference"
    ),
}
DEFAULT_PROFILE = "paper"


def resolve_profile(name: str = DEFAULT_PROFILE, *, parser: str | None = None) -> EvalProfile:
    """The named profile, its parser replaced by ``parser`` when given.

    Raises:
        ProfileError: an unknown profile or parser.
    """
    if name not in PROFILES:
        raise ProfileError(f"unknown --profile {name!r}; expected one of {', '.join(PROFILES)}")
    profile = PROFILES[name]
    if parser is None:
        return profile
    if parser not in ANSWER_PARSERS:
        raise ProfileError(f"unknown --parser {parser!r}; expected one of {', '.join(ANSWER_PARSERS)}")
    return replace(profile, answer_parser=parser, parser_overridden=parser != profile.answer_parser)
