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
