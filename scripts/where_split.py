"""Experiment data (not library splits) for the tiny Qwen2-VL teacher: the `where` stage, its held-out probe, the
`tally` stage and the `lookup` stage.

    python scripts/where_split.py --data builtin:shapes:n_pretrain=6000,captions=1,n_curriculum=3000,n_val=1000 \
        --out runs/data-where [--n 3000] [--n-probe 400] [--n-tally 0] [--n-lookup 0]

Writes a dataset folder `--out` that `vlsi-edge train --data` and `vlsi-edge eval --data` read: every split of
`--data` (json copied, images hard-linked where the filesystem allows, else copied), plus

- `where` (`--n` items): the test split's spatial scene (two named objects in one row or column of a 4x4 grid and
  0-2 distractors, difficulty-1 clutter), asked the spatial relation and the row and column (1-4, counted from the
  top left) of both named objects, five turns in random order but for the relation, which comes first in every
  other item and third in the rest;
- `probe` (`--n-probe` items, another seed, always 1-2 distractors): one question each, the row or the column of
  the first named object; categories `row` and `column`, chance 0.25;
- `tally` (`--n-tally` items, none by default): the test split's comparison scene (1-5 objects of each of two
  shapes, counts at least two apart, one or two objects of the other shapes, colours at random), asked both
  comparisons and both counts in random order, then the shape of up to two objects whose colour is unique;
- `lookup` (`--n-lookup` items, none by default): 2-5 objects in distinct colours on the test split's grid, asked the
  shape of every object by its colour and the colour of every object whose shape is unique, in random order.

Every item of these four splits carries its scene's `aux` target (`shapes.scene_target`), as the builtin splits do
with `scene_targets=1` in `--data`.

Why: on the test split the teacher's spatial answers are not even on the right axis, so it does not find the two
named objects among others. Asking where each named object is supervises that step directly (README, "The
`where` stage"). The teacher's comparison answers sit at the answer prior and its test shape answers confuse
squares with circles and triangles with crosses; `tally` asks for the counts a comparison rests on and for shapes in
the same crowded scenes (README, "The `tally` stage"). Deterministic for given arguments. Writes into a temporary
folder beside `--out` and renames it at the end; refuses an existing `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlsi_edge.data import shapes as S
from vlsi_edge.data.conversations import open_dataset
from vlsi_edge.errors import DataError, UserError
from vlsi_edge.fileio import publish_dir, staging_dir

GRID, SIZE = 4, 112


def _canvas(rng: np.random.Generator):
    """A white SIZE x SIZE image with the test split's (difficulty-1) clutter, and its drawing context."""
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    S._clutter(draw, rng, 1, SIZE)
    return img, draw


def _scene(objects, cells) -> list[tuple[str, str, int, int]]:
    return [(c, s, *divmod(cell, GRID)) for (c, s), cell in zip(objects, cells)]


def _item(split: str, i: int, img, category: str, choices: list[str], difficulty: int, turns, scene):
    """`shapes._item` plus the scene's `aux` target (`shapes.scene_target`), as `builtin:shapes:scene_targets=1`."""
    record, png = S._item(split, i, img, category, choices, difficulty, turns)
    record["aux"] = S.scene_target(scene, GRID)
    return record, png


def _place(draw: ImageDraw.ImageDraw, rng: np.random.Generator, objects, cells) -> None:
    """Draw each (colour, shape) in its cell of the GRID x GRID grid, sized and placed as the test split does."""
    for (colour, shape), (x, y, side) in zip(objects, S._grid_boxes(rng, cells, GRID, SIZE)):
        S.draw_shape(draw, shape, x, y, side, S.COLOURS[colour])


def scene(rng: np.random.Generator, seen: set, distractors: tuple[int, int]):
    """(image, relation, [(colour, shape, row, col)] with the named pair first): a test-like spatial scene."""
    while True:
        img, draw = _canvas(rng)
        relation = S.RELATIONS[int(rng.integers(len(S.RELATIONS)))]
        a = S._random_object(rng)
        b = S._random_object(rng, avoid=(a,))
        objects = [a, b] + [S._random_object(rng, avoid=(a, b)) for _ in range(int(rng.integers(*distractors)))]
        cells = S._spatial_cells(rng, relation, GRID, len(objects))
        _place(draw, rng, objects, cells)
        if S._is_new(img, seen):
            return img, relation, _scene(objects, cells)


def where_question(axis: str, colour: str, shape: str) -> str:
    return f"Which {axis} is the {colour} {shape} in? {S._SUFFIX['number']}"


def where_items(n: int, seed: int = 12345):
    """Yield (record, png) for the `where` split."""
    rng, seen = np.random.default_rng(seed), set()
    for i in range(n):
        img, relation, objects = scene(rng, seen, (0, 3))
        asks = []
        for colour, shape, row, col in objects[:2]:
            asks += [(where_question("row", colour, shape), str(row + 1)),
                     (where_question("column", colour, shape), str(col + 1))]
        asks = [asks[int(k)] for k in rng.permutation(len(asks))]
        (c1, s1, _, _), (c2, s2, _, _) = objects[:2]
        first = (S.question_text("spatial", ((c1, s1), (c2, s2))), relation)
        turns = [first] + asks if i % 2 == 0 else asks[:2] + [first] + asks[2:]
        yield _item("where", i, img, "spatial", list(S.RELATIONS), 0, turns, objects)


def probe_items(n: int, seed: int = 999):
    """Yield (record, png) for the `probe` split: the row or the column of the first named object."""
    rng, seen = np.random.default_rng(seed), set()
    for i in range(n):
        img, _, objects = scene(rng, seen, (1, 3))
        colour, shape, row, col = objects[0]
        axis = ("row", "column")[i % 2]
        answer = str((row, col)[i % 2] + 1)
        yield S._item("probe", i, img, axis, ["1", "2", "3", "4"], 1, [(where_question(axis, colour, shape), answer)])


def tally_scene(rng: np.random.Generator):
    """The test split's comparison scene: (image, [(colour, shape, row, col)], (first, n1), (second, n2)), where n1
    and n2 are 1-5 objects of two shapes at least two apart and one or two objects of the other shapes follow."""
    gap = S._COMPARE_GAP[1]
    pairs = [(a, b) for a in range(1, S._MAX_COMPARE + 1) for b in range(1, S._MAX_COMPARE + 1) if abs(a - b) >= gap]
    first, second = (S.SHAPES[int(k)] for k in rng.choice(len(S.SHAPES), 2, replace=False))
    n1, n2 = pairs[int(rng.integers(len(pairs)))]
    others = [s for s in S.SHAPES if s not in (first, second)]
    objects = [(S._pick(rng, S.COLOUR_NAMES), first) for _ in range(n1)]
    objects += [(S._pick(rng, S.COLOUR_NAMES), second) for _ in range(n2)]
    objects += [S._random_object(rng, shapes=others) for _ in range(int(rng.integers(1, 3)))]
    cells = [int(c) for c in rng.choice(GRID * GRID, len(objects), replace=False)]
    img, draw = _canvas(rng)
    _place(draw, rng, objects, cells)
    return img, _scene(objects, cells), (first, n1), (second, n2)


def tally_asks(rng: np.random.Generator, first: str, n1: int, second: str, n2: int) -> list[tuple[str, str]]:
    """Both comparisons and both counts of a tally scene, in random order."""
    more = "yes" if n1 > n2 else "no"
    asks = [(S.question_text("comparison", (first, second)), more),
            (S.question_text("comparison", (second, first)), "no" if more == "yes" else "yes"),
            (S.question_text("count", first), str(n1)), (S.question_text("count", second), str(n2))]
    return [asks[int(k)] for k in rng.permutation(len(asks))]


def tally_items(n: int, seed: int = 4242):
    """Yield (record, png) for the `tally` split: a tally scene asked both comparisons and both counts (in random
    order), then the shape of up to two objects whose colour is unique in the scene."""
    rng, seen = np.random.default_rng(seed), set()
    for i in range(n):
        while True:
            img, objects, (first, n1), (second, n2) = tally_scene(rng)
            if S._is_new(img, seen):
                break
        asks = tally_asks(rng, first, n1, second, n2)
        colours = [c for c, _, _, _ in objects]
        unique = [(c, s) for c, s, _, _ in objects if colours.count(c) == 1]
        asks += [(S.question_text("shape", unique[int(k)][0]), unique[int(k)][1])
                 for k in rng.permutation(len(unique))[:2]]
        yield _item("tally", i, img, "comparison", list(S.YES_NO), 1, asks, objects)


def lookup_items(n: int, seed: int = 777):
    """Yield (record, png) for the `lookup` split: a test-like scene of 2-5 objects in distinct colours, asked the
    shape of every object by its colour, then the colour of every object whose shape is unique, in random order."""
    rng, seen = np.random.default_rng(seed), set()
    for i in range(n):
        while True:
            k = int(rng.integers(2, 6))
            colours = [S.COLOUR_NAMES[int(c)] for c in rng.choice(len(S.COLOUR_NAMES), k, replace=False)]
            objects = [(c, S._pick(rng, S.SHAPES)) for c in colours]
            cells = [int(c) for c in rng.choice(GRID * GRID, k, replace=False)]
            img, draw = _canvas(rng)
            _place(draw, rng, objects, cells)
            if S._is_new(img, seen):
                break
        shapes = [s for _, s in objects]
        asks = [(S.question_text("shape", c), s) for c, s in objects]
        asks += [(S.question_text("colour", s), c) for c, s in objects if shapes.count(s) == 1]
        asks = [asks[int(j)] for j in rng.permutation(len(asks))]
        yield _item("lookup", i, img, "shape", list(S.SHAPES), 1, asks, _scene(objects, cells))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build(data: str, out: Path, n: int, n_probe: int, n_tally: int = 0, n_lookup: int = 0) -> Path:
    source = open_dataset(data, split="test").image_root     # materialises a builtin spec in the cache
    if out.exists():
        raise DataError(f"output folder {out} already exists", "expected a new folder; choose another --out")
    tmp = staging_dir(out)
    try:
        for p in sorted(Path(source).iterdir()):
            if p.suffix == ".json" and p.stem != "info":
                shutil.copy2(p, tmp / p.name)
        for folder in sorted((Path(source) / "images").iterdir()):
            (tmp / "images" / folder.name).mkdir(parents=True)
            for f in folder.iterdir():
                _link_or_copy(f, tmp / "images" / folder.name / f.name)
        splits = [("where", where_items(n)), ("probe", probe_items(n_probe))]
        if n_tally:
            splits.append(("tally", tally_items(n_tally)))
        if n_lookup:
            splits.append(("lookup", lookup_items(n_lookup)))
        for split, items in splits:
            (tmp / "images" / split).mkdir(parents=True)
            lines = []
            for record, png in items:
                (tmp / record["image"]).write_bytes(png)
                lines.append(json.dumps(record, sort_keys=True))
            (tmp / f"{split}.json").write_text("[\n" + ",\n".join(lines) + "\n]\n")
        publish_dir(tmp, out, overwrite=False,
                    appeared_error=lambda: DataError(f"output folder {out} appeared while it was being written",
                                                     "expected a new folder; choose another --out"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="builtin:shapes:n_pretrain=6000,captions=1,n_curriculum=3000,n_val=1000")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--n-probe", type=int, default=400)
    ap.add_argument("--n-tally", type=int, default=0)
    ap.add_argument("--n-lookup", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n < 1 or args.n_probe < 1 or min(args.n_tally, args.n_lookup) < 0:
        print("where_split: error: --n and --n-probe must be positive, --n-tally and --n-lookup at least 0",
              file=sys.stderr)
        return 2
    try:
        print(build(args.data, Path(args.out), args.n, args.n_probe, args.n_tally, args.n_lookup))
    except UserError as e:
        print(f"where_split: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
