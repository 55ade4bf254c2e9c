"""Turn the MLLM's reply into ``yes`` / ``no`` / ``unknown`` — never a guess.

The question is "Is there any defect in the object?" with options ``A. Yes`` / ``B. No``. Rules, in order:

1. **Echo removal.** A verbatim echo of the question, or of the option list ("A. Yes" followed by "B. No"), is
   removed first: an echo is not an answer.
2. **Letter.** The LAST standalone option letter wins (``A`` → yes, ``B`` → no). Standalone: upper-case ``A``/``B``
   not touching another letter or digit — ``"A"``, ``"(A)"``, ``"A."``, ``"Answer: B"``, ``"**B**"``,
   ``"The answer is B"``, ``"A or B? B"`` (→ B). Not letters: ``"AB"``, ``"Apple"``, ``"B2"``, and the article
   "A" opening a sentence before a lower-case word (``"A scratch is visible"``). Lower-case ``a``/``b`` count
   only when they are the whole reply (``"a"``, ``"(b)"``, ``"answer: b"``): inside prose they are words.
   A reply made of nothing but both letters (``"A/B"``, ``"A or B"``, ``"A, B"``) is ``unknown``. A letter beats
   any keyword (``"A. No"`` → yes: the letter is what was asked for). ``C``/``D`` are not options and are ignored.
3. **Keywords** (only when no letter): a hedge (``cannot tell``, ``not sure``, ``unclear``, ``uncertain``,
   ``unable to``, ``impossible to``, ``hard to say``) → ``unknown``. Otherwise phrases are matched longest
   first, each span used once:

   - negated defect words (and lists of them) → no: ``no defects``, ``no visible anomalies``, ``not defective``,
     ``no scratches or cracks``,
     ``does not have any defect``, ``without any defects``, ``defect-free``, ``free of defects``;
   - negated normal → yes: ``not normal``, ``isn't normal``;
   - defect words → yes: ``yes``, ``abnormal…``, ``defect…``, ``anomal…``, and common defect names (``flaw…``,
     ``damage…``, ``scratch…``, ``crack…``, ``dent``, ``broken``, ``stain…``, ``contaminat…``);
   - normal words → no: ``no``, ``normal``.

   All matched verdicts agree → that verdict; they disagree (``"No. There is a defect"``) or none matched →
   ``unknown``.
4. Empty or whitespace-only → ``unknown``.

Example:
    >>> parse_answer("The answer is B.")
    ParsedAnswer(letter='B', answer='no', source='letter')
    >>> parse_answer("No defects found")
    ParsedAnswer(letter=None, answer='no', source='keyword')
    >>> parse_answer("I cannot tell")
    ParsedAnswer(letter=None, answer='unknown', source='none')
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

from mllm.config import Answer

__all__ = [
    "LETTER_TO_ANSWER",
    "YES_NO_OPTIONS",
    "Answer",
    "AnswerSource",
    "ParsedAnswer",
    "parse_answer",
    "parse_answer_keyword",
    "parse_answer_reference",
    "parse_with",
]

AnswerSource = Literal["letter", "keyword", "closest", "none"]
"""Which rule read an answer: its option letter, a keyword, the closest option text, or none (unparseable)."""
LETTER_TO_ANSWER: dict[str, Answer] = {"A": "yes", "B": "no"}
YES_NO_OPTIONS: dict[str, str] = {"A": "Yes", "B": "No"}
"""The yes/no question's options as the reference's ``parse_conversation`` holds them (letter → text)."""


@dataclass(frozen=True)
class ParsedAnswer:
    """The parsed reply.

    Attributes:
        letter: The option letter found (``"A"``/``"B"``), or ``None``.
        answer: ``yes`` (defect), ``no`` (no defect) or ``unknown``.
        source: ``letter``, ``keyword``, ``closest`` (the reference parser's difflib fallback) or ``none``.
    """

    letter: str | None
    answer: Answer
    source: AnswerSource


_QUESTION_ECHO = re.compile(r"is there any defect in the object\??", re.IGNORECASE)
_OPTIONS_ECHO = re.compile(r"\(?A[.):]?\s*Yes\.?[\s,;]*\(?B[.):]?\s*No\.?", re.IGNORECASE)
_LETTER = re.compile(r"(?<![A-Za-z0-9])([AB])(?![A-Za-z0-9])")
_SENTENCE_START = re.compile(r"(?:^|[.!?]\s+|\n\s*)$")
_ARTICLE_FOLLOWER = re.compile(r"\s+[a-z]")
_ONLY_BOTH = re.compile(r"\W*([AB])\W*(?:or|and|/|,|\s)\W*([AB])\W*", re.IGNORECASE)
_WHOLE_LOWER = re.compile(
    r"^\W*(?:(?:the\s+)?(?:final\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:\-]?\s*)?\W*([ab])\W*$", re.IGNORECASE
)
_HEDGE = re.compile(
    r"\b(?:can ?not|can't|cannot|unable to|impossible to)\s+(?:tell|determine|say|decide|judge)\b"
    r"|\bnot (?:sure|certain)\b|\bunsure\b|\bunclear\b|\buncertain\b|\bhard to (?:say|tell)\b",
    re.IGNORECASE,
)
_DEFECT_WORD = (
    r"(?:defect\w*|anomal\w*|abnormal\w*|flaw\w*|damage\w*|scratch\w*|crack\w*|dent(?:s|ed)?\b|broken|"
    r"stain\w*|contaminat\w*)"
)
_NEGATION = r"(?:\bno|\bnot|\bcannot|n't|\bnever|\bwithout)"
_LIST_TAIL = (
    rf"(?:\s*(?:,|\bor\b|\band\b|\bnor\b)\s*(?:\w+\s+){{0,2}}?{_DEFECT_WORD})*"  # "no dents, scratches or cracks"
)
# (verdict, pattern), longest phrases first; each match consumes its span.
_KEYWORDS: tuple[tuple[Answer, re.Pattern[str]], ...] = (
    ("no", re.compile(rf"{_NEGATION}\s+(?:\w+\s+){{0,3}}?{_DEFECT_WORD}{_LIST_TAIL}", re.IGNORECASE)),
    ("no", re.compile(rf"\b{_DEFECT_WORD}[\s-]*free\b|\bfree\s+(?:of|from)\s+(?:any\s+)?{_DEFECT_WORD}", re.I)),
    ("yes", re.compile(r"(?:\bnot|n't)\s+(?:\w+\s+){0,2}?normal\b", re.IGNORECASE)),
    ("yes", re.compile(rf"\byes\b|\b{_DEFECT_WORD}", re.IGNORECASE)),
    ("no", re.compile(r"\bno\b|\bnormal\b", re.IGNORECASE)),
)


def _strip_echoes(text: str) -> str:
    return _OPTIONS_ECHO.sub(" ", _QUESTION_ECHO.sub(" ", text))


def _is_article(text: str, match: re.Match[str]) -> bool:
    return (
        match.group(1) == "A"
        and bool(_SENTENCE_START.search(text[: match.start()]))
        and bool(_ARTICLE_FOLLOWER.match(text, match.end()))
    )


def _last_letter(text: str) -> str | None:
    whole = _WHOLE_LOWER.match(text)
    if whole:
        return whole.group(1).upper()
    letters = [m.group(1) for m in _LETTER.finditer(text) if not _is_article(text, m)]
    return letters[-1] if letters else None


def _keyword_verdict(text: str) -> Answer:
    if _HEDGE.search(text):
        return "unknown"
    remaining = text
    verdicts: set[Answer] = set()
    for verdict, pattern in _KEYWORDS:
        if pattern.search(remaining):
            verdicts.add(verdict)
            remaining = pattern.sub(" ", remaining)
    return verdicts.pop() if len(verdicts) == 1 else "unknown"


def parse_answer(text: str | None) -> ParsedAnswer:
    """Parse the model's reply to the yes/no defect question (rules in the module docstring).

    Args:
        text: The decoded reply (special tokens already skipped); ``None`` counts as empty.

    Returns:
        The :class:`ParsedAnswer`; ``answer`` is ``unknown`` whenever the reply does not decide.
    """
    cleaned = _strip_echoes(text or "").strip()
    if not cleaned:
        return ParsedAnswer(None, "unknown", "none")
    both = _ONLY_BOTH.fullmatch(cleaned)
    if both and both.group(1).upper() != both.group(2).upper():
        return ParsedAnswer(None, "unknown", "none")
    letter = _last_letter(cleaned)
    if letter is not None:
        return ParsedAnswer(letter, LETTER_TO_ANSWER[letter], "letter")
    verdict = _keyword_verdict(cleaned)
    return ParsedAnswer(None, verdict, "keyword" if verdict != "unknown" else "none")


_REFERENCE_LETTER = re.compile(r"\b([A-E])\b")


def parse_answer_reference(text: str | None, options: dict[str, str] | None = None) -> ParsedAnswer:
    r"""The reference evaluation's reading (``GPT4Query.parse_answer`` as ``QwenQuery.generate_answer`` uses it).

    1. Every match of ``\b([A-E])\b`` (case-sensitive, so the article in "A scratch" counts); the LAST wins.
    2. None: ``difflib.get_close_matches(reply, option texts, n=1, cutoff=0.0)``, the option text most similar to
       the whole reply (SequenceMatcher ratio; with cutoff 0 it always picks one when options exist), and its
       letter.

    The letter is read as yes/no through ``options`` (default :data:`YES_NO_OPTIONS`): an option whose text is
    "Yes"/"No" (case and a final period ignored); a letter that is no option, or one whose text is neither, is
    ``unknown`` (the reference summary skips such answers).

    Example:
        >>> parse_answer_reference("A scratch is visible, so B.")
        ParsedAnswer(letter='B', answer='no', source='letter')
        >>> parse_answer_reference("yes")
        ParsedAnswer(letter='A', answer='yes', source='closest')
    """
    options = YES_NO_OPTIONS if options is None else options
    reply = text or ""
    letters = _REFERENCE_LETTER.findall(reply)
    if letters:
        letter, source = letters[-1], "letter"
    else:
        closest = difflib.get_close_matches(reply, list(options.values()), n=1, cutoff=0.0)
        if not closest:
            return ParsedAnswer(None, "unknown", "none")
        letter = next(key for key, value in options.items() if value == closest[0])
        source = "closest"
    option = re.sub(r"[\s.!]+$", "", options.get(letter, "")).strip().lower()
    answer: Answer = "yes" if option == "yes" else "no" if option == "no" else "unknown"
    return ParsedAnswer(letter, answer, source)  # type: ignore[arg-type]


def parse_answer_keyword(text: str | None) -> ParsedAnswer:
    """The paper's keyword reading (§4.1: the reply "contains yes or its variants"), keywords BEFORE letters.

    Precedence:

    1. echoes of the question / option list are removed (as in :func:`parse_answer`);
    2. a hedge (``cannot tell``, ``not sure`` …) → ``unknown``;
    3. the keyword rules of :func:`parse_answer`, longest phrase first: negated defect words (``no defect``,
       ``there is no anomaly``, ``defect-free``) → no; ``not normal`` → yes; ``yes`` / ``abnormal`` / ``defect`` /
       ``anomal…`` / defect names → yes; ``no`` / ``normal`` → no; verdicts that disagree → ``unknown``;
    4. only when no keyword decides: the last standalone option letter (``"B"`` → no), as :func:`parse_answer`.

    So the words win over a letter: ``"A. No"`` → no here (``parse_answer`` says yes, the letter).

    Example:
        >>> parse_answer_keyword("The object appears normal.")
        ParsedAnswer(letter=None, answer='no', source='keyword')
        >>> parse_answer_keyword("B")
        ParsedAnswer(letter='B', answer='no', source='letter')
    """
    cleaned = _strip_echoes(text or "").strip()
    if not cleaned or _HEDGE.search(cleaned):
        return ParsedAnswer(None, "unknown", "none")
    verdict = _keyword_verdict(cleaned)
    if verdict != "unknown":
        return ParsedAnswer(None, verdict, "keyword")
    both = _ONLY_BOTH.fullmatch(cleaned)
    if both and both.group(1).upper() != both.group(2).upper():
        return ParsedAnswer(None, "unknown", "none")
    remaining = cleaned
    for _, pattern in _KEYWORDS:  # a contradictory keyword reply stays unknown: its letters are not consulted
        if pattern.search(remaining):
            return ParsedAnswer(None, "unknown", "none")
    letter = _last_letter(cleaned)
    if letter is not None:
        return ParsedAnswer(letter, LETTER_TO_ANSWER[letter], "letter")
    return ParsedAnswer(None, "unknown", "none")


def parse_with(parser: str, text: str | None) -> ParsedAnswer:
    """Parse a reply to the yes/no question with the named parser (``eagle``, ``reference`` or ``keyword``).

    Raises:
        ValueError: an unknown parser name.
    """
    if parser == "eagle":
        return parse_answer(text)
    if parser == "reference":
        return parse_answer_reference(text)
    if parser == "keyword":
        return parse_answer_keyword(text)
    raise ValueError(f"unknown answer parser {parser!r}; expected eagle, reference or keyword")
