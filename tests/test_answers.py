"""The answer parser: normalisation, option letters, yes/no, numbers, choice words, ambiguity."""
from __future__ import annotations

import pytest

from vlsi_edge.data.answers import normalize, parse_answer, score

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "cross"]
NUMBERS = [str(n) for n in range(1, 7)]


@pytest.mark.parametrize("raw, expected", [
    ("The Red.", "red"), ("  An apple!  ", "apple"), ("THREE", "3"), ("twenty", "20"), ("Color", "colour"),
    ("gray", "grey"), ("3.0", "3"), ("2.50", "2.5"), ("a  big   dog", "big dog"),
    ("Answer: blue", "blue"), ("The answer is: Blue.", "blue"), ("red<|im_end|>", "red"), ("blue</s>", "blue"),
    ("red. Answer with one word.", "red"), ("left-hand side", "left hand side"),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize("raw, choices, expected", [
    ("blue", COLOURS, "blue"),
    ("Blue.", COLOURS, "blue"),
    ("B", SHAPES, "square"), ("(b)", SHAPES, "square"), ("B.", SHAPES, "square"), ("b)", SHAPES, "square"),
    ("(C) triangle", SHAPES, "triangle"), ("Answer: D", SHAPES, "cross"), ("[a]", SHAPES, "circle"),
    ("E", SHAPES, None), ("A", SHAPES, "circle"), ("a.", SHAPES, "circle"),
    ("A red circle", COLOURS, "red"),
    ("Yes, there are more.", ["yes", "no"], "yes"), ("no.", ["yes", "no"], "no"), ("Nope", ["yes", "no"], "no"),
    ("There are more circles, so yes", ["yes", "no"], "yes"),
    ("There are 3.", NUMBERS, "3"), ("three", NUMBERS, "3"), ("I count five circles", NUMBERS, "5"),
    ("3 circles and 2 squares", NUMBERS, None), ("9", NUMBERS, None),
    ("It is the square.", SHAPES, "square"), ("squares", SHAPES, "square"), ("crosses", SHAPES, "cross"),
    ("red or blue", COLOURS, None), ("not red but blue", COLOURS, None),
    ("dark red", ["red", "dark red"], "dark red"),
    ("The colour of the triangle is purple.", COLOURS, "purple"),
    ("", COLOURS, None), ("   \n  ", COLOURS, None), ("<|im_end|>", COLOURS, None), (None, COLOURS, None),
    ("I cannot tell.", COLOURS, None),
    ("purple\nbecause it is purple, not red", COLOURS, "purple"),
    ("The object to the left of it is red " + "very " * 40, COLOURS, None),
])
def test_parse_with_choices(raw, choices, expected):
    assert parse_answer(raw, choices) == expected


@pytest.mark.parametrize("raw, expected", [
    ("Red.", "red"), ("Yes, there are more.", "yes"), ("No", "no"), ("The cat\nsecond line", "cat"),
    ("", None), ("Three", "3"),
])
def test_parse_without_choices(raw, expected):
    assert parse_answer(raw) == expected


def test_letters_not_used_when_choices_are_letters():
    assert parse_answer("b", ["a", "b"]) == "b"
    assert parse_answer("(c)", ["a", "b"]) is None


def test_score():
    assert score("(B)", "square", SHAPES) == ("square", True)
    assert score("Three.", "3", NUMBERS) == ("3", True)
    assert score("red", "blue", COLOURS) == ("red", False)
    assert score("no idea", "blue", COLOURS) == (None, False)
    assert score("The Grey one", "gray") == ("grey 1", False)
    assert score("Gray", "grey") == ("grey", True)
