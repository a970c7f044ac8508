"""Export time and bundle size per target and precision for a 0.5B-class random student (`--parity off`).

    python benchmarks/export_time.py                    # Qwen2-0.5B text dims, several minutes per variant
    python benchmarks/export_time.py --quick            # a tiny student, seconds (the smoke test)
    python benchmarks/export_time.py --only onnx:fp32 phone:decoder=8da4w

Student: Qwen2-VL with Qwen2-0.5B text dimensions (hidden 896, 24 layers, 14/2 heads, MLP 4864, vocab 151,936,
untied lm_head), the tiny preset's two-block vision tower, tokenizer and processor, random init, saved as a
transformers checkpoint. Each variant runs `vlsi-edge export ... --parity off` in its own process (wall time
includes loading the checkpoint, as a user sees it). Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlsi_edge.benchmarks.hostinfo import machine as host

VARIANTS = ["onnx:fp32", "onnx:decoder=int8", "onnx:decoder=int4", "jetson:fp16", "jetson:decoder=int8",
            "phone:fp32", "phone:decoder=8da4w"]
FULL = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "intermediate_size": 4864, "vocab_size": 151_936}
GOAL_S = 120


def build_student(out: Path, quick: bool) -> Path:
    """The tiny preset with its text model swapped for Qwen2-0.5B dimensions (or left tiny with --quick)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from vlsi_edge.models import load_model

    tiny = load_model("builtin:tiny-qwen2vl-student")
    if quick:
        tiny.save_pretrained(out)
        return out
    config = tiny.model.config
    text = config.text_config
    for key, value in FULL.items():
        setattr(text, key, value)
    text.layer_types = ["full_attention"] * FULL["num_hidden_layers"]
    half = FULL["hidden_size"] // FULL["num_attention_heads"] // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]       # mrope sections sum to the rotary half-dim
    text.rope_parameters = {**text.rope_parameters, "mrope_section": section}
    config.vision_config.hidden_size = FULL["hidden_size"]
    config.vision_config.out_hidden_size = FULL["hidden_size"]
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).float().eval()
    model.generation_config = tiny.model.generation_config
    tiny.model = model
    tiny.save_pretrained(out)
    return out


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def run_variant(model: Path, variant: str, work: Path) -> dict:
    target, precision = variant.split(":", 1)
    out = work / variant.replace(":", "-").replace("=", "-")
    cmd = [sys.executable, "-m", "vlsi_edge.cli", "export", "--model", str(model), "--target", target,
           "--precision", precision, "--out", str(out), "--parity", "off", "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    row = {"variant": variant, "seconds": round(wall, 1), "ok": proc.returncode == 0}
    if proc.returncode == 0:
        row["bundle_mb"] = round(size_mb(out), 1)
    else:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny student (smoke test)")
    ap.add_argument("--only", nargs="+", default=VARIANTS, help="target:precision variants to run")
    ap.add_argument("--workdir", default=None, help="where checkpoints and bundles go (default: a temp folder)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model = build_student(work / "student", args.quick)
        build_s = time.perf_counter() - t0
        rows = [run_variant(model, v, work) for v in args.only]
    print(f"{'variant':<24} {'seconds':>8} {'bundle MB':>10}  status")
    for r in rows:
        status = "ok" if r["ok"] else f"FAILED: {r['error']}"
        print(f"{r['variant']:<24} {r['seconds']:>8} {r.get('bundle_mb', '-'):>10}  {status}")
    result = {"benchmark": "export_time", "student": "quick" if args.quick else "qwen2-0.5b-text-dims",
              "checkpoint_build_s": round(build_s, 1), "goal_s_per_target": GOAL_S, "machine": host(),
              "variants": rows, "all_ok": all(r["ok"] for r in rows),
              "max_seconds": max(r["seconds"] for r in rows)}
    print(json.dumps(result))
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
