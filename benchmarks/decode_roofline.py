"""Decode speed of exported 0.5B-class students against transformers eager `generate` and the weight-bandwidth roofline.

    python benchmarks/decode_roofline.py                       # Qwen2-0.5B text dims; exports take minutes each
    python benchmarks/decode_roofline.py --workdir /tmp/roof   # keeps the bundles: a rerun only measures
    python benchmarks/decode_roofline.py --quick               # the tiny preset (smoke test)

One random student (benchmarks/export_time.py's: Qwen2-0.5B text dimensions, the tiny vision tower) is exported with
`--parity off` to ONNX (decoder fp32 / int8 / int4) and ExecuTorch (decoder fp32 / 8da4w). Each bundle is timed by
`vlsi-edge bench` in its own process (same prompt, fixed output length, EOS ignored); transformers eager `generate`
on the same prompt is the baseline. Decode reads every decoder weight once per token, so a path's roofline is
copy bandwidth / bytes per token, with the bandwidth from a large memory copy measured in this run.

Goals (issue): best fp32 path >= 75% of its roofline; best quantized path >= 2.5x eager fp32 and >= 60% of its own
roofline. Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlsi_edge.benchmarks.bench import copy_bandwidth
from vlsi_edge.benchmarks.export_time import build_student
from vlsi_edge.benchmarks.hostinfo import machine as host

VARIANTS = {   # name -> (target, precision, backend)
    "onnx-fp32": ("onnx", "fp32", "ort"),
    "onnx-int8": ("onnx", "decoder=int8", "ort"),
    "onnx-int4": ("onnx", "decoder=int4", "ort"),
    "phone-fp32": ("phone", "fp32", "executorch"),
    "phone-8da4w": ("phone", "decoder=8da4w", "executorch"),
}
DATA = "builtin:shapes:n_pretrain=0,n_train=4,n_val=4,n_test=4"
PROMPT_ITEM = 0


def _cli(*argv: str, threads: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run([sys.executable, "-m", "vlsi_edge.cli", *argv], capture_output=True, text=True, env=env)


def export(model: Path, name: str, work: Path, threads: int) -> tuple[Path, float]:
    target, precision, _ = VARIANTS[name]
    out = work / name
    if (out / "manifest.json").exists():
        return out, 0.0
    t0 = time.perf_counter()
    proc = _cli("export", "--model", str(model), "--target", target, "--precision", precision, "--out", str(out),
                "--parity", "off", "--max-seq-len", "128", threads=threads)
    if proc.returncode != 0:
        raise SystemExit(f"export {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return out, time.perf_counter() - t0


def bench(bundle: Path, backend: str, tokens: int, threads: int) -> dict:
    proc = _cli("bench", "--bundle", str(bundle), "--backend", backend, "--data", DATA, "--limit", "1",
                "--allow-ungated", "--timing-tokens", str(tokens), "--threads", str(threads), threads=threads)
    if proc.returncode != 0:
        raise SystemExit(f"bench {bundle.name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    lat = doc["latency"]
    return {"tpot_ms": lat["stats"]["tpot_ms"]["median"], "ttft_ms": lat["stats"]["ttft_ms"]["median"],
            "bytes_per_token": lat["roofline"]["bytes_per_token"] if lat["roofline"] else None,
            "bundle_mb": lat["bundle_mb"]}


def eager(model: Path, tokens: int, threads: int, repeats: int = 3) -> dict:
    """transformers `generate` (eager attention, fp32) on the bench's first prompt: TPOT from two output lengths."""
    import torch

    from vlsi_edge.data.collate import Collator
    from vlsi_edge.data.conversations import open_dataset
    from vlsi_edge.models import load_model

    torch.set_num_threads(threads)
    vlm = load_model(str(model))
    sample = list(open_dataset(DATA, split="test"))[PROMPT_ITEM]
    batch = Collator(vlm, mode="generate")([sample])

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            vlm.model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=vlm.tokenizer.pad_token_id)
        return time.perf_counter() - t0

    run(2)   # warm-up
    firsts, fulls = [], []
    for _ in range(repeats):
        firsts.append(run(1))
        fulls.append(run(tokens + 1))
    first, full = sorted(firsts)[repeats // 2], sorted(fulls)[repeats // 2]
    decoder_params = sum(p.numel() * p.element_size() for n, p in vlm.model.named_parameters()
                         if "visual" not in n and "embed_tokens" not in n)
    return {"tpot_ms": (full - first) / tokens * 1e3, "ttft_ms": first * 1e3, "bytes_per_token": decoder_params}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny student (smoke test)")
    ap.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per timing run")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", default=None, help="keep the checkpoint and bundles here (reused on a rerun)")
    args = ap.parse_args(argv)
    keep = args.workdir is not None
    tmp = None if keep else tempfile.TemporaryDirectory()
    work = Path(args.workdir if keep else tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "student"
    if not (model / "config.json").exists():
        build_student(model, args.quick)

    rows = {}
    for name in args.only:
        bundle, export_s = export(model, name, work, args.threads)
        rows[name] = {**bench(bundle, VARIANTS[name][2], args.tokens, args.threads), "export_s": round(export_s, 1),
                      "precision": VARIANTS[name][1]}
    rows["eager-fp32"] = {**eager(model, args.tokens, args.threads), "precision": "fp32"}
    bandwidth = copy_bandwidth(1024 if not args.quick else 64)
    base = rows["eager-fp32"]["tpot_ms"]
    for r in rows.values():
        r["tok_s"] = 1e3 / r["tpot_ms"]
        r["x_eager"] = base / r["tpot_ms"]
        r["roofline_tok_s"] = bandwidth * 1e9 / r["bytes_per_token"] if r["bytes_per_token"] else None
        r["roofline_fraction"] = r["tok_s"] / r["roofline_tok_s"] if r["roofline_tok_s"] else None
    if tmp is not None:
        tmp.cleanup()

    print(f"copy bandwidth {bandwidth:.2f} GB/s; {args.tokens} decode tokens per run; {args.threads} threads")
    print(f"{'path':<14}{'precision':<15}{'tok/s':>9}{'x eager':>9}{'MiB/token':>11}{'roofline':>10}{'of roof':>9}")
    for name, r in rows.items():
        mib = r["bytes_per_token"] / 2**20 if r["bytes_per_token"] else float("nan")
        frac = f"{100 * r['roofline_fraction']:.0f}%" if r["roofline_fraction"] else "-"
        roof = f"{r['roofline_tok_s']:.1f}" if r["roofline_tok_s"] else "-"
        print(f"{name:<14}{r['precision']:<15}{r['tok_s']:>9.2f}{r['x_eager']:>9.2f}{mib:>11.1f}{roof:>10}{frac:>9}")
    fp32 = [r for n, r in rows.items() if n.endswith("fp32") and n != "eager-fp32"]
    quant = [r for n, r in rows.items() if not n.endswith("fp32")]
    best_fp32 = max(fp32, key=lambda r: r["tok_s"], default=None)
    best_q = max(quant, key=lambda r: r["tok_s"], default=None)
    goals = {
        "best_fp32_roofline_fraction": best_fp32 and best_fp32["roofline_fraction"],
        "best_fp32_x_eager": best_fp32 and best_fp32["x_eager"],
        "best_quantized_x_eager": best_q and best_q["x_eager"],
        "best_quantized_roofline_fraction": best_q and best_q["roofline_fraction"],
    }
    goals["met"] = bool(best_fp32 and best_q and goals["best_fp32_roofline_fraction"] >= 0.75
                        and goals["best_quantized_x_eager"] >= 2.5 and goals["best_quantized_roofline_fraction"] >= 0.6)
    print(json.dumps({"benchmark": "decode_roofline", "student": "quick" if args.quick else "qwen2-0.5b-text-dims",
                      "machine": host(), "threads": args.threads, "tokens": args.tokens,
                      "bandwidth_gb_s": bandwidth, "paths": rows, "goals": goals}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
