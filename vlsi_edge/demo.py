"""`vlsi-edge demo`: the whole pipeline on the built-in tiny models and data, on this machine's CPU.

    vlsi-edge demo --out demo-out

1. synthesize `builtin:shapes` (train/val/test) into OUT/shapes;
2. from the shipped pretrained tiny Qwen2-VL student, train the SFT-only baseline and distill the VLsI student
   from the shipped pretrained teacher (verbalize -> interact -> SFT; equal student optimizer steps);
3. score the teacher and both PyTorch students on the test split (`vlsi-edge eval`);
4. export the VLsI student for jetson (fp32), onnx (int8), phone (fp32) and phone (decoder 8da4w), each parity-gated;
5. bench every bundle here with ONNX Runtime or ExecuTorch (quick profile, each in its own process);
6. write the report (OUT/report/report.html) and print a five-line summary.

Independent jobs (evals, exports, benches) run as separate `vlsi-edge` processes, as many at a time as there are
cores, one thread each; their logs go to OUT/logs/. A failed job stops the demo with its log's last lines.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlsi_edge.errors import UserError

TEACHER = "builtin:tiny-qwen2vl-teacher-pretrained"
STUDENT = "builtin:tiny-qwen2vl-student-pretrained"
SIZES = {"n_pretrain": 0, "n_train": 1000, "n_val": 50, "n_test": 300}
STEPS = {"verbalize": 40, "interact": 80, "sft": 80}
BATCH = 8
EXPORTS = {   # bundle name -> (target, precision, backend)
    "jetson-fp32": ("jetson", "fp32", "ort"),
    "onnx-int8": ("onnx", "int8", "ort"),
    "phone-fp32": ("phone", "fp32", "executorch"),
    "phone-8da4w": ("phone", "decoder=8da4w", "executorch"),
}


class _Jobs:
    """Runs `vlsi-edge` invocations as subprocesses, `workers` at a time, logging each to OUT/logs/<label>.log."""

    def __init__(self, out: Path, workers: int):
        self.logs, self.workers = out / "logs", workers
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()

    def _one(self, label: str, argv: list[str]) -> float:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // self.workers)),
               "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        log = self.logs / f"{label}.log"
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", "vlsi_edge.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                                env=env).returncode
        seconds = time.perf_counter() - start
        if rc != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-8:]
            raise UserError(f"demo step {label} failed (exit {rc}); last lines of {log}:\n    " + "\n    ".join(tail),
                            f"see {log}")
        print(f"  [{time.perf_counter() - self.t0:6.1f} s] {label} done in {seconds:.1f} s", flush=True)
        return seconds

    def run(self, stage: str, jobs: dict[str, list[str]]) -> None:
        many = f" ({len(jobs)} jobs, {self.workers} at a time)" if len(jobs) > 1 else ""
        print(stage + many, flush=True)
        with ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(self._one, label, argv) for label, argv in jobs.items()]
            for f in futures:
                f.result()


def run_demo(out: Path, workers: int | None = None, overwrite: bool = True) -> dict:
    from vlsi_edge.models import pretrained

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty", "pass --overwrite or another --out")
    missing = [n for n in (TEACHER, STUDENT) if n.removeprefix("builtin:") not in pretrained.names()]
    if missing:
        raise UserError(f"this installation ships no {', '.join(missing)}", "reinstall vlsi-edge")
    out.mkdir(parents=True, exist_ok=True)
    jobs = _Jobs(out, workers or min(2, os.cpu_count() or 1))
    data, runs, results, bundles = out / "shapes", out / "runs", out / "results", out / "bundles"
    shutil.rmtree(results, ignore_errors=True)       # the report reads every results file here: no stale ones
    results.mkdir()
    sizes = [f"--n-{k.removeprefix('n_').replace('_', '-')}={v}" for k, v in SIZES.items()]
    steps = ",".join(f"{k}={v}" for k, v in STEPS.items())
    common = ["--data", str(data), "--batch-size", str(BATCH), "--overwrite"]
    t0 = time.perf_counter()

    jobs.run("1/6 synthesize builtin:shapes", {"synth": ["data", "synth", "--out", str(data), *sizes, "--overwrite"]})
    jobs.run("2/6 train the SFT-only student and distill the VLsI student from the pretrained ones", {
        "sft-student": ["distill", "--method", "sft", "--student", STUDENT, "--steps",
                        f"sft={STEPS['interact'] + STEPS['sft']}", "--out", str(runs / "sft"), *common],
        "vlsi-student": ["distill", "--config", "tiny-qwen2vl", "--method", "vlsi", "--teacher", TEACHER,
                         "--student", STUDENT, "--steps", steps, "--out", str(runs / "vlsi"), *common],
    })
    evals = {"teacher": TEACHER, "sft-student": str(runs / "sft" / "student"),
             "vlsi-student": str(runs / "vlsi" / "student")}
    exports = {name: ["export", "--model", str(runs / "vlsi" / "student"), "--target", target, "--precision", prec,
                      "--data", str(data), "--out", str(bundles / name), "--overwrite"]
               for name, (target, prec, _) in EXPORTS.items()}
    jobs.run("3/6 score the teacher and both PyTorch students; export the VLsI student (parity-gated)", {
        **{f"eval-{name}": ["eval", "--model", model, "--data", str(data), "--split", "test", "--name", name,
                            "--role", "teacher" if name == "teacher" else "student",
                            "--out", str(results / f"eval-{name}.json")] for name, model in evals.items()},
        **{f"export-{name}": argv for name, argv in exports.items()},
    })
    jobs.run("4/6 bench every bundle here (quick profile, one process each)", {
        f"bench-{name}": ["bench", "--bundle", str(bundles / name), "--backend", backend, "--data", str(data),
                          "--split", "test", "--profile", "quick", "--threads", "1",
                          "--out", str(results / f"bench-{name}.json")]
        for name, (_, _, backend) in EXPORTS.items()})
    result_files = sorted(str(p) for p in results.glob("*.json"))
    jobs.run("5/6 write the report", {"report": ["report", *result_files, "--run", str(runs / "vlsi"),
                                                 "--out", str(out / "report"), "--overwrite"]})
    summary = _summary(results, out / "report" / "report.html", time.perf_counter() - t0)
    print("6/6 summary", flush=True)
    for line in summary["lines"]:
        print("  " + line)
    return summary


def _summary(results: Path, report: Path, seconds: float) -> dict:
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}

    def acc(name: str) -> float:
        return docs[name]["metrics"]["overall"]["acc"]

    def fmt(name: str) -> str:
        m = docs[name]["metrics"]["overall"]
        return f"{m['acc']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"

    benches = {k.removeprefix("bench-"): d for k, d in docs.items() if k.startswith("bench-")}
    teacher, vlsi = acc("eval-teacher"), acc("eval-vlsi-student")
    lines = [
        f"accuracy on {docs['eval-teacher']['data']['n']} test items: teacher {fmt('eval-teacher')}, SFT-only "
        f"student {fmt('eval-sft-student')}, VLsI student {fmt('eval-vlsi-student')}",
        f"retention student/teacher: VLsI {vlsi / teacher:.2f}, SFT-only {acc('eval-sft-student') / teacher:.2f}",
        "exported VLsI student: " + ", ".join(f"{n} {d['metrics']['overall']['acc']:.3f} "
                                             f"(x{d['metrics']['overall']['acc'] / vlsi:.2f} of PyTorch)"
                                             for n, d in benches.items()),
        "decode tok/s (1 thread): " + ", ".join(f"{n} {d['latency']['stats']['decode_tok_s']['median']:.0f}"
                                               for n, d in benches.items()),
        f"report: {report}  (whole demo {seconds / 60:.1f} min)",
    ]
    return {"lines": lines, "report": str(report), "seconds": seconds}
