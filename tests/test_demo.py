"""`slow` tier: `vlsi-edge demo` end to end (the README's main job) and its report checked in headless Chromium."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from test_report import _Dom, _dump_dom


@pytest.mark.slow
def test_demo_end_to_end_and_its_report_renders(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "vlsi_edge.cli", "demo", "--out", str(out)], capture_output=True,
                          text=True, timeout=1800, check=False)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    lines = proc.stdout.strip().splitlines()
    summary = lines[lines.index("6/6 summary") + 1:]
    assert len(summary) == 5 and summary[-1].strip().startswith("report:")

    rep = json.loads((out / "report" / "report.json").read_text())
    docs = sorted(p.stem for p in (out / "results").glob("*.json"))
    assert docs == ["bench-jetson-fp32", "bench-onnx-int8", "bench-phone-8da4w", "bench-phone-fp32",
                    "eval-sft-student", "eval-teacher", "eval-vlsi-student"]
    teacher = json.loads((out / "results" / "eval-teacher.json").read_text())
    assert teacher["system"]["role"] == "teacher" and teacher["data"]["n"] == 300
    for name in ("jetson-fp32", "onnx-int8", "phone-fp32", "phone-8da4w"):
        bench = json.loads((out / "results" / f"bench-{name}.json").read_text())
        assert bench["parity"]["passed"] and bench["latency"]["stats"]["decode_tok_s"]["median"] > 0
    assert (out / "runs" / "vlsi" / "matching.json").exists() and rep

    if shutil.which("chromium") is None:
        pytest.skip("chromium is not on PATH (apt-get install chromium): the DOM check did not run")
    dom = _Dom()
    dom.feed(_dump_dom((out / "report" / "report.html").as_uri(), tmp_path / "profile"))
    assert dom.plots >= 6 and dom.svgs_in_plots == dom.plots          # accuracy, categories, latency, parity, heatmap
    acc = teacher["metrics"]["overall"]["acc"]
    assert f"{acc:.3f}" in dom.cells
