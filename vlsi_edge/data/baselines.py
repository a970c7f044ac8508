"""Sanity baselines for a question-answering split: how much can be answered without looking at the image?

    python benchmarks/shapes_baselines.py [--difficulty D --seed S]

- `text_only_baseline`: the most frequent training answer for the exact question string, falling back to the
  question's template (colour and shape names replaced by placeholders) within its category when the exact string
  has fewer than `3 × len(choices)` training examples, then to the category.
- `blank_image_baseline`: the pixel solver of `builtin:shapes` handed a blank white image of the same size.
- `solver_baseline`: the same solver on the real images (the ceiling, 100% on `builtin:shapes`).

Each returns `{"name", "overall": {acc, chance, n}, "per_category": {cat: {acc, chance, n}}}` where chance is
1/len(choices) averaged over the items (None when a sample has no choices). On `builtin:shapes` both blind
baselines sit within a few points of chance in every category: the suite deals its answers evenly per question.
"""
from __future__ import annotations

import functools
import io
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

from PIL import Image

from vlsi_edge.data.answers import normalize, score
from vlsi_edge.data.conversations import Dataset, Sample

MIN_SUPPORT_PER_CHOICE = 3


@functools.lru_cache(maxsize=1)
def _template_re():
    from vlsi_edge.data.shapes import COLOUR_NAMES, PLURALS, SHAPES

    words = sorted(set(COLOUR_NAMES) | set(SHAPES) | set(PLURALS.values()), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(words) + r")\b", re.I)


def question_template(question: str) -> str:
    """The question with palette colour and shape names replaced by `<w>`."""
    return _template_re().sub("<w>", question)


def _choices(sample: Sample):
    choices = sample.meta.get("choices")
    return list(choices) if isinstance(choices, (list, tuple)) and choices else None


def _majority(counter: Counter) -> str:
    return min(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def _report(name: str, rows: Iterable[tuple[str, bool, float | None]]) -> dict:
    per: dict[str, list[tuple[bool, float | None]]] = defaultdict(list)
    for category, correct, chance in rows:
        per[category].append((correct, chance))

    def block(items):
        chances = [c for _, c in items]
        return {
            "acc": sum(ok for ok, _ in items) / len(items) if items else None,
            "chance": sum(chances) / len(chances) if items and None not in chances else None,
            "n": len(items),
        }

    every = [item for items in per.values() for item in items]
    return {"name": name, "overall": block(every), "per_category": {c: block(per[c]) for c in sorted(per)}}


def _chance(sample: Sample) -> float | None:
    choices = _choices(sample)
    return 1.0 / len({normalize(c) for c in choices}) if choices else None


def text_only_baseline(train: Dataset, test: Dataset) -> dict:
    """Answer each test question with the most frequent training answer to the same question (see module doc)."""
    template = _template_re()
    exact: dict[str, Counter] = defaultdict(Counter)
    by_template: dict[tuple[str, str], Counter] = defaultdict(Counter)
    by_category: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for s in train:
        answer = normalize(s.answer)
        exact[s.question][answer] += 1
        by_template[(s.category, template.sub("<w>", s.question))][answer] += 1
        by_category[s.category][answer] += 1
        overall[answer] += 1

    def predict(s: Sample) -> str:
        choices = _choices(s)
        need = MIN_SUPPORT_PER_CHOICE * (len(choices) if choices else 3)
        for counter in (exact.get(s.question), by_template.get((s.category, template.sub("<w>", s.question))),
                        by_category.get(s.category), overall):
            if counter and (sum(counter.values()) >= need or counter is overall):
                return _majority(counter)
        return ""

    rows = []
    for s in test:
        _, ok = score(predict(s), s.answer, _choices(s))
        rows.append((s.category, ok, _chance(s)))
    return _report("text-only", rows)


def _blank_png(size: tuple[int, int], cache: dict) -> bytes:
    if size not in cache:
        buf = io.BytesIO()
        Image.new("RGB", size, (255, 255, 255)).save(buf, format="PNG")
        cache[size] = buf.getvalue()
    return cache[size]


def _solver_rows(test: Dataset, blank: bool):
    from vlsi_edge.data.solver import solve

    cache: dict = {}
    for s in test:
        if s.image is None:
            png = b""
        elif blank:
            with Image.open(s.image) as im:
                png = _blank_png(im.size, cache)
        else:
            png = s.image.read_bytes()
        answer = solve(png, s.question) if png else ""
        _, ok = score(answer, s.answer, _choices(s))
        yield s.category, ok, _chance(s)


def blank_image_baseline(test: Dataset) -> dict:
    """The pixel solver on a blank white image of each item's size."""
    return _report("blank-image", _solver_rows(test, blank=True))


def solver_baseline(test: Dataset) -> dict:
    """The pixel solver on the real images."""
    return _report("solver", _solver_rows(test, blank=False))
