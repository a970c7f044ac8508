"""`matrix` tier: `vlsi-edge eval` through the collator and `generate` for every family × role (torch backend)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from vlsi_edge.cli import main  # noqa: E402
from vlsi_edge.models.presets import PRESETS  # noqa: E402


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "d"
    assert main(["data", "synth", "--out", str(out), "--n-pretrain", "0", "--n-train", "0", "--n-val", "0",
                 "--n-test", "12", "--seed", "5"]) == 0
    return out


@pytest.mark.matrix
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_eval_every_preset(preset, shapes, tmp_path, torch_threads):
    out = tmp_path / "p.json"
    assert main(["eval", "--model", f"builtin:{preset}", "--data", str(shapes), "--split", "test",
                 "--out", str(out), "--max-new-tokens", "3", "--batch-size", "6"]) == 0
    doc = json.loads(out.read_text())
    assert doc["data"]["n"] == 12 and doc["system"]["family"] == PRESETS[preset].family
    assert 0.0 <= doc["metrics"]["overall"]["acc"] <= 1.0
