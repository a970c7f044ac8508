"""Toy-scale reproduction of the VLsI paper's claims on builtin:shapes: baselines, ablations, seeds, CIs, report.

    python benchmarks/reproduce.py --quick            # ~10 min on 2 cores: the three headline methods, 2 seeds
    python benchmarks/reproduce.py                    # ~60 min: 5 seeds, and the ablation grid over 3 seeds

Every method starts from the same shipped pretrained student (`builtin:tiny-qwen2vl-student-early-pretrained`) and,
where it needs one, the shipped pretrained teacher (`...-teacher-pretrained`); both were pretrained once on the
`pretrain` split by `scripts/pretrain_tiny.sh`. The student's pretraining stops at 300 steps so that the teacher is
ahead of it: the fully pretrained student (3,000 steps) scores above this teacher, which learns more slowly per step
(README, "Pretraining the tiny models"). They train on the `train` split and are scored on the 1,000-item test split.

- Shared once: the teacher's verbalizers (one `--stages verbalize` run) and the teacher's top-k cache of the train
  split; every VLsI and KD run reads them, so no run holds the teacher in memory.
- Headline methods, equal optimizer steps and samples seen: SFT only; final-logit KD; VLsI (verbalize the student ->
  interact -> SFT, the student's verbalize steps counted in the total). Scored by greedy generation.
- Ablations (full mode), scored by forced-choice log-likelihood over the answer set: the matching strategy built up
  as in the paper's Table 4(e), the loss ops of Table 4(d), and VLsI without its SFT step (Table 4(b)), the missing
  SFT steps given to the interaction so the total stays equal.
- Statistics: accuracy pooled over seeds with a 95% CI from a bootstrap over test images and seeds, the paired
  bootstrap against SFT only, the fraction of the teacher-student gap closed, per-category accuracy, the matching
  heatmap of the first and last window of the interaction, and what each target layer says through its verbalizer
  for a few test items (SFT-only student given verbalizers by a `--stages verbalize` run, and the VLsI student).

Every finished run and score is kept under --workdir; rerunning the command continues where it stopped. The report
goes to benchmarks/results/reproduction.{md,json} (or --out). Each training run uses one thread; --jobs of them run
at once.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vlsi_edge.data.shapes import CHANCE

TEACHER = "builtin:tiny-qwen2vl-teacher-pretrained"
STUDENT = "builtin:tiny-qwen2vl-student-early-pretrained"   # 300 pretraining steps: the teacher is ahead of it
DATA = "builtin:shapes:n_pretrain=30000"   # the spec the shipped checkpoints were scored with (same test split)
RESULTS = Path(__file__).resolve().parent / "results"

MODES = {
    "full": {"seeds": 5, "ablation_seeds": 3, "teacher_verbalize": 150, "data": DATA,
             "steps": {"verbalize": 60, "interact": 240, "sft": 100}},
    "quick": {"seeds": 2, "ablation_seeds": 0, "teacher_verbalize": 80, "data": DATA,
              "steps": {"verbalize": 30, "interact": 120, "sft": 50}},
    # the plumbing only (tests): every table, a few steps, a 40-item train split and a 36-item test split
    "smoke": {"seeds": 2, "ablation_seeds": 1, "teacher_verbalize": 3,
              "data": "builtin:shapes:n_pretrain=0,n_train=40,n_val=0,n_test=36,seed=5",
              "steps": {"verbalize": 2, "interact": 3, "sft": 2}},
}
COMMON = ["--batch-size", "16", "--lr", "5e-4", "--set", "optim.warmup_steps=20", "train.checkpoint_every=100000"]

# Table 4(e): the matching strategy, one component added per row; the last row is VLsI as shipped.
MATCHING = [
    ("random", ["matching.strategy=random"]),
    ("uniform", ["matching.strategy=uniform"]),
    ("bottom-1", ["matching.strategy=bottom-k", "matching.bottom_k=1", "matching.search_range=false",
                  "matching.order_preservation=false"]),
    ("multinomial", ["matching.strategy=multinomial", "matching.search_range=false",
                     "matching.order_preservation=false", "matching.adaptive_temperature=false"]),
    ("+ search range", ["matching.order_preservation=false", "matching.adaptive_temperature=false"]),
    ("+ order preservation", ["matching.adaptive_temperature=false"]),
    ("+ adaptive temperature", []),
]
# Table 4(d): loss op of the intermediate layers / of the last layer.
LOSS_OPS = [("KLD/KLD", []), ("CE/KLD", ["loss.intermediate=ce"]), ("KLD/none", ["loss.last=none"]),
            ("L2/KLD", ["loss.intermediate=l2"])]


class Runner:
    """Runs `vlsi-edge` subcommands as one-thread subprocesses, logging each to WORK/logs/NAME.log."""

    def __init__(self, work: Path):
        self.work = work
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, *args: str) -> None:
        log = self.work / "logs" / f"{name}.log"
        t0 = time.perf_counter()
        with log.open("w") as f:
            code = subprocess.call([sys.executable, "-m", "vlsi_edge.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                   env=self.env)
        self.seconds[name] = time.perf_counter() - t0
        if code != 0:
            tail = [line for line in log.read_text().splitlines() if "it/s" not in line][-3:]
            raise SystemExit(f"reproduce: `vlsi-edge {args[0]}` for {name} failed (exit {code}); {log}: "
                             + " | ".join(tail))


class Experiment:
    def __init__(self, work: Path, mode: str, jobs: int):
        self.work, self.mode, self.jobs = work, mode, jobs
        self.cfg = MODES[mode]
        self.data = self.cfg["data"]
        self.run = Runner(work)
        self.shared = work / "shared"
        self.cache = work / "teacher-cache"

    # ------------------------------------------------------------------------------------------- pieces
    def score(self, name: str, model: str, scoring: str) -> dict:
        out = self.work / "scores" / f"{name}.{scoring}.json"
        if not out.exists():
            out.parent.mkdir(exist_ok=True)
            self.run(f"eval-{name}-{scoring}", "eval", "--model", model, "--data", self.data, "--split", "test",
                     "--batch-size", "25", "--scoring", scoring, "--name", name, "--out", str(out))
        return json.loads(out.read_text())

    def prepare(self) -> None:
        """Teacher verbalizers and the teacher's top-k cache of the train split, made once for every run."""
        if (self.shared / "student").exists() and (self.cache / "manifest.json").exists():
            return
        self.run("shared", "distill", "--teacher", TEACHER, "--student", STUDENT, "--data", self.data,
                 "--stages", "verbalize,interact", "--steps", f"verbalize={self.cfg['teacher_verbalize']},interact=1",
                 "--cache-teacher", str(self.cache), "--out", str(self.shared), "--overwrite", *COMMON)

    def train(self, name: str, method: str, seed: int, sets: list[str] = (), stages: str = "verbalize,interact,sft",
              steps: dict | None = None) -> Path:
        out = self.work / "runs" / name
        if (out / "student").exists():
            return out
        steps = steps or self.cfg["steps"]
        total = sum(steps.values())
        args = ["--student", STUDENT, "--data", self.data, "--seed", str(seed), "--out", str(out), "--overwrite", *COMMON]
        if method == "sft":
            args = ["--method", "sft", "--steps", f"sft={total}", *args]
        elif method == "kd":
            args = ["--method", "kd", "--teacher", TEACHER, "--cache-teacher", str(self.cache),
                    "--steps", f"kd={total}", *args]
        else:
            args = ["--method", "vlsi", "--teacher", TEACHER, "--cache-teacher", str(self.cache),
                    "--teacher-verbalizers", str(self.shared / "verbalizers" / "teacher.safetensors"),
                    "--stages", stages, "--steps", ",".join(f"{k}={v}" for k, v in steps.items()), *args]
        self.run(f"train-{name}", "distill", *args, *sets)
        (out / "wall_seconds.json").write_text(json.dumps(self.run.seconds[f"train-{name}"]))
        return out

    def job(self, name: str, method: str, seed: int, scorings: tuple[str, ...], **kw) -> dict:
        run = self.train(name, method, seed, **kw)
        return {s: self.score(name, str(run / "student"), s) for s in scorings}

    def parallel(self, fn, items: list) -> list:
        with ThreadPoolExecutor(self.jobs) as pool:
            return list(pool.map(fn, items))

    def run_jobs(self, jobs: list[tuple]) -> list:
        """Run `job(name, method, seed, scorings, **kw)` for each (name, method, seed, scorings[, kw])."""
        return self.parallel(lambda j: self.job(*j[:4], **(j[4] if len(j) > 4 else {})), jobs)

    # ------------------------------------------------------------------------------------------- the plan
    def execute(self) -> dict:
        t0 = time.perf_counter()
        self.prepare()
        refs = dict(zip(("teacher", "student"), self.parallel(lambda p: self.score(*p, "generate"),
                                                               [("teacher", TEACHER), ("student", STUDENT)])))
        seeds = range(self.cfg["seeds"])
        head_scorings = ("generate", "choice")
        headline = {m: self.run_jobs([(f"{m}-s{s}", m, s, head_scorings) for s in seeds]) for m in ("sft", "kd", "vlsi")}
        ablations = {}
        a_seeds = range(self.cfg["ablation_seeds"])
        if a_seeds:
            steps = self.cfg["steps"]
            no_sft = {"verbalize": steps["verbalize"], "interact": steps["interact"] + steps["sft"]}
            grid = {"matching": MATCHING[:-1], "loss": LOSS_OPS[1:]}
            jobs = [(f"{table}-{slug(label)}-s{s}", "vlsi", s, ("choice",), {"sets": ["--set", *sets]})
                    for table, rows in grid.items() for label, sets in rows for s in a_seeds]
            jobs += [(f"nosft-s{s}", "vlsi", s, ("choice",), {"stages": "verbalize,interact", "steps": no_sft})
                     for s in a_seeds]
            done = dict(zip([j[0] for j in jobs], self.run_jobs(jobs)))
            full = [headline["vlsi"][s]["choice"] for s in a_seeds]  # VLsI as shipped: the last row of each table
            ablations["matching"] = [(label, [done[f"matching-{slug(label)}-s{s}"]["choice"] for s in a_seeds])
                                     for label, _ in MATCHING[:-1]] + [(MATCHING[-1][0], full)]
            ablations["loss"] = [(LOSS_OPS[0][0], full)] + [
                (label, [done[f"loss-{slug(label)}-s{s}"]["choice"] for s in a_seeds]) for label, _ in LOSS_OPS[1:]]
            ablations["sft_step"] = [("verbalize -> interact -> SFT", full),
                                     ("verbalize -> interact (no SFT step)", [done[f"nosft-s{s}"]["choice"]
                                                                              for s in a_seeds])]
        figure3 = self.verbalizer_views()
        # wall time summed over the invocations that built this workdir (a resumed run adds its own)
        log = self.work / "wall_seconds.json"
        spent = json.loads(log.read_text()) if log.exists() else []
        spent.append(round(time.perf_counter() - t0, 1))
        log.write_text(json.dumps(spent))
        return {"refs": refs, "headline": headline, "ablations": ablations, "figure3": figure3,
                "seconds_total": sum(spent)}

    def verbalizer_views(self, n_items: int = 3) -> list[dict]:
        """Figure 3: each target layer's verbalizer read greedily, SFT-only student vs VLsI student (seed 0)."""
        from vlsi_edge.data.conversations import open_dataset

        sft_run, vlsi_run = self.work / "runs" / "sft-s0", self.work / "runs" / "vlsi-s0"
        verb_run = self.work / "runs" / "sft-s0-verbalized"
        if not (verb_run / "verbalizers" / "student.safetensors").exists():
            self.run("verbalize-sft-s0", "distill", "--method", "vlsi", "--stages", "verbalize", "--student",
                     str(sft_run / "student"), "--teacher", TEACHER, "--teacher-verbalizers",
                     str(self.shared / "verbalizers" / "teacher.safetensors"), "--data", self.data,
                     "--steps", f"verbalize={self.cfg['steps']['verbalize']}", "--seed", "0", "--out", str(verb_run),
                     "--overwrite", *COMMON)
        test = list(open_dataset(self.data, split="test"))
        picks = [next(s for s in test if s.category == c) for c in ("shape", "spatial", "count")][:n_items]
        views = []
        for sample in picks:
            row = {"id": sample.id, "category": sample.category, "question": sample.question, "gold": sample.answer}
            for label, run in (("shared", self.shared), ("sft", verb_run), ("vlsi", vlsi_run)):
                out = self.work / "inspect" / f"{label}-{sample.id}.txt"
                if not out.exists():
                    out.parent.mkdir(exist_ok=True)
                    self.run(f"inspect-{label}-{sample.id}", "inspect", "--model", str(run), "--verbalize",
                             "--image", str(sample.image), "--prompt", sample.question)
                    out.write_text((self.work / "logs" / f"inspect-{label}-{sample.id}.log").read_text())
                row[label] = out.read_text()
            views.append(row)
        return views


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


# ----------------------------------------------------------------------------------------------- statistics
def _correct(docs: list[dict]) -> np.ndarray:
    return np.array([[it["correct"] for it in d["items"]] for d in docs], dtype=float)    # (seeds, items)


def _boot_means(values: np.ndarray, docs: list[dict], rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """Means of `values` (seeds, items) over resampled test images (clusters), each image with all its seeds."""
    index: dict[str, list[int]] = {}
    for i, it in enumerate(docs[0]["items"]):
        index.setdefault(it["cluster"], []).append(i)
    groups = [np.array(v) for v in index.values()]
    return np.array([values[:, np.concatenate([groups[k] for k in rng.integers(len(groups), size=len(groups))])].mean()
                     for _ in range(n_boot)])


def pooled(docs: list[dict], rng: np.random.Generator, n_boot: int = 2000) -> dict:
    """Accuracy pooled over seeds; 95% CI from resampling test images (clusters), each with all its seeds."""
    correct = _correct(docs)
    stats = _boot_means(correct, docs, rng, n_boot)
    per_seed = correct.mean(1)
    cats = {}
    for cat in sorted({it["category"] for it in docs[0]["items"]}):
        idx = [i for i, it in enumerate(docs[0]["items"]) if it["category"] == cat]
        cats[cat] = float(correct[:, idx].mean())
    return {"acc": float(correct.mean()), "lo": float(np.quantile(stats, 0.025)), "hi": float(np.quantile(stats, 0.975)),
            "per_seed": [round(float(x), 4) for x in per_seed], "per_category": cats, "n_items": correct.shape[1],
            "n_seeds": correct.shape[0]}


def paired(a: list[dict], b: list[dict], rng: np.random.Generator, n_boot: int = 5000) -> dict:
    """Paired bootstrap of mean(a) - mean(b) over test images x seeds (seed i of a paired with seed i of b)."""
    diff = _correct(a) - _correct(b)                                                        # (seeds, items)
    boots = _boot_means(diff, a, rng, n_boot)
    d = float(diff.mean())
    p = float(min(1.0, 2 * min((boots <= 0).mean(), (boots >= 0).mean())))
    return {"diff": d, "lo": float(np.quantile(boots, 0.025)), "hi": float(np.quantile(boots, 0.975)), "p": p}


def summarize(raw: dict, mode: str, work: Path) -> dict:
    rng = np.random.default_rng(0)
    refs = {k: pooled([v], rng) for k, v in raw["refs"].items()}
    head = {m: {"generate": pooled([r["generate"] for r in runs], rng), "choice": pooled([r["choice"] for r in runs], rng)}
            for m, runs in raw["headline"].items()}
    vs_sft = {m: {s: paired([r[s] for r in raw["headline"][m]], [r[s] for r in raw["headline"]["sft"]], rng)
                  for s in ("generate", "choice")} for m in ("kd", "vlsi")}
    vs_kd = {s: paired([r[s] for r in raw["headline"]["vlsi"]], [r[s] for r in raw["headline"]["kd"]], rng)
             for s in ("generate", "choice")}
    t, base = refs["teacher"]["acc"], head["sft"]["generate"]["acc"]
    gap = {m: (head[m]["generate"]["acc"] - base) / (t - base) if t > base else None for m in ("kd", "vlsi")}
    ablations = {table: [{"label": label, **pooled(docs, rng)} for label, docs in rows]
                 for table, rows in raw["ablations"].items()}
    from vlsi_edge.benchmarks.report import load_matching

    matching = load_matching(work / "runs" / "vlsi-s0")
    def run_seconds(name: str) -> float:
        path = work / "runs" / name / "wall_seconds.json"
        return json.loads(path.read_text()) if path.exists() else float("nan")

    wall = {m: float(np.mean([run_seconds(f"{m}-s{s}") for s in range(MODES[mode]["seeds"])]))
            for m in ("sft", "kd", "vlsi")}
    return {"mode": mode, "teacher": TEACHER, "student": STUDENT, "data": MODES[mode]["data"], "steps": MODES[mode]["steps"],
            "refs": refs, "headline": head, "vs_sft": vs_sft, "vlsi_vs_kd": vs_kd, "gap_closed": gap,
            "ablations": ablations,
            "matching": matching, "figure3": raw["figure3"], "train_seconds_mean": wall,
            "seconds_total": raw["seconds_total"]}


# ---------------------------------------------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"  # the bootstrap has 5,000 resamples


def render(summary: dict, command: str, machine: str) -> tuple[str, list[tuple[str, str]]]:
    from vlsi_edge.benchmarks.report import bar_chart, heatmap

    s = summary
    head, refs = s["headline"], s["refs"]
    lines = [f"# VLsI at toy scale: `{s['mode']}` run", "",
             f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Teacher `{s['teacher']}`, student `{s['student']}`, data `{s['data']}` (train split to train, "
             f"{refs['student']['n_items']}-item test split to score). Steps per VLsI run: {s['steps']} "
             f"(SFT only and KD get the same total). Wall time {s['seconds_total'] / 60:.1f} min.", "",
             "## Headline (greedy generation)", "",
             "| system | seeds | accuracy % [95% CI] | vs SFT only (points, 95% CI, p) | gap closed | train s/run |",
             "|---|---|---|---|---|---|"]
    for name in ("teacher", "student"):
        r = refs[name]
        lines.append(f"| {name} (pretrained, no training here) | — | {_pct(r['acc'])} [{_pct(r['lo'])}, {_pct(r['hi'])}]"
                     " | | | |")
    for m, label in (("sft", "SFT only"), ("kd", "final-logit KD"), ("vlsi", "VLsI")):
        r = head[m]["generate"]
        cmp = s["vs_sft"].get(m, {}).get("generate")
        vs = f"{100 * cmp['diff']:+.1f} [{100 * cmp['lo']:+.1f}, {100 * cmp['hi']:+.1f}], {_p(cmp['p'])}" if cmp else ""
        gap = _pct(s["gap_closed"].get(m)) + "%" if m in s["gap_closed"] and s["gap_closed"][m] is not None else ""
        lines.append(f"| {label} | {r['n_seeds']} | {_pct(r['acc'])} [{_pct(r['lo'])}, {_pct(r['hi'])}] | {vs} | {gap} "
                     f"| {s['train_seconds_mean'][m]:.0f} |")
    k = s["vlsi_vs_kd"]["generate"]
    lines += ["", f"VLsI vs final-logit KD: {100 * k['diff']:+.1f} points [{100 * k['lo']:+.1f}, {100 * k['hi']:+.1f}], "
              f"{_p(k['p'])} (paired bootstrap over test images x seeds). Gap closed = (method - SFT only) / "
              "(teacher - SFT only)."]
    lines += ["", "Forced-choice scoring of the same runs: " + ", ".join(
        f"{m} {_pct(head[m]['choice']['acc'])} [{_pct(head[m]['choice']['lo'])}, {_pct(head[m]['choice']['hi'])}]"
        for m in head) + ".", "", "## Per category (greedy, %)", ""]
    cats = list(refs["student"]["per_category"])
    lines += ["| system | " + " | ".join(f"{c} (chance {100 * CHANCE.get(c, 0):.0f})" for c in cats) + " |",
              "|---|" + "---|" * len(cats)]
    rows = [("teacher", refs["teacher"]), ("student", refs["student"])] + [(m, head[m]["generate"]) for m in head]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(_pct(r["per_category"][c]) for c in cats) + " |")
    figures = [("headline", bar_chart("Accuracy by category (greedy)", cats,
                                      [(n, [r["per_category"][c] for c in cats], None, None) for n, r in rows]))]
    for table, title in (("matching", "Matching strategy (Table 4(e))"), ("loss", "Loss ops, intermediate/last "
                                                                                  "(Table 4(d))"),
                         ("sft_step", "The SFT step (Table 4(b))")):
        if table in s["ablations"]:
            lines += ["", f"## Ablation: {title}, forced choice", "", "| variant | seeds | accuracy % [95% CI] |",
                      "|---|---|---|"]
            for r in s["ablations"][table]:
                lines.append(f"| {r['label']} | {r['n_seeds']} | {_pct(r['acc'])} [{_pct(r['lo'])}, {_pct(r['hi'])}] |")
    if s["matching"]:
        m = s["matching"]
        lines += ["", "## Matching heatmap (VLsI, seed 0): counts of matched teacher layers per student layer", ""]
        for snap in m["snapshots"]:
            lines += [f"{snap['label']}:", "", "| student \\ teacher | " + " | ".join(map(str, m["teacher_layers"]))
                      + " |", "|---|" + "---|" * len(m["teacher_layers"])]
            lines += [f"| {row} | " + " | ".join(map(str, counts)) + " |"
                      for row, counts in zip(m["student_layers"], snap["counts"])]
            lines.append("")
            figures.append((f"matching-{slug(snap['label'])}", heatmap(f"Matching, {snap['label']}", snap["counts"],
                                                                       m["student_layers"], m["teacher_layers"])))
    lines += ["", "## What the target layers say (Figure 3)", ""]
    for v in s["figure3"]:
        lines += [f"**{v['id']}** ({v['category']}) {v['question']} — gold `{v['gold']}`", "",
                  "The teacher through its shared verbalizers (above it, the pretrained student after the shared "
                  "run's one interaction step):",
                  "", "```", v["shared"].strip(), "```", "",
                  "SFT-only student (verbalizers trained afterwards on the frozen student):", "", "```",
                  v["sft"].strip(), "```", "", "VLsI student:", "",
                  "```", v["vlsi"].strip(), "```", ""]
    lines += ["## Against the paper's claims (computed from the tables above)", ""] + claims(s)
    notes = RESULTS / "reproduction-notes.md"
    if s["mode"] == "full" and notes.exists():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n", figures


def claims(s: dict) -> list[str]:
    """One line per claim of the paper: what this run's numbers say about it."""
    out = []
    v = s["vs_sft"]
    for m, label in (("vlsi", "VLsI"), ("kd", "final-logit KD")):
        c = v[m]["generate"]
        verdict = "better than" if c["lo"] > 0 else "worse than" if c["hi"] < 0 else "not distinguishable from"
        out.append(f"- {label} vs SFT only: {100 * c['diff']:+.1f} points (95% CI {100 * c['lo']:+.1f} to "
                   f"{100 * c['hi']:+.1f}, paired bootstrap {_p(c['p'])}): {verdict} SFT only.")
    k = s["vlsi_vs_kd"]["generate"]
    out.append(f"- VLsI vs final-logit KD: {100 * k['diff']:+.1f} points (95% CI {100 * k['lo']:+.1f} to "
               f"{100 * k['hi']:+.1f}, {_p(k['p'])}); the goal was 3 points, significant.")
    gap = s["gap_closed"].get("vlsi")
    t, b = s["refs"]["teacher"]["acc"], s["headline"]["sft"]["generate"]["acc"]
    out.append(f"- Teacher {100 * t:.1f}% vs SFT-only student {100 * b:.1f}%: " + (
        f"VLsI closes {100 * gap:.0f}% of that gap (goal 50%)." if gap is not None else
        "the teacher is not ahead of the SFT-only student, so there is no gap for VLsI to close and this run cannot "
        "show the method's effect."))
    ab = s["ablations"]
    if "sft_step" in ab:
        with_, without = ab["sft_step"][0]["acc"], ab["sft_step"][1]["acc"]
        out.append(f"- The SFT step (paper: essential): with {100 * with_:.1f}%, without {100 * without:.1f}% "
                   f"({100 * (with_ - without):+.1f} points).")
    if "loss" in ab:
        best = max(ab["loss"], key=lambda r: r["acc"])
        out.append(f"- Loss ops (paper: KLD/KLD best): best here is {best['label']} ({100 * best['acc']:.1f}%); "
                   + ", ".join(f"{r['label']} {100 * r['acc']:.1f}" for r in ab["loss"]) + ".")
    if "matching" in ab:
        rows = ab["matching"]
        steps = [(rows[i]["label"], rows[i]["acc"] - rows[i - 1]["acc"]) for i in range(4, len(rows))]
        out.append("- Matching components (paper: each helps): " + ", ".join(
            f"{label} {100 * d:+.1f} points" for label, d in steps) + f"; multinomial vs random "
            f"{100 * (rows[3]['acc'] - rows[0]['acc']):+.1f}. Differences smaller than the rows' CIs are noise.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="headline methods only, 2 seeds, half the steps (~10 min)")
    ap.add_argument("--workdir", type=Path, default=Path("reproduce-work"), help="runs and scores (resumable)")
    ap.add_argument("--out", type=Path, default=None, help="report path stem (default benchmarks/results/reproduction"
                                                           "[-quick])")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # plumbing check for the tests
    args = ap.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    work = args.workdir / mode
    raw = Experiment(work, mode, args.jobs).execute()
    summary = summarize(raw, mode, work)
    command = "python benchmarks/reproduce.py" + {"full": "", "quick": " --quick", "smoke": " --smoke"}[mode]
    if args.jobs != 2:
        command += f" --jobs {args.jobs}"
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, --jobs {args.jobs}"
    try:
        machine = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")) \
            + f", {os.cpu_count()} cores, --jobs {args.jobs}"
    except (OSError, StopIteration):
        pass
    md, figures = render(summary, command, machine)
    stem = args.out or RESULTS / ("reproduction" if mode == "full" else f"reproduction-{mode}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    for key, svg in figures:
        Path(f"{stem}-{key}.svg").write_text(svg)
    md += "\n" + "\n".join(f"![{k}]({Path(f'{stem}-{k}.svg').name})" for k, _ in figures) + "\n"
    Path(f"{stem}.md").write_text(md)
    Path(f"{stem}.json").write_text(json.dumps({"command": command, "machine": machine, **summary}, indent=1) + "\n")
    h = summary["headline"]
    print(json.dumps({"mode": mode, **{m: round(h[m]["generate"]["acc"], 4) for m in h},
                      "vlsi_vs_sft": summary["vs_sft"]["vlsi"]["generate"], "gap_closed": summary["gap_closed"]}))


if __name__ == "__main__":
    main()
