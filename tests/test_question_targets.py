"""scripts/question_targets.py: the six question-following numbers appended to a record's scene target."""
from __future__ import annotations

import json

from scriptload import load_script

from vlsi_edge.data import shapes

qt = load_script("question_targets")

SCENE = [("red", "circle", 0, 3), ("blue", "square", 2, 3), ("green", "square", 1, 0), ("red", "cross", 3, 1)]


def _record(*questions, scene=SCENE):
    turns = []
    for q in questions:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": "x"}]
    return {"id": "r", "conversations": turns, "aux": list(shapes.scene_target(scene, 4))}


def test_spatial_targets_follow_the_named_objects_in_pair_order():
    where = shapes.question_text("spatial", (("blue", "square"), ("red", "circle")))
    back = shapes.question_text("spatial", (("red", "circle"), ("blue", "square")))
    one, two = qt.question_target(_record(where)), qt.question_target(_record("What colour?", back, where))
    # red circle comes before blue square in shapes.PAIRS: its (row, col) first, whatever the question's order
    assert one == two == [0.5 / 4, 3.5 / 4, 2.5 / 4, 3.5 / 4, None, None]


def test_comparison_targets_are_the_named_shapes_counts():
    ask = shapes.question_text("comparison", ("square", "circle"))
    assert qt.question_target(_record(ask)) == [None] * 4 + [1 / 5, 2 / 5]     # circle before square
    assert qt.question_target(_record("How many circles are there?")) == [None] * 6


def test_cli_writes_suffixed_splits_and_refuses_other_layouts(tmp_path, capsys):
    ask = shapes.question_text("comparison", ("square", "cross"))
    records = [_record(ask), {"id": "p", "conversations": [], "aux": None}]
    (tmp_path / "tally.json").write_text(json.dumps(records))
    assert qt.main(["--data", str(tmp_path), "--splits", "tally"]) == 0
    got = json.loads((tmp_path / "tally-q.json").read_text())
    assert got[0]["aux"][:76] == records[0]["aux"] and got[0]["aux"][76:] == [None] * 4 + [2 / 5, 1 / 5]
    assert got[1]["aux"] == [None] * 82
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "b", "conversations": [], "aux": [0.1, 0.2]}]))
    assert qt.main(["--data", str(tmp_path), "--splits", "bad"]) == 2
    assert "2 aux entries, expected 76" in capsys.readouterr().err and not (tmp_path / "bad-q.json").exists()
