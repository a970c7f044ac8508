"""Fault injection: `vlsi-edge distill`, the teacher-cache build and `vlsi-edge export` run as subprocesses and are
SIGKILLed at seeded random moments, then rerun the way a user (or a job scheduler) would, with `--resume`.

- distill: every trial ends with student weights, verbalizers, matching counts and the logged losses bit-identical
  to an uninterrupted run (CPU, one thread), and every checkpoint left on disk after a kill loads;
- teacher cache: a killed build resumes (complete shards kept) or restarts, never leaving a short cache that opens;
- export: a killed export leaves nothing at `--out` that opens as a bundle, and the rerun cleans the killed one's
  temporaries.

The full suite (`slow`: 21 distill trials, 7 per stage, plus 4 cache and 4 export trials) runs in .ci/run's slow
tier; the default run keeps one quick distill trial.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

SEED = 20261127
DATA = "builtin:shapes:n_pretrain=0,n_train=40,n_val=4,n_test=4,seed=7"
STAGES = ("verbalize", "interact", "sft")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli() -> list[str]:
    return [sys.executable, "-m", "vlsi_edge.cli"]


def _distill_cmd(out: Path, cache: Path | None = None) -> list[str]:
    cmd = [*_cli(), "distill", "--teacher", "builtin:tiny-qwen2vl-teacher", "--student", "builtin:tiny-qwen2vl-student",
           "--data", DATA, "--out", str(out), "--steps", "verbalize=3,interact=4,sft=3", "--batch-size", "4",
           "--set", "train.checkpoint_every=2", "train.log_every=1"]
    if cache is not None:
        cmd += ["--cache-teacher", str(cache), "--set", "cache.shard_items=8"]
    return cmd


def _run(cmd, log: Path, timeout: float = 300) -> int:
    with open(log, "a") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, timeout=timeout).returncode


def _kill_after(cmd, log: Path, needle: str | None, delay: float, timeout: float = 300) -> bool:
    """Start `cmd`; once `needle` shows in its output (at once when None), wait `delay` s and SIGKILL it.
    Returns whether it was killed (False: it finished first)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV)
    start = time.monotonic()
    try:
        while needle is not None and proc.poll() is None and needle not in log.read_text(errors="replace"):
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{needle!r} never appeared in {log}")
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGKILL)
        return True
    finally:
        proc.wait()


def _checkpoints_load(state: Path) -> None:
    """Every checkpoint a killed run left behind loads, and `latest` names one that does."""
    from vlsi_edge.distill.checkpoint import load_latest

    if not state.is_dir():
        return
    load_latest(state)
    for d in state.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            load_file(str(d / "tensors.safetensors"))
            json.loads((d / "meta.json").read_text())
            if (d / "optimizer.pt").exists():
                torch.load(d / "optimizer.pt", weights_only=True)


def _losses(run: Path):
    return [(r["phase"], r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").open())]


def _assert_same_run(ref: Path, run: Path) -> None:
    a, b = load_file(str(ref / "student" / "model.safetensors")), load_file(str(run / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    for name in ("teacher", "student"):
        va = load_file(str(ref / "verbalizers" / f"{name}.safetensors"))
        vb = load_file(str(run / "verbalizers" / f"{name}.safetensors"))
        assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va), name
    assert json.loads((ref / "matching.json").read_text()) == json.loads((run / "matching.json").read_text())
    assert _losses(ref) == _losses(run)


def _plan(n: int, seed: int = SEED) -> list[tuple[str, str | None, float]]:
    """Trial i kills in STAGES[i % 3], a seeded random time after that stage starts (the stage's first progress line
    or, for a few, the moment the process starts)."""
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        stage = STAGES[i % len(STAGES)]
        needle = {"verbalize": rng.choice(["phase verbalize-teacher", "phase verbalize-student"]),
                  "interact": "phase interact", "sft": "phase sft"}[stage]
        plan.append((stage, needle, rng.uniform(0.0, 1.2)))
    return plan


def _reference(root: Path, cache: bool) -> Path:
    run = root / "run"
    log = root / "ref.log"
    assert _run(_distill_cmd(run, root / "tc" if cache else None), log) == 0, log.read_text()[-2000:]
    return run


@pytest.fixture(scope="module")
def reference_live(tmp_path_factory) -> Path:
    """An uninterrupted run, built once per module."""
    return _reference(tmp_path_factory.mktemp("fi-ref-live"), cache=False)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory) -> Path:
    """An uninterrupted run with a teacher cache."""
    return _reference(tmp_path_factory.mktemp("fi-ref-cache"), cache=True)


def _distill_trial(ref: Path, work: Path, needle: str | None, delay: float, cache: bool = False) -> bool:
    run = work / "run"
    tc = work / "tc" if cache else None
    cmd = _distill_cmd(run, tc)
    killed = _kill_after(cmd, work / "killed.log", needle, delay)
    _checkpoints_load(run / "state")
    if cache and tc.exists() and (tc / "manifest.json").exists():
        manifest = json.loads((tc / "manifest.json").read_text())
        assert manifest.get("complete") and manifest["total_items"] == 40, manifest    # never a short cache
    assert _run([*cmd, "--resume"], work / "resume.log") == 0, (work / "resume.log").read_text()[-3000:]
    _assert_same_run(ref, run)
    return killed


def test_one_kill_mid_interaction_resumes_bit_identical(reference_live, tmp_path):
    """The default run's quick instance of the suite below."""
    killed = _distill_trial(reference_live, tmp_path, "phase interact", 0.3)
    assert killed


@pytest.mark.slow
def test_sigkill_anywhere_in_distill_resumes_bit_identical(reference_live, tmp_path):
    plan = _plan(21)

    def trial(i):
        stage, needle, delay = plan[i]
        work = tmp_path / f"t{i:02d}-{stage}"
        work.mkdir()
        return _distill_trial(reference_live, work, needle, delay)

    with ThreadPoolExecutor(2) as pool:
        killed = list(pool.map(trial, range(len(plan))))
    per_stage = {s: sum(k for (st, _, _), k in zip(plan, killed) if st == s) for s in STAGES}
    print(f"fault injection: {sum(killed)}/{len(plan)} trials killed, per stage {per_stage}; all bit-identical")
    assert all(v >= 5 for v in per_stage.values()), per_stage


@pytest.mark.slow
def test_sigkill_during_teacher_cache_build_never_leaves_a_short_cache(reference_cache, tmp_path):
    rng = random.Random(SEED + 1)
    delays = [rng.uniform(0.0, 1.0) for _ in range(4)]

    def trial(i):
        work = tmp_path / f"c{i}"
        work.mkdir()
        return _distill_trial(reference_cache, work, "teacher cache", delays[i], cache=True)

    with ThreadPoolExecutor(2) as pool:
        killed = list(pool.map(trial, range(len(delays))))
    assert sum(killed) >= 3, killed


@pytest.mark.slow
def test_sigkill_during_export_leaves_nothing_that_looks_valid(tmp_path):
    from vlsi_edge.errors import UserError
    from runtimes.bundle import open_bundle

    def cmd(out):
        return [*_cli(), "export", "--model", "builtin:tiny-qwen2vl-student", "--target", "jetson", "--out", str(out),
                "--data", DATA]

    t0 = time.monotonic()
    assert _run(cmd(tmp_path / "ref"), tmp_path / "ref.log") == 0
    full = time.monotonic() - t0
    rng = random.Random(SEED + 2)
    killed = 0
    for i in range(4):
        out = tmp_path / f"b{i}"
        killed += _kill_after(cmd(out), tmp_path / f"b{i}.log", None, rng.uniform(0.15, 0.85) * full)
        rerun = cmd(out)
        if out.exists():                       # only a finished, verified bundle may stand at --out
            open_bundle(out, verify=True)
            rerun.append("--overwrite")
        assert _run(rerun, tmp_path / f"b{i}.log") == 0, (tmp_path / f"b{i}.log").read_text()[-2000:]
        open_bundle(out, verify=True)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers, leftovers     # the rerun swept the killed export's temporaries
    assert killed >= 3
    with pytest.raises(UserError):
        open_bundle(tmp_path / "missing", verify=True)


def test_plan_covers_every_stage():
    plan = _plan(21)
    assert [sum(1 for s, _, _ in plan if s == st) for st in STAGES] == [7, 7, 7]
    assert _plan(21) == plan                  # seeded
