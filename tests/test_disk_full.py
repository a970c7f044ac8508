"""Disk full during a checkpoint: a small tmpfs under the run folder fills up at the second checkpoint. The run stops
with one line, the first checkpoint stays the latest and loads, no temporary is left that could pass for a
checkpoint, and once there is room `--resume` finishes the run. Needs root (mount), as CI has."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from vlsi_edge.cli import main

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                                reason="mounting a size-limited tmpfs needs root")
DATA = "builtin:shapes:n_pretrain=0,n_train=16,n_val=4,n_test=4"


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("could not mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_at_a_checkpoint_keeps_the_last_good_one(small_disk, capsys):
    from vlsi_edge.distill.checkpoint import load_latest

    run = small_disk / "run"
    argv = ["train", "--model", "builtin:tiny-qwen2vl-student", "--data", DATA, "--split", "train", "--out", str(run),
            "--steps", "6", "--batch-size", "2", "--set", "train.checkpoint_every=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "No space left" in err[-1] and "--resume" in err[-1], err[-1:]
    state = run / "state"
    latest = load_latest(state)
    assert latest is not None and latest.path.name == "sft-0000002" and latest.meta["step"] == 2
    assert not [p.name for p in state.iterdir() if p.name.startswith(".")]          # no half-written temporaries
    assert not (run / "student").exists()

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    assert main([*argv, "--resume"]) == 0
    assert (run / "student" / "model.safetensors").is_file()


@pytest.mark.slow  # trains and exports a student (about 30 s on 2 cores)
def test_disk_full_during_an_export_leaves_nothing(tmp_path, capsys):
    """The tiny student's jetson bundle is ~4.6 MB; a 3 MB disk fills while its decoder weights are written."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("could not mount a tmpfs here")
    try:
        out = mnt / "bundle"
        rc = main(["export", "--model", "builtin:tiny-qwen2vl-student", "--target", "jetson", "--out", str(out),
                   "--data", DATA])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("vlsi-edge: error:")]
        assert rc == 2 and len(lines) == 1 and "no space left" in lines[0].lower(), err[-2000:]
        assert "Traceback" not in err
        assert list(mnt.iterdir()) == []          # no bundle, no staging folder
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
