"""Peak memory and time of one training step: plain SFT vs the VLsI interaction step vs the same with dense losses.

    python benchmarks/distill_step.py                      # Qwen2-0.5B-shaped student, ~10 GB RAM, minutes per step
    python benchmarks/distill_step.py --steps 2 --dense-steps 1
    python benchmarks/distill_step.py --quick              # tiny model, seconds (the smoke test)

Student: Qwen2-VL with Qwen2-0.5B text dims (hidden 896, 24 layers, 14/2 heads, MLP 4864, vocab 151,936, untied
lm_head), a one-block vision tower, random init, fp32. Batch 1 of 1024 tokens (16 image tokens, 256 response tokens),
6 student target layers, a synthetic top-64 teacher cache with 12 layers + final (no teacher forward). Variants, each
in its own subprocess (peak RSS only grows): (a) `phase_loss("sft")`, (b) `phase_loss("interact")` as built
(chunked losses), (c) the interaction step with naive dense (N, V) losses. Every variant trains the whole student
except lm_head with AdamW (the trainer's step: backward, clip, step); (b) and (c) also train the 6 verb-FFNs.
Prints a table and ends with one JSON line holding mem_b_over_a (whole-process peak RSS) and time_b_over_a (median).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = {"a": "sft", "b": "interact", "c": "interact-dense"}
FULL = {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "mlp": 4864, "vocab": 151_936, "seq": 1024,
        "response": 256, "top_k": 64, "s_layers": [2, 6, 10, 14, 18, 22], "t_layers": 12, "vision_embed": 64,
        "vision_heads": 2, "special": {"image": 151655, "video": 151656, "start": 151652, "end": 151653,
                                       "eos": 151645, "pad": 151643}}
QUICK = {"hidden": 64, "layers": 7, "heads": 4, "kv_heads": 2, "mlp": 128, "vocab": 2000, "seq": 128, "response": 32,
         "top_k": 16, "s_layers": [1, 2, 3, 4, 5, 6], "t_layers": 12, "vision_embed": 32, "vision_heads": 2,
         "special": {"image": 1995, "video": 1996, "start": 1997, "end": 1998, "eos": 1999, "pad": 1994}}
IMAGE_TOKENS, PATCHES, PATCH_DIM = 16, 64, 3 * 2 * 14 * 14   # a 112-px image: 8x8 patches of 14 px, merged 2x2


# ------------------------------------------------------------------------------------------------ setup
def build_student(s: dict):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from vlsi_edge.models.qwen2vl import Qwen2VLAdapter
    from vlsi_edge.models.vlm import VLM

    half = s["hidden"] // s["heads"] // 2
    sp = s["special"]
    text = {"hidden_size": s["hidden"], "intermediate_size": s["mlp"], "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"],
            "max_position_embeddings": 32768, "rope_theta": 1_000_000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [half // 2, half // 4, half // 4]},  # sums to half
            "bos_token_id": None, "eos_token_id": sp["eos"], "pad_token_id": sp["pad"], "tie_word_embeddings": False}
    vision = {"depth": 1, "embed_dim": s["vision_embed"], "hidden_size": s["hidden"], "num_heads": s["vision_heads"],
              "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=sp["image"],
                           video_token_id=sp["video"], vision_start_token_id=sp["start"],
                           vision_end_token_id=sp["end"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).float()
    return VLM(Qwen2VLAdapter, model, None, "bench:random", s["s_layers"])


def make_batch(s: dict) -> dict:
    """input_ids (1, T): 4 prompt tokens, <vision_start>, 16 image tokens, <vision_end>, prompt, then the response;
    labels are -100 except the last `response` positions."""
    g = torch.Generator().manual_seed(1)
    sp, t = s["special"], s["seq"]
    ids = torch.randint(0, sp["start"] - 1, (1, t), generator=g)
    ids[0, 4] = sp["start"]
    ids[0, 5:5 + IMAGE_TOKENS] = sp["image"]
    ids[0, 5 + IMAGE_TOKENS] = sp["end"]
    labels = torch.full_like(ids, -100)
    labels[0, -s["response"]:] = ids[0, -s["response"]:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "mm_token_type_ids": (ids == sp["image"]).long(),
            "pixel_values": torch.randn(PATCHES, PATCH_DIM, generator=g),
            "image_grid_thw": torch.tensor([[1, 8, 8]])}


def synthetic_topk(n: int, vocab: int, k: int, g: torch.Generator):
    """Peaky random teacher: N(0, 2) logits with +12 on 16 random ids per token -> top-k log-probs (mass ~0.9)."""
    from vlsi_edge.distill.losses import TopK

    logits = torch.randn(n, vocab, generator=g) * 2
    logits.scatter_add_(1, torch.randint(0, vocab, (n, 16), generator=g), torch.full((n, 16), 12.0))
    top = logits.log_softmax(-1).topk(k, dim=-1)
    return TopK(top.indices, top.values.float())


class SyntheticCache:
    """`TeacherCache.lookup`'s contract with fixed random top-k rows: the real cache needs a teacher forward, which
    this benchmark excludes."""

    def __init__(self, n: int, vocab: int, k: int, t_layers: list[int]):
        g = torch.Generator().manual_seed(2)
        self.n, self.final = n, synthetic_topk(n, vocab, k, g)
        self.layers = {j: synthetic_topk(n, vocab, k, g) for j in t_layers}

    def lookup(self, item_ids, t_layers, final_only):
        out = {"n": self.n, "final": self.final}
        if not final_only:
            out["layers"] = [self.layers[j] for j in t_layers]
        return out


def build_context(s: dict):
    from vlsi_edge.config import DistillConfig
    from vlsi_edge.distill.stages import Context, Side
    from vlsi_edge.distill.verbalizer import Verbalizers

    adapter = build_student(s)
    verb = Verbalizers(s["s_layers"], s["hidden"])
    t_layers = list(range(2, 2 * s["t_layers"] + 1, 2))  # 12 teacher target layers (numbers only)
    cache = SyntheticCache(s["response"], s["vocab"], s["top_k"], t_layers)
    return Context(cfg=DistillConfig(), student=Side(adapter, verb), teacher=None, vocab=s["vocab"],
                   s_layers=list(s["s_layers"]), t_layers=t_layers, reduce_sum=lambda t: t, teacher_cache=cache)


# ------------------------------------------------------------------------------------------------ dense twin
def dense_kl(lq: torch.Tensor, t) -> torch.Tensor:
    """Sum over tokens of KL(teacher top-k + rest || student buckets), lq: full (N, V) student log-probs."""
    pk = t.logprobs.exp()                                                # (N, k)
    rest = (1 - pk.sum(-1)).clamp(0, 1)                                  # (N,)
    lqk = lq.gather(1, t.ids)                                            # (N, k)
    lqr = lq.scatter(1, t.ids, float("-inf")).logsumexp(-1)              # (N,) student mass off the ids
    top = (pk * (t.logprobs - lqk)).sum(-1)
    tail = torch.where(rest > 0, rest * (rest.clamp_min(1e-30).log() - lqr), torch.zeros_like(rest))
    return (top + tail).sum()


def dense_interact_loss(ctx, batch: dict, step_key: int) -> torch.Tensor:
    """`phase_loss("interact")` with naive losses: every layer's (N, V) log-softmax lives in the autograd graph."""
    from vlsi_edge.distill import losses
    from vlsi_edge.distill.matching import candidate_pairs, match, matching_generator

    cfg = ctx.cfg
    index, _ = losses.response_positions(batch.pop("labels"))
    sn = ctx.student.adapter.num_layers
    w = ctx.student.adapter.lm_head.weight[:ctx.vocab]                   # (V, D)
    feats = ctx.student(batch, [*ctx.s_layers, sn], index, backbone_grad=True)
    teacher = ctx.teacher_cache.lookup(["bench"], ctx.t_layers, False)
    lq = {k: (feats[k] @ w.T).log_softmax(-1) for k in [*ctx.s_layers, sn]}  # (N, V) each
    kl = torch.full((len(ctx.s_layers), len(ctx.t_layers)), float("inf"), dtype=torch.float64)
    with torch.no_grad():
        for i, j in candidate_pairs(len(ctx.s_layers), len(ctx.t_layers), cfg.matching):
            kl[i, j] = dense_kl(lq[ctx.s_layers[i]], teacher["layers"][j]).double() / index.numel()
    result = match(kl, cfg.matching, matching_generator(cfg.train.seed, step_key), step=step_key)
    loss = dense_kl(lq[sn], teacher["final"])
    for i, k in enumerate(ctx.s_layers):
        loss = loss + dense_kl(lq[k], teacher["layers"][result.teacher_index[i]])
    return loss


# ------------------------------------------------------------------------------------------------ one variant
def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def measure(variant: str, s: dict, warmup: int, steps: int) -> dict:
    """Build the student, run warm-up + timed steps of one variant, return its numbers (runs in a child)."""
    from vlsi_edge.distill.stages import (
        phase_loss,
        response_tokens,
        trainable_parameters,
    )

    ctx = build_context(s)
    batch = make_batch(s)
    model_params, verb_params = trainable_parameters("interact", ctx, lora=False)  # all but lm_head; + verb-FFNs
    params = model_params + (verb_params if variant != "a" else [])
    if variant == "a":
        for p in verb_params:
            p.requires_grad_(False)
    cfg = ctx.cfg
    opt = torch.optim.AdamW([{"params": params, "lr": cfg.optim.lr}], betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay, foreach=False)   # as the trainer builds it
    n_tokens = response_tokens(batch)
    rss_before = rss_mb()
    times, parts = [], []
    for step in range(warmup + steps):
        b = dict(batch)
        t0 = time.perf_counter()
        if variant == "c":
            loss = dense_interact_loss(ctx, b, step)
        else:
            loss, _ = phase_loss(VARIANTS[variant], ctx, b, step, item_ids=["bench"])
        t1 = time.perf_counter()
        (loss / n_tokens).backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= warmup:
            times.append(t3 - t0)
            parts.append((t1 - t0, t2 - t1, t3 - t2))
    peak = peak_rss_mb()
    return {"variant": variant, "phase": VARIANTS[variant], "loss": loss.item() / n_tokens,
            "params_trained": sum(p.numel() for p in params), "verb_params": sum(p.numel() for p in verb_params)
            if variant != "a" else 0, "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(peak, 1),
            "step_increment_mb": round(peak - rss_before, 1), "steps": steps, "warmup": warmup,
            "median_s": statistics.median(times), "p90_s": _p90(times), "times_s": [round(t, 3) for t in times],
            "median_forward_loss_s": statistics.median(p[0] for p in parts),
            "median_backward_s": statistics.median(p[1] for p in parts),
            "median_optimizer_s": statistics.median(p[2] for p in parts)}


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(0.9 * (len(xs) - 1))))] if len(xs) > 1 else xs[0]


# ------------------------------------------------------------------------------------------------ driver
def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 1024


def machine() -> dict:
    from vlsi_edge.benchmarks.hostinfo import machine as host

    return {**host(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def run_child(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--warmup", str(args.warmup),
           "--steps", str(args.dense_steps if variant == "c" and args.dense_steps else args.steps)]
    if args.quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"variant": variant, "phase": VARIANTS[variant], "error": f"did not run (rc {proc.returncode}): "
                                                                           f"{tail[0][:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded warm-up steps (default 1)")
    parser.add_argument("--dense-steps", type=int, default=0, help="timed steps for (c) (default: --steps)")
    parser.add_argument("--variants", default="abc", help="which of a (sft), b (interact), c (dense) to run")
    parser.add_argument("--quick", action="store_true", help="tiny model (hidden 64, vocab 2000, seq 128)")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.child:
        print(json.dumps(measure(args.child, s, args.warmup, args.steps)))
        return 0

    info = machine()
    results = {}
    for v in args.variants:
        if v == "c" and "b" in results and "peak_rss_mb" in results["b"]:
            # (N, V) fp32 tensors the dense graph keeps: about 3 per matched layer, plus backward temporaries
            extra = (len(s["s_layers"]) + 1) * 4 * s["response"] * s["vocab"] * 4 / 2**20
            need, avail = results["b"]["step_increment_mb"] + extra, mem_available_mb()
            if need > 0.9 * avail:
                results[v] = {"variant": v, "phase": VARIANTS[v],
                              "error": f"did not fit (needs ~{need:.0f} MB, {avail:.0f} MB available)"}
                continue
        print(f"running ({v}) {VARIANTS[v]} ...", file=sys.stderr, flush=True)
        results[v] = run_child(v, args)
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    print(f"distill_step  {'quick' if args.quick else 'Qwen2-0.5B-shaped'} student, seq {s['seq']}, "
          f"{s['response']} response tokens, vocab {s['vocab']}, {len(s['s_layers'])} student layers, "
          f"top-{s['top_k']} cache x {s['t_layers']}+1 teacher layers; {info['cpu']}, {info['cores']} cores, "
          f"load {info['loadavg_at_start']}")
    print(f"{'variant':<20} {'params trained':>15} {'peak RSS MB':>12} {'step +MB':>9} {'median s':>9} {'p90 s':>8}"
          f"   fwd+loss / bwd / optim s")
    for v, r in results.items():
        name = f"({v}) {r['phase']}"
        if "error" in r:
            print(f"{name:<20} {r['error']}")
            continue
        print(f"{name:<20} {r['params_trained']:>15,} {r['peak_rss_mb']:>12.0f} {r['step_increment_mb']:>9.0f} "
              f"{r['median_s']:>9.2f} {r['p90_s']:>8.2f}   {r['median_forward_loss_s']:.2f} / "
              f"{r['median_backward_s']:.2f} / {r['median_optimizer_s']:.2f}")
    if "b" in results and "verb_params" in results["b"]:
        print(f"verb-FFNs in (b)/(c): {results['b']['verb_params']:,} params, "
              f"{results['b']['verb_params'] * 16 / 2**20:.0f} MB with grads + AdamW states")

    ratios = {}
    a, b = results.get("a", {}), results.get("b", {})
    if "median_s" in a and "median_s" in b:
        ratios = {"mem_b_over_a": round(b["peak_rss_mb"] / a["peak_rss_mb"], 3),
                  "time_b_over_a": round(b["median_s"] / a["median_s"], 3),
                  "mem_increment_b_over_a": round(b["step_increment_mb"] / max(a["step_increment_mb"], 1e-9), 3)}
        print(f"(b)/(a): peak RSS {ratios['mem_b_over_a']:.3f} (goal <= 1.25; step increment "
              f"{ratios['mem_increment_b_over_a']:.3f}), median time {ratios['time_b_over_a']:.3f} (goal <= 1.6)")
    print(json.dumps({"bench": "distill_step", "quick": args.quick, "machine": info, "ratios": ratios,
                      "variants": results}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
