"""Experiment (not a library feature): is a spatial answer's information at the position that answers it?

    python scripts/relation_probe.py --model RUN/student --data DATA [--split val] [--fit-split sp]
                                     [--head RUN/aux_head.safetensors] [--head-layer 5] [--layers 3,5,8,10]
                                     [--n 1000] [--json OUT]

Two readings on the split's spatial items ("Where is the A relative to the B?"), both at the last prompt position
(the one whose next token is the answer):

- Scene head (`--head`, from `vlsi-edge train --set train.aux_weight=W` on `builtin:shapes:...,scene_targets=1`
  records): the head predicts every colour-shape pair's row and column (`shapes.AUX_NAMES`). Take A's and B's and
  answer with the larger difference's axis and sign. This reading is handed A and B from the question, so it says
  whether the hidden state holds where things are, not whether the model knows which two objects were asked about.
  With 82 or more outputs (`scripts/question_targets.py` layouts), the same reading of the question entries
  (q:row/col of the two named objects) is reported too: that one the hidden state must select by itself.
- Linear probe (`--fit-split`): a softmax regression on the hidden state after each of `--layers`, fit on the
  fit split's spatial items and scored on `--split`'s; its accuracy on the fit split says how much of the answer a
  linear read-out of that position can find at all. The model's own answer is a read-out of the last layer, so a
  probe above the model's accuracy means the answer head, not the hidden state, is what falls short.

Chance is 0.25 for both. Why (README, "Cosine to zero"): the teacher's spatial answers sit near chance while its
scene head knows where the objects are.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from vlsi_edge.data.collate import Collator
from vlsi_edge.data.conversations import open_dataset
from vlsi_edge.data.shapes import AUX_NAMES, PAIRS, RELATIONS
from vlsi_edge.errors import UserError
from vlsi_edge.models.registry import load_model

QUESTION = re.compile(r"Where is the (\w+ \w+) relative to the (\w+ \w+)\?")
ROW, COL = AUX_NAMES.index(f"row:{PAIRS[0]}"), AUX_NAMES.index(f"col:{PAIRS[0]}")
Q = len(AUX_NAMES)      # question_targets.py appends q:row first, q:col first, q:row second, q:col second, ...


def relation(d_row: float, d_col: float) -> str:
    """The relation of A to B from A's place minus B's (rows count down, columns right)."""
    if abs(d_col) > abs(d_row):
        return "left" if d_col < 0 else "right"
    return "above" if d_row < 0 else "below"


def spatial_items(data: str, split: str, n: int) -> list:
    items = [s for s in open_dataset(data, split) if s.category == "spatial" and s.image
             and QUESTION.search(s.turns[0].text)][:n]
    if len(items) < 2:
        raise UserError(f"{data} split {split} has {len(items)} spatial items", "expected at least 2")
    return items


def last_states(vlm, items, layers: list[int], batch: int = 50) -> tuple[dict, list[str]]:
    """{layer: [items, hidden]} at the last prompt position, and the gold answers."""
    collate = Collator(vlm, mode="generate")     # left-padded prompts, so position -1 is every row's last
    out, gold = {k: [] for k in layers}, []
    with torch.no_grad():
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            states = vlm.hidden_states(dict(collate(chunk)), layers)
            for k in layers:
                out[k].append(states[k][:, -1].float())
            gold += [s.turns[1].text.strip() for s in chunk]
    return {k: torch.cat(v) for k, v in out.items()}, gold


def head_reading(pred: torch.Tensor, items, gold: list[str]) -> dict:
    """Accuracy of the scene head's rows / columns of the two named objects read as a relation."""
    scene = question = axis = 0
    has_q = pred.shape[1] >= Q + 4              # q entries name the two objects in PAIRS order
    for p, s, g in zip(pred.tolist(), items, gold):
        a, b = (PAIRS.index(x) for x in QUESTION.search(s.turns[0].text).groups())
        r = relation(p[ROW + a] - p[ROW + b], p[COL + a] - p[COL + b])
        scene += r == g
        axis += (r in RELATIONS[:2]) == (g in RELATIONS[:2])
        if has_q:
            first, second = (p[Q], p[Q + 1]), (p[Q + 2], p[Q + 3])
            pa, pb = (first, second) if a < b else (second, first)
            question += relation(pa[0] - pb[0], pa[1] - pb[1]) == g
    n = len(gold)
    out = {"scene_entries": round(scene / n, 3), "scene_entries_axis": round(axis / n, 3)}
    if has_q:
        out["question_entries"] = round(question / n, 3)
    return out


def linear_probe(x_fit, y_fit, x_test, y_test, steps: int = 300) -> tuple[float, float]:
    """Softmax regression (AdamW, full batch, standardised inputs): (fit accuracy, test accuracy)."""
    torch.manual_seed(0)
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-5
    a, b = (x_fit - mu) / sd, (x_test - mu) / sd
    net = torch.nn.Linear(a.shape[1], len(RELATIONS))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(a), y_fit).backward()
        opt.step()
    with torch.no_grad():
        return (round(float((net(a).argmax(1) == y_fit).float().mean()), 3),
                round(float((net(b).argmax(1) == y_test).float().mean()), 3))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--fit-split", default=None, help="split whose spatial items fit the linear probe")
    ap.add_argument("--head", default=None, help="RUN/aux_head.safetensors")
    ap.add_argument("--head-layer", type=int, default=5)
    ap.add_argument("--layers", default="3,5,8,10")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        if not (args.head or args.fit_split):
            raise UserError("nothing to do", "give --head, --fit-split or both")
        vlm = load_model(args.model)
        layers = sorted({int(k) for k in args.layers.split(",")} | ({args.head_layer} if args.head else set()))
        if not all(0 <= k <= vlm.num_layers for k in layers):
            raise UserError(f"--layers {layers} outside 0..{vlm.num_layers}")
        items = spatial_items(args.data, args.split, args.n)
        fit = spatial_items(args.data, args.fit_split, args.n) if args.fit_split else None
        head = None
        if args.head:
            from safetensors.torch import load_file

            w = load_file(args.head)
            if w["weight"].shape[0] < Q or w["weight"].shape[1] != vlm.hidden_size:
                raise UserError(f"--head {args.head} has shape {tuple(w['weight'].shape)}",
                                f"expected at least {Q} outputs on hidden size {vlm.hidden_size}")
            head = torch.nn.Linear(vlm.hidden_size, w["weight"].shape[0])
            head.load_state_dict(w)
    except (UserError, ValueError, OSError) as e:
        print(f"relation_probe: error: {e}", file=sys.stderr)
        return 2
    states, gold = last_states(vlm, items, layers)
    result = {"model": args.model, "data": args.data, "split": args.split, "n": len(items)}
    if head is not None:
        with torch.no_grad():
            result["head"] = head_reading(head(states[args.head_layer]), items, gold)
    if fit is not None:
        fit_states, fit_gold = last_states(vlm, fit, layers)
        y = torch.tensor([RELATIONS.index(g) for g in gold])
        y_fit = torch.tensor([RELATIONS.index(g) for g in fit_gold])
        result["fit_split"], result["n_fit"] = args.fit_split, len(fit)
        result["linear_probe_fit_test"] = {str(k): linear_probe(fit_states[k], y_fit, states[k], y) for k in layers}
    text = json.dumps(result)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
