"""parse_answer on a table of real-looking replies; every edge case decided in mllm/answers.py's docstring."""

from __future__ import annotations

import pytest

from mllm.answers import ParsedAnswer, parse_answer

# (reply, letter, answer, source)
TABLE = [
    # plain letters
    ("A", "A", "yes", "letter"),
    ("B", "B", "no", "letter"),
    ("B.", "B", "no", "letter"),
    ("(A)", "A", "yes", "letter"),
    ("A)", "A", "yes", "letter"),
    ("**B**", "B", "no", "letter"),
    ("`A`", "A", "yes", "letter"),
    ("A. Yes", "A", "yes", "letter"),
    ("B. No", "B", "no", "letter"),
    ("A\n", "A", "yes", "letter"),
    ("Answer: B", "B", "no", "letter"),
    ("The answer is B", "B", "no", "letter"),
    ("The answer is A because there is a scratch near the rim.", "A", "yes", "letter"),
    ("Based on the images, B", "B", "no", "letter"),
    ("Option A", "A", "yes", "letter"),
    ("A or B? Comparing with the template, the answer is B.", "B", "no", "letter"),
    ("I first thought A, but the final answer is B", "B", "no", "letter"),
    ("[B]", "B", "no", "letter"),
    ("A: Yes, there is a defect.", "A", "yes", "letter"),
    # the letter wins over keywords
    ("A. No", "A", "yes", "letter"),
    ("B - there is a small defect but within tolerance", "B", "no", "letter"),
    # lower case only as the whole reply
    ("a", "A", "yes", "letter"),
    ("b.", "B", "no", "letter"),
    ("(b)", "B", "no", "letter"),
    ("answer: a", "A", "yes", "letter"),
    # the article "A" opening a sentence is not an option
    ("A scratch is visible on the surface.", None, "yes", "keyword"),
    ("A small dent; the object is defective.", None, "yes", "keyword"),
    ("The object is normal. A careful look shows nothing.", None, "no", "keyword"),
    # not standalone letters
    ("AB", None, "unknown", "none"),
    ("Apple", None, "unknown", "none"),
    ("B2 bolt looks fine", None, "unknown", "none"),
    # both letters and nothing else: undecided
    ("A/B", None, "unknown", "none"),
    ("A or B", None, "unknown", "none"),
    ("A, B", None, "unknown", "none"),
    # C/D are not options
    ("C", None, "unknown", "none"),
    # keyword fallback
    ("Yes", None, "yes", "keyword"),
    ("yes.", None, "yes", "keyword"),
    ("Yes, there is a scratch", None, "yes", "keyword"),
    ("No", None, "no", "keyword"),
    ("no", None, "no", "keyword"),
    ("No defects found", None, "no", "keyword"),
    ("There are no visible defects on the object.", None, "no", "keyword"),
    ("The object is defect-free.", None, "no", "keyword"),
    ("It is free of any defects.", None, "no", "keyword"),
    ("The product doesn't have any defect.", None, "no", "keyword"),
    ("I can't see any defect here.", None, "no", "keyword"),
    ("The query image looks normal compared to the template.", None, "no", "keyword"),
    ("The object is abnormal.", None, "yes", "keyword"),
    ("The surface is not normal: there is a crack.", None, "yes", "keyword"),
    ("An anomaly is present at the top left.", None, "yes", "keyword"),
    ("The object is defective.", None, "yes", "keyword"),
    ("The cable insulation is damaged.", None, "yes", "keyword"),
    ("There is a dent near the thread.", None, "yes", "keyword"),
    ("The evidence shows nothing unusual.", None, "unknown", "none"),  # "dent" only as a word
    ("No scratches or cracks.", None, "no", "keyword"),
    ("The object is not anomalous.", None, "no", "keyword"),
    # conflicting keywords: never guess
    ("No. There is a defect.", None, "unknown", "none"),
    ("Yes, it looks normal", None, "unknown", "none"),
    # hedges and silence
    ("I cannot tell", None, "unknown", "none"),
    ("I cannot tell whether there is a defect.", None, "unknown", "none"),
    ("It is unclear from these images.", None, "unknown", "none"),
    ("Not sure.", None, "unknown", "none"),
    ("", None, "unknown", "none"),
    ("   \n", None, "unknown", "none"),
    (None, None, "unknown", "none"),
    ("The image shows a metal nut.", None, "unknown", "none"),
    # echoes of the question or the option list are not answers
    ("Is there any defect in the object? A. Yes B. No", None, "unknown", "none"),
    ("Is there any defect in the object?\nA. Yes\nB. No\nB", "B", "no", "letter"),
    ("Is there any defect in the object? No.", None, "no", "keyword"),
]


@pytest.mark.parametrize(("reply", "letter", "answer", "source"), TABLE)
def test_table(reply, letter, answer, source):
    assert parse_answer(reply) == ParsedAnswer(letter, answer, source)


def test_table_is_large_and_covers_every_outcome():
    assert len(TABLE) >= 25
    assert {row[2] for row in TABLE} == {"yes", "no", "unknown"}
    assert {row[3] for row in TABLE} == {"letter", "keyword", "none"}


def test_letter_maps_to_answer_consistently():
    for reply, letter, answer, _ in TABLE:
        if letter is not None:
            assert answer == {"A": "yes", "B": "no"}[letter], reply
