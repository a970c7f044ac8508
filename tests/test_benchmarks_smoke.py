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
    """The position probe's whole path (items, the large-object warm-up, train, eval, table) for one model and axis, a
    few steps."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "position_readout.py"), "--models",
                           "builtin:tiny-qwen2vl-student", "--axes", "horizontal", "--steps", "2", "--n-train", "16",
                           "--warmup-steps", "2",
                           "--n-test", "8", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "position_readout" and len(report["rows"]) == 1
    row = report["rows"][0]
    assert row["n"] == 8 and 0.0 <= row["accuracy"] <= 1.0 and row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
    assert row["warmup_steps"] == 2 and (tmp_path / "run-horizontal-tiny-qwen2vl-student-large" / "student").is_dir()
    items = json.loads((tmp_path / "data-horizontal-test" / "items.json").read_text())
    assert [i["conversations"][1]["value"] for i in items[:4]] == ["left", "right", "left", "right"]


@pytest.mark.slow
def test_reproduce_smoke(tmp_path):
    """benchmarks/reproduce.py end to end at toy size (--smoke: 40 train items, 36 test items, a few steps): every
    headline method, every ablation row, the heatmap and the verbalizer views reach the report; a rerun resumes from
    the finished runs instead of training again."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--smoke", "--workdir", str(tmp_path / "w"),
           "--out", str(tmp_path / "report" / "r"), "--jobs", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["mode"] == "smoke" and {"sft", "kd", "vlsi", "vlsi_vs_sft"} <= set(last)
    doc = json.loads((tmp_path / "report" / "r.json").read_text())
    assert {m: doc["headline"][m]["generate"]["n_seeds"] for m in ("sft", "kd", "vlsi")} == {"sft": 2, "kd": 2,
                                                                                           "vlsi": 2}
    assert [r["label"] for r in doc["ablations"]["matching"]][-1] == "+ adaptive temperature"
    assert len(doc["ablations"]["loss"]) == 4 and len(doc["ablations"]["sft_step"]) == 2
    assert doc["matching"]["snapshots"] and len(doc["figure3"]) == 3
    md = (tmp_path / "report" / "r.md").read_text()
    assert "## Against the paper's claims" in md and (tmp_path / "report" / "r-headline.svg").exists()
    logs = tmp_path / "w" / "smoke" / "logs"
    before = {p.name: p.stat().st_mtime_ns for p in logs.iterdir()}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1]) == last
    assert {p.name: p.stat().st_mtime_ns for p in logs.iterdir()} == before  # nothing trained or scored again
