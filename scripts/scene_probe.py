"""Experiment (not a library feature): what a tiny Qwen2-VL checkpoint's language model knows of where things are.

    python scripts/scene_probe.py --model RUN/student --data DATA [--split val] [--head RUN/aux_head.safetensors]
                                  [--n 450] [--layers 0,2,5,8] [--json OUT]

Two readings on the split's grid items (pattern rows are left out):

- Token position: at 112 px a Qwen2-VL image is 16 tokens, token i being cell (i // 4, i % 4) of the test split's
  4x4 grid. A ridge probe (one-hot targets, argmax) reads every image token's row and column from the language
  model's hidden state after each of `--layers` (0: its input, the vision tower's output), fit on the first two
  thirds of the images and scored on the rest (the better of a one-hot and a ramp reading); chance 0.25.
- Scene head (`--head`, from `vlsi-edge train --set train.aux_weight=W`: `RUN/aux_head.safetensors`, or a state
  checkpoint's `tensors.safetensors`): the head's squared error per group of the records' `aux` entries (shape
  counts, colour-shape pair counts, rows, columns; averaged over the text positions after the image) against the
  error of predicting each entry's mean over the scored items, and how often the rounded shape counts at the last
  prompt position are exact.

Why: the teacher's spatial answers stay at chance while its shape and count answers do not (README, "Scene
targets"). The vision tower has no absolute position embedding, so a token's place can only come from the language
model (the causal order of the tokens, M-RoPE).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from vlsi_edge.data.collate import Collator
from vlsi_edge.data.conversations import open_dataset
from vlsi_edge.data.shapes import AUX_NAMES
from vlsi_edge.distill.stages import image_token_id, text_after_image
from vlsi_edge.errors import UserError
from vlsi_edge.models.registry import load_model

GRID = 4
GROUPS = {"shape_counts": slice(0, 4), "pair_counts": slice(4, 28), "rows": slice(28, 52), "cols": slice(52, 76)}


def image_states(vlm, samples, layers: list[int], batch: int = 25):
    """{layer: [images, 16, D]} hidden states at the image positions, and per batch (collated inputs, states)."""
    collate = Collator(vlm, mode="generate")
    token = image_token_id(vlm.model.config)
    out, batches = {k: [] for k in layers}, []
    with torch.no_grad():
        for start in range(0, len(samples), batch):
            inputs = collate(samples[start:start + batch])
            states = vlm.hidden_states(dict(inputs), layers)
            is_image = inputs["input_ids"] == token
            for k in layers:
                out[k].append(states[k][is_image].reshape(-1, GRID * GRID, states[k].shape[-1]))
            batches.append((inputs, states))
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}, batches


def ridge_accuracy(x: np.ndarray, labels: np.ndarray, n_fit: int, ridge: float = 1.0) -> float:
    """x [N, D], labels [N] in 0..L-1: ridge maps fit on the first n_fit rows, accuracy on the rest. The better of
    two readings: one-hot targets with argmax (a value with a direction of its own) and the label as a number,
    rounded (a ramp, which one-hot argmax misses for the middle values)."""
    x = np.hstack([x, np.ones((len(x), 1))])
    fit = x[:n_fit]
    gram = fit.T @ fit + ridge * np.eye(x.shape[1])
    onehot = np.eye(int(labels.max()) + 1)[labels]
    by_value = np.argmax(x[n_fit:] @ np.linalg.solve(gram, fit.T @ onehot[:n_fit]), 1)
    ramp = np.clip(np.rint(x[n_fit:] @ np.linalg.solve(gram, fit.T @ labels[:n_fit].astype(float))), 0, labels.max())
    rest = labels[n_fit:]
    return float(max((by_value == rest).mean(), (ramp == rest).mean()))


def position_probe(states: dict[int, np.ndarray]) -> dict:
    out = {}
    for k, x in states.items():
        n = x.shape[0]
        n_fit = (2 * n // 3) * GRID * GRID
        cells = np.tile(np.arange(GRID * GRID), n)
        flat = x.reshape(n * GRID * GRID, -1)
        out[f"layer {k}"] = {"row": round(ridge_accuracy(flat, cells // GRID, n_fit), 3),
                             "col": round(ridge_accuracy(flat, cells % GRID, n_fit), 3)}
    return out


def load_head(path: Path, hidden: int) -> torch.nn.Linear:
    from safetensors.torch import load_file

    state = load_file(str(path))
    state = {k.removeprefix("student_aux."): v for k, v in state.items() if k in
             ("weight", "bias", "student_aux.weight", "student_aux.bias")}
    if set(state) != {"weight", "bias"} or tuple(state["weight"].shape) != (len(AUX_NAMES), hidden):
        raise UserError(f"{path} holds no scene head of shape ({len(AUX_NAMES)}, {hidden})",
                        "expected RUN/aux_head.safetensors of a run with builtin:shapes scene targets")
    head = torch.nn.Linear(hidden, len(AUX_NAMES))
    head.load_state_dict(state)
    return head


def head_probe(vlm, head, samples, batches, layer: int) -> dict:
    targets = torch.tensor([[math.nan if v is None else v for v in s.meta["aux"]] for s in samples])
    mean = torch.nanmean(targets, 0)
    sums = {g: [0.0, 0.0, 0.0] for g in GROUPS}            # head error, mean-predictor error, weight
    exact = total = 0
    start = 0
    with torch.no_grad():
        for inputs, states in batches:
            rows = targets[start:start + len(inputs["input_ids"])]
            start += len(rows)
            mask = text_after_image(inputs, image_token_id(vlm.model.config)).float()
            pred = head(states[layer])
            for g, part in GROUPS.items():
                t = rows[:, part]
                known = torch.isfinite(t).float()
                err = ((pred[..., part] - torch.nan_to_num(t)[:, None]) ** 2 * known[:, None]).sum(-1)
                base = ((mean[part] - torch.nan_to_num(t)) ** 2 * known).sum(-1)
                sums[g][0] += float((err * mask).sum())
                sums[g][1] += float((base * mask.sum(1)).sum())
                sums[g][2] += float((known.sum(-1) * mask.sum(1)).sum())
            exact += int((torch.round(pred[:, -1, :4] * 5) == torch.round(rows[:, :4] * 5)).sum())
            total += rows[:, :4].numel()
    out = {g: {"head": round(h / max(w, 1), 4), "mean": round(b / max(w, 1), 4)} for g, (h, b, w) in sums.items()}
    out["shape_count_exact"] = round(exact / max(total, 1), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--head", default=None, help="aux_head.safetensors (or a state checkpoint's tensors)")
    ap.add_argument("--head-layer", type=int, default=5)
    ap.add_argument("--n", type=int, default=450)
    ap.add_argument("--layers", default="0,2,5,8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        vlm = load_model(args.model)
        layers = sorted({int(k) for k in args.layers.split(",")} | ({args.head_layer} if args.head else set()))
        if vlm.family != "qwen2vl" or vlm.image_token_count() != GRID * GRID:
            raise UserError(f"{args.model} is {vlm.family} with {vlm.image_token_count()} image tokens",
                            "expected a Qwen2-VL checkpoint at 112 px (16 image tokens)")
        if not all(0 <= k <= vlm.num_layers for k in layers):
            raise UserError(f"--layers {layers} outside 0..{vlm.num_layers}")
        samples = [s for s in open_dataset(args.data, args.split) if s.category != "pattern" and s.image][:args.n]
        if len(samples) < 3:
            raise UserError(f"{args.data} split {args.split} has {len(samples)} grid items", "expected at least 3")
        if args.head and not all("aux" in s.meta for s in samples):
            raise UserError(f"--head needs items with an 'aux' target; {args.data} split {args.split} has none",
                            "use builtin:shapes:...,scene_targets=1 or a where_split.py folder")
        head = load_head(Path(args.head), vlm.hidden_size) if args.head else None
    except (UserError, ValueError, OSError) as e:
        print(f"scene_probe: error: {e}", file=sys.stderr)
        return 2
    states, batches = image_states(vlm, samples, layers)
    result = {"model": args.model, "data": args.data, "split": args.split, "n": len(samples),
              "position": position_probe({k: states[k] for k in map(int, args.layers.split(","))})}
    if head is not None:
        result["head"] = head_probe(vlm, head, samples, batches, args.head_layer)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
