"""Blind baselines on `builtin:shapes`: chance, text-only, blank-image and the pixel solver, per category.

    python benchmarks/shapes_baselines.py [--difficulty D --seed S]

Materialises the default `builtin:shapes` split (cached under $VLSI_EDGE_CACHE/data), prints a table and ends
with one JSON line holding every number. Text-only and blank-image must sit near chance (the question alone must
not give the answer away); the solver must reach 100% (every item is answerable from its pixels).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from vlsi_edge.data.baselines import blank_image_baseline, solver_baseline, text_only_baseline
from vlsi_edge.data.conversations import open_dataset
from vlsi_edge.data.shapes import CATEGORIES, GENERATOR_VERSION


def _pct(value) -> str:
    return "   n/a" if value is None else f"{100 * value:6.1f}"


def run(difficulty: int = 1, seed: int = 0) -> dict:
    spec = f"builtin:shapes:difficulty={difficulty},seed={seed}"
    start = time.perf_counter()
    train, test = open_dataset(spec, "train"), open_dataset(spec, "test")
    n_train, n_test = len(train), len(test)
    prepare_s = time.perf_counter() - start
    results = {r["name"]: r for r in (text_only_baseline(train, test), blank_image_baseline(test),
                                      solver_baseline(test))}
    rows = {}
    for category in list(CATEGORIES) + ["overall"]:
        blocks = {name: r["overall"] if category == "overall" else r["per_category"].get(category)
                  for name, r in results.items()}
        if any(b is None for b in blocks.values()):
            continue
        rows[category] = {"n": blocks["solver"]["n"], "chance": blocks["solver"]["chance"],
                          **{name: b["acc"] for name, b in blocks.items()}}
    return {"benchmark": "shapes_baselines", "spec": spec, "generator_version": GENERATOR_VERSION,
            "n_train": n_train, "n_test": n_test, "prepare_s": round(prepare_s, 2), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--difficulty", type=int, default=1, help="1..5 (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run(args.difficulty, args.seed)
    print(f"{report['spec']}  train={report['n_train']} test={report['n_test']}  "
          f"(materialise + count {report['prepare_s']:.1f}s)")
    print(f"{'category':<12} {'n':>5} {'chance':>7} {'text':>7} {'blank':>7} {'solver':>7}   (accuracy, %)")
    for category, row in report["rows"].items():
        print(f"{category:<12} {row['n']:>5} {_pct(row['chance'])} {_pct(row['text-only'])} "
              f"{_pct(row['blank-image'])} {_pct(row['solver'])}")
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
