"""The CLI on bad input: one line naming the problem, exit 2, no traceback, no output written. Plus the happy
paths of `inspect`, `data synth` and `eval` on the tiny presets."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlsi_edge.cli import main


def _png(path: Path, colour=(255, 0, 0)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (112, 112), colour).save(path)
    return path.name


def _record(i, image="img.png", answer="red", question="<image>\nWhat colour is the square? Answer with one word."):
    rec = {"id": f"s{i}", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
           "category": "colour", "choices": ["red", "green", "blue"]}
    if image is not None:
        rec["image"] = image
    return rec


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("vlsi-edge: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture
def good_dir(tmp_path):
    _png(tmp_path / "img.png")
    return tmp_path


def _synth(tmp_path, n_train: int, n_val: int, n_test: int, seed: int):
    out = tmp_path / "shapes"
    assert main(["data", "synth", "--out", str(out), "--n-pretrain", "0", "--n-train", str(n_train), "--n-val",
                 str(n_val), "--n-test", str(n_test), "--seed", str(seed)]) == 0
    return out


def _eval(tmp_path, data, *extra):
    out = tmp_path / "preds.json"
    rc = main(["eval", "--model", "builtin:tiny-qwen2vl-student", "--data", str(data), "--out", str(out), *extra])
    return rc, out


BAD_DATA = {
    "missing_image": ([_record(0, image="nope.png")], ["nope.png", "data.jsonl:1"]),
    "escaping_image": ([_record(0, image="../outside.png")], ["outside.png"]),
    "no_assistant": ([{"id": "x", "image": "img.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]}],
                     ["assistant"]),
    "empty_answer": ([_record(0, answer="   ")], ["empty"]),
    "malformed_jsonl": ([json.dumps(_record(0)), '{"id": "broken", '], ["data.jsonl:2"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line(case, good_dir, capsys):
    records, needles = BAD_DATA[case]
    _png(good_dir.parent / "outside.png")
    data = _write_jsonl(good_dir / "data.jsonl", records)
    rc, out = _eval(good_dir, data)
    _one_line_error(capsys, rc, "data.jsonl", *needles)
    assert not out.exists()


def test_corrupt_image_is_one_line(good_dir, capsys):
    (good_dir / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    data = _write_jsonl(good_dir / "data.jsonl", [_record(0, image="bad.png")])
    rc, out = _eval(good_dir, data)
    _one_line_error(capsys, rc, "bad.png")
    assert not out.exists()


def test_malformed_json_names_file_and_line(good_dir, capsys):
    (good_dir / "data.json").write_text('[\n{"id": "a",\n "conversations": [}\n]')
    rc, out = _eval(good_dir, good_dir / "data.json")
    _one_line_error(capsys, rc, "data.json:3")


def test_skip_bad_samples_reports_and_continues(good_dir, capsys):
    data = _write_jsonl(good_dir / "data.jsonl", [_record(0), _record(1, image="nope.png"), _record(2)])
    rc, out = _eval(good_dir, data, "--skip-bad-samples", "--max-new-tokens", "2")
    assert rc == 0
    err = capsys.readouterr().err
    assert "skipped 1" in err
    doc = json.loads(out.read_text())
    assert [i["id"] for i in doc["items"]] == ["s0", "s2"]


@pytest.mark.parametrize("model, needles", [
    ("builtin:tiny-nope-student", ["unknown preset", "builtin:tiny-qwen2vl-student"]),
    ("{tmp}/noconfig", ["config.json"]),
    ("{tmp}/wrongfamily", ["bert", "qwen2_vl"]),
])
def test_bad_model_is_one_line(model, needles, tmp_path, capsys):
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "wrongfamily").mkdir()
    (tmp_path / "wrongfamily" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    rc = main(["inspect", "--model", model.format(tmp=tmp_path)])
    _one_line_error(capsys, rc, *needles)


def test_unknown_flag_is_one_line():
    r = subprocess.run([sys.executable, "-m", "vlsi_edge.cli", "inspect", "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--bogus" in r.stderr


def test_subprocess_bad_data_has_no_traceback(good_dir):
    data = _write_jsonl(good_dir / "data.jsonl", [_record(0, image="nope.png")])
    r = subprocess.run([sys.executable, "-m", "vlsi_edge.cli", "eval", "--model", "builtin:tiny-qwen2vl-student",
                        "--data", str(data), "--out", str(good_dir / "p.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (good_dir / "p.json").exists()


def test_inspect_json(capsys):
    assert main(["inspect", "--model", "builtin:tiny-qwen2vl-teacher", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "qwen2vl" and info["num_layers"] == 10 and info["image_tokens"] == 16
    assert info["target_layers"] == list(range(1, 10)) and info["params"] > info["params_vision"] > 0


def test_inspect_list(capsys):
    assert main(["inspect", "--list", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["families"]) == {"qwen2vl", "qwen2_5vl", "llava_onevision", "smolvlm", "internvl", "gemma3"}
    for fam in info["families"]:
        assert f"builtin:tiny-{fam}-teacher" in info["presets"] and f"builtin:tiny-{fam}-student" in info["presets"]


def test_synth_then_eval_writes_versioned_results(tmp_path, capsys):
    out = _synth(tmp_path, n_train=6, n_val=6, n_test=12, seed=3)
    rc, preds = _eval(tmp_path, out, "--split", "test", "--max-new-tokens", "3", "--batch-size", "5")
    assert rc == 0
    doc = json.loads(preds.read_text())
    assert doc["schema"] == "vlsi-edge/results" and doc["schema_version"] == 1 and doc["producer"] == "eval"
    assert doc["data"]["split"] == "test" and doc["data"]["n"] == 12 and len(doc["items"]) == 12
    item = doc["items"][0]
    assert {"id", "category", "cluster", "question", "gold", "raw", "parsed", "correct"} <= set(item)
    assert "overall" in doc["metrics"]


def test_forced_choice_eval_picks_the_most_likely_answer(tmp_path, capsys):
    """`--scoring choice` predicts, for every item, the answer-set entry whose tokens (and the end of the turn) the
    model finds most likely; checked against one forward per candidate, unbatched and unpadded."""
    import torch

    from vlsi_edge.data.collate import Collator
    from vlsi_edge.data.conversations import Turn, open_dataset
    from vlsi_edge.models import load_model

    out = _synth(tmp_path, n_train=0, n_val=0, n_test=6, seed=4)
    rc, preds = _eval(tmp_path, out, "--split", "test", "--scoring", "choice", "--batch-size", "4")
    assert rc == 0
    doc = json.loads(preds.read_text())
    assert doc["system"]["scoring"] == "choice" and doc["metrics"]["overall"]["parse_failure_rate"] == 0
    vlm = load_model("builtin:tiny-qwen2vl-student")
    collate = Collator(vlm, mode="train")
    for sample, item in zip(open_dataset(str(out), split="test"), doc["items"]):
        logps = []
        for choice in sample.meta["choices"]:
            one = dataclasses.replace(sample, turns=(*sample.turns[:-1], Turn("assistant", choice)))
            batch = collate([one])
            labels = batch.pop("labels")[0, 1:]
            with torch.no_grad():
                logits = vlm.model(**batch).logits[0, :-1]
            keep = labels != -100
            logps.append(float(torch.log_softmax(logits[keep], -1).gather(-1, labels[keep, None]).sum()))
        assert item["choice_logp"] == pytest.approx(logps, abs=1e-3)
        assert item["parsed"] == sample.meta["choices"][max(range(len(logps)), key=logps.__getitem__)]
        assert item["correct"] == (item["parsed"] == sample.answer)


def test_eval_choice_needs_choices(good_dir, capsys):
    record = _record(0)
    del record["choices"]
    data = _write_jsonl(good_dir / "data.jsonl", [record])
    rc, _ = _eval(good_dir, data, "--scoring", "choice")
    _one_line_error(capsys, rc, "choices")


def test_synth_refuses_negative_counts(tmp_path, capsys):
    rc = main(["data", "synth", "--out", str(tmp_path / "x"), "--n-test", "-1"])
    _one_line_error(capsys, rc, "--n-test")
    assert not (tmp_path / "x").exists()
