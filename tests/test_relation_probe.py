"""scripts/relation_probe.py: the scene head's relation reading, the linear probe, both on a tiny checkpoint, and
bad input as one line and exit 2."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402
from scriptload import load_script  # noqa: E402

from vlsi_edge.data.shapes import AUX_NAMES  # noqa: E402

rp = load_script("relation_probe")
qt = load_script("question_targets")

MODEL = "builtin:tiny-qwen2vl-student"
DATA = "builtin:shapes:n_pretrain=0,n_train=0,n_val=90,n_test=0,seed=5,scene_targets=1"


def test_relation_by_hand():
    assert [rp.relation(0, -0.5), rp.relation(0, 0.25), rp.relation(-0.5, 0.25), rp.relation(0.75, -0.25)] == \
        ["left", "right", "above", "below"]


def test_a_head_that_knows_the_scene_reads_every_complete_item_right():
    items = rp.spatial_items(DATA, "val", 100)
    gold = [s.turns[1].text.strip() for s in items]
    raw = [{"conversations": [{"from": "human", "value": s.turns[0].text}], "aux": s.meta["aux"]} for s in items]
    rows = [r["aux"] + qt.question_target(r) for r in raw]
    complete = sum(all(v is not None for v in row[len(AUX_NAMES):len(AUX_NAMES) + 4]) for row in rows) / len(rows)
    pred = torch.tensor([[0.5 if v is None else v for v in row] for row in rows])
    got = rp.head_reading(pred, items, gold)
    assert complete > 0.5 and got["scene_entries"] >= complete and got["question_entries"] >= complete
    wrong = rp.head_reading(torch.full_like(pred, 0.5), items, gold)   # no place at all: always "below"
    assert wrong["scene_entries"] == pytest.approx(sum(g == "below" for g in gold) / len(gold), abs=1e-3)


def test_linear_probe_finds_a_planted_answer_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (800,), generator=g)
    x = torch.randn(800, 16, generator=g)
    planted = x + 4 * torch.nn.functional.one_hot(y, 16).float()
    fit, test = rp.linear_probe(planted[:600], y[:600], planted[600:], y[600:])
    assert fit > 0.9 and test > 0.9
    fit, test = rp.linear_probe(x[:600], y[:600], x[600:], y[600:])
    assert test < 0.4


def test_both_readings_on_the_tiny_student(tmp_path, torch_threads):
    head = tmp_path / "aux_head.safetensors"
    save_file({"weight": torch.zeros(len(AUX_NAMES) + 6, 128), "bias": torch.zeros(len(AUX_NAMES) + 6)}, str(head))
    out = tmp_path / "probe.json"
    assert rp.main(["--model", MODEL, "--data", DATA, "--head", str(head), "--head-layer", "2", "--fit-split", "val",
                    "--layers", "1,2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == result["n_fit"] == len(rp.spatial_items(DATA, "val", 100)) >= 10
    assert set(result["head"]) == {"scene_entries", "scene_entries_axis", "question_entries"}
    assert set(result["linear_probe_fit_test"]) == {"1", "2"}
    assert all(0 <= v <= 1 for pair in result["linear_probe_fit_test"].values() for v in pair)


@pytest.mark.parametrize("extra, needle", [
    ([], "give --head, --fit-split"),
    (["--head", "{tmp}/small.safetensors", "--layers", "1,2"], "expected at least 76 outputs"),
    (["--fit-split", "val", "--layers", "0,40"], "outside"),
])
def test_bad_input_is_one_line(extra, needle, tmp_path, capsys):
    save_file({"weight": torch.zeros(4, 128), "bias": torch.zeros(4)}, str(tmp_path / "small.safetensors"))
    extra = [e.format(tmp=tmp_path) for e in extra]
    assert rp.main(["--model", MODEL, "--data", DATA, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relation_probe: error:") and needle in err[0], err
