"""`vlsi-edge bench` pieces that need no bundle (statistics, bandwidth, device facts), its bad input, and the shipped
pretrained checkpoints' integrity check. Bench runs on real bundles live next to their exports:
test_export_onnx.py (ONNX Runtime, and `eval` joining) and test_export_executorch.py (ExecuTorch, torch backend)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vlsi_edge.benchmarks import bench as B
from vlsi_edge.cli import main

DATA = "builtin:shapes:n_pretrain=0,n_train=8,n_val=4,n_test=8"


def test_summary_statistics():
    s = B.summary([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["mean"] == 22.0 and s["median"] == 3.0
    assert s["p90"] == pytest.approx(np.percentile([1, 2, 3, 4, 100], 90))
    assert s["stdev"] == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1))
    assert B.summary([5.0])["stdev"] == 0.0
    assert B.summary([])["mean"] is None


def test_copy_bandwidth_and_device_facts():
    assert 0.1 < B.copy_bandwidth(8, repeats=2) < 10_000      # GB/s, any machine
    facts = B.device_facts(threads=1)
    assert facts["cores"] >= 1 and facts["threads"] == 1 and facts["cpu"]
    assert {"gpu", "jetson_power_mode"} <= set(facts)


@pytest.mark.parametrize("argv, needle", [
    (["--backend", "ort", "--model", "builtin:tiny-qwen2vl-student"], "--bundle"),
    (["--backend", "torch", "--bundle", "somewhere"], "--model"),
    (["--backend", "ort", "--bundle", "no/such/bundle"], "no/such/bundle"),
    (["--backend", "ort", "--bundle", "x", "--limit", "0"], "--limit"),
    (["--backend", "ort", "--bundle", "x", "--split", "nosuchsplit"], "nosuchsplit"),
    (["--emit-phone-kit", "kit"], "--bundle"),
])
def test_bad_bench_input_is_one_line(argv, needle, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "--data", DATA, *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_unknown_profile_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--bundle", "x", "--profile", "slow"])
    assert exc.value.code == 2 and "slow" in capsys.readouterr().err


def test_pretrained_checkpoints_are_checked_against_their_sha256(tmp_path):
    from vlsi_edge.errors import ModelError
    from vlsi_edge.models import pretrained

    shipped = pretrained.names()
    assert shipped == ["tiny-qwen2vl-student-early-pretrained", "tiny-qwen2vl-student-pretrained",
                       "tiny-qwen2vl-teacher-pretrained"]
    sizes = sum(pretrained.record(n)["size_mb"] for n in shipped)
    assert sizes <= 40
    root = tmp_path / "pretrained"
    shutil.copytree(pretrained.ROOT, root)
    name = shipped[0]
    assert pretrained.checkpoint_dir(name, root) == root / pretrained.record(name, root)["folder"]
    weights = root / pretrained.record(name, root)["folder"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        pretrained.checkpoint_dir(name, root)
    with pytest.raises(ModelError, match="unknown pretrained"):
        pretrained.checkpoint_dir("tiny-qwen2vl-giant-pretrained", root)
    (root / "manifest.json").unlink()
    with pytest.raises(ModelError, match="ships no pretrained"):
        pretrained.checkpoint_dir(name, root)


def test_pretrained_student_loads_and_its_record_holds_test_accuracy():
    from vlsi_edge.models import load_model, pretrained

    vlm = load_model("builtin:tiny-qwen2vl-student-pretrained")
    assert vlm.family == "qwen2vl" and vlm.source == "builtin:tiny-qwen2vl-student-pretrained"
    rec = pretrained.record("tiny-qwen2vl-student-pretrained")
    assert 0 < rec["test_accuracy"] < 1 and set(rec["per_category"]) == {
        "colour", "shape", "count", "spatial", "comparison", "pattern"}
    assert json.loads((pretrained.ROOT / "manifest.json").read_text())["models"]
