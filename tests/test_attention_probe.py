"""scripts/attention_probe.py: the attention reading is a proper share and entropy per layer and head, the token
probes read a tiny checkpoint's vision tokens, and bad input is one line and exit 2."""
from __future__ import annotations

import json
import math

from scriptload import load_script

from vlsi_edge.data.conversations import Sample, Turn

attention_probe = load_script("attention_probe")

MODEL = "builtin:tiny-qwen2vl-student"
DATA = "builtin:shapes:n_pretrain=0,n_train=16,n_val=8,n_test=8"


def test_first_question_keeps_the_first_exchange():
    turns = (Turn("user", "q1"), Turn("assistant", "a1"), Turn("user", "q2"), Turn("assistant", "a2"))
    cut = attention_probe.first_question(Sample("x", None, turns))
    assert [t.text for t in cut.turns] == ["q1", "a1"]


def test_readings_on_the_tiny_student(tmp_path, torch_threads):
    out = tmp_path / "probe.json"
    assert attention_probe.main(["--model", MODEL, "--data", DATA, "--split", "train", "--n", "4",
                                 "--scenes", "128", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["attention"]
    assert [r["layer"] for r in rows] == list(range(len(rows))) and len(rows) >= 2
    for r in rows:
        assert all(-1e-6 <= m <= 1 + 1e-6 for m in r["mass"]), r
        assert all(-1e-6 <= e <= math.log(16) + 1e-3 for e in r["entropy"]), r
    assert any(m > 0.01 for r in rows for m in r["mass"])          # an untrained model still looks at the image
    tokens = result["tokens"]
    assert tokens["scenes"] == 128 and 0 <= tokens["token_shape_acc"] <= 1 and tokens["pooled_count_mae"] >= 0


def test_refuses_other_families(tmp_path, capsys):
    assert attention_probe.main(["--model", "builtin:tiny-llava_onevision-student", "--data", DATA, "--split", "train",
                                 "--n", "2"]) == 2
    assert "expected a Qwen2-VL checkpoint" in capsys.readouterr().err
