"""A data set's own multiple-choice question (MMAD): its text in the prompt and the reply read against ITS options.

The option texts and their letter order vary between MMAD items ("Yes." / "No." with a period or without, A = No
in some items, a third option in others), so a reply is parsed to one of the item's letters and the detection
verdict comes from that option's TEXT. Every expectation below is written by hand.
"""

from __future__ import annotations

import pytest

from mllm.choices import QUESTION_LIST_PREFIX, MultipleChoice, ParsedChoice, option_answer, parse_choice

DETECT = "Is there any defect in the object?"
YES_FIRST = MultipleChoice(DETECT, (("A", "Yes."), ("B", "No.")))
NO_FIRST = MultipleChoice(DETECT, (("A", "No."), ("B", "Yes.")))
NO_PERIODS = MultipleChoice(DETECT, (("A", "No"), ("B", "Yes")))
THREE = MultipleChoice(DETECT, (("A", "Yes."), ("B", "No."), ("C", "Not sure.")))
KINDS = MultipleChoice(
    "What is the type of the defect?", (("A", "Scratch."), ("B", "Crack."), ("C", "Broken."), ("D", "Contamination."))
)


def test_the_question_list_is_the_items_own_text_in_its_letter_order():
    assert NO_FIRST.text() == "Question 1: Is there any defect in the object? \nA. No.\nB. Yes."
    assert NO_PERIODS.question_list() == QUESTION_LIST_PREFIX + (
        "Question 1: Is there any defect in the object? \nA. No\nB. Yes"
    )
    third = MultipleChoice(KINDS.question, KINDS.options, number=3)
    assert third.text().splitlines() == [
        "Question 3: What is the type of the defect? ",  # the reference keeps the space before the line break
        "A. Scratch.",
        "B. Crack.",
        "C. Broken.",
        "D. Contamination.",
    ]


@pytest.mark.parametrize(
    ("reply", "choice", "letter", "source", "answer"),
    [
        # a letter counts as the item's option of that letter: "A" is "No" where A is "No."
        ("A", YES_FIRST, "A", "letter", "yes"),
        ("A", NO_FIRST, "A", "letter", "no"),
        ("A", NO_PERIODS, "A", "letter", "no"),
        ("(B)", NO_FIRST, "B", "letter", "yes"),
        ("Answer: B", NO_PERIODS, "B", "letter", "yes"),
        ("**A**", THREE, "A", "letter", "yes"),
        ("b", YES_FIRST, "B", "letter", "no"),  # a lower-case letter only as the whole reply
        ("C", THREE, "C", "letter", "unknown"),  # neither yes nor no: a third option
        ("C", YES_FIRST, None, "none", "unknown"),  # not one of this item's letters, no option text
        # the option's text, without a letter: read against this item's letters
        ("No.", YES_FIRST, "B", "text", "no"),
        ("No.", NO_FIRST, "A", "text", "no"),
        ("yes", NO_PERIODS, "B", "text", "yes"),
        ("Not sure.", THREE, "C", "text", "unknown"),
        ("It is Contamination.", KINDS, "D", "text", "unknown"),
        # keywords only when the options are a yes/no pair
        ("Yes, there is a scratch.", NO_FIRST, "B", "keyword", "yes"),
        ("There is an obvious defect on the rim.", NO_FIRST, "B", "keyword", "yes"),
        ("The object looks normal and intact.", YES_FIRST, "B", "keyword", "no"),
        # undecided: never a guess
        ("A/B", YES_FIRST, None, "none", "unknown"),
        ("A or B", NO_FIRST, None, "none", "unknown"),
        ("", YES_FIRST, None, "none", "unknown"),
        ("the weather is nice", KINDS, None, "none", "unknown"),
        # an echo of the question and option list is removed before reading
        (f"{DETECT} A. No. B. Yes. B", NO_FIRST, "B", "letter", "yes"),
        # the article "A" opening a sentence is not the letter A
        ("A crack is visible, so the answer is B.", KINDS, "B", "letter", "unknown"),
    ],
)
def test_a_reply_is_read_against_the_items_own_options(reply, choice, letter, source, answer):
    parsed = parse_choice(reply, choice)
    assert parsed == ParsedChoice(letter, source)
    assert option_answer(choice, parsed.letter) == answer


def test_the_verdict_comes_from_the_option_text_not_its_position():
    for choice in (YES_FIRST, NO_FIRST, NO_PERIODS, THREE):
        assert {option_answer(choice, letter) for letter in choice.letters} >= {"yes", "no"}
        yes = next(letter for letter in choice.letters if option_answer(choice, letter) == "yes")
        assert choice.option(yes).rstrip(".") == "Yes"
    assert option_answer(NO_FIRST, None) == "unknown" and option_answer(NO_FIRST, "E") == "unknown"


@pytest.mark.parametrize(
    "options",
    [(("A", "Yes."),), (("A", "Yes."), ("A", "No.")), (("a", "Yes."), ("b", "No.")), (("A", "Yes."), ("Z", "No."))],
)
def test_malformed_options_are_refused(options):
    with pytest.raises(ValueError, match="option letters|two or more distinct"):
        MultipleChoice(DETECT, options)
