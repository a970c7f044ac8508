"""scripts/pick_split.py: one category of a split copied into another dataset folder as a new split, readable by
the data room; bad input is one line and exit 2, leaving nothing behind."""
from __future__ import annotations

import json

from scriptload import load_script

from vlsi_edge.data import open_dataset
from vlsi_edge.data.shapes import synth

ps = load_script("pick_split")


def test_picks_one_category_into_a_new_split(tmp_path):
    source = synth(tmp_path / "src", n_pretrain=1, n_train=36, n_val=1, n_test=1, seed=5, scene_targets=1)
    into = synth(tmp_path / "data", n_pretrain=1, n_train=6, n_val=1, n_test=1, seed=0)
    assert ps.main(["--source", str(source), "--category", "spatial", "--into", str(into), "--name", "sp"]) == 0
    want = [r for r in json.loads((source / "train.json").read_text()) if r["category"] == "spatial"]
    got = json.loads((into / "sp.json").read_text())
    assert len(got) == len(want) == 6
    for g, w in zip(got, want):
        assert g["id"] == "sp-" + w["id"] and g["aux"] == w["aux"] and g["conversations"] == w["conversations"]
        assert (into / g["image"]).read_bytes() == (source / w["image"]).read_bytes()
    samples = list(open_dataset(str(into), "sp"))
    assert len(samples) == 6 and all(s.category == "spatial" and s.image.is_file() for s in samples)


def test_bad_input_is_one_line(tmp_path, capsys):
    source = synth(tmp_path / "src", n_pretrain=1, n_train=6, n_val=1, n_test=1, seed=5)
    cases = [(["--source", str(tmp_path / "nope"), "--category", "spatial"], "not found"),
             (["--source", str(source), "--category", "weather"], "no item of category"),
             (["--source", str(source), "--category", "spatial", "--name", "train"], "already exists")]
    for extra, needle in cases:
        args = ["--into", str(source), "--name", "sp", *extra]
        assert ps.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pick_split: error:") and needle in err[0], err
    assert not (source / "sp.json").exists() and not (source / "images" / "sp").exists()
