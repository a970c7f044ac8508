"""Experiment (not a library feature): scene targets that follow the question, for `vlsi-edge train`.

    python scripts/question_targets.py --data DIR --splits pairs,triples,tally,train,pretrain [--suffix q]

For every listed split of a data folder whose records carry scene targets (`aux`, 76 numbers in
`shapes.AUX_NAMES` order, from `builtin:shapes:scene_targets=1` or `scripts/where_split.py`), writes
`DIR/{split}-{suffix}.json`: the same records, with six numbers appended to `aux` (`QUESTION_NAMES`):

- the row and column of the two objects named by the record's first spatial question ("Where is the red circle
  relative to the blue square?"), in the order of `shapes.PAIRS`, not of the question, so that a record asking
  both "a relative to b" and "b relative to a" has one target;
- the counts (divided by 5) of the two shapes named by its first comparison question, in `shapes.SHAPES` order.

Entries a record has no such question for are null. The new files sit beside the old ones, so the records' image
paths stay valid: train on them with `--split pairs-q+tally-q+...`.

Why: the scene target's rows and columns are for all 24 colour-shape pairs at once, which the tiny language
model never learned (README, "Scene targets"), while a question names only two objects. The answer loss says
only which of four words is right; these numbers ask, at every text position after the image, for the named
objects' places and the named shapes' counts themselves.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from vlsi_edge.data.shapes import AUX_NAMES, PAIRS, PLURALS, SHAPES
from vlsi_edge.errors import UserError
from vlsi_edge.fileio import atomic_path

QUESTION_NAMES = ("q:row first", "q:col first", "q:row second", "q:col second",
                  "q:count first", "q:count second")
_SPATIAL = re.compile(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?")
_COMPARE = re.compile(r"Are there more (\w+) than (\w+)\?")
_PLURAL = {plural: shape for shape, plural in PLURALS.items()}
_INDEX = {name: i for i, name in enumerate(AUX_NAMES)}


def question_target(record: dict) -> list[float | None]:
    """The six numbers for one record (its `aux` must be the 76-number scene target)."""
    aux = record["aux"]
    out: list[float | None] = [None] * len(QUESTION_NAMES)
    questions = [t["value"] for t in record["conversations"] if t["from"] == "human"]
    for text in questions:
        m = _SPATIAL.search(text)
        if m:
            named = sorted({f"{m.group(1)} {m.group(2)}", f"{m.group(3)} {m.group(4)}"} & set(PAIRS), key=PAIRS.index)
            if len(named) == 2:
                out[:4] = [aux[_INDEX[f"{axis}:{pair}"]] for pair in named for axis in ("row", "col")]
            break
    for text in questions:
        m = _COMPARE.search(text)
        if m and m.group(1) in _PLURAL and m.group(2) in _PLURAL:
            named = sorted({_PLURAL[m.group(1)], _PLURAL[m.group(2)]}, key=SHAPES.index)
            if len(named) == 2:
                out[4:] = [aux[_INDEX[f"count:{s}"]] for s in named]
            break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--splits", required=True)
    ap.add_argument("--suffix", default="q")
    args = ap.parse_args(argv)
    try:
        for split in args.splits.split(","):
            src = args.data / f"{split}.json"
            if not src.is_file():
                raise UserError(f"{src} not found", "expected a data folder from scripts/where_split.py")
            records = json.loads(src.read_text())
            n = 0
            for r in records:
                if r.get("aux") is None:
                    continue
                if len(r["aux"]) != len(AUX_NAMES):
                    raise UserError(f"{src}: record {r.get('id')!r} has {len(r['aux'])} aux entries, expected "
                                    f"{len(AUX_NAMES)}", "make the folder with scene_targets=1")
                extra = question_target(r)
                n += any(v is not None for v in extra)
                r["aux"] = r["aux"] + extra
            width = len(AUX_NAMES) + len(QUESTION_NAMES)
            for r in records:       # records without a scene get an all-null target of the same width
                if r.get("aux") is None:
                    r["aux"] = [None] * width
            dst = args.data / f"{split}-{args.suffix}.json"
            with atomic_path(dst) as tmp:
                tmp.write_text(json.dumps(records))
            print(f"{dst}: {len(records)} records, {n} with a question target")
    except UserError as e:
        print(f"question_targets: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
