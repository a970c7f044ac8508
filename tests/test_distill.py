"""The training loop end to end on the tiny presets: every method and stage, exact resume, bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from vlsi_edge.cli import main  # noqa: E402
from vlsi_edge.distill import trainer as trainer_mod  # noqa: E402

DATA = "builtin:shapes:n_pretrain=0,n_train=40,n_val=0,n_test=0,seed=7"
QT, QS = "builtin:tiny-qwen2vl-teacher", "builtin:tiny-qwen2vl-student"


def _distill(out, *extra, teacher=QT, student=QS, steps="verbalize=3,interact=4,sft=3"):
    args = ["distill", "--student", student, "--data", DATA, "--out", str(out), "--steps", steps,
            "--batch-size", "4", "--set", "train.checkpoint_every=2", "--set", "train.log_every=1"]
    if teacher:
        args += ["--teacher", teacher]
    return main(args + list(extra))


def _one_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("vlsi-edge: error:")]
    assert rc == 2 and len(lines) == 1, err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _weights(run: Path) -> dict:
    return load_file(str(run / "student" / "model.safetensors"))


@pytest.mark.parametrize("family", ["qwen2vl", "llava_onevision"])
def test_vlsi_runs_all_three_stages(family, tmp_path, torch_threads):
    run = tmp_path / "run"
    assert _distill(run, teacher=f"builtin:tiny-{family}-teacher", student=f"builtin:tiny-{family}-student") == 0
    phases = [json.loads(line)["phase"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert ["verbalize-teacher", "verbalize-student", "interact", "sft"] == list(dict.fromkeys(phases))
    assert (run / "verbalizers" / "teacher.safetensors").is_file()
    assert (run / "verbalizers" / "student.safetensors").is_file()
    matching = json.loads((run / "matching.json").read_text())
    assert matching["student_layers"] == [1, 2, 3, 4] and matching["teacher_layers"] == list(range(1, 10))
    assert all(sum(row) == 4 for row in matching["total"])  # one match per student layer per step
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(run / "student")
    assert not any("verb" in n or "lora" in n for n, _ in hf.named_parameters())
    config = json.loads((run / "student" / "config.json").read_text())
    assert config["vlsi_edge"]["target_layers"] == [1, 2, 3, 4]


@pytest.mark.parametrize("crash_at", [("verbalize-teacher", 2), ("interact", 3), ("sft", 1)])
def test_resume_is_bit_identical(crash_at, tmp_path, monkeypatch, torch_threads):
    ref = tmp_path / "ref"
    assert _distill(ref) == 0

    real = trainer_mod.phase_loss
    calls = {"n": 0}

    def crashing(phase, ctx, batch, key, *a, **kw):
        if phase == crash_at[0]:
            calls["n"] += 1
            if calls["n"] == crash_at[1] + 1:
                raise KeyboardInterrupt  # killed mid-step, after crash_at[1] completed steps of that phase
        return real(phase, ctx, batch, key, *a, **kw)

    run = tmp_path / "run"
    monkeypatch.setattr(trainer_mod, "phase_loss", crashing)
    assert _distill(run) == 130
    monkeypatch.setattr(trainer_mod, "phase_loss", real)
    assert _distill(run, "--resume") == 0

    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("teacher", "student"):
        va = load_file(str(ref / "verbalizers" / f"{name}.safetensors"))
        vb = load_file(str(run / "verbalizers" / f"{name}.safetensors"))
        assert all(torch.equal(va[k], vb[k]) for k in va)
    assert json.loads((ref / "matching.json").read_text()) == json.loads((run / "matching.json").read_text())

    def losses(path):
        return [(r["phase"], r["step"], r["loss"]) for r in map(json.loads, (path / "metrics.jsonl").open())]
    assert losses(ref) == losses(run)


def test_resume_with_other_config_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert _distill(run, steps="verbalize=1,interact=1,sft=1") == 0
    capsys.readouterr()
    rc = _distill(run, "--resume", "--set", "matching.strategy=random", steps="verbalize=1,interact=1,sft=1")
    _one_line(capsys, rc, "different config", "matching.strategy", "random")


def test_existing_output_needs_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert _distill(run, teacher=None, steps="sft=1", *["--method", "sft"]) == 0
    capsys.readouterr()
    rc = _distill(run, "--method", "sft", teacher=None, steps="sft=1")
    _one_line(capsys, rc, "already holds", "--resume")
    assert _distill(run, "--method", "sft", "--overwrite", teacher=None, steps="sft=1") == 0


@pytest.mark.parametrize("method", ["sft", "kd"])
def test_baselines_run(method, tmp_path, torch_threads):
    run = tmp_path / method
    teacher = QT if method == "kd" else None
    assert _distill(run, "--method", method, "--set", "kd.ce_weight=0.5", teacher=teacher, steps="3") == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert {r["phase"] for r in recs} == {method}
    assert (run / "student" / "model.safetensors").is_file()
    if method == "kd":
        assert "kl" in recs[-1] and "ce" in recs[-1]


def test_lowres_student_aligns_by_response_order(tmp_path, torch_threads):
    run = tmp_path / "run"
    assert _distill(run, student="builtin:tiny-qwen2vl-student-lowres", steps="verbalize=1,interact=2,sft=1") == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").open() if '"interact"' in line]
    assert recs and all(r["tokens"] > 0 for r in recs)


def test_teacher_verbalizers_are_reused_and_checked(tmp_path, capsys, torch_threads):
    first = tmp_path / "first"
    assert _distill(first, "--stages", "verbalize", steps="verbalize=2") == 0
    tv = first / "verbalizers" / "teacher.safetensors"
    second = tmp_path / "second"
    assert _distill(second, "--teacher-verbalizers", str(tv), steps="verbalize=1,interact=1,sft=1") == 0
    phases = {json.loads(line)["phase"] for line in (second / "metrics.jsonl").open()}
    assert "verbalize-teacher" not in phases
    only = tmp_path / "student-verbalizers-only"  # e.g. giving an SFT-only student verbalizers, teacher on disk
    assert _distill(only, "--stages", "verbalize", "--teacher-verbalizers", str(tv), steps="verbalize=1") == 0
    assert {json.loads(line)["phase"] for line in (only / "metrics.jsonl").open()} == {"verbalize-student"}
    assert (only / "verbalizers" / "student.safetensors").is_file()
    capsys.readouterr()
    rc = _distill(tmp_path / "third", "--teacher-verbalizers", str(tv), teacher="builtin:tiny-llava_onevision-teacher",
                  student="builtin:tiny-llava_onevision-student", steps="verbalize=1,interact=1,sft=1")
    _one_line(capsys, rc, "teacher.safetensors")


def test_all_masked_batches_are_skipped_not_nan(tmp_path):
    run = tmp_path / "run"
    assert _distill(run, "--method", "sft", "--set", "train.max_length=12", teacher=None, steps="2") == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert all(r["loss"] == 0.0 and r["tokens"] == 0 and r["skipped_batches"] == 1 for r in recs)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    rc = _distill(run, "--method", "sft", "--lr", "1e30", "--set", "optim.clip=0", "--set", "optim.warmup_steps=0",
                  "--set", "train.checkpoint_every=1",
                  teacher=None, steps="6")
    line = _one_line(capsys, rc, "non-finite loss", "--resume")
    assert "step" in line
    assert json.loads((run / "state" / "latest.json").read_text())["name"].startswith("sft-")


BAD = {
    "families_differ": (dict(teacher="builtin:tiny-gemma3-teacher"), ["family", "gemma3", "qwen2vl"]),
    "layer_beyond_depth": (dict(extra=["--set", "student_target_layers=[1,2,3,9]"]), ["9", "outside"]),
    "reverse_kl_with_cache": (dict(extra=["--cache-teacher", "{tmp}/cache", "--set", "loss.kl=reverse"]),
                              ["reverse", "cache"]),
    "unknown_key": (dict(extra=["--set", "matching.strategyy=random"]), ["unknown key", "matching.strategyy"]),
    "bad_stage": (dict(extra=["--stages", "sft,verbalize"]), ["stages", "order"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_distill_input(case, tmp_path, capsys):
    kw, needles = BAD[case]
    extra = [e.format(tmp=tmp_path) for e in kw.pop("extra", [])]
    rc = _distill(tmp_path / "run", *extra, **kw)
    _one_line(capsys, rc, *needles)
    assert not (tmp_path / "run").exists(), "a refused run must leave nothing behind"


def test_empty_dataset_and_unwritable_out(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    rc = main(["train", "--model", QS, "--data", str(empty), "--out", str(tmp_path / "r")])
    _one_line(capsys, rc, "empty")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["train", "--model", QS, "--data", DATA, "--out", str(blocker / "sub"), "--steps", "1"])
    _one_line(capsys, rc, "cannot write", "sub")


def test_tokenizers_that_differ_are_refused(tmp_path, capsys):
    from vlsi_edge.models import load_model

    m = load_model(QS)
    m.save_pretrained(tmp_path / "s")
    tok = json.loads((tmp_path / "s" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "s" / "tokenizer.json").write_text(json.dumps(tok))
    rc = _distill(tmp_path / "run", student=str(tmp_path / "s"))
    _one_line(capsys, rc, "tokenizers differ", "first mismatch")


def test_teacher_cache_with_full_vocabulary_matches_live_teacher(tmp_path, capsys, torch_threads):
    steps = "verbalize=2,interact=3,sft=1"
    live = tmp_path / "live"
    assert _distill(live, steps=steps) == 0
    cached = tmp_path / "cached"
    cache = tmp_path / "cache"
    assert _distill(cached, "--cache-teacher", str(cache), "--set", "cache.top_k=522", steps=steps) == 0
    assert (cache / "manifest.json").is_file()
    a, b = _weights(live), _weights(cached)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    capsys.readouterr()
    again = tmp_path / "again"  # a second run reuses the cache and never loads the teacher
    assert _distill(again, "--cache-teacher", str(cache), "--set", "cache.top_k=522", steps=steps) == 0
    err = capsys.readouterr().err
    assert "stays on disk" in err and "verbalize-teacher" not in err


def test_every_recipe_loads_into_the_config_classes():
    from vlsi_edge.config import DistillConfig, recipe_path, recipes

    names = recipes()
    assert {"qwen2vl-72b-to-2b", "qwen2vl-72b-to-7b", "tiny-qwen2vl", "tiny-llava_onevision"} <= set(names)
    for name in names:
        cfg = DistillConfig.from_yaml(recipe_path(name))
        assert cfg.method == "vlsi"
    big = DistillConfig.from_yaml(recipe_path("qwen2vl-72b-to-2b"))
    assert big.lora.enabled and big.lora.r == 64 and big.lora.alpha == 64
    assert big.student_target_layers == list(range(2, 28, 4)) and big.teacher_target_layers == list(range(2, 80, 4))
    assert big.train.batch_size * 8 * big.train.grad_accum == 512 and big.cache.dir and big.train.distributed == "fsdp2"


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    """PyYAML reads "1e-5" as a string (YAML 1.1); a preset or `--set optim.lr=2e-4` must still mean the number."""
    from vlsi_edge.cli import _distill_config
    from vlsi_edge.config import load_yaml

    assert load_yaml("[2e-4, 1E5, -3e+2, 7, 0.5, e5, 1e]") == [2e-4, 1e5, -300.0, 7, 0.5, "e5", "1e"]
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 1e-5\n")
    assert _distill_config(str(preset), {}, []).optim.lr == 1e-5
    assert _distill_config(str(preset), {}, ["optim.lr=2e-4"]).optim.lr == 2e-4


def test_lora_run_merges_into_a_plain_checkpoint(tmp_path, torch_threads):
    run = tmp_path / "lora"
    assert _distill(run, "--lora", "--set", "lora.r=4", "--set", "lora.alpha=8", steps="verbalize=1,interact=2,sft=2") == 0
    from transformers import AutoModelForImageTextToText

    from vlsi_edge.models import load_model

    hf = AutoModelForImageTextToText.from_pretrained(run / "student")
    assert not any("lora" in n for n, _ in hf.named_parameters())
    base = load_model(QS).model.state_dict()
    merged = hf.state_dict()
    changed = [k for k in base if "language_model.layers" in k and "proj" in k and not torch.equal(base[k], merged[k])]
    assert changed, "LoRA updates were not merged into the saved student"
    untouched = [k for k in base if "visual" in k]
    assert all(torch.equal(base[k], merged[k]) for k in untouched)


ABLATIONS = {
    "random": ["matching.strategy=random"],
    "uniform": ["matching.strategy=uniform"],
    "bottom-1": ["matching.strategy=bottom-k", "matching.bottom_k=1"],
    "no-search-range": ["matching.search_range=false"],
    "no-order": ["matching.order_preservation=false"],
    "fixed-temperature": ["matching.adaptive_temperature=false"],
    "temperature-b": ["matching.temperature=b"],
    "reverse-kl": ["loss.kl=reverse"],
    "ce-kld": ["loss.intermediate=ce"],
    "l2-kld": ["loss.intermediate=l2"],
    "kld-none": ["loss.last=none"],
    "paper-literal-verbalizer": ["verbalizer.residual=false"],
    "grad-checkpointing": ["train.grad_checkpointing=true"],
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_every_method_switch_runs(name, tmp_path, torch_threads):
    sets = [x for s in ABLATIONS[name] for x in ("--set", s)]
    run = tmp_path / name
    assert _distill(run, *sets, steps="verbalize=1,interact=3,sft=0") == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").open() if '"interact"' in line]
    assert recs and all(math.isfinite(r["loss"]) for r in recs)
    for r in recs:
        matched = r["matched"]
        assert all(1 <= j <= 9 for j in matched)
        if name == "no-order":
            continue
        assert matched == sorted(matched)
        if name != "no-search-range":
            assert len(set(matched)) == len(matched) and matched[-1] <= 9 and matched[0] <= 6
    if name == "uniform":
        assert all(r["matched"] == [2, 5, 7, 9] for r in recs)  # index round((i+1)*9/4) - 1 into layers 1..9
    if name == "kld-none":
        assert all("last" not in r for r in recs)


def test_resume_of_a_run_killed_before_its_config_starts_it(tmp_path, torch_threads):
    """A scheduler that always passes --resume: a run folder killed during setup (empty but for a hidden leftover),
    or none at all, starts the run instead of refusing."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".write-test.12345").write_text("ok")
    assert _distill(run, "--resume", steps="verbalize=1,interact=1,sft=1") == 0
    assert (run / "student" / "model.safetensors").is_file()
    assert _distill(tmp_path / "absent", "--resume", steps="verbalize=1,interact=1,sft=1") == 0


def test_train_at_another_image_size_then_distill_from_it(tmp_path, capsys, torch_threads):
    """`train --image-size`: a Qwen2-VL teacher continued at 168 px (36 image tokens) keeps that size, and distilling
    from it into the 112-px student (16) aligns by response order."""
    teacher = tmp_path / "teacher"
    assert main(["train", "--model", QT, "--data", DATA, "--out", str(teacher), "--steps", "1", "--batch-size", "2",
                 "--image-size", "168"]) == 0
    from vlsi_edge.models import load_model

    m = load_model(str(teacher / "student"))
    assert m.image_size == 168 and m.image_token_count() == 36
    run = tmp_path / "run"
    assert _distill(run, teacher=str(teacher / "student"), steps="verbalize=1,interact=2,sft=1") == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").open() if '"interact"' in line]
    assert recs and all(r["tokens"] > 0 for r in recs)
    assert load_model(str(run / "student")).image_size == 112


@pytest.mark.parametrize("model, size, needle", [(QS, "100", "multiple of 28"),
                                                 ("builtin:tiny-llava_onevision-student", "224", "fixed input size")])
def test_bad_image_size_is_refused(model, size, needle, tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(["train", "--model", model, "--data", DATA, "--out", str(out), "--steps", "1", "--image-size", size])
    _one_line(capsys, rc, needle)
    assert not out.exists()
