"""torchrun on CPU (gloo): 2 processes with the same global batch equal 1 process, matching included."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

DATA = "builtin:shapes:n_pretrain=0,n_train=40,n_val=0,n_test=0,seed=7"
ARGS = ["distill", "--teacher", "builtin:tiny-qwen2vl-teacher", "--student", "builtin:tiny-qwen2vl-student",
        "--data", DATA, "--steps", "verbalize=2,interact=3,sft=2", "--set", "train.checkpoint_every=2"]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "vlsi_edge.cli"]


def _one_process(tmp_path_factory, args: list[str]) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _run([sys.executable, "-m", "vlsi_edge.cli", *args, "--batch-size", "8", "--out", str(out)], out.parent)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _one_process(tmp_path_factory, ARGS)


def _same_tensors(a: Path, b: Path, files: list[str]) -> None:
    for name in files:
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys(), name
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=f"{name}: {k}")


def _compare(a: Path, b: Path) -> None:
    _same_tensors(a, b, ["student/model.safetensors", "verbalizers/teacher.safetensors",
                         "verbalizers/student.safetensors"])
    ma, mb = (json.loads((p / "matching.json").read_text()) for p in (a, b))
    assert ma["total"] == mb["total"], "ranks sampled a different matching than one process"


def test_ddp_two_processes_equal_one(single, tmp_path):
    out = tmp_path / "ddp"
    _run(_torchrun(2) + [*ARGS, "--batch-size", "4", "--out", str(out)], tmp_path)
    _compare(single, out)


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one(single, tmp_path):
    out = tmp_path / "fsdp2"
    _run(_torchrun(2) + [*ARGS, "--batch-size", "4", "--out", str(out), "--set", "train.distributed=fsdp2"],
         tmp_path)
    _compare(single, out)


SCENE_ARGS = ["train", "--model", "builtin:tiny-qwen2vl-student", "--data", DATA + ",scene_targets=1", "--steps", "3",
              "--set", "train.aux_weight=3", "train.aux_layer=2", "train.place_weight=2", "train.place_layer=1"]


@pytest.fixture(scope="module")
def scene_single(tmp_path_factory):
    return _one_process(tmp_path_factory, SCENE_ARGS)


def test_ddp_with_scene_targets_equals_one(scene_single, tmp_path):
    """The scene-target and place losses are sums over rows like the answer loss, so 2 ranks x 4 rows equal
    1 process x 8."""
    one, two = scene_single, tmp_path / "two"
    _run(_torchrun(2) + [*SCENE_ARGS, "--batch-size", "4", "--out", str(two)], tmp_path)
    _same_tensors(one, two, ["student/model.safetensors", "aux_head.safetensors"])
    # the loss lines agree (all-reduced); `aux`, like every other logged term, is rank 0's own share
    la, lb = ([json.loads(x) for x in (p / "metrics.jsonl").open()] for p in (one, two))
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5) and la[-1]["aux"] > 0 < la[-1]["place"]


@pytest.mark.slow
def test_fsdp2_with_scene_targets_equals_one(scene_single, tmp_path):
    out = tmp_path / "fsdp2"
    _run(_torchrun(2) + [*SCENE_ARGS, "--batch-size", "4", "--out", str(out), "--set", "train.distributed=fsdp2"],
         tmp_path)
    _same_tensors(scene_single, out, ["student/model.safetensors", "aux_head.safetensors"])
