"""Scene targets: `builtin:shapes:scene_targets=1` writes each grid item's scene as numbers (`aux`), and
`vlsi-edge train --set train.aux_weight=W` regresses them from the language model's hidden states."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from vlsi_edge.data import shapes
from vlsi_edge.data.solver import analyse

torch = pytest.importorskip("torch")
import trainruns  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vlsi_edge.cli import main  # noqa: E402
from vlsi_edge.distill import stages  # noqa: E402

QS = "builtin:tiny-qwen2vl-student"
DATA = "builtin:shapes:n_pretrain=0,n_train=24,n_val=0,n_test=0,seed=7,scene_targets=1"


def test_scene_target_layout_by_hand():
    scene = [("red", "circle", 0, 3), ("blue", "circle", 2, 1), ("red", "circle", 3, 3), ("green", "cross", 1, 0)]
    aux = dict(zip(shapes.AUX_NAMES, shapes.scene_target(scene, 4)))
    assert len(aux) == len(shapes.AUX_NAMES) == 4 + 3 * 24
    assert aux["count:circle"] == 3 / 5 and aux["count:cross"] == 1 / 5 and aux["count:square"] == 0
    assert aux["count:red circle"] == 2 and aux["count:blue circle"] == 1 and aux["count:red square"] == 0
    assert aux["row:blue circle"] == 2.5 / 4 and aux["col:blue circle"] == 1.5 / 4
    assert aux["row:green cross"] == 1.5 / 4 and aux["col:green cross"] == 0.5 / 4
    assert aux["row:red circle"] is None and aux["col:red circle"] is None     # twice: no single place
    assert aux["row:red square"] is None                                          # absent


def test_records_carry_targets_that_match_the_pixels():
    """On the test split's 4x4 grid, every target entry agrees with what the pixel solver finds in the image."""
    checked = 0
    for record, png in shapes.generate_split("test", 60, 5, 1, 112, scene_targets=True):
        if record["category"] == "pattern":
            assert "aux" not in record
            continue
        found = [c for c in analyse(png)[0] if c.area >= 40]         # objects, not clutter specks
        aux = dict(zip(shapes.AUX_NAMES, record["aux"]))
        by_shape = Counter(c.shape for c in found)
        by_pair = Counter(f"{c.colour} {c.shape}" for c in found)
        assert [aux[f"count:{s}"] for s in shapes.SHAPES] == [by_shape[s] / 5 for s in shapes.SHAPES], record["id"]
        assert [aux[f"count:{p}"] for p in shapes.PAIRS] == [float(by_pair[p]) for p in shapes.PAIRS], record["id"]
        for c in found:
            pair = f"{c.colour} {c.shape}"
            if by_pair[pair] == 1:
                assert aux[f"row:{pair}"] == (c.cy // 28 + 0.5) / 4, (record["id"], pair)
                assert aux[f"col:{pair}"] == (c.cx // 28 + 0.5) / 4, (record["id"], pair)
            else:
                assert aux[f"row:{pair}"] is None
        checked += 1
    assert checked >= 40


@pytest.mark.parametrize("split", ["train", "pretrain", "pairs"])
def test_targets_change_nothing_else(split):
    def items(on):
        if split == "pairs":
            return list(shapes.generate_curriculum_split(split, 20, 3, 112, scene_targets=on))
        return list(shapes.generate_split(split, 30, 3, 1, 112, captions=True, scene_targets=on))
    plain, with_aux = items(False), items(True)
    assert [png for _, png in plain] == [png for _, png in with_aux]
    assert [r for r, _ in plain] == [{k: v for k, v in r.items() if k != "aux"} for r, _ in with_aux]
    assert sum("aux" in r for r, _ in with_aux) >= 20


def test_scene_loss_by_hand():
    pred = torch.tensor([[[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], [[5.0, 5.0, 5.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    target = torch.tensor([[0.0, math.nan, 1.0], [math.nan, math.nan, math.nan]])
    mask = torch.tensor([[True, True], [True, False]])
    per_row = stages.scene_loss(pred, target, mask)
    # row 0: position 0 -> (1 + 1) / 2, position 1 -> (9 + 1) / 2; row 1 has no target
    assert per_row.tolist() == pytest.approx([(1.0 + 5.0) / 2, 0.0])
    per_row.sum().backward()
    assert pred.grad[1].abs().sum() == 0 and pred.grad[0, :, 1].abs().sum() == 0
    masked_out = stages.scene_loss(pred, target, torch.tensor([[False, True], [True, True]]))
    assert masked_out.tolist() == pytest.approx([5.0, 0.0])
    nothing = stages.scene_loss(pred, torch.full_like(target, math.nan), mask)
    assert nothing.tolist() == [0.0, 0.0] and nothing.requires_grad


def test_text_after_image_mask():
    batch = {"input_ids": torch.tensor([[1, 9, 9, 2, 3, 0], [9, 4, 5, 6, 7, 8]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])}
    mask = stages.text_after_image(batch, 9)
    assert mask.tolist() == [[False, False, False, True, True, False], [False, True, True, True, True, True]]
    assert stages.text_after_image(batch, None).tolist() == batch["attention_mask"].bool().tolist()


def _train(out, *extra, data=DATA, steps="4"):
    return trainruns.train(out, *extra, data=data, steps=steps)


_weights = trainruns.weights


def test_aux_weight_trains_head_and_model_and_zero_changes_nothing(tmp_path, torch_threads):
    plain, off, on = tmp_path / "plain", tmp_path / "off", tmp_path / "on"
    assert _train(plain) == 0
    assert _train(off, "--set", "train.aux_weight=0", "train.aux_layer=2") == 0
    assert _train(on, "--set", "train.aux_weight=5", "train.aux_layer=2") == 0
    a, b, c = _weights(plain), _weights(off), _weights(on)
    assert all(torch.equal(a[k], b[k]) for k in a)                   # off is off: bit-identical to no setting
    assert any(not torch.equal(a[k], c[k]) for k in a)               # the scene loss reaches the model
    recs = [json.loads(line) for line in (on / "metrics.jsonl").open()]
    assert all(r["aux"] > 0 and r["loss"] == pytest.approx(r["main"] + 5 * r["aux"]) for r in recs)
    assert "aux" not in json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])
    state = load_file(str(next((on / "state").glob("sft-*/tensors.safetensors"))))
    head = {k: v for k, v in state.items() if k.startswith("student_aux.")}
    weight = head["student_aux.weight"]
    assert weight.shape == (len(shapes.AUX_NAMES), 128) and weight.abs().sum() > 0
    assert not any("aux" in k for k in c)                            # the head is not part of the student


def test_resume_with_scene_targets_is_bit_identical(tmp_path, monkeypatch, torch_threads):
    extra = ("--set", "train.aux_weight=2")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _train(ref, *extra, steps="5") == 0
    trainruns.killed_then_resumed(monkeypatch, lambda out, *more: _train(out, *extra, *more, steps="5"), run)
    a, b = _weights(ref), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (ref / "metrics.jsonl").read_text() != "" and \
        [json.loads(x)["loss"] for x in (ref / "metrics.jsonl").open()] == \
        [json.loads(x)["loss"] for x in (run / "metrics.jsonl").open()]


_one_line = trainruns.one_line


def test_bad_scene_target_input(tmp_path, capsys):
    no_aux = DATA.replace(",scene_targets=1", "")
    _one_line(capsys, _train(tmp_path / "a", "--set", "train.aux_weight=1", data=no_aux), "aux", "scene_targets=1")
    _one_line(capsys, _train(tmp_path / "b", "--set", "train.aux_weight=1", "train.aux_layer=9"), "aux_layer", "9")
    _one_line(capsys, _train(tmp_path / "c", "--set", "train.aux_weight=-1"), "aux_weight")
    records = [{"id": i, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
                "aux": aux} for i, aux in enumerate([[0.1, 0.2], [0.3]])]
    (tmp_path / "train.json").write_text(json.dumps(records))
    _one_line(capsys, _train(tmp_path / "d", "--set", "train.aux_weight=1", data=str(tmp_path / "train.json")),
              "'aux' has 1", "2")
    records[1]["aux"] = ["x", 1]
    (tmp_path / "train.json").write_text(json.dumps(records))
    _one_line(capsys, _train(tmp_path / "e", "--set", "train.aux_weight=1", data=str(tmp_path / "train.json")),
              "finite numbers")
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_head_is_saved_and_starts_the_next_stage(tmp_path, capsys, torch_threads):
    first, second, fresh = tmp_path / "first", tmp_path / "second", tmp_path / "fresh"
    assert _train(first, "--set", "train.aux_weight=5") == 0
    saved = load_file(str(first / "aux_head.safetensors"))
    state = load_file(str(next((first / "state").glob("sft-*/tensors.safetensors"))))
    assert all(torch.equal(saved[k], state[f"student_aux.{k}"]) for k in ("weight", "bias"))
    assert saved["weight"].abs().sum() > 0
    # at lr 0 the head of the next stage stays what it started from: the saved one, or zeros without aux_init
    for run, extra in ((second, [f"train.aux_init={first}"]), (fresh, [])):
        assert main(["train", "--model", str(first / "student"), "--data", DATA, "--out", str(run), "--steps", "2",
                     "--batch-size", "4", "--lr", "0", "--set", "train.aux_weight=5", *extra]) == 0
    assert all(torch.equal(saved[k], v) for k, v in load_file(str(second / "aux_head.safetensors")).items())
    assert all(v.abs().sum() == 0 for v in load_file(str(fresh / "aux_head.safetensors")).values())
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 128), "bias": torch.zeros(3)}, str(tmp_path / "wrong.safetensors"))
    for init, needle in ((tmp_path / "missing.safetensors", "not found"), (tmp_path / "wrong.safetensors", "needs")):
        capsys.readouterr()
        _one_line(capsys, _train(tmp_path / "bad", "--set", "train.aux_weight=1", f"train.aux_init={init}"),
                  "aux_init", needle)
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method, steps", [("vlsi", "verbalize=1,interact=2,sft=1"), ("kd", "2")])
def test_scene_targets_in_the_distillation_phases(method, steps, tmp_path, torch_threads):
    """The scene and place losses join every phase that trains the student's backbone (interact, sft, kd), not
    verbalize."""
    run = tmp_path / method
    assert main(["distill", "--method", method, "--teacher", "builtin:tiny-qwen2vl-teacher", "--student", QS,
                 "--data", DATA, "--out", str(run), "--steps", steps, "--batch-size", "4",
                 "--set", "train.log_every=1", "train.aux_weight=2", "train.aux_layer=3", "train.place_weight=0.5",
                 "train.place_layer=0"]) == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    for r in recs:
        assert ("aux" in r) == ("place" in r) == (r["phase"] in stages.SCENE_PHASES), r
        if "aux" in r:
            assert r["aux"] > 0 < r["place"] and r["loss"] == pytest.approx(r["main"] + 2 * r["aux"] + r["place"] / 2)
    assert {r["phase"] for r in recs if "aux" in r} == ({"interact", "sft"} if method == "vlsi" else {"kd"})
