"""Can a tiny VLM family learn where a single object is? A probe of the plateau the tiny Qwen2-VL models sit on.

    python benchmarks/position_readout.py [--models builtin:tiny-qwen2vl-student builtin:tiny-llava_onevision-student]
                                          [--steps 600] [--n-train 3200] [--n-test 200] [--workdir DIR] [--frame]
                                          [--warmup-steps N]

One object (random colour, shape, size 20-39 px) on a white 112 px image, in the left or right half (or the top or
bottom half); the question names it and asks which half. Each model is trained from its random-init preset with
`vlsi-edge train` (batch 16, lr 1e-3, one thread) on `--n-train` such items per axis and scored on `--n-test` held-out
ones with `vlsi-edge eval`. Chance is 50%. `--frame` draws a 3 px dark border round every image, a fixed landmark
that a relative-position encoder could measure from. `--warmup-steps N` first trains N steps on large objects (44-52
px, about four image tokens across) and then `--steps` on the usual ones from that checkpoint: the size curriculum
that gets the tiny Qwen2-VL off the plateau (README, "Pretraining the tiny models").

Why it matters: the `spatial` category of builtin:shapes asks for relations between objects, and the tiny Qwen2-VL
teacher and student stay at chance on it. Qwen2-VL has no absolute position embedding (M-RoPE in the language model,
2D RoPE in the vision tower), while LLaVA-OneVision's SigLIP tower adds a learned one to every patch. Prints a table
and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from vlsi_edge.data.shapes import COLOURS, SHAPES, draw_shape, position_question
from vlsi_edge.data.shapes import POSITION_QUESTIONS as AXES  # axis: (first half, second half, phrase)

ROOT = Path(__file__).resolve().parents[1]
SMALL, LARGE = (20, 40), (44, 53)   # object sides in px, [lo, hi)


def make_items(folder: Path, axis: str, n: int, seed: int, frame: bool = False, sizes: tuple[int, int] = SMALL) -> Path:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    first, second, _ = AXES[axis]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(n):
        side = (first, second)[k % 2]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = int(rng.integers(*sizes))
        near = int(rng.integers(0, 56 - size)) if side == first else int(rng.integers(56, 112 - size))
        other = int(rng.integers(0, 112 - size))
        x, y = (near, other) if axis == "horizontal" else (other, near)
        image = Image.new("RGB", (112, 112), "white")
        draw = ImageDraw.Draw(image)
        draw_shape(draw, shape, x, y, size, COLOURS[colour])
        if frame:
            draw.rectangle((0, 0, 111, 111), outline=(40, 40, 40), width=3)
        rel = f"images/{k:05d}.png"
        image.save(folder / rel)
        records.append({"id": f"{axis}-{seed}-{k:05d}", "image": rel, "category": "spatial", "choices": [first, second],
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{position_question(colour, shape, axis)}"},
                            {"from": "gpt", "value": side}]})
    path = folder / "items.json"
    path.write_text(json.dumps(records))
    return path


def _cli(*args: str, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "vlsi_edge.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"position_readout: `vlsi-edge {args[0]}` failed; see {log}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    default=["builtin:tiny-qwen2vl-student", "builtin:tiny-llava_onevision-student"])
    ap.add_argument("--axes", nargs="+", default=list(AXES), choices=list(AXES))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--n-train", type=int, default=3200)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--warmup-steps", type=int, default=0,
                    help="first train this many steps on large objects (44-52 px), then --steps on the usual ones")
    ap.add_argument("--frame", action="store_true", help="draw a dark 3 px border round every image")
    ap.add_argument("--workdir", default=None, help="keep data, runs and logs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="position-readout-"))
    rows = []
    for axis in args.axes:
        train = make_items(work / f"data-{axis}-train", axis, args.n_train, seed=0, frame=args.frame)
        test = make_items(work / f"data-{axis}-test", axis, args.n_test, seed=1, frame=args.frame)
        if args.warmup_steps:
            large = make_items(work / f"data-{axis}-large", axis, args.n_train, seed=2, frame=args.frame, sizes=LARGE)
        for model in args.models:
            name = model.removeprefix("builtin:").replace("/", "_")
            run, log = work / f"run-{axis}-{name}", work / f"{axis}-{name}.log"
            stages = ([(large, args.warmup_steps, Path(f"{run}-large"))] if args.warmup_steps else []) + [
                (train, args.steps, run)]
            start = model
            for data, steps, out in stages:
                _cli("train", "--model", start, "--data", str(data), "--split", "train", "--out", str(out),
                     "--steps", str(steps), "--batch-size", "16", "--lr", "1e-3", "--overwrite",
                     "--set", "optim.warmup_steps=50", "train.checkpoint_every=100000", log=log)
                start = str(out / "student")
            _cli("eval", "--model", str(run / "student"), "--data", str(test), "--out", str(run / "test.json"), log=log)
            overall = json.loads((run / "test.json").read_text())["metrics"]["overall"]
            rows.append({"axis": axis, "model": model, "warmup_steps": args.warmup_steps, "steps": args.steps,
                         "accuracy": overall["acc"],
                         "ci95": [overall["lo"], overall["hi"]], "n": overall["n"]})
            r = rows[-1]
            print(f"{axis:10s}  {model:40s}  {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]  n={r['n']}",
                  file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "position_readout", "chance": 0.5, "workdir": str(work), "frame": args.frame,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
