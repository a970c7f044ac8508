"""scripts/vision_cells.py: the per-cell vision loss reads the 16 cells of a 112-px Qwen2-VL image, changes only the
vision tower, and writes a checkpoint the toolkit loads."""
from __future__ import annotations

import json

import numpy as np
import torch
from scriptload import load_script

from vlsi_edge.data.shapes import COLOUR_NAMES, COLOURS, SHAPES
from vlsi_edge.models.registry import load_model

vision_cells = load_script("vision_cells")

MODEL = "builtin:tiny-qwen2vl-student"


def test_scene_labels_match_pixels():
    rng = np.random.default_rng(3)
    for _ in range(20):
        img, colour, shape = vision_cells.scene(rng)
        px = np.asarray(img)
        for cell in range(16):
            r, c = divmod(cell, 4)
            block = px[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28]
            present = [k + 1 for k, name in enumerate(COLOUR_NAMES) if (block == COLOURS[name]).all(-1).any()]
            assert present == ([colour[cell]] if colour[cell] else []), (cell, present, colour[cell])
            assert (shape[cell] == 0) == (colour[cell] == 0) and 0 <= shape[cell] <= len(SHAPES)


def test_trains_the_vision_tower_only_and_saves(tmp_path):
    out = tmp_path / "v"
    assert vision_cells.main(["--model", MODEL, "--out", str(out), "--steps", "60", "--batch", "16",
                              "--eval-every", "60", "--lr", "3e-3", "--anchor", "0", "--position"]) == 0
    log = json.loads((out / "vision_cells.json").read_text())["log"]
    assert log[-1]["colour"] > 0.5, log       # 7 classes on occupied cells: colour is the first thing it learns
    assert {"row", "column"} <= set(log[-1]), log
    before, after = load_model(MODEL).model.state_dict(), load_model(str(out)).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".visual." in f".{k}" for k in changed), sorted(changed)[:5]


def test_refuses_existing_out_and_other_sizes(tmp_path, capsys):
    (tmp_path / "v").mkdir()
    assert vision_cells.main(["--model", MODEL, "--out", str(tmp_path / "v")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert vision_cells.main(["--model", "builtin:tiny-qwen2vl-student-lowres", "--out", str(tmp_path / "w")]) == 2
    assert "expected a Qwen2-VL checkpoint at 112 px" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
