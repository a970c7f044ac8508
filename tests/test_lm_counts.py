"""scripts/lm_counts.py: its scenes' counts and answers agree, the auxiliary head reads text positions only, and a
short run writes a checkpoint the toolkit loads; bad input is one line and exit 2."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from scriptload import load_script

from vlsi_edge.data.shapes import COLOURS, SHAPES, question_text
from vlsi_edge.models.registry import load_model

lm_counts = load_script("lm_counts")

MODEL = "builtin:tiny-qwen2vl-student"


def test_scene_counts_and_answers_agree(tmp_path):
    for path, counts, asks in lm_counts.scenes(30, np.random.default_rng(1), tmp_path):
        px = np.asarray(Image.open(path).convert("RGB"))
        occupied = sum(any((px[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] == rgb).all(-1).any()
                           for rgb in COLOURS.values()) for r in range(4) for c in range(4))
        assert occupied == sum(counts)
        n = dict(zip(SHAPES, counts))
        expected = {question_text("count", s): str(n[s]) for s in SHAPES}
        expected |= {question_text("comparison", (a, b)): "yes" if n[a] > n[b] else "no"
                     for a in SHAPES for b in SHAPES if a != b}
        assert all(expected[q] == answer for q, answer in asks), asks
        named = [s for s in SHAPES if question_text("count", s) in dict(asks)]
        assert len(asks) == 4 and len(named) == 2 and min(n[s] for s in named) >= 1
        assert abs(n[named[0]] - n[named[1]]) >= 2


def test_text_after_image_mask():
    ids = torch.tensor([[1, 9, 9, 2, 3, 0], [9, 9, 4, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    got = lm_counts.text_after_image({"input_ids": ids, "attention_mask": mask}, 9)
    assert got.tolist() == [[False, False, False, True, True, False], [False, False, True, True, True, True]]


def test_short_run_writes_a_checkpoint(tmp_path, torch_threads):
    out = tmp_path / "m" / "student"
    assert lm_counts.main(["--model", MODEL, "--out", str(out), "--steps", "6", "--batch", "4", "--scenes", "24",
                           "--eval-every", "6", "--layer", "2", "--lr", "1e-3"]) == 0
    log = json.loads((out / "lm_counts.json").read_text())["log"]
    assert log[-1]["step"] == 6 and 0 <= log[-1]["comparison"] <= 1 and np.isfinite(log[-1]["aux"]), log
    before, after = load_model(MODEL).model.state_dict(), load_model(str(out)).model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)


def test_refuses_existing_out_other_families_and_bad_layers(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert lm_counts.main(["--model", MODEL, "--out", str(tmp_path / "m")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert lm_counts.main(["--model", MODEL, "--out", str(tmp_path / "n"), "--layer", "99"]) == 2
    assert "--layer in 1.." in capsys.readouterr().err
    assert lm_counts.main(["--model", "builtin:tiny-llava_onevision-student", "--out", str(tmp_path / "k")]) == 2
    assert not (tmp_path / "n").exists() and not (tmp_path / "k").exists()
