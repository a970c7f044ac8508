"""scripts/where_split.py: the experiment's `where` and `probe` splits are consistent with their scenes and load as
a dataset folder."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

from vlsi_edge.data.conversations import open_dataset
from vlsi_edge.data.shapes import COLOURS

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("where_split", ROOT / "scripts" / "where_split.py")
where_split = importlib.util.module_from_spec(spec)
spec.loader.exec_module(where_split)

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
