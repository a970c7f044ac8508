"""Train the tiny Qwen2-VL teacher on one GPU: one or more recipes side by side, sized to a wall-clock budget.

    python scripts/pretrain_gpu.py --out pretrain-gpu --budget 330            # one CUDA GPU, ~6 minutes
    python scripts/pretrain_gpu.py --out /tmp/p --budget 120 --device cpu --quick  # a dry run of the plumbing
    python scripts/pretrain_gpu.py --out more --model RUN/student --split solo-small+pairs+triples+train+pretrain \
        --data builtin:shapes:n_pretrain=6000,captions=1,n_curriculum=3000 --recipe mixed=32,5e-4,100,4

Each recipe (`--recipe NAME=BATCH,LR,WARMUP,SEED`, repeatable; default the six below) is a `vlsi-edge train` run
from `--model` on `--split` of `--data`. The GPU is shared by all recipes at once (tiny models leave it mostly idle;
the host collates images). First every recipe runs a short probe under that same load to measure its seconds per
step, then it gets as many steps as fit the budget (the cosine schedule needs the count up front). Every finished run
is scored with `vlsi-edge eval` on `--select-split` and on the 1,000-item test split; the best (largest margin of the
95% CI's lower bound over chance, minimised over categories, on the selection split, so the test split stays
unbiased) is named in `OUT/summary.json`. `scripts/ship_pretrained.py` ships a chosen run like any other.

Measured once (2026-11-27, one H200 with 16 host cores, budget 380 s, `benchmarks/results/pretrain-gpu-sweep-h200.json`,
selected on the test split then): six recipes side by side ran at 0.23-0.55 s per step each (the host's collation
and Python overhead, shared by six processes and one GPU context switch, dominate tiny models), so each got only
356-869 steps and none left the plateau on shape or spatial questions (best overall 0.389). A GPU helps these models
through longer runs, not through more recipes at once.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vlsi_edge.data.shapes import CHANCE

DATA = "builtin:shapes:n_pretrain=60000"
# name: (batch size, peak lr, warm-up steps, data-order seed)
RECIPES = {
    "b16-lr1e-3": (16, 1e-3, 200, 0),
    "b32-lr1e-3": (32, 1e-3, 200, 0),
    "b64-lr1e-3": (64, 1e-3, 300, 0),
    "b64-lr2e-3": (64, 2e-3, 300, 0),
    "b32-lr5e-4": (32, 5e-4, 200, 0),
    "b32-lr1e-3-s1": (32, 1e-3, 200, 1),
}
PROBE_STEPS = 30


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlsi_edge.cli", *args]


def parse_recipe(text: str) -> tuple[str, tuple[int, float, int, int]]:
    """NAME=BATCH,LR,WARMUP,SEED -> (name, (batch, lr, warmup, seed))."""
    name, sep, values = text.partition("=")
    parts = values.split(",")
    try:
        if not sep or not name or len(parts) != 4:
            raise ValueError
        return name, (int(parts[0]), float(parts[1]), int(parts[2]), int(parts[3]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"recipe {text!r}: expected NAME=BATCH,LR,WARMUP,SEED "
                                         "(e.g. b32=32,5e-4,100,0)") from None


def train_cmd(model: str, recipe: tuple, out: Path, steps: int, data: str, split: str) -> list[str]:
    bs, lr, warmup, seed = recipe
    return cli("train", "--model", model, "--data", data, "--split", split, "--out", str(out),
               "--steps", str(steps), "--batch-size", str(bs), "--lr", str(lr), "--seed", str(seed), "--overwrite",
               "--set", f"optim.warmup_steps={min(warmup, steps // 5)}", "train.checkpoint_every=1000000")


def launch_all(cmds: dict[str, list[str]], logs: Path, env: dict) -> dict[str, subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    return {n: subprocess.Popen(c, stdout=open(logs / f"{n}.log", "w"), stderr=subprocess.STDOUT, env=env)
            for n, c in cmds.items()}


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, int]:
    codes = {}
    for n, p in procs.items():
        try:
            codes[n] = p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            codes[n] = -9
    return codes


def seconds_per_step(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return statistics.median(r["sec"] for r in rows[len(rows) // 3:])


def margin(doc: dict) -> float:
    cats = doc["metrics"]["per_category"]
    return min(cats[c]["lo"] - CHANCE[c] for c in CHANCE if c in cats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=330, help="wall seconds for probe + training, all runs at once")
    ap.add_argument("--eval-seconds", type=float, default=90, help="wall seconds kept for scoring at the end")
    ap.add_argument("--model", default="builtin:tiny-qwen2vl-teacher", help="where every recipe starts")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--split", default="pretrain", help="training split (a+b: their union)")
    ap.add_argument("--recipe", type=parse_recipe, action="append",
                    help="NAME=BATCH,LR,WARMUP,SEED (repeatable; default: the six built-in recipes)")
    ap.add_argument("--select-split", default="val", help="split the best run is chosen on (default val)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="two recipes, tiny data (plumbing check)")
    args = ap.parse_args()
    start = time.time()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    recipes = dict(args.recipe) if args.recipe else dict(RECIPES)
    names = list(recipes)[:2] if args.quick else list(recipes)
    data = "builtin:shapes:n_pretrain=400,n_test=60,n_train=0,n_val=60" if args.quick else args.data
    split = "pretrain" if args.quick else args.split
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // (len(names) + 1))),
           "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    # the data is synthesised once, before the runs race for it
    from vlsi_edge.data.conversations import open_dataset
    for part in dict.fromkeys([*split.split("+"), args.select_split, "test"]):
        open_dataset(data, split=part)
    print(f"[{time.time() - start:5.0f}s] data ready; probing {len(names)} recipes", flush=True)

    probe_steps, min_steps = (10, 5) if args.quick else (PROBE_STEPS, 50)   # quick: seconds-long runs on a CPU
    probes = launch_all({n: train_cmd(args.model, recipes[n], out / "probe" / n, probe_steps, data, split)
                         for n in names}, out / "logs" / "probe", env)
    codes = wait_all(probes, start + args.budget)
    sec = {n: seconds_per_step(out / "probe" / n) for n in names if codes[n] == 0}
    probe_wall = time.time() - start
    print(f"[{probe_wall:5.0f}s] probe: " + ", ".join(f"{n} {s * 1000:.0f} ms/step" for n, s in sec.items()),
          flush=True)
    shutil.rmtree(out / "probe", ignore_errors=True)
    if not sec:
        raise SystemExit("every probe failed; see " + str(out / "logs" / "probe"))

    startup = 20.0  # import, model build and data load of one run, measured loosely
    left = start + args.budget - time.time() - startup
    steps = {n: max(min_steps, int(0.9 * left / s)) for n, s in sec.items()}
    print(f"[{time.time() - start:5.0f}s] training: " + ", ".join(f"{n} {k} steps" for n, k in steps.items()),
          flush=True)
    runs = launch_all({n: train_cmd(args.model, recipes[n], out / n, k, data, split) for n, k in steps.items()},
                      out / "logs", env)
    codes = wait_all(runs, start + args.budget + 60)
    print(f"[{time.time() - start:5.0f}s] trained: {codes}", flush=True)

    done = [n for n, c in codes.items() if c == 0]
    # the test split does not depend on n_pretrain or n_train (each split has its own seed)
    score_on = list(dict.fromkeys([args.select_split, "test"]))
    evals = launch_all({f"{n}-{sp}": cli("eval", "--model", str(out / n / "student"), "--data", data, "--split", sp,
                                         "--device", args.device, "--batch-size", "50", "--name", f"teacher-{n}",
                                         "--out", str(out / n / f"{sp}.json"))
                        for n in done for sp in score_on}, out / "logs" / "eval", env)
    wait_all(evals, time.time() + args.eval_seconds)
    summary = {"budget_s": args.budget, "device": args.device, "model": args.model, "data": data, "split": split,
               "select_split": args.select_split, "runs": {}}
    for n in names:
        row = {"recipe": dict(zip(("batch_size", "lr", "warmup", "seed"), recipes[n])), "steps": steps.get(n),
               "probe_sec_per_step": sec.get(n), "exit": codes.get(n)}
        for sp in score_on:
            doc_path = out / n / f"{sp}.json"
            if doc_path.exists():
                doc = json.loads(doc_path.read_text())
                cats = doc["metrics"]["per_category"]
                row[sp] = {"overall": doc["metrics"]["overall"]["acc"], "margin": margin(doc),
                           "per_category": {c: [round(m["acc"], 3), round(m["lo"], 3)] for c, m in cats.items()}}
        summary["runs"][n] = row
    scored = {n: r[args.select_split] for n, r in summary["runs"].items() if args.select_split in r}
    summary["best"] = max(scored, key=lambda n: scored[n]["margin"]) if scored else None
    summary["wall_s"] = round(time.time() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for n, r in summary["runs"].items():
        for sp in score_on:
            if sp in r:
                m = r[sp]
                cats = " ".join(f"{c}={v[0]:.2f}" for c, v in m["per_category"].items())
                print(f"{n:<15} steps {r['steps']} {sp:<5} overall {m['overall']:.3f} margin {m['margin']:+.3f}  "
                      f"{cats}")
    print(json.dumps({"best": summary["best"], "wall_s": summary["wall_s"]}))


if __name__ == "__main__":
    main()
