"""Experiment (not a library feature): make a tiny Qwen2-VL checkpoint's language model gather shape counts.

    python scripts/lm_counts.py --model RUN/student --out RUN2 [--steps 600] [--batch 16] [--lr 3e-4]
                                [--aux 1.0] [--layer 5] [--scenes 4000] [--seed 0]

Trains the whole checkpoint on fresh scenes like the test split's comparison items (1-5 objects of each of two
shapes, counts at least two apart, one or two objects of the other shapes, difficulty-1 clutter on the 4x4 grid),
each asked both comparisons and both counts in random order, with the usual next-token loss on the answers plus
`--aux` times an auxiliary loss: a linear head reads the count of every shape (divided by 5) from the hidden
state after decoder layer `--layer` at every text position after the image, mean-squared error. The head is
dropped; `--out` is the whole checkpoint, for `vlsi-edge train --model OUT` and `vlsi-edge eval`.

Why: comparison answers sit at the answer prior even after 1,000 steps on comparisons alone, while the counts are
linearly readable from the mean of the image tokens (README, "Comparison: the counts are in the tokens"). Both
shapes are always present in these scenes, so a lookup of one object, which is what the language model's sharp
attention heads do, says nothing about the answer. A dense count target at every text position asks the language
model to spread its attention over the objects and gather their count, which the one-word answers reward only
once it is already done.

The library now has the same kind of target inside `vlsi-edge train`: records' `aux` lists (with
`builtin:shapes:scene_targets=1`, or the splits of `where_split.py`) and `--set train.aux_weight=W
train.aux_layer=K` (README, "Scene targets"); this script stays as the record of the runs it made.

Prints held-out comparison accuracy (the 'y' token against the 'n' token at the answer position, 256 scenes) and
count accuracy (the head's rounded counts) every `--eval-every` steps. Writes `--out` through a temporary folder
renamed at the end, and refuses an existing one.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlsi_edge.data import shapes as S
from vlsi_edge.data.collate import Collator
from vlsi_edge.data.conversations import Sample, Turn
from vlsi_edge.distill.stages import text_after_image
from vlsi_edge.errors import UserError


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


where_split, vision_cells = _script("where_split"), _script("vision_cells")     # tally scenes; checkpoint writing


def scenes(n: int, rng: np.random.Generator, folder: Path) -> list[tuple[Path, list[int], list[tuple[str, str]]]]:
    """n tally scenes (`where_split.tally_scene`) saved as PNGs under `folder`: (path, counts per shape in S.SHAPES
    order, both comparisons and both counts in random order)."""
    out = []
    for i in range(n):
        img, objects, (first, n1), (second, n2) = where_split.tally_scene(rng)
        path = folder / f"{i:06d}.png"
        img.save(path, compress_level=1)
        counts = [sum(s == shape for _, s, _, _ in objects) for shape in S.SHAPES]
        out.append((path, counts, where_split.tally_asks(rng, first, n1, second, n2)))
    return out


def sample(i: int, path: Path, asks: list[tuple[str, str]]) -> Sample:
    turns = []
    for question, answer in asks:
        turns += [Turn("user", question), Turn("assistant", answer)]
    return Sample(f"scene-{i}", path, tuple(turns))


def evaluate(vlm, head, layer: int, held, yes_no: tuple[int, int]) -> dict:
    """Comparison accuracy (first answer token 'y' against 'n') and the head's count accuracy, on held-out scenes."""
    collate = Collator(vlm, mode="generate")
    right = counted = n_counts = 0
    with torch.no_grad():
        for start in range(0, len(held), 32):
            chunk = held[start:start + 32]
            questions = [next((q, a) for q, a in asks if q.startswith("Are there")) for _, _, asks in chunk]
            batch = collate([Sample(f"h{k}", p, (Turn("user", q), Turn("assistant", a)))
                             for k, ((p, _, _), (q, a)) in enumerate(zip(chunk, questions))])
            out = vlm.model(**batch, output_hidden_states=True)
            logits = out.logits[:, -1, list(yes_no)]
            said_yes = logits[:, 0] > logits[:, 1]
            right += sum(bool(y) == (a == "yes") for y, (_, a) in zip(said_yes, questions))
            guess = torch.round(head(out.hidden_states[layer][:, -1]) * 5)
            target = torch.tensor([c for _, c, _ in chunk], dtype=torch.float32)
            counted += int((guess == target).sum())
            n_counts += target.numel()
    return {"comparison": round(right / len(held), 3), "count_head": round(counted / n_counts, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--aux", type=float, default=1.0)
    ap.add_argument("--layer", type=int, default=5, help="read the counts after this decoder layer (1-based)")
    ap.add_argument("--scenes", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        vlm = vision_cells.open_model(args.model, out)
    except UserError as e:
        print(f"lm_counts: error: {e}", file=sys.stderr)
        return 2
    if vlm.family != "qwen2vl" or not 1 <= args.layer <= vlm.num_layers:
        print(f"lm_counts: error: {args.model} is {vlm.family} with {vlm.num_layers} layers; expected a Qwen2-VL "
              f"checkpoint and --layer in 1..{vlm.num_layers}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tokenizer = vlm.processor.tokenizer
    yes_no = (tokenizer("yes", add_special_tokens=False)["input_ids"][0],
              tokenizer("no", add_special_tokens=False)["input_ids"][0])
    image_token_id = vlm.model.config.image_token_id
    with tempfile.TemporaryDirectory() as tmp:
        train = scenes(args.scenes, rng, Path(tmp))
        (Path(tmp) / "held").mkdir()
        held = scenes(256, np.random.default_rng(10_000 + args.seed), Path(tmp) / "held")
        model = vlm.model.train()
        head = torch.nn.Linear(vlm.hidden_size, len(S.SHAPES))
        torch.nn.init.zeros_(head.weight)            # the head learns to read before its error reaches the model
        torch.nn.init.zeros_(head.bias)
        params = list(model.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 20))
        collate = Collator(vlm, mode="train")
        log, start = [], time.perf_counter()
        for step in range(1, args.steps + 1):
            picks = rng.choice(len(train), args.batch, replace=False)
            batch = collate([sample(int(i), train[i][0], train[i][2]) for i in picks])
            target = torch.tensor([train[i][1] for i in picks], dtype=torch.float32)[:, None, :] / 5
            out_ = model(**batch, output_hidden_states=True)
            mask = text_after_image(batch, image_token_id)
            aux = ((head(out_.hidden_states[args.layer]) - target) ** 2).mean(-1)[mask].mean()
            lm = out_.loss                               # mean next-token loss on the answers (labels in batch)
            loss = lm + args.aux * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if step % args.eval_every == 0 or step == args.steps:
                model.eval()
                acc = evaluate(vlm, head, args.layer, held, yes_no)
                model.train()
                log.append({"step": step, "lm": round(lm.item(), 4), "aux": round(aux.item(), 4), **acc,
                            "sec": round(time.perf_counter() - start, 1)})
                print(json.dumps(log[-1]), flush=True)
    model.eval()
    vision_cells.save_checkpoint(vlm, out, "lm_counts.json", {"args": vars(args), "log": log})
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
