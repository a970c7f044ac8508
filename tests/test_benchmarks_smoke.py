"""`slow` tier: benchmarks run end to end on a tiny model and end with one JSON line (no speed assertions)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_distill_step_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_step.py"), "--quick", "--steps", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["bench"] == "distill_step"
    assert {"mem_b_over_a", "time_b_over_a"} <= set(report["ratios"])
    variants = report["variants"]
    assert all("error" not in variants[v] for v in "abc"), variants
    # the dense twin computes the same loss as the chunked interaction step (same matching, same weights)
    b, c = variants["b"]["loss"], variants["c"]["loss"]
    assert abs(b - c) <= 1e-4 * abs(b), (b, c)

