"""Experiment (not a library feature): teach a tiny Qwen2-VL checkpoint's vision tower to say what is in each cell.

    python scripts/vision_cells.py --model RUN/student --out RUN2 [--steps 1500] [--batch 32] [--lr 1e-3]
                                   [--anchor 1.0] [--position] [--seed 0]

On the test split's 112-px images the merger's 16 output tokens are the 16 cells of the 4x4 grid (patch 14, merge
2: one token per 28-px cell, row-major). Two linear heads read every token's cell colour (6 + empty) and shape
(4 + empty); the vision tower and the heads are trained on fresh test-like scenes (1-12 objects, random colours
and shapes and cells, difficulty-1 clutter), with a mean-squared anchor to the tokens the unchanged tower gives,
so the language model still understands them. The heads are dropped; `--out` is the whole checkpoint with the
new vision tower, for `vlsi-edge train --model OUT/...` to realign the language model. With `--position`, two more
heads read every token's row and column (1-4): the tower has no absolute position embedding (2D RoPE only), and
the language model's M-RoPE turns a row step into a rotation of at most 0.03 rad (README), so where a token is
becomes part of what it says.

Why: on a single small object on the test grid the teacher names the shape right 53% of the time (README, "The
`lookup` stage"); shape is what the shape, spatial, count and comparison questions all rest on, and the gradient
that reaches the vision tower through the language model's one-word answers is weak. A per-cell loss is the
usual way to pretrain a vision encoder before aligning it to a language model.

Prints held-out per-cell accuracy (occupied cells) every `--eval-every` steps and at the end; writes `--out`
through a temporary folder renamed at the end, and refuses an existing one.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vlsi_edge.data import shapes as S
from vlsi_edge.errors import UserError
from vlsi_edge.fileio import publish_dir, staging_dir
from vlsi_edge.models.registry import load_model

GRID, SIZE = 4, 112


def scene(rng: np.random.Generator) -> tuple[Image.Image, list[int], list[int]]:
    """A test-like scene and its 16 cell labels: colour (0 empty, 1.. COLOUR_NAMES) and shape (0 empty, 1.. SHAPES)."""
    k = int(rng.integers(1, 13))
    cells = [int(c) for c in rng.choice(GRID * GRID, k, replace=False)]
    objects = [S._random_object(rng) for _ in range(k)]
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    S._clutter(draw, rng, 1, SIZE)
    colour, shape = [0] * GRID * GRID, [0] * GRID * GRID
    for (c, s), cell, (x, y, side) in zip(objects, cells, S._grid_boxes(rng, cells, GRID, SIZE)):
        S.draw_shape(draw, s, x, y, side, S.COLOURS[c])
        colour[cell], shape[cell] = 1 + S.COLOUR_NAMES.index(c), 1 + S.SHAPES.index(s)
    return img, colour, shape


def batch(vlm, rng: np.random.Generator, n: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    scenes = [scene(rng) for _ in range(n)]
    pixels = vlm.processor.image_processor(images=[s[0] for s in scenes], return_tensors="pt")
    return (dict(pixels), torch.tensor([s[1] for s in scenes]).view(-1), torch.tensor([s[2] for s in scenes]).view(-1))


def tokens(visual, pixels: dict) -> torch.Tensor:
    out = visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
    return getattr(out, "pooler_output", out)      # transformers 5: a model output whose pooler holds merged tokens


def positions(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column (0-3) of every token of n images, in the merger's row-major cell order."""
    cell = torch.arange(GRID * GRID).repeat(n)
    return cell // GRID, cell % GRID


def accuracy(visual, heads, held) -> dict:
    with torch.no_grad():
        pixels, colour, shape = held
        feats = tokens(visual, pixels)
        occupied = shape > 0
        acc = {"shape": float((heads[1](feats).argmax(-1) == shape)[occupied].float().mean()),
               "colour": float((heads[0](feats).argmax(-1) == colour)[occupied].float().mean()),
               "empty": float((heads[1](feats).argmax(-1) == 0)[~occupied].float().mean())}
        if len(heads) == 4:
            row, col = positions(len(shape) // (GRID * GRID))
            acc["row"] = float((heads[2](feats).argmax(-1) == row).float().mean())
            acc["column"] = float((heads[3](feats).argmax(-1) == col).float().mean())
        return acc


def save_checkpoint(vlm, out: Path, record: str, payload: dict) -> None:
    """Write the whole checkpoint and `payload` as JSON file `record` to the new folder `out`, through a staging
    folder renamed at the end (nothing is left behind on failure)."""
    tmp = staging_dir(out)
    try:
        vlm.save_pretrained(tmp)
        (tmp / record).write_text(json.dumps(payload, indent=1) + "\n")
        publish_dir(tmp, out, overwrite=False, appeared_error=lambda: UserError(f"{out} appeared meanwhile"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_model(model: str, out: Path):
    """The checkpoint a run trains, loaded, once its new output folder `out` is known to be free (UserError if
    `out` exists or the model does not load)."""
    if out.exists():
        raise UserError(f"{out} already exists", "expected a new folder")
    return load_model(model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--anchor", type=float, default=1.0)
    ap.add_argument("--position", action="store_true", help="also read each token's row and column")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        vlm = open_model(args.model, out)
    except UserError as e:
        print(f"vision_cells: error: {e}", file=sys.stderr)
        return 2
    if vlm.family != "qwen2vl" or vlm.image_size != SIZE:
        print(f"vision_cells: error: {args.model} is {vlm.family} at {vlm.image_size} px; expected a Qwen2-VL "
              f"checkpoint at {SIZE} px (16 tokens, one per cell)", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    visual = vlm.model.model.visual.train()
    frozen = copy.deepcopy(visual).eval().requires_grad_(False)
    dim = vlm.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(dim, 1 + len(S.COLOUR_NAMES)), torch.nn.Linear(dim, 1 + len(S.SHAPES))]
                                + [torch.nn.Linear(dim, GRID) for _ in range(2 * args.position)])
    params = list(visual.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / args.steps)))
    held = batch(vlm, np.random.default_rng(10_000 + args.seed), 256)
    ce = torch.nn.functional.cross_entropy
    log = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        pixels, colour, shape = batch(vlm, rng, args.batch)
        feats = tokens(visual, pixels)
        with torch.no_grad():
            ref = tokens(frozen, pixels)
        anchor = torch.nn.functional.mse_loss(feats, ref) / ref.pow(2).mean()
        loss = ce(heads[0](feats), colour) + ce(heads[1](feats), shape) + args.anchor * anchor
        if args.position:
            row, col = positions(args.batch)
            loss = loss + ce(heads[2](feats), row) + ce(heads[3](feats), col)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(visual, heads, held)
            log.append({"step": step, "loss": round(loss.item(), 4), "anchor": round(anchor.item(), 4), **acc,
                        "sec": round(time.perf_counter() - start, 1)})
            print(json.dumps(log[-1]), flush=True)
    visual.eval()
    save_checkpoint(vlm, out, "vision_cells.json", {"args": vars(args), "log": log})
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
