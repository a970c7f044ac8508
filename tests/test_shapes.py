"""builtin:shapes: determinism, split independence and disjointness, balance, validation, the pixel solver at
every difficulty, and the blind baselines at chance."""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from vlsi_edge.data import shapes
from vlsi_edge.data.baselines import blank_image_baseline, solver_baseline, text_only_baseline
from vlsi_edge.data.conversations import open_dataset
from vlsi_edge.data.solver import classify_shape, components, solve
from vlsi_edge.errors import DataError

SMALL = {"n_pretrain": 12, "n_train": 30, "n_val": 6, "n_test": 30}


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_synth_is_byte_identical_and_seeded(tmp_path):
    a = shapes.synth(tmp_path / "a", seed=5, difficulty=2, **SMALL)
    b = shapes.synth(tmp_path / "b", seed=5, difficulty=2, **SMALL)
    c = shapes.synth(tmp_path / "c", seed=6, difficulty=2, **SMALL)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert len(ha) == 4 + 1 + sum(SMALL.values()) and ha == hb
    assert ha["test.json"] != hc["test.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_changing_other_splits_keeps_test_items(tmp_path):
    a = shapes.synth(tmp_path / "a", **SMALL)
    b = shapes.synth(tmp_path / "b", **{**SMALL, "n_train": 77, "n_pretrain": 0})
    ha, hb = _hashes(a), _hashes(b)
    assert {k: v for k, v in ha.items() if "test" in k} == {k: v for k, v in hb.items() if "test" in k}
    assert ha["train.json"] != hb["train.json"]


def test_records_and_info(tmp_path):
    out = shapes.synth(tmp_path / "s", **SMALL)
    records = json.loads((out / "test.json").read_text())
    info = json.loads((out / "info.json").read_text())
    assert info["version"] == shapes.GENERATOR_VERSION and info["params"]["n_test"] == 30
    assert sum(info["counts"]["test"].values()) == info["totals"]["test"] == 30
    assert set(info["counts"]["test"]) == set(shapes.CATEGORIES)
    for r in records:
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert question.startswith("<image>\n") and question.rstrip().endswith(".")
        assert "Answer" in question and answer in r["choices"] and len(answer.split()) == 1
        assert r["category"] in shapes.CATEGORIES and r["difficulty"] == 1 and r["image_id"] == r["id"]
        assert (out / r["image"]).is_file() and r["image"] == f"images/test/{r['id']}.png"
        with Image.open(out / r["image"]) as im:
            assert im.size == (112, 112) and im.mode == "RGB"


def test_no_image_shared_across_splits(tmp_path):
    out = shapes.synth(tmp_path / "s", n_pretrain=800, n_train=600, n_val=100, n_test=600)
    owner = {}
    for png in (out / "images").rglob("*.png"):
        with Image.open(png) as im:
            digest = hashlib.sha256(np.asarray(im.convert("RGB")).tobytes()).hexdigest()
        assert digest not in owner, f"{png} repeats {owner.get(digest)}"
        owner[digest] = png


@pytest.mark.parametrize("difficulty", [1, 5])
def test_answers_balanced_per_question_and_category(difficulty):
    by_question, by_category = defaultdict(Counter), defaultdict(Counter)
    for record, _ in shapes.generate_split("train", 1500, 11, difficulty, 112):
        question, answer = (t["value"] for t in record["conversations"])
        by_category[record["category"]][answer] += 1
        if record["category"] != "spatial":
            by_question[question][answer] += 1
    for category, counts in by_category.items():
        answers = shapes.ANSWERS[category]
        assert set(counts) == set(answers), category
        spread = max(counts.values()) - min(counts.values())
        n_questions = {"colour": 4, "shape": 6, "count": 4, "comparison": 12}.get(category, 1)
        assert spread <= n_questions, (category, counts)
    for question, counts in by_question.items():
        assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) >= 2, (question, counts)


@pytest.mark.parametrize("params, words", [
    ({"difficulty": 0}, "difficulty=0"), ({"difficulty": 6}, "difficulty=6"), ({"n_train": -1}, "negative"),
    ({"image_size": 64}, "image_size=64"), ({"seed": 1.5}, "not an integer"),
])
def test_parameters_validated(tmp_path, params, words):
    with pytest.raises(DataError, match=words):
        shapes.synth(tmp_path / "x", **{**SMALL, **params})
    assert not (tmp_path / "x").exists()


def test_refuses_non_empty_out_unless_overwrite(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    shapes.synth(out, **SMALL)
    (out / "stray.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        shapes.synth(out, **SMALL)
    shapes.synth(out, overwrite=True, seed=1, **SMALL)
    assert not (out / "stray.txt").exists() and json.loads((out / "info.json").read_text())["params"]["seed"] == 1


def test_shape_classifier_across_sizes():
    from PIL import ImageDraw

    for size in range(10, 60):
        for shape in shapes.SHAPES:
            im = Image.new("RGB", (size + 8, size + 8), "white")
            shapes.draw_shape(ImageDraw.Draw(im), shape, 4, 4, size, shapes.COLOURS["blue"])
            (found,) = components(np.asarray(im))
            assert (found.colour, found.shape) == ("blue", shape), size


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_solver_is_perfect(difficulty):
    wrong = []
    for record, png in shapes.generate_split("val", 300, 100 + difficulty, difficulty, 112):
        question, answer = (t["value"] for t in record["conversations"])
        if solve(png, question) != answer:
            wrong.append((record["id"], question, answer))
    assert not wrong


def test_pretrain_mixes_in_larger_scenes_that_stay_correct():
    """Every other pretrain item of a grid category is an easy scene (2x2 or 3x3 grid, at most one distractor): objects are larger, the
    answer still follows from the pixels, and no other split has easy items."""
    def object_area(png):
        return np.mean([c.area for c in components(png)])

    items = list(shapes.generate_split("pretrain", 120, 7, 1, 112))
    easy = [(r, png) for r, png in items if r["difficulty"] == 0]
    assert [r["id"] for r, _ in easy] == [r["id"] for r, _ in items[::2] if r["category"] != "pattern"]
    assert all(solve(png, r["conversations"][0]["value"]) == r["conversations"][1]["value"] for r, png in items)
    grid = [(r, png) for r, png in items if r["category"] != "pattern"]
    sizes = {d: np.median([object_area(np.asarray(Image.open(io.BytesIO(png)))) for r, png in grid
                           if (r["difficulty"] == 0) == d]) for d in (True, False)}
    assert sizes[True] > 2 * sizes[False]
    assert all(r["difficulty"] == 1 for r, _ in shapes.generate_split("train", 40, 7, 1, 112))


def test_pretrain_grid_items_end_with_a_caption_that_the_pixels_confirm():
    """With captions=1, the last turn of every pretrain grid item names each cell of its grid in reading order; the pixel solver finds
    exactly those objects, each in its cell. Pattern items and the other splits carry no caption."""
    items = list(shapes.generate_split("pretrain", 60, 3, 1, 112, captions=True))
    plain = list(shapes.generate_split("pretrain", 60, 3, 1, 112))
    assert [png for _, png in plain] == [png for _, png in items]  # the same images, questions and answers
    assert all(p["conversations"] == r["conversations"][:len(p["conversations"])] for (p, _), (r, _) in zip(plain, items))
    assert all(shapes.CAPTION_QUESTION not in json.dumps(r) for r, _ in plain)
    for r, png in items:
        turns = [t["value"] for t in r["conversations"]]
        if r["category"] == "pattern":
            assert shapes.CAPTION_QUESTION not in turns
            continue
        assert turns[-2] == shapes.CAPTION_QUESTION and turns.count(shapes.CAPTION_QUESTION) == 1
        rows = [row.split(", ") for row in turns[-1].split("; ")]
        g = len(rows)
        assert all(len(row) == g for row in rows)
        named = sorted((cell, i, j) for i, row in enumerate(rows) for j, cell in enumerate(row) if cell != "empty")
        cw = 112 // g
        seen = sorted((f"{c.colour} {c.shape}", int(c.cy // cw), int(c.cx // cw))
                      for c in components(np.asarray(Image.open(io.BytesIO(png)))))
        assert seen == named, r["id"]
    for r, _ in shapes.generate_split("test", 30, 3, 1, 112, captions=True):
        assert all(t["value"] != shapes.CAPTION_QUESTION for t in r["conversations"])


def test_curriculum_splits_are_answerable_and_leave_the_suite_unchanged(tmp_path):
    """n_curriculum=N adds four warm-up splits (one large object, one small object, two objects in a line, the same
    with a distractor); every answer of every turn follows from the pixels; the other splits stay byte-identical;
    N=0 writes none of them."""
    plain = _hashes(shapes.synth(tmp_path / "a", **SMALL))
    staged = _hashes(shapes.synth(tmp_path / "b", **SMALL, n_curriculum=24))
    assert {k: v for k, v in staged.items() if k in plain and k != "info.json"} == \
        {k: v for k, v in plain.items() if k != "info.json"}
    assert not [k for k in plain if any(stage in k for stage in shapes.CURRICULUM_SPLITS)]
    area = {}
    for split in shapes.CURRICULUM_SPLITS:
        records = json.loads((tmp_path / "b" / f"{split}.json").read_text())
        assert len(records) == 24 and len({r["id"] for r in records}) == 24
        sizes = []
        for r in records:
            png = (tmp_path / "b" / r["image"]).read_bytes()
            objs = components(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
            assert len(objs) == {"pairs": 2, "triples": 3}.get(split, 1), r["id"]
            sizes += [o.area for o in objs]
            turns = [t["value"] for t in r["conversations"]]
            assert turns[0].startswith("<image>\n") and r["conversations"][1]["value"] in r["choices"]
            for question, answer in zip(turns[::2], turns[1::2]):
                assert solve(png, question) == answer, (r["id"], question)
            if split in ("pairs", "triples"):
                a, b = [o for o in objs if f"the {o.colour} {o.shape}" in turns[0]]    # the two named ones
                assert abs(a.cx - b.cx) < 14 or abs(a.cy - b.cy) < 14      # one row or one column of the 4x4 grid
            else:
                assert len(turns) == 8 and {"left", "right"} & set(turns) and {"top", "bottom"} & set(turns)
        area[split] = np.median(sizes)
    assert area["solo-large"] > 3 * area["solo-small"]
    for split in ("pairs", "triples"):
        records = json.loads((tmp_path / "b" / f"{split}.json").read_text())
        answers = Counter(r["conversations"][1]["value"] for r in records)
        assert answers == {r: 6 for r in shapes.RELATIONS}                  # dealt from a deck
    assert sorted(json.loads((tmp_path / "b" / "info.json").read_text())["totals"]) == sorted(
        shapes.SPLITS + shapes.CURRICULUM_SPLITS)


def test_curriculum_cache_and_split_names(tmp_path, monkeypatch):
    """n_curriculum=0 names the same cache folder as no n_curriculum (older caches stay valid); its stages open as
    splits of the builtin spec."""
    monkeypatch.setenv("VLSI_EDGE_CACHE", str(tmp_path))
    base = "builtin:shapes:n_pretrain=0,n_train=4,n_val=0,n_test=4"
    assert open_dataset(base, split="test").files == open_dataset(base + ",n_curriculum=0", split="test").files
    staged = open_dataset(base + ",n_curriculum=4", split="solo-small")
    assert len(staged) == 4 and staged.files != open_dataset(base, split="test").files
    assert len(open_dataset(base + ",n_curriculum=4", split="pairs+triples")) == 8
    with pytest.raises(DataError, match="split 'solo-small' not found"):
        open_dataset(base, split="solo-small")


def test_solver_other_image_size_and_unknown_question():
    items = list(shapes.generate_split("test", 60, 2, 3, 224))
    assert all(solve(png, r["conversations"][0]["value"]) == r["conversations"][1]["value"] for r, png in items)
    assert solve(items[0][1], "What is the meaning of life?") == ""
    assert classify_shape(100, 10, 10, 10, 10) == "square"


def test_blind_baselines_at_chance(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSI_EDGE_CACHE", str(tmp_path))
    spec = "builtin:shapes:n_pretrain=0,n_train=3000,n_val=0,n_test=1200,seed=4"
    train, test = open_dataset(spec, "train"), open_dataset(spec, "test")
    text, blank = text_only_baseline(train, test), blank_image_baseline(test)
    for result in (text, blank):
        assert set(result["per_category"]) == set(shapes.CATEGORIES)
        for category, row in result["per_category"].items():
            assert row["n"] >= 190
            assert abs(row["acc"] - row["chance"]) <= 0.05, (result["name"], category, row)
    ceiling = solver_baseline(test)
    assert ceiling["overall"]["acc"] == 1.0 and ceiling["overall"]["n"] == 1200


def test_pattern_sequence_completion():
    assert shapes.complete_sequence(["red", "blue", None, "blue", "red"]) == "red"
    assert shapes.complete_sequence(["a", "b", "c", "a", None, "c", "a"]) == "b"
    assert shapes.complete_sequence(["a", None, "b"]) is None and shapes.complete_sequence(["a", "b"]) is None
    png = io.BytesIO()
    Image.new("RGB", (112, 112), "white").save(png, format="PNG")
    assert solve(png.getvalue(), "What colour belongs in the empty cell? Answer with one word.") == "red"
