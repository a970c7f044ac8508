"""Experiment (not a library feature): where a Qwen2-VL checkpoint's answer position looks among the image tokens,
and what those tokens hold.

    python scripts/attention_probe.py --model RUN/student --data DATA --split SPLIT [--n 32] [--scenes 1280]
                                      [--json OUT.json]

Two readings, printed as a table and written to `--json`:

- attention: for the first `--n` items of SPLIT (the prompt up to the first answer), per decoder layer and head,
  the share of the last prompt position's attention that lands on image tokens (`mass`), and the entropy in nats
  of that share spread over the image tokens (`entropy`; log 16 = 2.77 is an even spread over 16 tokens, 0 is one
  token). Counting needs a spread over the objects counted; a one-token lookup shows as an entropy near 0.
- tokens (112 px only, where the 16 merged tokens are the 16 cells of the test grid): ridge probes fitted on half of
  `--scenes` fresh test-like scenes (`vision_cells.scene`) and scored on the other half: every token's shape
  (occupied cells), and the count of each shape read from the mean of an image's 16 tokens (exact after rounding,
  and mean absolute error).

Why: on comparison questions ("Are there more circles than squares?") the teacher sits at the answer prior even
after 1,000 steps on comparisons alone (README, "Comparison: the counts are in the tokens"). Both shapes are always
present in those scenes, so a lookup of one object says nothing about the answer; only a count does.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from vlsi_edge.data.collate import Collator
from vlsi_edge.data.conversations import Sample, open_dataset
from vlsi_edge.errors import UserError
from vlsi_edge.models.registry import load_model

_spec = importlib.util.spec_from_file_location("vision_cells", Path(__file__).with_name("vision_cells.py"))
vision_cells = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vision_cells)


def first_question(sample: Sample) -> Sample:
    """The sample cut after its first assistant turn (the collator in generate mode then stops before that answer)."""
    end = next(i for i, t in enumerate(sample.turns) if t.role == "assistant") + 1
    return Sample(sample.id, sample.image, sample.turns[:end], sample.meta, sample.image_first)


def attention(vlm, samples: list[Sample]) -> list[dict]:
    """Per layer: image-token attention mass and entropy of the last prompt position, averaged over samples."""
    model = vlm.model
    model.set_attn_implementation("eager")      # sdpa returns no attention weights
    batch = Collator(vlm, mode="generate")([first_question(s) for s in samples])
    image = batch["input_ids"] == model.config.image_token_id
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    rows = []
    for layer, weights in enumerate(out.attentions):
        last = weights[:, :, -1, :] * image[:, None, :]                  # [batch, heads, tokens], image part only
        mass = last.sum(-1)
        p = last / mass.clamp_min(1e-12)[..., None]
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
        rows.append({"layer": layer, "mass": [round(float(v), 3) for v in mass.mean(0)],
                     "entropy": [round(float(v), 3) for v in entropy.mean(0)]})
    return rows


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    a = np.c_[x, np.ones(len(x))]
    return np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ y)


def _apply(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.c_[x, np.ones(len(x))] @ w


def token_probes(vlm, n_scenes: int, seed: int = 5) -> dict:
    """Held-out ridge probes on the vision tower's 16 tokens: per-token shape, and shape counts from their mean."""
    visual = vlm.model.model.visual.eval()
    rng = np.random.default_rng(seed)
    feats, shapes = [], []
    with torch.no_grad():
        for start in range(0, n_scenes, 64):
            pixels, _, shape = vision_cells.batch(vlm, rng, min(64, n_scenes - start))
            feats.append(vision_cells.tokens(visual, pixels).numpy())
            shapes.append(shape.numpy())
    x, y = np.concatenate(feats), np.concatenate(shapes)          # [scenes*16, dim], shape 0 = empty
    half = (len(x) // 32) * 16                                    # whole scenes in each half
    pred = _apply(_ridge(x[:half], np.eye(5)[y[:half]], 1e-2), x[half:]).argmax(1)
    occupied = y[half:] > 0
    pooled = x.reshape(-1, 16, x.shape[1]).mean(1)
    counts = np.stack([(y.reshape(-1, 16) == s).sum(1) for s in range(1, 5)], 1)
    h = half // 16
    guess = _apply(_ridge(pooled[:h], counts[:h], 1e-3), pooled[h:])
    return {"scenes": n_scenes,
            "token_shape_acc": round(float((pred == y[half:])[occupied].mean()), 3),
            "pooled_count_exact": round(float((np.rint(guess) == counts[h:]).mean()), 3),
            "pooled_count_mae": round(float(np.abs(guess - counts[h:]).mean()), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--image-root", default=None)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--scenes", type=int, default=1280)
    ap.add_argument("--json", default=None, help="also write the readings here")
    args = ap.parse_args(argv)
    try:
        vlm = load_model(args.model)
        samples = [s for _, s in zip(range(args.n), open_dataset(args.data, args.split, args.image_root))]
    except UserError as e:
        print(f"attention_probe: error: {e}", file=sys.stderr)
        return 2
    if vlm.family != "qwen2vl" or not samples or any(s.image is None for s in samples):
        print(f"attention_probe: error: expected a Qwen2-VL checkpoint and items with an image; got {vlm.family} "
              f"and {len(samples)} items from {args.data} split {args.split}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    result = {"model": args.model, "data": args.data, "split": args.split, "n": len(samples),
              "attention": attention(vlm, samples)}
    print(f"last prompt position -> image tokens ({len(samples)} items; entropy max {math.log(16):.2f} over 16)")
    for row in result["attention"]:
        cells = "  ".join(f"{m:.2f}/{e:.2f}" for m, e in zip(row["mass"], row["entropy"]))
        print(f"layer {row['layer']:2d}  mass/entropy per head: {cells}")
    if vlm.image_size == vision_cells.SIZE:
        result["tokens"] = token_probes(vlm, args.scenes)
        print("vision tokens:", json.dumps(result["tokens"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
