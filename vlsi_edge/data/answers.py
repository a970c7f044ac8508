"""The one deterministic answer parser every accuracy figure uses (BENCH.md, "Task accuracy"); no LLM judge.

    >>> parse_answer("(B) blue", ["red", "blue"]), parse_answer("There are three.", ["1", "2", "3"])
    ('blue', '3')

`normalize` lower-cases, drops chat-template tokens, "answer:" prefixes, punctuation and articles, turns number
words (zero..twenty) into digits and unifies spelling (color -> colour, gray -> grey). `parse_answer` maps a model's
raw output to one normalized choice, in this order: an exact match; an option letter ("B", "(b)", "B." -> the
second choice); yes/no by the first word; a single number; a single choice named inside a short reply. Anything
ambiguous or unrecognised is None, and `score` counts None as wrong.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14",
    "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20",
}
SPELLING = {"color": "colour", "colors": "colours", "colored": "coloured", "gray": "grey", "grays": "greys"}
ARTICLES = {"a", "an", "the"}
YES_WORDS = {"yes", "yeah", "yep", "true", "correct"}
NO_WORDS = {"no", "nope", "false", "incorrect"}
MAX_SENTENCE_WORDS = 30

_SPECIAL_TOKENS = re.compile(r"<\|[^|>]*\|>|</?s>|<pad>|<eos>|<end_of_turn>|<start_of_turn>|\[/?INST\]", re.I)
_PREFIX = re.compile(r"^\s*(?:final\s+)?(?:answer|ans|output|response)\s*(?:is)?\s*[:\-]\s*|^\s*the\s+(?:final\s+)?"
                     r"answer\s+is\s*:?\s*", re.I)
_LETTER = re.compile(r"^\s*(?:option\s+)?[\(\[]?([a-z])[\)\]]?(?:[.:)\]]\s*(.*))?\s*$", re.I | re.S)
_LETTER_WITH_TEXT = re.compile(r"^\s*(?:option\s+)?(?:\(([a-z])\)|\[([a-z])\]|([a-z])[.:)])\s*(.*)$", re.I | re.S)
_PUNCT = re.compile(r"[^\w\s.]|_")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")
_TRAILING_INSTRUCTION = re.compile(r"(?<=\S)[\s.,;:]+(?:please\s+)?answer\s+(?:with|in|using|only|yes\s+or|left)\b.*$",
                                   re.I | re.S)


def _clean(text: str) -> str:
    text = _SPECIAL_TOKENS.sub(" ", str(text))
    for _ in range(2):
        text = _PREFIX.sub("", text, count=1)
    return text.strip()


def normalize(text: str) -> str:
    """Canonical form for comparing short answers (see the module docstring)."""
    text = _TRAILING_INSTRUCTION.sub("", _clean(text)).lower()
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    words = []
    for word in text.split():
        if word in ARTICLES:
            continue
        word = NUMBER_WORDS.get(word, word)
        word = SPELLING.get(word, word)
        if _NUMBER.match(word) and "." in word:
            word = word.rstrip("0").rstrip(".")
        words.append(word)
    return " ".join(words)


def _first_line(text: str) -> str:
    for line in _clean(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _mentions(words: list[str], choice: str) -> bool:
    target = choice.split()
    if not target:
        return False
    n = len(target)
    for i in range(len(words) - n + 1):
        window = words[i:i + n]
        last = window[-1]
        if window[:-1] == target[:-1] and last in (target[-1], target[-1] + "s", target[-1] + "es"):
            return True
    return False


def _letter(raw: str, n_choices: int) -> int | None:
    first = _first_line(raw)
    m = _LETTER.match(first)
    if m and (m.group(2) is None or m.group(2) == "") and len(first.strip("()[] .:")) == 1:
        index = ord(m.group(1).lower()) - ord("a")
        return index if index < n_choices else None
    m = _LETTER_WITH_TEXT.match(first)
    if m:
        letter = next(g for g in m.groups()[:3] if g)
        index = ord(letter.lower()) - ord("a")
        return index if index < n_choices else None
    return None


def parse_answer(raw: str, choices: Sequence[str] | None = None) -> str | None:
    """Map raw model output to one normalized choice (or, without choices, a normalized short answer)."""
    if raw is None:
        return None
    line = normalize(_first_line(raw))
    words = line.split()
    if not choices:
        if not words:
            return None
        if words[0] in YES_WORDS:
            return "yes"
        if words[0] in NO_WORDS:
            return "no"
        return line
    options = [normalize(c) for c in choices]
    if line in options:
        return line
    if len(set(options)) != len(options):
        return None
    index = _letter(raw, len(options))
    if index is not None and not any(len(o) == 1 and o.isalpha() for o in options):
        return options[index]
    if not words:
        return None
    if {"yes", "no"} <= set(options):
        if words[0] in YES_WORDS:
            return "yes"
        if words[0] in NO_WORDS:
            return "no"
    if len(words) > MAX_SENTENCE_WORDS:
        return None
    if all(_NUMBER.match(o) for o in options):
        numbers = {w for w in words if _NUMBER.match(w)}
        return numbers.pop() if len(numbers) == 1 and next(iter(numbers)) in options else None
    hits = [o for o in options if _mentions(words, o)]
    hits = [h for h in hits if not any(h != other and _mentions(other.split(), h) for other in hits)]
    return hits[0] if len(hits) == 1 else None


def score(raw: str, gold: str, choices: Sequence[str] | None = None) -> tuple[str | None, bool]:
    """(parsed answer, correct); an unparseable answer is wrong."""
    parsed = parse_answer(raw, choices)
    return parsed, parsed is not None and parsed == normalize(gold)
