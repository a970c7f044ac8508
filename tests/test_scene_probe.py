"""scripts/scene_probe.py: the ridge probe reads what is there and nothing else, both readings run on a tiny
checkpoint, and bad input is one line and exit 2."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402
from scriptload import load_script  # noqa: E402

from vlsi_edge.data.shapes import AUX_NAMES  # noqa: E402

scene_probe = load_script("scene_probe")

MODEL = "builtin:tiny-qwen2vl-student"
DATA = "builtin:shapes:n_pretrain=0,n_train=0,n_val=40,n_test=0,seed=5,scene_targets=1"


def test_ridge_reads_a_planted_label_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 2000)
    by_value = rng.normal(size=(2000, 8))
    by_value[:, :4] += 3 * np.eye(4)[labels]          # a direction per value
    ramp = rng.normal(size=(2000, 8))
    ramp[:, 3] += 4 * labels                           # one axis, the value as a number
    assert scene_probe.ridge_accuracy(by_value, labels, 1500) > 0.9
    assert scene_probe.ridge_accuracy(ramp, labels, 1500) > 0.9
    assert scene_probe.ridge_accuracy(rng.normal(size=(2000, 8)), labels, 1500) < 0.35


def test_both_readings_on_the_tiny_student(tmp_path, torch_threads):
    head = tmp_path / "aux_head.safetensors"
    save_file({"weight": torch.zeros(len(AUX_NAMES), 128), "bias": torch.full((len(AUX_NAMES),), 0.5)}, str(head))
    out = tmp_path / "probe.json"
    assert scene_probe.main(["--model", MODEL, "--data", DATA, "--head", str(head), "--head-layer", "2",
                             "--layers", "0,2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] >= 25 and set(result["position"]) == {"layer 0", "layer 2"}
    assert all(0 <= v <= 1 for r in result["position"].values() for v in r.values())
    # a constant head of 0.5 against targets whose mean is known: its error is at least the mean predictor's
    assert all(g["head"] >= g["mean"] - 1e-6 for k, g in result["head"].items() if k != "shape_count_exact")


@pytest.mark.parametrize("extra, data, needle", [
    (["--model", "builtin:tiny-qwen2vl-student-lowres"], DATA, "16 image tokens"),
    (["--head", "{tmp}/aux_head.safetensors"], DATA.replace(",scene_targets=1", ""), "'aux' target"),
    (["--head", "{tmp}/missing.safetensors"], DATA, "missing"),
])
def test_bad_input_is_one_line(extra, data, needle, tmp_path, capsys):
    save_file({"weight": torch.zeros(len(AUX_NAMES), 128), "bias": torch.zeros(len(AUX_NAMES))},
              str(tmp_path / "aux_head.safetensors"))
    args = {"--model": MODEL, "--data": data, "--layers": "0,2"}
    extra = [e.format(tmp=tmp_path) for e in extra]
    args.update(dict(zip(extra[::2], extra[1::2])))
    assert scene_probe.main([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scene_probe: error:") and needle in err[0], err
