"""Datasets for vlsi-edge: LLaVA-style conversations, safe image loading, the `builtin:shapes` suite, answer
parsing and accuracy statistics.

The modules here import only numpy, Pillow, PyYAML and the standard library, so `vlsi-edge bench` can use them on a
device: `images` (load/check images), `conversations` (`open_dataset`, `Dataset`, `Sample`), `shapes` (the
synthetic suite), `solver` (its pixel solver), `answers` (the answer parser), `scoring` (CIs and paired tests) and
`baselines`. Host-side pieces (collators, tensors) live in their own modules and are imported lazily by their users.
The names below are re-exported lazily, so `import vlsi_edge.data` itself loads nothing.
"""
from __future__ import annotations

_EXPORTS = {
    "open_dataset": "conversations", "read_conversations": "conversations", "Dataset": "conversations",
    "Sample": "conversations", "Turn": "conversations", "load_image": "images", "parse_answer": "answers",
    "accuracy_ci": "scoring",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"vlsi_edge.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vlsi_edge.data' has no attribute {name!r}")
