"""The parity gate that ends every export (BENCH.md levels 1 and 2).

For each probe (distinct images from `--data`, the dataset's own questions):
- vision_encoder: the bundle's image embeddings against the PyTorch part's — cosine (min) and max abs diff;
- token_embedding: the bundle's embeddings of the whole prompt against the model's — max abs diff;
- text_decoder, teacher-forced: the prompt plus the reference answer fed to both sides in one pass, logits
  compared at every text position — max abs diff, top-1 agreement (near-ties in the reference excluded), mean
  KL(reference ‖ bundle);
- generation: transformers `generate` (greedy) against the shared loop on the bundle — per-step logits along the
  common prefix (checked too), exact-sequence match rate, mean common-prefix length, output-length ratio;
- anti-toy: at least `min_tokens` counted positions, and two different images must give different embeddings and
  different first-step logits on both sides.
A part's gate follows its own precision. `check` returns the report; `enforce` raises naming part, metric, value.
"""
from __future__ import annotations

import numpy as np

from vlsi_edge.errors import UserError

GATES = {
    "fp32": {"top1": 1.0, "max_abs": 1e-3, "cosine": 0.9999},
    "fp16": {"top1": 0.99, "mean_kl": 1e-3, "cosine": 0.999},
    "int8": {"top1": 0.97, "mean_kl": 0.02, "cosine": 0.99},
    "8da8w": {"top1": 0.97, "mean_kl": 0.02, "cosine": 0.99},
    "int4": {"top1": 0.95, "mean_kl": 0.05, "cosine": 0.99},
    "8da4w": {"top1": 0.95, "mean_kl": 0.05, "cosine": 0.99},
}
TIE_MARGIN = 0.01      # reference top-1 minus top-2 logit below this: a near-tie, not counted for top-1
MIN_TOKENS = 32


class ParityError(UserError):
    pass


def _kl(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    def logsoftmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsoftmax(ref), logsoftmax(got)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict:
    """Logit rows [N, V] (reference, bundle) → counted, top-1 agreement, max abs diff, KL sum."""
    top2 = np.sort(ref, -1)[:, -2:]
    counted = (top2[:, 1] - top2[:, 0]) >= TIE_MARGIN
    agree = ref.argmax(-1) == got.argmax(-1)
    return {"n": len(ref), "counted": int(counted.sum()), "agree": int((agree & counted).sum()),
            "max_abs": float(np.abs(ref - got).max()) if len(ref) else 0.0, "kl_sum": float(_kl(ref, got).sum())}


def _merge(acc: dict, new: dict) -> dict:
    if not acc:
        return dict(new)
    return {"n": acc["n"] + new["n"], "counted": acc["counted"] + new["counted"], "agree": acc["agree"] + new["agree"],
            "max_abs": max(acc["max_abs"], new["max_abs"]), "kl_sum": acc["kl_sum"] + new["kl_sum"]}


def _finish(acc: dict) -> dict:
    return {"n": acc["n"], "counted": acc["counted"], "max_abs": acc["max_abs"],
            "top1": acc["agree"] / max(acc["counted"], 1), "mean_kl": acc["kl_sum"] / max(acc["n"], 1)}


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check(vlm, parts, runtime, probes, max_new_tokens: int = 8) -> dict:
    """Measure parity of `runtime` (the bundle) against the PyTorch student on `probes` [(Sample, uint8 image)]."""
    import torch
    from vlsi_edge.runtimes.generate import generate, merge_prompt

    from vlsi_edge.data.collate import Collator

    model = vlm.model
    collate = Collator(vlm, mode="generate")
    vision_ref = parts["vision_encoder"].module
    vis = {"cosine": 1.0, "max_abs": 0.0}
    emb_max, forced, stepped = 0.0, {}, {}
    gen = {"exact": 0, "prefix": [], "len_ratio": []}
    firsts = []
    for sample, pixels in probes:
        with torch.no_grad():
            v_ref = vision_ref(torch.from_numpy(pixels[None])).numpy()
        v_got = runtime.run("vision_encoder", {"image": pixels[None]})["image_embeds"]
        vis["cosine"] = min(vis["cosine"], _cos(v_ref, v_got))
        vis["max_abs"] = max(vis["max_abs"], float(np.abs(v_ref - v_got).max()))

        batch = collate([sample])
        host_ids = batch["input_ids"][0].numpy()
        dev_ids = runtime.prompter.ids(sample.turns[0].text)
        if not np.array_equal(host_ids, dev_ids):
            raise ParityError(f"{vlm.family}: the bundle's prompt ids differ from the host processor's "
                              f"({len(dev_ids)} vs {len(host_ids)} tokens)", "this is a vlsi-edge bug; report it")
        with torch.no_grad():
            ref = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        ref_tokens = ref.sequences[0, len(host_ids):].tolist()
        ref_steps = np.stack([s[0].float().numpy() for s in ref.logits])
        firsts.append((v_ref, v_got, ref_steps[0]))

        # teacher-forced: prompt + reference answer in one pass on both sides
        full = np.concatenate([host_ids, np.asarray(ref_tokens[:-1], dtype=np.int64)])
        extra = len(full) - len(host_ids)
        fwd = {}
        for key, value in batch.items():    # per-token tensors grow with the answer: mask 1, type ids 0 (text)
            if torch.is_tensor(value) and value.shape == (1, len(host_ids)):
                value = torch.cat([value, torch.full((1, extra), int(key == "attention_mask"), dtype=value.dtype)], 1)
            fwd[key] = value
        fwd["input_ids"] = torch.from_numpy(full)[None]
        with torch.no_grad():
            hf_logits = model(**fwd).logits[0].float().numpy()
        tokens = runtime.run("token_embedding", {"input_ids": full[None]})["inputs_embeds"]
        with torch.no_grad():
            emb_ref = vlm.embed_tokens(torch.from_numpy(full)[None]).numpy()
        emb_max = max(emb_max, float(np.abs(emb_ref - tokens).max()))
        embeds, pos, _, is_image = merge_prompt(runtime.bundle.model, full, tokens, v_got)
        decoder = runtime.decoder()
        decoder.reset()
        got_logits = decoder(embeds, pos, is_image)
        text = ~is_image
        forced = _merge(forced, compare_logits(hf_logits[text], got_logits[text]))

        out = generate(runtime, pixels, sample.turns[0].text, max_new_tokens=max_new_tokens, keep_logits=True)
        k = _prefix(out.tokens, ref_tokens)
        common = min(len(out.step_logits), len(ref_steps), k + 1)
        stepped = _merge(stepped, compare_logits(ref_steps[:common], np.stack(out.step_logits[:common])))
        gen["exact"] += int(out.tokens == ref_tokens)
        gen["prefix"].append(k)
        gen["len_ratio"].append(len(out.tokens) / max(len(ref_tokens), 1))

    distinct = {"reference": True, "bundle": True}
    if len(firsts) >= 2:
        (a_ref, a_got, a_log), (b_ref, b_got, b_log) = firsts[0], firsts[1]
        distinct["reference"] = bool(np.abs(a_ref - b_ref).max() > 1e-3)
        distinct["bundle"] = bool(np.abs(a_got - b_got).max() > 1e-3)
        distinct["first_step_logits"] = bool(np.abs(a_log - b_log).max() > 1e-3)
    n = max(len(probes), 1)
    return {
        "probes": len(probes),
        "vision_encoder": vis,
        "token_embedding": {"max_abs": emb_max},
        "text_decoder": {"teacher_forced": _finish(forced), "generation_steps": _finish(stepped)},
        "generation": {"exact_match": gen["exact"] / n, "mean_common_prefix": float(np.mean(gen["prefix"])),
                       "length_ratio": float(np.mean(gen["len_ratio"]))},
        "distinct_images": distinct,
    }


def verdict(report: dict, precisions: dict[str, str], min_tokens: int = MIN_TOKENS) -> list[str]:
    """Failures as 'part: metric value vs gate' lines; empty when the bundle passes."""
    fails = []
    vgate = GATES[precisions["vision_encoder"]]
    v = report["vision_encoder"]
    if v["cosine"] < vgate["cosine"]:
        fails.append(f"vision_encoder: cosine {v['cosine']:.6f} < {vgate['cosine']}")
    if "max_abs" in vgate and v["max_abs"] > vgate["max_abs"]:
        fails.append(f"vision_encoder: max abs diff {v['max_abs']:.3g} > {vgate['max_abs']}")
    egate = GATES[precisions["token_embedding"]]
    if "max_abs" in egate and report["token_embedding"]["max_abs"] > egate["max_abs"]:
        fails.append(f"token_embedding: max abs diff {report['token_embedding']['max_abs']:.3g} > {egate['max_abs']}")
    dgate = GATES[precisions["text_decoder"]]
    for view in ("teacher_forced", "generation_steps"):
        d = report["text_decoder"][view]
        if d["top1"] < dgate["top1"]:
            fails.append(f"text_decoder ({view}): top-1 agreement {d['top1']:.4f} < {dgate['top1']}")
        if "max_abs" in dgate and d["max_abs"] > dgate["max_abs"]:
            fails.append(f"text_decoder ({view}): max abs logit diff {d['max_abs']:.3g} > {dgate['max_abs']}")
        if "mean_kl" in dgate and d["mean_kl"] > dgate["mean_kl"]:
            fails.append(f"text_decoder ({view}): mean KL {d['mean_kl']:.3g} > {dgate['mean_kl']}")
    counted = report["text_decoder"]["teacher_forced"]["counted"]
    if counted < min_tokens:
        fails.append(f"text_decoder: only {counted} counted positions < {min_tokens} (more or longer probes needed)")
    bad = [k for k, ok in report["distinct_images"].items() if not ok]
    if bad:
        fails.append(f"vision_encoder: two different images gave the same output ({', '.join(bad)})")
    return fails
