"""scripts/where_split.py: the experiment's `where`, `probe`, `tally` and `lookup` splits are consistent with their
scenes and load as a dataset folder."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image
from scriptload import load_script

from vlsi_edge.data.conversations import open_dataset
from vlsi_edge.data.shapes import COLOURS, PLURALS

where_split = load_script("where_split")

DATA = "builtin:shapes:n_pretrain=0,n_train=8,n_val=4,n_test=8"


def _cell_of(image: Image.Image, colour: str) -> set[tuple[int, int]]:
    """Grid cells (row, col) holding pixels of `colour` (objects are drawn without anti-aliasing)."""
    px = np.asarray(image.convert("RGB"))
    ys, xs = np.nonzero((px == np.array(COLOURS[colour])).all(-1))
    return {(int(y) * 4 // 112, int(x) * 4 // 112) for y, x in zip(ys, xs)}


def test_where_answers_match_relation_and_pixels(tmp_path):
    out = where_split.build(DATA, tmp_path / "d", n=40, n_probe=20)
    records = json.loads((out / "where.json").read_text())
    assert len(records) == 40 and len(json.loads((out / "probe.json").read_text())) == 20
    for rec in records:
        turns = rec["conversations"]
        qa = {turns[k]["value"].removeprefix("<image>\n"): turns[k + 1]["value"] for k in range(0, len(turns), 2)}
        relation = next(a for q, a in qa.items() if q.startswith("Where is"))
        where = {q.split(" is the ")[1].split(" in?")[0] + "/" + q.split()[1]: int(a)
                 for q, a in qa.items() if q.startswith("Which")}
        assert len(where) == 4
        (n1, n2) = sorted({k.split("/")[0] for k in where}, key=lambda k: qa_order(qa, k))
        r1, c1, r2, c2 = where[f"{n1}/row"], where[f"{n1}/column"], where[f"{n2}/row"], where[f"{n2}/column"]
        expected = {"left": r1 == r2 and c1 < c2, "right": r1 == r2 and c1 > c2,
                    "above": c1 == c2 and r1 < r2, "below": c1 == c2 and r1 > r2}
        assert expected[relation], (rec["id"], relation, r1, c1, r2, c2)
        image = Image.open(out / rec["image"])
        for name, r, c in ((n1, r1, c1), (n2, r2, c2)):    # the answer's cell holds that colour's pixels
            assert (r - 1, c - 1) in _cell_of(image, name.split()[0]), (rec["id"], name)
    assert len(open_dataset(str(out), split="where+probe+train")) == 40 + 20 + 8


def qa_order(qa: dict, name: str) -> int:
    """Where `name` appears in the relation question: sorts the named pair into (first, second)."""
    question = next(q for q in qa if q.startswith("Where is"))
    return question.index(name)


def test_where_split_refuses_existing_out(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert where_split.main(["--data", DATA, "--out", str(tmp_path / "d"), "--n", "2", "--n-probe", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not list(tmp_path.glob(".d.tmp-*"))


def _objects_in_pixels(image: Image.Image) -> list[tuple[str, str]]:
    """(colour, shape) of every object in a 4x4-grid scene, read from the pixels of each cell: the fill ratio of the
    object's bounding box tells squares (1.0) and circles (~0.8) from triangles and crosses (~0.5), and a triangle's
    bottom row is filled from end to end where a cross's is one arm wide."""
    px = np.asarray(image.convert("RGB"))
    found = []
    for colour, rgb in COLOURS.items():
        mask = (px == np.array(rgb)).all(-1)
        for r in range(4):
            for c in range(4):
                cell = mask[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28]
                if not cell.any():
                    continue
                ys, xs = np.nonzero(cell)
                box = cell[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
                fill = box.mean()
                shape = ("square" if fill > 0.95 else "circle" if fill > 0.7
                         else "triangle" if box[-1].all() else "cross")
                found.append((colour, shape))
    return found


def test_tally_answers_match_pixels(tmp_path):
    out = where_split.build(DATA, tmp_path / "d", n=2, n_probe=2, n_tally=40)
    records = json.loads((out / "tally.json").read_text())
    assert len(records) == 40
    plural_to_shape = {v: k for k, v in PLURALS.items()}
    for rec in records:
        objects = _objects_in_pixels(Image.open(out / rec["image"]))
        counts = {s: sum(1 for _, o in objects if o == s) for s in PLURALS}
        turns = rec["conversations"]
        qa = [(turns[k]["value"].removeprefix("<image>\n"), turns[k + 1]["value"]) for k in range(0, len(turns), 2)]
        kinds = [q.split()[0] for q, _ in qa]
        assert kinds[:4].count("Are") == 2 and kinds[:4].count("How") == 2, rec["id"]
        for q, a in qa:
            words = q.split("?")[0].split()
            if q.startswith("How many"):
                assert int(a) == counts[plural_to_shape[words[2]]], (rec["id"], q, a, objects)
            elif q.startswith("Are there more"):
                n1, n2 = counts[plural_to_shape[words[3]]], counts[plural_to_shape[words[5]]]
                assert abs(n1 - n2) >= 2 and a == ("yes" if n1 > n2 else "no"), (rec["id"], q, a, objects)
            else:
                colour = words[4]
                assert [s for c, s in objects if c == colour] == [a], (rec["id"], q, a, objects)
    assert len(open_dataset(str(out), split="tally+train")) == 40 + 8


def test_lookup_answers_match_pixels(tmp_path):
    out = where_split.build(DATA, tmp_path / "d", n=2, n_probe=2, n_lookup=40)
    records = json.loads((out / "lookup.json").read_text())
    assert len(records) == 40
    for rec in records:
        objects = _objects_in_pixels(Image.open(out / rec["image"]))
        colours = [c for c, _ in objects]
        assert 2 <= len(objects) <= 5 and len(set(colours)) == len(colours), (rec["id"], objects)
        turns = rec["conversations"]
        qa = [(turns[k]["value"].removeprefix("<image>\n"), turns[k + 1]["value"]) for k in range(0, len(turns), 2)]
        asked_shapes = {q.split()[4]: a for q, a in qa if q.startswith("What shape")}
        assert asked_shapes == dict(objects), (rec["id"], qa, objects)
        unique = {s: c for c, s in objects if [o for _, o in objects].count(s) == 1}
        assert {q.split()[4].rstrip("?"): a for q, a in qa if q.startswith("What colour")} == unique, rec["id"]
    assert len(open_dataset(str(out), split="lookup+train")) == 40 + 8
