"""Soak: the bench loop on one bundle for N minutes, watching for memory growth, latency drift and answers that change.

    python benchmarks/soak.py --bundle out/bundle-onnx --backend ort --minutes 10 [--threads 1] [--out soak.json]
    python benchmarks/soak.py --model builtin:tiny-qwen2vl-student-pretrained --backend torch --minutes 10

Batch 1, greedy, a fixed output length that ignores EOS, cycling over the split's first `--prompts` items (as
`vlsi-edge bench` times them). The first `--warmup` seconds are discarded (allocator pools, thread pools and
caches settle there). After that, the process's resident set (VmRSS, not the peak) and every run's end-to-end
latency are recorded in windows of `--window` seconds.

Reported, against the goals of issue 6:
- RSS growth: last window's RSS over the first post-warm-up window's, goal < 5%;
- p90 drift: p90 end-to-end latency of the last quarter of runs over that of the first quarter, goal < 10%
  (quarters, not single windows, so one noisy window does not decide it);
- answer stability: every prompt's generated token ids must equal its first run's, all along (a leak of state
  between runs — a KV cache not reset, a position offset carried over — shows here first).

Prints a table of windows and ends with one JSON line; `--out` also gets the document. Nothing is asserted about
speed: the exit status is 0 when it ran, whatever the figures say.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from vlsi_edge.benchmarks.bench import _open, device_facts, image_samples, peak_rss_mb
from vlsi_edge.errors import UserError

GOALS = {"rss_growth": 0.05, "p90_drift": 0.10}


def current_rss_mb() -> float:
    """This process's resident set now (Linux /proc); elsewhere the peak, which can only overstate growth."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def soak(rt, samples, minutes: float, warmup_s: float, window_s: float, tokens: int, log=print) -> dict:
    from vlsi_edge.runtimes.generate import generate

    def one(i):
        s = samples[i % len(samples)]
        t0 = time.perf_counter()
        g = generate(rt, s.image, s.question, max_new_tokens=tokens, stop_at_eos=False)
        return (time.perf_counter() - t0) * 1e3, list(g.tokens)

    first_ids: dict[int, list] = {}
    changed, i = [], 0
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < warmup_s:
        _, ids = one(i)
        first_ids.setdefault(i % len(samples), ids)
        i += 1
    warm_runs = i
    # every latency goes into one float64 array sized (and written, so resident) before measuring starts: a Python
    # list of 100,000 floats is ~3 MB of growth that would be the soak's own, not the runtime's
    rate = warm_runs / max(time.perf_counter() - t_start, 1e-9)
    lat_ms = np.full(int(rate * minutes * 60 * 1.5) + 1024, np.nan)
    windows, n = [], 0
    t_end = time.perf_counter() + minutes * 60
    while time.perf_counter() < t_end:
        w0, start = time.perf_counter(), n
        while time.perf_counter() - w0 < window_s and time.perf_counter() < t_end:
            ms, ids = one(i)
            k = i % len(samples)
            if first_ids.setdefault(k, ids) != ids:
                changed.append(i)
            if n == len(lat_ms):                      # slower warm-up than steady state: grow (counted as growth)
                lat_ms = np.concatenate([lat_ms, np.full(len(lat_ms), np.nan)])
            lat_ms[n] = ms
            n += 1
            i += 1
        lat = lat_ms[start:n]
        windows.append({"t_s": round(time.perf_counter() - t_start, 1), "runs": len(lat),
                        "rss_mb": current_rss_mb(), "p50_ms": float(np.percentile(lat, 50)),
                        "p90_ms": float(np.percentile(lat, 90))})
        w = windows[-1]
        log(f"{w['t_s']:8.1f} s  runs {w['runs']:5d}  rss {w['rss_mb']:8.1f} MB  p50 {w['p50_ms']:8.2f} ms  "
            f"p90 {w['p90_ms']:8.2f} ms", file=sys.stderr)
    runs = lat_ms[:n]
    if len(runs) < 8 or len(windows) < 2:
        raise UserError(f"the soak measured only {len(runs)} runs in {len(windows)} windows",
                        "give it more --minutes (or a shorter --window)")
    q = len(runs) // 4
    p90_first, p90_last = float(np.percentile(runs[:q], 90)), float(np.percentile(runs[-q:], 90))
    rss0, rss1 = windows[0]["rss_mb"], windows[-1]["rss_mb"]
    return {"warmup_runs": warm_runs, "runs": len(runs), "windows": windows,
            "rss_first_mb": rss0, "rss_last_mb": rss1, "rss_max_mb": max(w["rss_mb"] for w in windows),
            "rss_growth": rss1 / rss0 - 1, "p90_first_quarter_ms": p90_first, "p90_last_quarter_ms": p90_last,
            "p90_drift": p90_last / p90_first - 1, "answers_changed": len(changed),
            "first_changed_run": changed[0] if changed else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="an exported bundle folder")
    ap.add_argument("--model", help="a PyTorch model (with --backend torch)")
    ap.add_argument("--backend", required=True, choices=["ort", "executorch", "tensorrt", "torch"])
    ap.add_argument("--data", default="builtin:shapes:n_pretrain=0")
    ap.add_argument("--split", default="test")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds discarded before measuring")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per reported window")
    ap.add_argument("--tokens", type=int, default=16, help="decode tokens per run (EOS ignored)")
    ap.add_argument("--prompts", type=int, default=8, help="the split's first N items, cycled")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--allow-ungated", action="store_true", help="accept a bundle exported with --parity off")
    ap.add_argument("--out", help="also write the JSON document here")
    args = ap.parse_args(argv)
    try:
        if args.minutes <= 0 or args.window <= 0 or args.warmup < 0 or args.tokens < 2 or args.prompts < 1:
            raise UserError("--minutes and --window must be > 0, --warmup >= 0, --tokens >= 2 and --prompts >= 1")
        samples = image_samples(args.data, args.split, args.prompts, "to soak", "soak runs image questions only")
        rt, system, load, size_mb, _, _ = _open(args.backend, args.bundle, args.model, args.threads,
                                                args.allow_ungated)
        facts = device_facts(args.threads)
        print(f"soaking {system['name']} for {args.minutes:g} min on {facts['cpu']} "
              f"(threads: {facts.get('threads') or os.cpu_count()})", file=sys.stderr)
        result = soak(rt, samples, args.minutes, args.warmup, args.window, args.tokens, log=print)
    except UserError as e:
        print(f"soak: error: {e}", file=sys.stderr)
        return 2
    doc = {"benchmark": "soak", "system": system, "device": facts, "bundle_mb": size_mb, "load_ms": load["load_ms"],
           "params": {k: getattr(args, k) for k in ("minutes", "warmup", "window", "tokens", "prompts", "threads")},
           "goals": GOALS, **result,
           "meets": {"rss_growth": result["rss_growth"] < GOALS["rss_growth"],
                     "p90_drift": result["p90_drift"] < GOALS["p90_drift"],
                     "answers_stable": result["answers_changed"] == 0}}
    print(f"{system['name']}: {result['runs']} runs after {result['warmup_runs']} warm-up runs; "
          f"RSS {result['rss_first_mb']:.1f} -> {result['rss_last_mb']:.1f} MB ({result['rss_growth']:+.2%}, goal "
          f"< {GOALS['rss_growth']:.0%}); p90 {result['p90_first_quarter_ms']:.2f} -> "
          f"{result['p90_last_quarter_ms']:.2f} ms ({result['p90_drift']:+.2%}, goal < {GOALS['p90_drift']:.0%}); "
          f"answers changed in {result['answers_changed']} runs", file=sys.stderr)
    if args.out:
        from vlsi_edge.fileio import write_json_atomic

        write_json_atomic(Path(args.out), doc)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
