"""`vlsi-edge bench`: latency and task accuracy of one exported bundle (or the PyTorch reference) on this device.

    vlsi-edge bench --bundle out/bundle-onnx --backend ort --data builtin:shapes --out results/onnx.json
    vlsi-edge bench --model runs/vlsi/student --backend torch --data builtin:shapes --out results/torch.json

Latency follows BENCH.md: batch 1, greedy, a fixed prompt set (the split's first items), a fixed output length that
ignores EOS, discarded warm-up runs, then timed runs (`quick`: 10; `full`: at least 20 and at least 60 s). Each
run is split into preprocess, vision encode, prefill and decode steps by the shared generation loop; TTFT covers
preprocess + vision + prefill, TPOT is the mean decode step. Decode reads every decoder weight once per token, so
decoder bytes / TPOT is the achieved bandwidth, set against a memory copy measured in the same run.

Accuracy: every item of the split (or `--limit`), greedy until EOS, scored by the one answer parser, in the
versioned results schema that `vlsi-edge eval` writes, so `vlsi-edge report` joins them by item id.

Torch-free unless `--backend torch`: it runs on a Jetson with the core install, the bundle and the backend library.
Peak RSS is this process's: run one backend per process (the CLI does).
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vlsi_edge.errors import UserError

PROFILES = {
    "quick": {"warmup": 1, "runs": 10, "min_seconds": 0.0, "max_new_tokens": 16, "copy_mb": 256},
    "full": {"warmup": 2, "runs": 20, "min_seconds": 60.0, "max_new_tokens": 64, "copy_mb": 1024},
}
N_PROMPTS = 4            # timing prompts: the split's first items, cycled
LATENCY_KEYS = ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "tpot_ms", "decode_tok_s", "e2e_ms")


def image_samples(data: str, split: str, limit: int | None, purpose: str, images_only: str) -> list:
    """The split's first `limit` samples, validated; every one must carry an image (bench and the phone kit)."""
    from vlsi_edge.data.conversations import open_dataset

    dataset = open_dataset(data, split=split)
    dataset.validate()
    samples = [s for _, s in zip(range(limit or 1 << 62), dataset)]
    if not samples:
        raise UserError(f"{data} split {split!r} has no samples {purpose}")
    if any(s.image is None for s in samples):
        raise UserError(f"{data} split {split!r} has items without an image", images_only)
    return samples


def summary(values) -> dict:
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {k: None for k in ("mean", "median", "p90", "p99", "stdev")}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "stdev": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def copy_bandwidth(mb: int, repeats: int = 5) -> float:
    """GB/s of a large memory copy (bytes read + bytes written), best of `repeats`: the roofline's ceiling."""
    src = np.ones(mb * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def device_facts(threads: int | None) -> dict:
    """CPU, cores and threads; the GPU and, on a Jetson, the power mode and a tegrastats line where readable."""
    from vlsi_edge.benchmarks.hostinfo import machine

    facts = {**machine(), "threads": threads}

    def probe(*cmd: str) -> str | None:
        if not shutil.which(cmd[0]):
            return None
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return getattr(exc, "stdout", None) or None
        return out.stdout.strip() or None

    facts["gpu"] = probe("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader")
    facts["jetson_power_mode"] = probe("nvpmodel", "-q")
    if shutil.which("tegrastats"):
        try:
            out = subprocess.run(["tegrastats", "--interval", "200"], capture_output=True, text=True, timeout=1)
            line = out.stdout
        except subprocess.TimeoutExpired as exc:
            line = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout
        facts["tegrastats"] = (line or "").strip().splitlines()[0] if line and line.strip() else None
    return facts


# --------------------------------------------------------------------------------------------------- sources
def _bundle_system(bundle, backend: str) -> dict:
    from vlsi_edge.results import tokenizer_fingerprint

    m = bundle.manifest
    return {"name": f"{bundle.root.name}-{backend}", "role": "export", "backend": backend, "target": bundle.target,
            "family": m["model"].get("family"), "bundle": str(bundle.root),
            "precision": {name: part["precision"] for name, part in bundle.parts.items()},
            "weights_fingerprint": m.get("source", {}).get("weights_fingerprint"),
            "tokenizer_fingerprint": tokenizer_fingerprint(bundle.path("tokenizer.json").read_text())}


def _bundle_sizes(bundle) -> tuple[float, int | None]:
    """(bundle MB, decoder weight bytes read per token). ONNX/TensorRT: the decoder's own files. The phone
    program holds every method in one file, so its decoder share is what the manifest records for the method
    (None for bundles that do not record it)."""
    files = {rel: bundle.path(rel).stat().st_size for rel in bundle.manifest["files"]}
    total = sum(files.values())
    if bundle.target == "phone":
        return total / 2**20, bundle.parts["text_decoder"].get("weight_bytes")
    decoder = sum(size for rel, size in files.items() if rel.startswith("text_decoder"))
    return total / 2**20, decoder or None


def _kv_bytes_per_token(model: dict, context: float, itemsize: int = 4) -> float:
    """KV-cache bytes one decode step reads at a mean context length."""
    return 2 * model["num_layers"] * model["num_kv_heads"] * model["head_dim"] * context * itemsize


def _open(backend: str, bundle: str | None, model: str | None, threads: int | None, allow_ungated: bool):
    """(runtime, system, timings of verify/load, bundle MB, decoder weight bytes)."""
    from vlsi_edge.runtimes.base import open_runtime
    from vlsi_edge.runtimes.bundle import open_bundle

    if backend == "torch":
        if not model or bundle:
            raise UserError("--backend torch runs a PyTorch model: give --model DIR (not --bundle)",
                            "or pick ort/executorch/tensorrt for a bundle")
        import vlsi_edge.torch_runtime  # noqa: F401  (registers the host backend)
        from vlsi_edge.distill.verbalizer import fingerprint
        from vlsi_edge.results import tokenizer_fingerprint

        t0 = time.perf_counter()
        rt = open_runtime("torch", model=model, threads=threads)
        load_ms = (time.perf_counter() - t0) * 1e3
        decoder = rt.parts_["text_decoder"].module
        embed = rt.parts_["token_embedding"].module
        skip = {id(p) for p in embed.parameters()}
        weight_bytes = sum(p.numel() * p.element_size() for p in decoder.parameters() if id(p) not in skip)
        name = Path(str(model)).name.removeprefix("builtin:")
        system = {"name": f"{name}-torch", "role": "student", "backend": "torch", "target": "host",
                  "family": rt.vlm.family, "model": str(model), "precision": "fp32",
                  "weights_fingerprint": fingerprint(rt.vlm.model),
                  "tokenizer_fingerprint": tokenizer_fingerprint(rt.vlm.tokenizer.backend_tokenizer.to_str())}
        return rt, system, {"verify_ms": 0.0, "load_ms": load_ms}, None, weight_bytes, None
    if not bundle or model:
        raise UserError(f"--backend {backend} runs an exported bundle: give --bundle DIR (not --model)",
                        "or --backend torch for a PyTorch model")
    t0 = time.perf_counter()
    b = open_bundle(bundle)
    verify_ms = (time.perf_counter() - t0) * 1e3
    if b.manifest.get("parity", {}).get("mode") == "off" and not allow_ungated:
        raise UserError(f"bundle {bundle} was exported with --parity off (no accuracy gate)",
                        "re-export it with parity on, or pass --allow-ungated for a speed-only benchmark")
    t0 = time.perf_counter()
    rt = open_runtime(backend, bundle=b, threads=threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    size_mb, weight_bytes = _bundle_sizes(b)
    parity = None
    if (b.root / "parity.json").exists():
        parity = json.loads((b.root / "parity.json").read_text())
    return rt, _bundle_system(b, backend), {"verify_ms": verify_ms, "load_ms": load_ms}, size_mb, weight_bytes, parity


# --------------------------------------------------------------------------------------------------- measuring
def time_generation(rt, samples, profile: dict, max_new_tokens: int, log=print) -> dict:
    """Warm-up runs, then timed runs over the prompt set until both the run count and the time floor are met."""
    from vlsi_edge.runtimes.generate import generate

    prompts = samples[:N_PROMPTS]
    for i in range(profile["warmup"]):
        s = prompts[i % len(prompts)]
        generate(rt, s.image, s.question, max_new_tokens=max_new_tokens, stop_at_eos=False)
    rows, t_start = [], time.perf_counter()
    while len(rows) < profile["runs"] or time.perf_counter() - t_start < profile["min_seconds"]:
        s = prompts[len(rows) % len(prompts)]
        g = generate(rt, s.image, s.question, max_new_tokens=max_new_tokens, stop_at_eos=False)
        t = g.timings
        ttft = t["preprocess_ms"] + t["vision_ms"] + t["prefill_ms"]
        tpot = float(np.mean(t["decode_ms"])) if t["decode_ms"] else float("nan")
        rows.append({"preprocess_ms": t["preprocess_ms"], "vision_ms": t["vision_ms"], "prefill_ms": t["prefill_ms"],
                     "ttft_ms": ttft, "tpot_ms": tpot, "decode_tok_s": 1e3 / tpot,
                     "e2e_ms": ttft + float(np.sum(t["decode_ms"])), "prompt_tokens": len(g.prompt_ids)})
    log(f"timed {len(rows)} runs of {max_new_tokens} tokens in {time.perf_counter() - t_start:.1f} s",
        file=sys.stderr)
    return {"runs": len(rows), "stats": {k: summary(r[k] for r in rows) for k in LATENCY_KEYS},
            "mean_prompt_tokens": float(np.mean([r["prompt_tokens"] for r in rows]))}


def score_split(rt, samples, max_new_tokens: int, log=print) -> list[dict]:
    """Greedy answers for every sample, scored like `vlsi-edge eval` scores the PyTorch models."""
    from vlsi_edge.data.answers import score
    from vlsi_edge.runtimes.generate import generate

    items = []
    for i, s in enumerate(samples):
        g = generate(rt, s.image, s.question, max_new_tokens=max_new_tokens)
        raw = g.text.strip()
        parsed, correct = score(raw, s.answer, s.meta.get("choices"))
        items.append({"id": s.id, "category": s.category, "cluster": s.cluster, "question": s.question,
                      "gold": s.answer, "raw": raw, "parsed": parsed, "correct": bool(correct)})
        if 10 * (i + 1) // len(samples) > 10 * i // len(samples):
            log(f"scored {i + 1}/{len(samples)}", file=sys.stderr)
    return items


def bench(backend: str, data: str, out: Path | None = None, bundle: str | None = None, model: str | None = None,
          split: str = "test", profile: str = "quick", limit: int | None = None, max_new_tokens: int = 8,
          timing_tokens: int | None = None, threads: int | None = None, allow_ungated: bool = False,
          log=print) -> dict:
    """Measure one bundle (or PyTorch model) and return the results document (also written to `out`)."""
    from vlsi_edge.data.scoring import summarize
    from vlsi_edge.fileio import write_json_atomic
    from vlsi_edge.results import make_results

    if profile not in PROFILES:
        raise UserError(f"unknown --profile {profile!r}", f"expected one of {', '.join(PROFILES)}")
    if (limit is not None and limit < 1) or max_new_tokens < 1 or (timing_tokens is not None and timing_tokens < 2):
        raise UserError("--limit and --max-new-tokens must be >= 1 and --timing-tokens >= 2")
    prof = PROFILES[profile]
    timing_tokens = timing_tokens or prof["max_new_tokens"]
    samples = image_samples(data, split, limit, "to benchmark", "bench measures image questions only")

    rt, system, load, size_mb, weight_bytes, parity = _open(backend, bundle, model, threads, allow_ungated)
    facts = device_facts(threads)
    log(f"benchmarking {system['name']} ({profile} profile) on {facts['cpu']}", file=sys.stderr)
    timing = time_generation(rt, samples, prof, timing_tokens, log=log)
    t0 = time.perf_counter()
    items = score_split(rt, samples, max_new_tokens, log=log)
    accuracy_s = time.perf_counter() - t0
    rss = peak_rss_mb()                                   # before the copy buffers below raise it
    bandwidth = copy_bandwidth(prof["copy_mb"])

    roofline = None
    tpot = timing["stats"]["tpot_ms"]["mean"]
    if weight_bytes and tpot:
        context = timing["mean_prompt_tokens"] + timing_tokens / 2
        per_token = weight_bytes + _kv_bytes_per_token(rt.bundle.model, context, np.dtype(rt.cache_dtype).itemsize)
        achieved = per_token / (tpot / 1e3) / 1e9
        roofline = {"bytes_per_token": per_token, "weight_bytes": weight_bytes, "achieved_gb_s": achieved,
                    "bandwidth_gb_s": bandwidth, "fraction": achieved / bandwidth,
                    "roofline_tok_s": bandwidth * 1e9 / per_token}
    latency = {"profile": profile, "warmup": prof["warmup"], "runs": timing["runs"], "min_seconds": prof["min_seconds"],
               "max_new_tokens": timing_tokens, "prompts": N_PROMPTS, "verify_ms": load["verify_ms"],
               "load_ms": load["load_ms"], "stats": timing["stats"], "peak_rss_mb": rss,
               "bundle_mb": size_mb, "roofline": roofline}
    doc = make_results("bench", system, {"spec": data, "split": split}, items, summarize(items),
                       latency=latency, parity=parity, device=facts,
                       timing={"seconds": accuracy_s, "items_per_s": len(items) / max(accuracy_s, 1e-9)})
    if out is not None:
        write_json_atomic(Path(out), doc)
    return doc


def format_table(doc: dict) -> str:
    lat, ov = doc["latency"], doc["metrics"]["overall"]
    s = lat["stats"]
    lines = [f"{doc['system']['name']}  ({lat['profile']} profile, {lat['runs']} runs x {lat['max_new_tokens']} "
             f"tokens, {doc['device']['cpu']})",
             f"  {'':<14s}{'mean':>10s}{'median':>10s}{'p90':>10s}{'p99':>10s}"]
    for key in LATENCY_KEYS:
        v = s[key]
        lines.append(f"  {key:<14s}" + "".join(f"{v[k]:>10.2f}" for k in ("mean", "median", "p90", "p99")))
    lines.append(f"  load {lat['load_ms']:.0f} ms (+ verify {lat['verify_ms']:.0f} ms), peak RSS "
                 f"{lat['peak_rss_mb']:.0f} MB" + (f", bundle {lat['bundle_mb']:.1f} MB" if lat["bundle_mb"] else ""))
    r = lat.get("roofline")
    if r:
        lines.append(f"  decode reads {r['bytes_per_token'] / 2**20:.1f} MiB/token: {r['achieved_gb_s']:.2f} GB/s of "
                     f"{r['bandwidth_gb_s']:.2f} GB/s copy bandwidth ({100 * r['fraction']:.0f}% of roofline)")
    lines.append(f"  accuracy {ov['acc']:.3f} [{ov['lo']:.3f}, {ov['hi']:.3f}] on {ov['n']} items, parse failures "
                 f"{ov['parse_failure_rate']:.3f}")
    return "\n".join(lines)


def main_json_line(doc: dict) -> str:
    return json.dumps(doc, separators=(",", ":"))

