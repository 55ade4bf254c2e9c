r"""A data set's own multiple-choice question (MMAD): its question-list text and the reply parsed to one of its letters.

MMAD items carry their own question, options and answer letter; the option texts vary ("Yes." / "No." with a
period, either letter order, sometimes more than two options). This module formats such an item the way the
reference evaluation does (``parse_conversation`` in the reference's ``gpt4v.py``: ``"Question <n>: <q> \\n"`` then
one ``"<letter>. <text>"`` line per option in the item's order, the whole stripped) and parses the reply against
THOSE options:

1. **Echo removal.** A verbatim echo of the question, or of the option list, is removed first.
2. **Letter.** The LAST standalone letter among the item's option letters wins (the rules of
   :func:`mllm.answers.parse_answer`: ``"(B)"``, ``"Answer: C"``, ``"**A**"``; not ``"AB"``, ``"B2"``, nor the
   article "A" opening a sentence before a lower-case word; a lower-case letter only as the whole reply). A reply
   made of nothing but two different option letters (``"A/B"``) decides nothing.
3. **Option text** (no letter): the reply IS one option's text (case, spaces and a final period ignored), or
   exactly one option's text occurs in it as a phrase.
4. **Keywords** (no letter, no option text, and the options are a yes/no pair): the keyword rules of
   :func:`mllm.answers.parse_answer`, mapped to the option whose text is "Yes" / "No".
5. Otherwise no letter (``None``): the answer is unparseable, never a guess.

Example:
    >>> item = MultipleChoice("Is there any defect in the object?", (("A", "No."), ("B", "Yes.")))
    >>> item.text()
    'Question 1: Is there any defect in the object? \nA. No.\nB. Yes.'
    >>> parse_choice("A", item), option_answer(item, "A")
    (ParsedChoice(letter='A', source='letter'), 'no')
    >>> parse_choice("Yes, there is a scratch.", item).letter
    'B'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mllm.answers import Answer, parse_answer

__all__ = ["QUESTION_LIST_PREFIX", "MultipleChoice", "ParsedChoice", "option_answer", "parse_choice"]

QUESTION_LIST_PREFIX = "Following is the question list: "
"""What precedes the question in the prompt (the reference's text, trailing space included)."""

_LETTER_CHARS = "ABCDEFGH"


@dataclass(frozen=True)
class MultipleChoice:
    """One multiple-choice question as a data set states it.

    Attributes:
        question: The question text, verbatim.
        options: ``(letter, text)`` pairs in the item's own order, texts verbatim (e.g. ``("A", "Yes.")``).
        number: The question's number in the list ("Question <number>:"); the reference numbers a question by its
            position in the item's conversation, starting at 1.
    """

    question: str
    options: tuple[tuple[str, str], ...]
    number: int = 1

    def __post_init__(self) -> None:
        letters = [letter for letter, _ in self.options]
        if len(letters) < 2 or len(set(letters)) != len(letters):
            raise ValueError(f"a multiple-choice question needs two or more distinct option letters, got {letters}")
        if any(len(letter) != 1 or letter not in _LETTER_CHARS for letter in letters):
            raise ValueError(f"option letters must be single capitals A-H, got {letters}")

    @property
    def letters(self) -> tuple[str, ...]:
        """The option letters, in the item's order."""
        return tuple(letter for letter, _ in self.options)

    def option(self, letter: str | None) -> str | None:
        """The text of option ``letter`` (``None`` when there is no such option)."""
        return dict(self.options).get(letter or "")

    def text(self) -> str:
        r"""``"Question <n>: <question> \\n<letter>. <text>\\n…"``, stripped (the reference's formatting)."""
        options = "".join(f"{letter}. {value}\n" for letter, value in self.options)
        return f"Question {self.number}: {self.question} \n{options}".strip()

    def question_list(self) -> str:
        """The prompt's last text part: :data:`QUESTION_LIST_PREFIX` + :meth:`text`."""
        return QUESTION_LIST_PREFIX + self.text()


@dataclass(frozen=True)
class ParsedChoice:
    """The reply parsed against a :class:`MultipleChoice`.

    Attributes:
        letter: One of the item's option letters, or ``None`` (unparseable).
        source: ``letter``, ``text``, ``keyword`` or ``none``: which rule decided.
    """

    letter: str | None
    source: Literal["letter", "text", "keyword", "none"]


def _normal(text: str) -> str:
    return re.sub(r"[\s.!。]+$", "", " ".join(text.split())).lower()


def option_answer(choice: MultipleChoice, letter: str | None) -> Answer:
    """``yes`` / ``no`` when option ``letter``'s TEXT is "Yes" / "No" (period or not), else ``unknown``.

    The detection verdict of an MMAD item comes from the chosen option's text, never from its letter's position.
    """
    text = choice.option(letter)
    normal = _normal(text) if text is not None else ""
    return "yes" if normal == "yes" else "no" if normal == "no" else "unknown"


def _yes_no_letters(choice: MultipleChoice) -> dict[str, str]:
    found = {option_answer(choice, letter): letter for letter in choice.letters}
    return {k: v for k, v in found.items() if k != "unknown"}


def _strip_echoes(text: str, choice: MultipleChoice) -> str:
    text = re.sub(re.escape(choice.question.strip()), " ", text, flags=re.IGNORECASE)
    parts = [rf"\(?{letter}[.):]?\s*{re.escape(_normal(value))}[.!]?" for letter, value in choice.options]
    return re.sub(r"[\s,;]*".join(parts), " ", text, flags=re.IGNORECASE)


def _last_letter(text: str, letters: str) -> str | None:
    whole = re.fullmatch(
        rf"\W*(?:(?:the\s+)?(?:final\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:\-]?\s*)?\W*([{letters.lower()}])\W*",
        text,
        re.IGNORECASE,
    )
    if whole:
        return whole.group(1).upper()
    found = []
    for match in re.finditer(rf"(?<![A-Za-z0-9])([{letters}])(?![A-Za-z0-9])", text):
        is_article = (
            match.group(1) == "A"
            and re.search(r"(?:^|[.!?]\s+|\n\s*)$", text[: match.start()]) is not None
            and re.match(r"\s+[a-z]", text[match.end() :]) is not None
        )
        if not is_article:
            found.append(match.group(1))
    return found[-1] if found else None


def _option_text_letter(text: str, choice: MultipleChoice) -> str | None:
    reply = _normal(text)
    exact = [letter for letter, value in choice.options if _normal(value) == reply]
    if exact:
        return exact[0]
    contained = [
        letter
        for letter, value in choice.options
        if _normal(value) and re.search(rf"(?<!\w){re.escape(_normal(value))}(?!\w)", reply)
    ]
    if len(contained) == 1 and len(_normal(choice.option(contained[0]) or "")) > 3:
        return contained[0]
    return None


def parse_choice(text: str | None, choice: MultipleChoice) -> ParsedChoice:
    """Parse the model's reply to ``choice`` (rules in the module docstring).

    Args:
        text: The decoded reply; ``None`` counts as empty.
        choice: The question the reply answers.

    Returns:
        The :class:`ParsedChoice`; ``letter`` is ``None`` whenever the reply does not decide.
    """
    cleaned = _strip_echoes(text or "", choice).strip()
    if not cleaned:
        return ParsedChoice(None, "none")
    letters = "".join(choice.letters)
    only = re.fullmatch(rf"\W*([{letters}])\W*(?:(?:or|and|/|,|\s)\W*([{letters}])\W*)+", cleaned, re.IGNORECASE)
    if only and only.group(1).upper() != only.group(2).upper():
        return ParsedChoice(None, "none")
    letter = _last_letter(cleaned, letters)
    if letter is not None:
        return ParsedChoice(letter, "letter")
    letter = _option_text_letter(cleaned, choice)
    if letter is not None:
        return ParsedChoice(letter, "text")
    yes_no = _yes_no_letters(choice)
    if len(yes_no) == 2:
        verdict = parse_answer(cleaned)
        if verdict.letter is None and verdict.answer in yes_no:
            return ParsedChoice(yes_no[verdict.answer], "keyword")
    return ParsedChoice(None, "none")
