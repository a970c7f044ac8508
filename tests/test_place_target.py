"""The place target: `vlsi-edge train --set train.place_weight=W` makes every image token regress its own row and
column in its image's token grid, from decoder layer `place_layer`. It needs no data, only the image grids a
Qwen-VL processor puts in the batch."""
from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
import trainruns  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vlsi_edge.distill import stages  # noqa: E402

QS = trainruns.QS
DATA = "builtin:shapes:n_pretrain=0,n_train=24,n_val=0,n_test=0,seed=7"


def test_place_target_by_hand():
    img = 9
    ids = torch.tensor([[1, img, img, img, img, 2, 0, 0],
                        [1, 2, img, img, img, img, img, img]])
    grids = torch.tensor([[1, 4, 4], [1, 4, 6]])        # patches; merged 2x2 -> a 2x2 and a 2x3 token grid
    got = stages.place_target(ids, grids, 2, img)
    q, h, s = 0.25, 0.75, 1 / 6
    assert torch.equal(got[0, 1:5], torch.tensor([[q, q], [q, h], [h, q], [h, h]]))
    want = torch.tensor([[q, s], [q, 3 * s], [q, 5 * s], [h, s], [h, 3 * s], [h, 5 * s]])
    assert torch.allclose(got[1, 2:8], want)
    assert torch.isnan(got[0, [0, 5, 6, 7]]).all() and torch.isnan(got[1, :2]).all()
    with pytest.raises(ValueError, match="9 image tokens in the batch but its image grids make 10"):
        stages.place_target(ids[:, :7], grids, 2, img)      # one image token cut off


def test_place_loss_by_hand():
    nan = math.nan
    target = torch.tensor([[[nan, nan], [0.25, 0.75], [0.75, 0.25]], [[nan, nan]] * 3])
    pred = torch.tensor([[[5.0, 5.0], [0.25, 0.25], [0.75, 0.25]], [[1.0, 1.0]] * 3], requires_grad=True)
    loss = stages.place_loss(pred, target)
    assert loss.tolist() == pytest.approx([(0.25 / 2 + 0) / 2, 0.0])   # ((0.5^2 + 0) / 2 + 0) / 2 tokens
    loss.sum().backward()                                           # the no-image row is in the graph, zero grad
    assert pred.grad[1].abs().sum() == 0 and pred.grad[0, 0].abs().sum() == 0


def test_place_target_agrees_with_the_models_own_rope_positions():
    """Qwen2-VL's M-RoPE gives each image token (t, start + row, start + col): the target must name the same cell."""
    from vlsi_edge.data import open_dataset
    from vlsi_edge.data.collate import Collator
    from vlsi_edge.models import load_model

    model = load_model(QS, dtype="float32", device="cpu")
    batch = Collator(model, mode="train")(list(open_dataset(DATA, split="train"))[:3])
    config = model.model.config
    image = stages.image_token_id(config)
    target = stages.place_target(batch["input_ids"], batch["image_grid_thw"], config.vision_config.spatial_merge_size,
                                 image)
    pos, _ = model.model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                              attention_mask=batch["attention_mask"])
    for b in range(3):
        where = batch["input_ids"][b] == image
        h, w = (pos[k, b][where] for k in (1, 2))
        rows = int(h.max() - h.min()) + 1
        cols = int(w.max() - w.min()) + 1
        want = torch.stack([(h - h.min() + 0.5) / rows, (w - w.min() + 0.5) / cols], -1).float()
        assert rows == cols == 4 and torch.equal(target[b][where], want)
        assert torch.isnan(target[b][~where]).all()


def test_layer_zero_sends_the_place_loss_into_the_vision_tower_only():
    """Layer 0 is the language model's input: there the image tokens are the tower's (merged) output."""
    from vlsi_edge.data import open_dataset
    from vlsi_edge.data.collate import Collator
    from vlsi_edge.models import load_model

    model = load_model(QS, dtype="float32", device="cpu")
    torch.manual_seed(0)
    head = torch.nn.Linear(model.hidden_size, 2)
    side = stages.Side(model, None, place=head, place_layer=0)
    batch = Collator(model, mode="train")(list(open_dataset(DATA, split="train"))[:2])
    config = model.model.config
    batch["place_target"] = stages.place_target(batch["input_ids"], batch["image_grid_thw"],
                                                config.vision_config.spatial_merge_size, stages.image_token_id(config))
    side(batch, [], torch.zeros(0, dtype=torch.long), backbone_grad=True)["place"].sum().backward()
    grads = {n: p.grad for n, p in model.model.named_parameters()}
    tower = [g for n, g in grads.items() if "visual" in n]
    rest = [g for n, g in grads.items() if "visual" not in n]
    assert tower and all(g is not None for g in tower) and sum(float(g.abs().sum()) for g in tower) > 0
    assert all(g is None or g.abs().sum() == 0 for g in rest)


def _train(out, *extra, model=QS, steps="4"):
    return trainruns.train(out, *extra, data=DATA, model=model, steps=steps)


_weights = trainruns.weights


def test_place_weight_trains_head_and_model_and_zero_changes_nothing(tmp_path, torch_threads):
    plain, off, on = tmp_path / "plain", tmp_path / "off", tmp_path / "on"
    assert _train(plain) == 0
    assert _train(off, "--set", "train.place_weight=0", "train.place_layer=1") == 0
    assert _train(on, "--set", "train.place_weight=3", "train.place_layer=1") == 0
    a, b, c = _weights(plain), _weights(off), _weights(on)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    recs = [json.loads(line) for line in (on / "metrics.jsonl").open()]
    assert all(r["place"] > 0 and r["loss"] == pytest.approx(r["main"] + 3 * r["place"]) for r in recs)
    assert recs[-1]["place"] < recs[0]["place"]                       # the head learns the grid's mean at least
    state = load_file(str(next((on / "state").glob("sft-*/tensors.safetensors"))))
    assert state["student_place.weight"].shape == (2, 128) and state["student_place.bias"].abs().sum() > 0
    assert not any("place" in k for k in c)


def test_resume_with_both_targets_is_bit_identical(tmp_path, monkeypatch, torch_threads):
    ref, run = tmp_path / "ref", tmp_path / "run"

    def train(out, *more):
        return trainruns.train(out, "--set", "train.place_weight=2", "train.aux_weight=1", *more,
                               data=DATA + ",scene_targets=1", steps="5")

    assert train(ref) == 0
    trainruns.killed_then_resumed(monkeypatch, train, run)
    a, b = _weights(ref), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").open()] for r in (ref, run)]
    assert losses[0] and losses[0] == losses[1]


def test_bad_place_target_input(tmp_path, capsys):
    def one_line(rc, *needles):
        trainruns.one_line(capsys, rc, *needles)

    one_line(_train(tmp_path / "a", "--set", "train.place_weight=1", "train.place_layer=9"), "place_layer", "9")
    one_line(_train(tmp_path / "b", "--set", "train.place_weight=-1"), "place_weight")
    one_line(_train(tmp_path / "c", "--set", "train.place_weight=1", "train.place_layer=-1"), "place_layer")
    one_line(_train(tmp_path / "d", "--set", "train.place_weight=1", model="builtin:tiny-llava_onevision-student"),
             "place_weight", "qwen-vl")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_text_only_batches_get_no_place_target(tmp_path, torch_threads):
    """A record without an image has no image tokens: its rows add nothing, and an all-text batch trains as usual."""
    from PIL import Image

    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "red.png")

    def record(k, image):
        question = ("<image>\n" if image else "") + "What colour is it? Answer with one word."
        return {"id": k, **({"image": "red.png"} if image else {}),
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]}

    for name, images in (("text", [False] * 4), ("mixed", [False, True, False, True])):
        (tmp_path / f"{name}.json").write_text(json.dumps([record(k, im) for k, im in enumerate(images)]))
        run = tmp_path / f"run-{name}"
        assert trainruns.train(run, "--split", name, "--set", "train.place_weight=1", data=str(tmp_path),
                               steps="2") == 0
        places = [json.loads(line)["place"] for line in (run / "metrics.jsonl").open()]
        assert len(places) == 2 and (all(p == 0 for p in places) if name == "text" else all(p > 0 for p in places))
