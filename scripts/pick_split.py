"""Experiment helper (not a library feature): copy one category's items of a dataset split into another dataset
folder as a new split.

    python scripts/pick_split.py --source DIR --split train --category spatial --into DATA --name sp

Reads `DIR/SPLIT.json` (a `vlsi-edge data synth` folder or any LLaVA-JSON folder), keeps the items whose
`category` is `--category`, and writes them as `DATA/NAME.json`: each id prefixed with `NAME-`, each image
hard-linked (copied where the filesystem refuses) to `DATA/images/NAME/`. Refuses an existing `DATA/NAME.json`.

Why: the teacher's spatial stages (README, "Cosine to zero") train on many more items drawn like the test split's
spatial items than the train split holds; `data synth --n-train 30000 --seed 5 --scene-targets` into a scratch
folder, then this, gives 5,000 of them with no image shared with val or test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from vlsi_edge.fileio import atomic_path


def pick(source: Path, split: str, category: str, into: Path, name: str) -> int:
    """Write `into/name.json` and its images; returns the number of items."""
    src = source / f"{split}.json"
    if not src.is_file():
        raise ValueError(f"{src} not found; expected a dataset folder holding {split}.json")
    if not into.is_dir():
        raise ValueError(f"{into} is not a folder; expected the dataset folder to add the split to")
    dst = into / f"{name}.json"
    if dst.exists():
        raise ValueError(f"{dst} already exists; choose another --name or remove it")
    items = [r for r in json.loads(src.read_text(encoding="utf-8")) if r.get("category") == category]
    if not items:
        raise ValueError(f"{src} has no item of category {category!r}")
    images = into / "images" / name
    images.mkdir(parents=True, exist_ok=True)
    out = []
    for r in items:
        rel = Path("images") / name / Path(r["image"]).name
        if not (into / rel).exists():
            try:
                os.link(source / r["image"], into / rel)
            except OSError:
                shutil.copyfile(source / r["image"], into / rel)
        out.append({**r, "id": f"{name}-{r['id']}", "image": rel.as_posix()})
    with atomic_path(dst) as tmp:
        Path(tmp).write_text(json.dumps(out), encoding="utf-8")
    return len(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, type=Path)
    ap.add_argument("--split", default="train")
    ap.add_argument("--category", required=True)
    ap.add_argument("--into", required=True, type=Path)
    ap.add_argument("--name", required=True)
    args = ap.parse_args(argv)
    try:
        n = pick(args.source, args.split, args.category, args.into, args.name)
    except (ValueError, OSError) as e:
        print(f"pick_split: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.into / (args.name + '.json')}: {n} items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
