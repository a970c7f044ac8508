"""`builtin:shapes`: a deterministic synthetic visual-reasoning suite drawn with Pillow.

    vlsi-edge data synth --out DIR [--n-pretrain N --n-train N --n-val N --n-test N --seed S --difficulty 1..5
                                    --captions --n-curriculum N]

`synth` writes LLaVA-style `pretrain/train/val/test.json` (one record per line inside the list), the images under
`images/<split>/<id>.png` and `info.json` (params, per-split counts by category, totals, answer sets, palette,
version), atomically (a temporary folder beside `out`, renamed at the end).

Six question categories (`CATEGORIES`), one question per image, short answers (a word or a number):
colour ("What colour is the triangle?"), shape ("What shape is the red object?"), count ("How many circles are
there?"), spatial ("Where is the red circle relative to the blue square?" left/right/above/below), comparison
("Are there more circles than squares?" yes/no, never a tie) and pattern (a row of cells with a repeating colour or
shape sequence and one empty cell drawn as a dark outline box: "What colour belongs in the empty cell?").

Balance: the category and, within it, the (question, answer) pair are dealt from shuffled decks, so every exact
question string sees every answer equally often (up to one unfinished deck) and the question text alone carries no
information about the answer. Spatial questions name colour+shape pairs (hundreds of strings), so their answers are
dealt per category instead. Every image is unique within its split (pixel hash) and carries random clutter, which
makes a repeat across splits astronomically unlikely; each split draws from its own `SeedSequence` child, so
changing `n_train` never changes a test item. `difficulty` 1..5 adds objects, distractors and clutter (grey specks
and thin lines in colours outside the palette, drawn under the objects) and tightens comparisons.

The `pretrain` split is a curriculum. Its grid items carry up to three follow-up turns (`extra_questions`: more
questions in the test templates about the same scene) and, with `captions=1`, end with a caption turn that names
every cell of the grid in reading order (`caption`: dense supervision of colour, shape and place, which one-word
answers lack), and every other item of a grid category is an easy scene (a 2x2 or 3x3 grid, at
most one distractor, so objects are two to four times larger; `difficulty` 0 in its record). A randomly initialised
vision tower gets off the answer-prior plateau on large objects far sooner than on the test split's small ones; easy
colour and shape items show a single object filling most of the image.

`scene_targets=1` adds to every grid item's record an `aux` list: the scene as numbers (`scene_target`, layout in
`AUX_NAMES`), which `vlsi-edge train --set train.aux_weight=W` regresses from the language model's hidden states
(dense supervision of every object's identity, count and place at once). It draws nothing from the RNG.

`n_curriculum=N` (0 by default, and then nothing changes) adds four warm-up splits of N items each, meant to be
trained on in this order before `pretrain`: `solo-large` (one object on a 2x2 grid), `solo-small` (one object on
the test split's 4x4 grid), `pairs` (two objects in one row or column) and `triples` (a pair and one distractor);
see `generate_curriculum_split`.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlsi_edge.errors import DataError
from vlsi_edge.fileio import publish_dir, staging_dir

GENERATOR_VERSION = 2
CATEGORIES = ("colour", "shape", "count", "spatial", "comparison", "pattern")
SPLITS = ("pretrain", "train", "val", "test")
# warm-up stages before `pretrain`, written only with n_curriculum > 0 (see `generate_curriculum_split`)
CURRICULUM_SPLITS = ("solo-large", "solo-small", "pairs", "triples")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
RELATIONS = ("left", "right", "above", "below")
COUNTS = tuple(str(n) for n in range(1, 7))
YES_NO = ("yes", "no")
OUTLINE = (40, 40, 40)
CELL_LINE = (215, 215, 215)
CLUTTER_GREYS = ((110, 110, 110), (135, 135, 135), (160, 160, 160), (185, 185, 185), (200, 200, 200))
CLUTTER_LINES = ((190, 190, 190), (205, 195, 175), (175, 200, 200), (200, 185, 205))
DEFAULTS = {"n_pretrain": 10000, "n_train": 2000, "n_val": 200, "n_test": 1000, "seed": 0, "difficulty": 1,
            "image_size": 112, "captions": 0, "n_curriculum": 0, "scene_targets": 0}
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 112, 1024

ANSWERS = {
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "count": COUNTS,
    "spatial": RELATIONS,
    "comparison": YES_NO,
    "pattern": COLOUR_NAMES + SHAPES,
}
# chance accuracy per category of the test split (pattern: half colour, half shape questions, 0.21, given as 0.20 as
# in the README's tables)
CHANCE = {"colour": 1 / 6, "count": 1 / 6, "pattern": 0.2, "shape": 0.25, "spatial": 0.25, "comparison": 0.5}
_SUFFIX = {"word": "Answer with one word.", "number": "Answer with a number.",
           "relation": "Answer left, right, above or below.", "yesno": "Answer yes or no."}
_GRID = {1: 4, 2: 4, 3: 5, 4: 5, 5: 5}
_DISTRACTORS = {1: (1, 2), 2: (2, 4), 3: (3, 6), 4: (5, 8), 5: (6, 10)}
_COMPARE_GAP = {0: 2, 1: 2, 2: 2, 3: 1, 4: 1, 5: 1}
_MAX_COMPARE = 5
_PATTERN = {1: (5, (2,)), 2: (6, (2,)), 3: (7, (2, 3)), 4: (7, (3,)), 5: (7, (3,))}
_PATTERN_DISTRACTORS = {1: (0, 0), 2: (0, 0), 3: (0, 0), 4: (1, 2), 5: (2, 4)}


def complete_sequence(seq: list[str | None]) -> str | None:
    """Fill the single `None` in a periodic sequence: the smallest period consistent with every visible cell that
    also shows a member of the hole's residue class. Shared by the generator (to reject ambiguous rows) and the
    pixel solver."""
    if seq.count(None) != 1:
        return None
    hole = seq.index(None)
    for period in range(1, len(seq)):
        classes: dict[int, set[str]] = {}
        for i, value in enumerate(seq):
            if value is not None:
                classes.setdefault(i % period, set()).add(value)
        if all(len(v) == 1 for v in classes.values()) and hole % period in classes:
            return next(iter(classes[hole % period]))
    return None


def question_text(category: str, key) -> str:
    """The question for a category and its deck key (the names the question mentions), instruction included."""
    if category == "colour":
        return f"What colour is the {key}? {_SUFFIX['word']}"
    if category == "shape":
        return f"What shape is the {key} object? {_SUFFIX['word']}"
    if category == "count":
        return f"How many {PLURALS[key]} are there? {_SUFFIX['number']}"
    if category == "spatial":
        (c1, s1), (c2, s2) = key
        return f"Where is the {c1} {s1} relative to the {c2} {s2}? {_SUFFIX['relation']}"
    if category == "comparison":
        return f"Are there more {PLURALS[key[0]]} than {PLURALS[key[1]]}? {_SUFFIX['yesno']}"
    if category == "pattern":
        return f"What {key} belongs in the empty cell? {_SUFFIX['word']}"
    raise ValueError(category)


def _deck_items(category: str) -> list[tuple]:
    if category == "colour":
        return [(s, c) for s in SHAPES for c in COLOUR_NAMES]
    if category == "shape":
        return [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    if category == "count":
        return [(s, n) for s in SHAPES for n in COUNTS]
    if category == "spatial":
        return [(None, r) for r in RELATIONS]
    if category == "comparison":
        return [((a, b), yn) for a in SHAPES for b in SHAPES if a != b for yn in YES_NO]
    return [("colour", c) for c in COLOUR_NAMES] + [("shape", s) for s in SHAPES]


class _Deck:
    def __init__(self, items: list, rng: np.random.Generator):
        self.items, self.rng, self.pool = list(items), rng, []

    def draw(self):
        if not self.pool:
            self.pool = [self.items[i] for i in self.rng.permutation(len(self.items))][::-1]
        return self.pool.pop()


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, s: int, rgb: tuple[int, int, int]) -> None:
    """Draw one filled shape in the s×s box at (x, y); no anti-aliasing, so every pixel is exactly `rgb`."""
    x1, y1 = x + s - 1, y + s - 1
    if shape == "circle":
        draw.ellipse((x, y, x1, y1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x, y, x1, y1), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x, y1), (x1, y1), ((x + x1) / 2, y)], fill=rgb)
    elif shape == "cross":
        arm = max(3, round(s * 0.3))
        off = (s - arm) // 2
        draw.rectangle((x + off, y, x + off + arm - 1, y1), fill=rgb)
        draw.rectangle((x, y + off, x1, y + off + arm - 1), fill=rgb)
    else:
        raise ValueError(shape)


def _pick(rng: np.random.Generator, options, exclude=()) -> str:
    pool = [o for o in options if o not in exclude]
    return pool[int(rng.integers(len(pool)))]


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, difficulty: int, size: int) -> None:
    for _ in range(3 + 4 * (difficulty - 1)):
        x, y = (int(v) for v in rng.integers(0, size - 2, 2))
        s = int(rng.integers(1, 3))
        draw.rectangle((x, y, x + s - 1, y + s - 1), fill=CLUTTER_GREYS[int(rng.integers(len(CLUTTER_GREYS)))])
    for _ in range(difficulty - 1):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        draw.line((x0, y0, x1, y1), fill=CLUTTER_LINES[int(rng.integers(len(CLUTTER_LINES)))], width=1)


def _grid_boxes(rng: np.random.Generator, cells: list[int], g: int, size: int) -> list[tuple[int, int, int]]:
    cw = size // g
    lo, hi = max(10, round(cw * 0.5)), cw - 4
    boxes = []
    for cell in cells:
        r, c = divmod(int(cell), g)
        s = int(rng.integers(lo, hi + 1))
        free = cw - 4 - s
        x = c * cw + 2 + int(rng.integers(0, free + 1))
        y = r * cw + 2 + int(rng.integers(0, free + 1))
        boxes.append((x, y, s))
    return boxes


def _random_object(rng, colours=COLOUR_NAMES, shapes=SHAPES, avoid=()) -> tuple[str, str]:
    """A random (colour, shape), drawn again while it is one of `avoid`."""
    while (obj := (_pick(rng, colours), _pick(rng, shapes))) in avoid:
        pass
    return obj


def _distractors(rng, difficulty, colours=COLOUR_NAMES, shapes=SHAPES, avoid=()) -> list[tuple[str, str]]:
    lo, hi = _DISTRACTORS[difficulty] if difficulty else (0, 1)
    return [_random_object(rng, colours, shapes, avoid) for _ in range(int(rng.integers(lo, hi + 1)))]


def _grid_scene(rng, category: str, key, answer: str, difficulty: int):
    """Objects (colour, shape) for a grid category; the first ones carry the answer. Returns (objects, key)."""
    def any_colour() -> str:
        return _pick(rng, COLOUR_NAMES)

    if category == "colour":
        objects = [(answer, key)] + _distractors(rng, difficulty, shapes=[s for s in SHAPES if s != key])
    elif category == "shape":
        objects = [(key, answer)] + _distractors(rng, difficulty, colours=[c for c in COLOUR_NAMES if c != key])
    elif category == "count":
        objects = [(any_colour(), key) for _ in range(int(answer))]
        objects += _distractors(rng, difficulty, shapes=[s for s in SHAPES if s != key])
    elif category == "comparison":
        gap = _COMPARE_GAP[difficulty]
        pairs = [(a, b) for a in range(1, _MAX_COMPARE + 1) for b in range(1, _MAX_COMPARE + 1)
                 if (a - b >= gap if answer == "yes" else b - a >= gap) and (difficulty < 4 or abs(a - b) == gap)]
        n1, n2 = pairs[int(rng.integers(len(pairs)))]
        objects = [(any_colour(), key[0]) for _ in range(n1)] + [(any_colour(), key[1]) for _ in range(n2)]
        objects += _distractors(rng, difficulty, shapes=[s for s in SHAPES if s not in key])
    else:
        a = _random_object(rng)
        b = _random_object(rng, avoid=(a,))
        key = (a, b)
        objects = [a, b] + _distractors(rng, difficulty, avoid=(a, b))
    return objects, key


def _spatial_cells(rng, relation: str, g: int, n: int) -> list[int]:
    line = int(rng.integers(g))
    i, j = sorted(int(v) for v in rng.choice(g, 2, replace=False))
    first, second = (i, j) if relation in ("left", "above") else (j, i)
    if relation in ("left", "right"):
        cells = [line * g + first, line * g + second]
    else:
        cells = [first * g + line, second * g + line]
    rest = [c for c in range(g * g) if c not in cells]
    return cells + [rest[int(k)] for k in rng.choice(len(rest), n - 2, replace=False)]


def _render_grid(rng, category, key, answer, difficulty, size, easy=False):
    objects, key = _grid_scene(rng, category, key, answer, 0 if easy else difficulty)
    if easy and category in ("colour", "shape"):
        objects = objects[:1]       # one large object: the first thing a fresh vision tower can learn to read
    g = (1 if len(objects) == 1 else 2 if len(objects) <= 4 else 3) if easy else _GRID[difficulty]
    if category == "spatial":
        cells = _spatial_cells(rng, answer, g, len(objects))
    else:
        cells = [int(c) for c in rng.choice(g * g, len(objects), replace=False)]
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, difficulty, size)
    for (colour, shape), (x, y, s) in zip(objects, _grid_boxes(rng, cells, g, size)):
        draw_shape(draw, shape, x, y, s, COLOURS[colour])
    return img, key, [(colour, shape, *divmod(cell, g)) for (colour, shape), cell in zip(objects, cells)], g


CAPTION_QUESTION = "Describe each cell, row by row."


def caption(scene: list[tuple[str, str, int, int]], g: int) -> str:
    """The whole g×g grid in reading order, "empty" for a free cell: "red circle, empty; empty, blue square".

    Pretraining asks it as the last turn of a grid item (after the questions, so no answer can read it): every
    object's colour, shape and cell become supervised tokens, where a question supervises one word.
    """
    cells = {(r, c): f"{colour} {shape}" for colour, shape, r, c in scene}
    return "; ".join(", ".join(cells.get((r, c), "empty") for c in range(g)) for r in range(g))


PAIRS = tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES)
AUX_NAMES = (tuple(f"count:{s}" for s in SHAPES) + tuple(f"count:{p}" for p in PAIRS)
             + tuple(f"row:{p}" for p in PAIRS) + tuple(f"col:{p}" for p in PAIRS))


def scene_target(scene: list[tuple[str, str, int, int]], g: int) -> list[float | None]:
    """A grid scene as numbers, in `AUX_NAMES` order: the count of each shape / 5, the count of each colour-shape
    pair, and the row and column centre of each pair present exactly once, as a fraction of the image's height and
    width ((row + 0.5) / g, so a place means the same on every grid size); None where a pair is absent or repeated.

    The records' `aux` field with `scene_targets=1`: `vlsi-edge train` with `train.aux_weight > 0` regresses it from
    the language model's hidden states at every text position after the image (README, "Scene targets")."""
    shapes = Counter(s for _, s, _, _ in scene)
    pairs = Counter(f"{c} {s}" for c, s, _, _ in scene)
    where = {f"{c} {s}": ((r + 0.5) / g, (k + 0.5) / g) for c, s, r, k in scene}
    once = {p: where[p] if pairs[p] == 1 else (None, None) for p in PAIRS}
    return ([shapes[s] / 5 for s in SHAPES] + [float(pairs[p]) for p in PAIRS]
            + [once[p][0] for p in PAIRS] + [once[p][1] for p in PAIRS])


def extra_questions(rng: np.random.Generator, scene: list[tuple[str, str, int, int]], asked: str,
                    limit: int = 3) -> list[tuple[str, str]]:
    """Up to `limit` more (question, answer) pairs about a grid scene [(colour, shape, row, col)], in the test
    categories' templates and answerable without ambiguity; `asked` is left out. Pretraining asks them as follow-up
    turns, so each image forward carries several image-dependent answers."""
    shapes = Counter(s for _, s, _, _ in scene)
    colours = Counter(c for c, _, _, _ in scene)
    pairs = Counter((c, s) for c, s, _, _ in scene)
    out = [(question_text("colour", s), c) for c, s, _, _ in scene if shapes[s] == 1]
    out += [(question_text("shape", c), s) for c, s, _, _ in scene if colours[c] == 1]
    out += [(question_text("count", s), str(n)) for s, n in shapes.items() if n <= len(COUNTS)]
    out += [(question_text("comparison", (a, b)), "yes" if shapes[a] > shapes[b] else "no")
            for a in shapes for b in shapes if a != b and shapes[a] != shapes[b]]
    for c1, s1, r1, k1 in scene:
        for c2, s2, r2, k2 in scene:
            if pairs[(c1, s1)] == pairs[(c2, s2)] == 1 and (c1, s1) != (c2, s2) and (r1 == r2) != (k1 == k2):
                relation = ("left" if k1 < k2 else "right") if r1 == r2 else ("above" if r1 < r2 else "below")
                out.append((question_text("spatial", ((c1, s1), (c2, s2))), relation))
    out = [qa for qa in out if qa[0] != asked]
    return [out[int(k)] for k in rng.permutation(len(out))[:limit]]


def _pattern_row(rng, attr: str, answer: str, difficulty: int) -> tuple[list[str], int]:
    n_cells, periods = _PATTERN[difficulty]
    values = COLOUR_NAMES if attr == "colour" else SHAPES
    while True:
        period = periods[int(rng.integers(len(periods)))]
        others = [values[int(i)] for i in rng.permutation(len(values)) if values[int(i)] != answer][: period - 1]
        cycle = [answer] + others
        hole = int(rng.integers(n_cells))
        seq = [cycle[(i - hole) % period] for i in range(n_cells)]
        probe: list[str | None] = list(seq)
        probe[hole] = None
        if complete_sequence(probe) == answer:
            return seq, hole


def _render_pattern(rng, attr: str, answer: str, difficulty: int, size: int):
    seq, hole = _pattern_row(rng, attr, answer, difficulty)
    n_cells = len(seq)
    cw = size // n_cells
    x_start = (size - n_cells * cw) // 2
    y0 = int(rng.integers(round(size * 0.3), round(size * 0.7) - cw + 1))
    fixed_colour, fixed_shape = _pick(rng, COLOUR_NAMES), _pick(rng, SHAPES)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, difficulty, size)
    for i, value in enumerate(seq):
        x0 = x_start + i * cw
        if i == hole:
            draw.rectangle((x0 + 1, y0 + 1, x0 + cw - 2, y0 + cw - 2), outline=OUTLINE, width=1)
            continue
        draw.rectangle((x0 + 1, y0 + 1, x0 + cw - 2, y0 + cw - 2), outline=CELL_LINE, width=1)
        if difficulty >= 3:
            other = _pick(rng, SHAPES if attr == "colour" else COLOUR_NAMES)
            s = int(rng.integers(max(10, cw - 7), cw - 4 + 1))
        else:
            other = fixed_shape if attr == "colour" else fixed_colour
            s = cw - 4
        colour, shape = (value, other) if attr == "colour" else (other, value)
        free = cw - 4 - s
        draw_shape(draw, shape, x0 + 2 + int(rng.integers(free + 1)), y0 + 2 + int(rng.integers(free + 1)), s,
                   COLOURS[colour])
    lo, hi = _PATTERN_DISTRACTORS[difficulty]
    placed: list[tuple[int, int, int]] = []
    scale = size / 112
    for _ in range(int(rng.integers(lo, hi + 1))):
        for _try in range(50):
            s = int(rng.integers(round(10 * scale), round(16 * scale) + 1))
            x = int(rng.integers(2, size - s - 2))
            top = bool(rng.integers(2))
            y_lo, y_hi = (2, y0 - 3 - s) if top else (y0 + cw + 3, size - 2 - s)
            if y_hi <= y_lo:
                continue
            y = int(rng.integers(y_lo, y_hi))
            if all(x + s + 3 <= px or px + ps + 3 <= x or y + s + 3 <= py or py + ps + 3 <= y
                   for px, py, ps in placed):
                placed.append((x, y, s))
                draw_shape(draw, _pick(rng, SHAPES), x, y, s, COLOURS[_pick(rng, COLOUR_NAMES)])
                break
    return img


def make_item(rng: np.random.Generator, category: str, key, answer: str, difficulty: int, size: int,
              easy: bool = False):
    """Draw one item: returns (PIL image, question text, choices, scene, g). `scene` lists a grid category's objects
    as (colour, shape, row, col) on its g×g grid; both are None for pattern rows. `easy` (pretrain only) draws a grid category on a
    2×2 or 3×3 grid with at most one distractor, so objects are two to four times larger."""
    if category == "pattern":
        img, scene, g = _render_pattern(rng, key, answer, difficulty, size), None, None
        choices = COLOUR_NAMES if key == "colour" else SHAPES
    else:
        img, key, scene, g = _render_grid(rng, category, key, answer, difficulty, size, easy)
        choices = ANSWERS[category]
    return img, question_text(category, key), list(choices), scene, g


def validate_params(**params) -> dict:
    """Check synth parameters (types and ranges); returns them with defaults filled in."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise DataError(f"unknown shapes parameter(s): {', '.join(unknown)}",
                        f"expected some of {', '.join(DEFAULTS)}")
    merged = {**DEFAULTS, **params}
    for name, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise DataError(f"shapes parameter {name}={value!r} is not an integer", "expected an integer")
        merged[name] = int(value)
    for name in ("n_pretrain", "n_train", "n_val", "n_test", "n_curriculum", "seed"):
        if merged[name] < 0:
            raise DataError(f"shapes parameter {name}={merged[name]} is negative", "expected 0 or more")
    for name in ("captions", "scene_targets"):
        if merged[name] not in (0, 1):
            raise DataError(f"shapes {name}={merged[name]} is not 0 or 1", f"expected {name}=0 or {name}=1")
    if not 1 <= merged["difficulty"] <= 5:
        raise DataError(f"shapes difficulty={merged['difficulty']} is out of range", "expected 1, 2, 3, 4 or 5")
    if not MIN_IMAGE_SIZE <= merged["image_size"] <= MAX_IMAGE_SIZE:
        raise DataError(f"shapes image_size={merged['image_size']} is out of range",
                        f"expected {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels")
    return merged


def generate_split(split: str, n: int, seed: int, difficulty: int, image_size: int, captions: bool = False,
                   scene_targets: bool = False):
    """Yield (record, png bytes) for one split, deterministically from `seed` and the split's own RNG stream.
    `captions` adds the caption turn to pretrain grid items and `scene_targets` the `aux` field to every grid item
    (neither draws from the RNG: images, questions and every other split stay byte-identical)."""
    rng = _split_rng(split, seed)
    categories = _Deck(list(CATEGORIES), rng)
    decks = {c: _Deck(_deck_items(c), rng) for c in CATEGORIES}
    seen: set[bytes] = set()
    for i in range(n):
        category = categories.draw()
        key, answer = decks[category].draw()
        easy = split == "pretrain" and i % 2 == 0 and category != "pattern"
        while True:
            img, question, choices, scene, g = make_item(rng, category, key, answer, difficulty, image_size, easy)
            if _is_new(img, seen):
                break
        turns = [(question, answer)]
        if split == "pretrain" and scene is not None:
            turns += extra_questions(rng, scene, question)
            turns += [(CAPTION_QUESTION, caption(scene, g))] if captions else []
        record, png = _item(split, i, img, category, choices, 0 if easy else difficulty, turns)
        if scene_targets and scene is not None:
            record["aux"] = scene_target(scene, g)
        yield record, png


def _is_new(img: Image.Image, seen: set[bytes]) -> bool:
    """True (and remembered) the first time these pixels appear in a split: every image of a split is unique."""
    digest = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
    if digest in seen:
        return False
    seen.add(digest)
    return True


def _item(split: str, i: int, img: Image.Image, category: str, choices: list[str], difficulty: int,
          turns: list[tuple[str, str]]) -> tuple[dict, bytes]:
    """(record, png bytes) of item i of a split: the image placeholder opens the first of the (question, answer)
    turns."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    item_id = f"{split}-{i:06d}"
    conversations = []
    for k, (question, answer) in enumerate(turns):
        conversations += [{"from": "human", "value": f"<image>\n{question}" if k == 0 else question},
                          {"from": "gpt", "value": answer}]
    return {"id": item_id, "image": f"images/{split}/{item_id}.png", "image_id": item_id, "category": category,
            "choices": choices, "difficulty": difficulty, "conversations": conversations}, buf.getvalue()


def _split_rng(split: str, seed: int) -> np.random.Generator:
    """Each split's own stream: child k of the seed's SeedSequence (children depend on k alone, so the curriculum
    splits appended after SPLITS leave every other split's bytes as they were)."""
    names = SPLITS + CURRICULUM_SPLITS
    children = np.random.SeedSequence(seed).spawn(len(names))
    return np.random.Generator(np.random.PCG64(children[names.index(split)]))


POSITION_QUESTIONS = {"horizontal": ("left", "right", "on the left or the right"),
                      "vertical": ("top", "bottom", "at the top or the bottom")}


def position_question(colour: str, shape: str, axis: str) -> str:
    return f"Is the {colour} {shape} {POSITION_QUESTIONS[axis][2]}? {_SUFFIX['word']}"


def generate_curriculum_split(split: str, n: int, seed: int, image_size: int, scene_targets: bool = False):
    """Yield (record, png bytes) for one warm-up stage; train on them in order, then on `pretrain`.

    - `solo-large`: one object in a cell of a 2x2 grid (28-52 px at 112 px); asks its shape, its colour, and which
      half of the image it is in, left/right and top/bottom.
    - `solo-small`: the same on a 4x4 grid, the test split's cell and object size (14-24 px).
    - `pairs`: two objects in one row or column of a 4x4 grid and nothing else; asks the test split's spatial
      question, then up to three follow-ups (`extra_questions`).
    - `triples`: a pair as in `pairs` plus one distractor in another cell (the test has one or two), so the two
      named objects have to be found among others; the same questions.

    Why: a tiny Qwen2-VL has no absolute position embedding, and a small object is one image token in sixteen. Trained
    from random init on small objects it stays at the answer prior, even for one object alone (measured: 2,500 student
    steps for its shape, 2,500 for its left/right half); on large objects it learns both within ~1,500 steps, and what
    it learned there carries over to small objects and then to relations between two of them (README, "Pretraining").
    """
    rng = _split_rng(split, seed)
    objects = _Deck([(c, s) for c in COLOUR_NAMES for s in SHAPES], rng)
    relations = _Deck(list(RELATIONS), rng)
    g = 2 if split == "solo-large" else 4
    seen: set[bytes] = set()
    for i in range(n):
        while True:
            img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
            draw = ImageDraw.Draw(img)
            _clutter(draw, rng, 1, image_size)
            if split in ("pairs", "triples"):
                relation = relations.draw()
                a = objects.draw()
                b = _random_object(rng, avoid=(a,))
                scene_objects = [a, b]
                if split == "triples":      # one distractor, never a copy of a named object
                    scene_objects.append(_random_object(rng, avoid=(a, b)))
                cells = _spatial_cells(rng, relation, g, len(scene_objects))
            else:
                scene_objects = [objects.draw()]
                cells = [int(rng.integers(g * g))]
            for (colour, shape), (x, y, s) in zip(scene_objects, _grid_boxes(rng, cells, g, image_size)):
                draw_shape(draw, shape, x, y, s, COLOURS[colour])
            if _is_new(img, seen):
                break
        scene = [(colour, shape, *divmod(cell, g)) for (colour, shape), cell in zip(scene_objects, cells)]
        if split in ("pairs", "triples"):
            category, choices = "spatial", list(RELATIONS)
            first = question_text("spatial", (a, b))
            turns = [(first, relation)] + extra_questions(rng, scene, first)
        else:
            (colour, shape, row, col), = scene
            category, choices = "shape", list(SHAPES)
            where = [(position_question(colour, shape, "horizontal"), "left" if col < g // 2 else "right"),
                     (position_question(colour, shape, "vertical"), "top" if row < g // 2 else "bottom")]
            turns = [(question_text("shape", colour), shape), (question_text("colour", shape), colour)]
            turns += [where[int(k)] for k in rng.permutation(2)]
        record, png = _item(split, i, img, category, choices, 0, turns)
        if scene_targets:
            record["aux"] = scene_target(scene, g)
        yield record, png


def _is_nonempty_dir(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def synth(out: Path, n_pretrain: int = 10000, n_train: int = 2000, n_val: int = 200, n_test: int = 1000,
          seed: int = 0, difficulty: int = 1, image_size: int = 112, captions: int = 0, n_curriculum: int = 0,
          scene_targets: int = 0, overwrite: bool = False) -> Path:
    """Generate the suite into `out` (see the module docstring); returns `out`. Refuses a non-empty `out` unless
    `overwrite`. Same parameters, same bytes."""
    params = validate_params(n_pretrain=n_pretrain, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed,
                             difficulty=difficulty, image_size=image_size, captions=captions,
                             n_curriculum=n_curriculum, scene_targets=scene_targets)
    out = Path(out)
    if _is_nonempty_dir(out) and not overwrite:
        raise DataError(f"output folder {out} already exists and is not empty",
                        "expected a new or empty folder; pass overwrite=True (or choose another --out)")
    tmp = staging_dir(out)
    try:
        counts: dict[str, dict] = {}
        stages = CURRICULUM_SPLITS if params["n_curriculum"] else ()
        for split in SPLITS + stages:
            img_dir = tmp / "images" / split
            img_dir.mkdir(parents=True)
            lines, per_cat = [], Counter()
            if split in CURRICULUM_SPLITS:
                items = generate_curriculum_split(split, params["n_curriculum"], params["seed"], params["image_size"],
                                                  bool(params["scene_targets"]))
            else:
                items = generate_split(split, params[f"n_{split}"], params["seed"], params["difficulty"],
                                       params["image_size"], bool(params["captions"]), bool(params["scene_targets"]))
            for record, png in items:
                (tmp / record["image"]).write_bytes(png)
                lines.append(json.dumps(record, sort_keys=True))
                per_cat[record["category"]] += 1
            body = "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"
            (tmp / f"{split}.json").write_text(body, encoding="utf-8")
            counts[split] = {c: per_cat[c] for c in CATEGORIES}
        info = {
            "generator": "vlsi_edge.data.shapes",
            "version": GENERATOR_VERSION,
            "params": params,
            "counts": counts,
            "totals": {split: sum(c.values()) for split, c in counts.items()},
            "categories": list(CATEGORIES),
            "answers": {c: list(a) for c, a in ANSWERS.items()},
            "palette": {k: list(v) for k, v in COLOURS.items()},
        }
        (tmp / "info.json").write_text(json.dumps(info, sort_keys=True, indent=1) + "\n", encoding="utf-8")
        publish_dir(tmp, out, overwrite, lambda: DataError(
            f"output folder {out} appeared while generating and is not empty",
            "expected a new or empty folder; pass overwrite=True"))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
