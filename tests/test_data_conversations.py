"""Conversation datasets: JSON/JSONL reading, every record error with file:line, skip_bad, Dataset, open_dataset."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from PIL import Image

from vlsi_edge.data.conversations import Dataset, Sample, Turn, open_dataset, read_conversations
from vlsi_edge.errors import DataError


def _img(path, colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


def _rec(i, image="img/a.png", q="<image>\nWhat colour?", a="red", **extra):
    rec = {"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], **extra}
    if image is not None:
        rec["image"] = image
    return rec


def _jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _json(path, records):
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    return path


@pytest.fixture
def root(tmp_path):
    _img(tmp_path / "img" / "a.png")
    _img(tmp_path / "img" / "b.png", (0, 0, 255))
    return tmp_path


@pytest.mark.parametrize("writer, name", [(_jsonl, "d.jsonl"), (_json, "d.json")])
def test_reads_json_and_jsonl_multiturn(root, writer, name):
    multi = {"id": "m", "image": "img/b.png", "category": "colour", "choices": ["red", "blue"], "image_id": "B",
             "conversations": [{"from": "system", "value": "Be brief."},
                               {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "blue"},
                               {"from": "user", "value": "Sure?"}, {"from": "assistant", "value": "Yes."}]}
    after = _rec(2, q="Describe this: <image>", a="a red square")
    text_only = _rec(3, image=None, q="What is 2+2?", a="4")
    path = writer(root / name, [_rec(1), multi, after, text_only])
    samples = list(read_conversations(path))
    assert [s.id for s in samples] == ["1", "m", "2", "3"]
    first, m, second, third = samples
    assert first.image == (root / "img" / "a.png").resolve() and first.image_first
    assert first.turns == (Turn("user", "What colour?"), Turn("assistant", "red"))
    assert first.category == "all" and first.cluster == str(first.image)
    assert [t.role for t in m.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert m.question == "Sure?" and m.answer == "Yes." and m.category == "colour" and m.cluster == "B"
    assert m.meta == {"category": "colour", "choices": ["red", "blue"], "image_id": "B"}
    assert second.turns[0].text == "Describe this:" and second.image_first is False
    assert third.image is None and third.cluster == "3" and third.answer == "4"


BAD = [
    ('{"id": 9, "conversations": [', "malformed JSON", "malformed_json"),
    ('[1, 2]', "not an object", "not_object"),
    (json.dumps({"id": 9, "image": "img/a.png"}), "no 'conversations'", "no_conversations"),
    (json.dumps({"id": 9, "conversations": []}), "'conversations' is empty", "no_conversations"),
    (json.dumps({"id": 9, "conversations": [{"from": "bot", "value": "x"}]}), "unknown role 'bot' in turn 1",
     "unknown_role"),
    (json.dumps({"id": 9, "conversations": [{"from": "human", "value": "hi"}]}), "no assistant turn", "no_answer"),
    (json.dumps(_rec(9, a="  ")), "assistant turn 2 is empty", "empty_answer"),
    (json.dumps(_rec(9, image="img/zzz.png")), "image not found", "missing_image"),
    (json.dumps(_rec(9, image="../outside.png")), "escapes the image root", "image_escapes_root"),
    (json.dumps(_rec(1)), "duplicate id '1' (first seen at line 1)", "duplicate_id"),
]


@pytest.mark.parametrize("line, words, reason", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_each_error_names_file_and_line(root, line, words, reason):
    path = _jsonl(root / "bad.jsonl", [_rec(1), "", line])
    with pytest.raises(DataError) as info:
        list(read_conversations(path))
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and words in message and "\n" not in message
    assert " — expected" in message or "expected" in message
    skipped = Counter()
    assert [s.id for s in read_conversations(path, skip_bad=True, skipped=skipped)] == ["1"]
    assert skipped == Counter({reason: 1})


def test_skip_bad_counts_every_reason(root):
    path = _jsonl(root / "mix.jsonl", [_rec(1)] + [line for line, _, _ in BAD] + [_rec(2)])
    skipped = Counter()
    assert [s.id for s in read_conversations(path, skip_bad=True, skipped=skipped)] == ["1", "2"]
    assert skipped == Counter(reason for _, _, reason in BAD)


def test_jsonl_streams_good_lines_before_a_bad_last_line(root):
    path = _jsonl(root / "s.jsonl", [_rec(1), _rec(2), "{oops"])
    seen = []
    with pytest.raises(DataError, match=r"s\.jsonl:3: malformed JSON"):
        for sample in read_conversations(path):
            seen.append(sample.id)
    assert seen == ["1", "2"]


def test_json_errors_name_lines(root):
    path = _json(root / "d.json", [_rec(1), _rec(2, a="")])
    with pytest.raises(DataError, match=r"d\.json:3: assistant turn 2 is empty"):
        list(read_conversations(path))
    (root / "broken.json").write_text('[\n{"id": 1,\n "conversations": oops}\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: malformed JSON"):
        list(read_conversations(root / "broken.json"))
    (root / "obj.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match=r"obj\.json:1: top level is not a list"):
        list(read_conversations(root / "obj.json"))


def test_image_root_override_and_suffix(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    path = _jsonl(other / "d.jsonl", [_rec(1)])
    with pytest.raises(DataError, match="image not found"):
        list(read_conversations(path))
    assert next(iter(read_conversations(path, image_root=root))).image == (root / "img" / "a.png").resolve()
    (other / "d.csv").write_text("x")
    with pytest.raises(DataError, match="expected .json or .jsonl"):
        list(read_conversations(other / "d.csv"))


def test_dataset_reiterates_counts_and_validates_images(root):
    data = root / "img" / "a.png"
    cut = root / "img" / "cut.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(cut)
    cut.write_bytes(cut.read_bytes()[:40])
    path = _jsonl(root / "train.jsonl", [_rec(1), _rec(2, image="img/cut.png"), _rec(3), _rec(4, image=None)])
    ds = Dataset("t", [path], "train")
    assert [s.id for s in ds] == [s.id for s in ds] == ["1", "2", "3", "4"] and len(ds) == 4
    with pytest.raises(DataError, match=r"train\.jsonl:2: sample '2': .*cut\.png"):
        ds.validate()
    ds.validate(check_images=False)
    lenient = open_dataset(str(path), skip_bad=True)
    lenient.validate()
    assert lenient.skipped == Counter({"bad_image": 1})
    assert [s.id for s in lenient] == ["1", "3", "4"] and len(lenient) == 3 and data.exists()


def test_open_dataset_file_and_folder(root):
    _jsonl(root / "train.jsonl", [_rec(1), _rec(2)])
    _json(root / "test.json", [_rec(3)])
    ds = open_dataset(str(root / "train.jsonl"))
    assert ds.split == "train" and len(ds) == 2 and ds.name == "train.jsonl"
    with pytest.raises(DataError, match="'train' split but split 'test'"):
        open_dataset(str(root / "train.jsonl"), split="test")
    assert [s.id for s in open_dataset(str(root), split="test")] == ["3"]
    with pytest.raises(DataError, match=r"several splits \(test, train\)"):
        open_dataset(root)
    with pytest.raises(DataError, match=r"split 'val' not found .*splits present: test, train"):
        open_dataset(str(root), split="val")
    with pytest.raises(DataError, match="dataset not found"):
        open_dataset(str(root / "nope"))
    both = open_dataset(str(root), split="test+train")
    assert [s.id for s in both] == ["3", "1", "2"] and both.split == "test+train"
    with pytest.raises(DataError, match=r"split 'val' not found"):
        open_dataset(str(root), split="train+val")
    with pytest.raises(DataError, match="empty or repeated split"):
        open_dataset(str(root), split="train+train")
    with pytest.raises(DataError, match="empty or repeated split"):
        open_dataset(str(root), split="train+")
    single = root / "single"
    single.mkdir()
    _jsonl(single / "val.jsonl", [_rec(5, image=None)])
    assert open_dataset(single).split == "val"


def test_open_dataset_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSI_EDGE_CACHE", str(tmp_path / "cache"))
    spec = "builtin:shapes:n_pretrain=0,n_train=12,n_val=6,n_test=18,seed=3"
    test = open_dataset(spec, split="test")
    assert test.name == spec and test.split == "test" and len(test) == 18
    folders = list((tmp_path / "cache" / "data").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("shapes-")
    stamp = (folders[0] / "test.json").stat().st_mtime_ns
    again = open_dataset(spec, split="test")
    assert [s.id for s in again] == [s.id for s in test]
    assert (folders[0] / "test.json").stat().st_mtime_ns == stamp
    assert all(isinstance(s, Sample) and s.image.is_file() and s.meta["choices"] for s in again)
    assert len(open_dataset(spec, split="pretrain")) == 0
    with pytest.raises(DataError, match="several splits"):
        open_dataset(spec)
    with pytest.raises(DataError, match=r"unknown builtin dataset 'nope'.*builtin:shapes"):
        open_dataset("builtin:nope")
    with pytest.raises(DataError, match="unknown shapes parameter"):
        open_dataset("builtin:shapes:colours=3", split="test")
    with pytest.raises(DataError, match="difficulty=9"):
        open_dataset("builtin:shapes:difficulty=9", split="test")


def test_device_modules_import_without_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import vlsi_edge.data\n"
        "for m in ('images', 'conversations', 'shapes', 'solver', 'answers', 'scoring', 'baselines'):\n"
        "    __import__('vlsi_edge.data.' + m)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
