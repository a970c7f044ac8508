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



@pytest.mark.slow
def test_decode_roofline_quick(tmp_path):
    """Every path of the roofline benchmark runs on the tiny preset: five exports, five benches and eager."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_roofline.py"), "--quick", "--tokens", "4",
                           "--threads", "1", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "decode_roofline" and report["bandwidth_gb_s"] > 0
    paths = report["paths"]
    assert set(paths) == {"onnx-fp32", "onnx-int8", "onnx-int4", "phone-fp32", "phone-8da4w", "eager-fp32"}
    assert all(p["tok_s"] > 0 and p["bytes_per_token"] > 0 for p in paths.values())
    # the quantized decoders read fewer bytes per token than fp32
    assert paths["onnx-int4"]["bytes_per_token"] < paths["onnx-int8"]["bytes_per_token"] < paths["onnx-fp32"]["bytes_per_token"]
    assert paths["phone-8da4w"]["bytes_per_token"] < paths["phone-fp32"]["bytes_per_token"]


@pytest.mark.slow
def test_soak_quick(tmp_path):
    """The soak loop on the tiny student's jetson bundle for a few seconds: windows, growth, drift, stable answers."""
    from vlsi_edge.cli import main

    bundle = tmp_path / "bundle"
    assert main(["export", "--model", "builtin:tiny-qwen2vl-student", "--target", "jetson", "--out", str(bundle),
                 "--data", "builtin:shapes:n_pretrain=0,n_train=8,n_val=4,n_test=8"]) == 0
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--bundle", str(bundle),
                           "--backend", "ort", "--data", "builtin:shapes:n_pretrain=0,n_train=8,n_val=4,n_test=8",
                           "--minutes", "0.1", "--warmup", "1", "--window", "2", "--threads", "1",
                           "--out", str(tmp_path / "soak.json")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc == json.loads((tmp_path / "soak.json").read_text())
    assert doc["benchmark"] == "soak" and doc["runs"] >= 8 and len(doc["windows"]) >= 2
    assert doc["answers_changed"] == 0            # greedy on a fixed prompt gives the same ids every time
    assert doc["rss_first_mb"] > 0 and set(doc["meets"]) == {"rss_growth", "p90_drift", "answers_stable"}


@pytest.mark.slow
def test_position_readout_quick(tmp_path):
    """The position probe's whole path (items, train, eval, table) for one model and axis, a few steps."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "position_readout.py"), "--models",
                           "builtin:tiny-qwen2vl-student", "--axes", "horizontal", "--steps", "2", "--n-train", "16",
                           "--n-test", "8", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "position_readout" and len(report["rows"]) == 1
    row = report["rows"][0]
    assert row["n"] == 8 and 0.0 <= row["accuracy"] <= 1.0 and row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
    items = json.loads((tmp_path / "data-horizontal-test" / "items.json").read_text())
    assert [i["conversations"][1]["value"] for i in items[:4]] == ["left", "right", "left", "right"]
