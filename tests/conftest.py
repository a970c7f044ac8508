"""Shared fixtures: offline, CPU, tiny. Every test gets its own cache folder for built-in data."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLSI_EDGE_CACHE", str(tmp_path_factory.getbasetemp() / "vlsi_cache"))


@pytest.fixture(scope="session")
def torch_threads():
    import torch

    torch.set_num_threads(1)
    return 1


def _train_briefly(family: str, out, steps: int = 40, data: str = "builtin:shapes:n_pretrain=0,n_train=64,n_val=16,"
                   "n_test=16"):
    """A tiny student trained full-batch on 32 items: peaked logits for the export parity gates (random weights
    give near-ties everywhere). Saved as a transformers checkpoint at `out`."""
    import torch

    from vlsi_edge.data.collate import Collator
    from vlsi_edge.data.conversations import open_dataset
    from vlsi_edge.models import load_model

    torch.manual_seed(0)
    vlm = load_model(f"builtin:tiny-{family}-student")
    batch = Collator(vlm, mode="train")(list(open_dataset(data, split="train"))[:32])
    opt = torch.optim.AdamW(vlm.model.parameters(), lr=2e-3)
    vlm.model.train()
    for _ in range(steps):
        loss = vlm.model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    vlm.model.eval()
    vlm.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def train_briefly():
    """`train_briefly(family, out, steps=40)` → a briefly trained student checkpoint folder."""
    return _train_briefly
