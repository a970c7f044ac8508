"""Small `vlsi-edge train` runs for the tests of the training targets (scene and place): the run, its weights, the
one-line error, and a run killed mid-way then resumed."""
from __future__ import annotations

from safetensors.torch import load_file

from vlsi_edge.cli import main

QS = "builtin:tiny-qwen2vl-student"


def train(out, *extra, data: str, model: str = QS, steps: str = "4") -> int:
    return main(["train", "--model", model, "--data", data, "--out", str(out), "--steps", steps, "--batch-size", "4",
                 "--seed", "3", "--set", "train.log_every=1", "train.checkpoint_every=2", *extra])


def weights(run):
    return load_file(str(run / "student" / "model.safetensors"))


def one_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("vlsi-edge: error:")]
    assert rc == 2 and len(lines) == 1, err
    assert all(n.lower() in lines[0].lower() for n in needles), lines[0]


def killed_then_resumed(monkeypatch, run_train, run) -> None:
    """`run_train(run)` killed in its 4th micro-batch loss (step 4, after the step-2 checkpoint), then resumed."""
    from vlsi_edge.distill import trainer as trainer_mod

    real, calls = trainer_mod.phase_loss, {"n": 0}

    def crashing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(trainer_mod, "phase_loss", crashing)
    assert run_train(run) == 130
    monkeypatch.setattr(trainer_mod, "phase_loss", real)
    assert run_train(run, "--resume") == 0
