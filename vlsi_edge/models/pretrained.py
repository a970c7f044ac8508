"""The pretrained tiny checkpoints shipped in the package: `builtin:tiny-qwen2vl-{teacher,student}-pretrained`, and
`builtin:tiny-qwen2vl-student-early-pretrained` (the reproduction's student, its pretraining stopped at 300 steps).

    vlsi-edge eval --model builtin:tiny-qwen2vl-teacher-pretrained --data builtin:shapes --out teacher.json

`scripts/pretrain_tiny.sh` trains them from the random-init presets on the `pretrain` split of builtin:shapes and
`scripts/ship_pretrained.py` copies them here with `manifest.json`: the sha256 of every file, the recipe, and the
test accuracies measured when they were made. Every load checks the checksums first, so a damaged or edited
checkpoint is refused instead of silently giving other numbers.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vlsi_edge.errors import ModelError

ROOT = Path(__file__).resolve().parent.parent / "assets" / "pretrained"
SUFFIX = "-pretrained"


def names(root: Path = ROOT) -> list[str]:
    """The shipped pretrained names (without `builtin:`); empty when the package ships none."""
    manifest = root / "manifest.json"
    if not manifest.is_file():
        return []
    return sorted(json.loads(manifest.read_text())["models"])


def is_pretrained(name: str) -> bool:
    return name.endswith(SUFFIX)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def checkpoint_dir(name: str, root: Path = ROOT) -> Path:
    """The verified folder of a shipped checkpoint; refuses a missing, unknown or modified one."""
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise ModelError(f"builtin:{name}: this installation ships no pretrained checkpoints ({manifest_path} is "
                         "missing)", "reinstall vlsi-edge, or make them with scripts/pretrain_tiny.sh")
    manifest = json.loads(manifest_path.read_text())
    if name not in manifest["models"]:
        raise ModelError(f"unknown pretrained checkpoint builtin:{name}",
                         "shipped: " + ", ".join(f"builtin:{n}" for n in sorted(manifest["models"])))
    folder = root / manifest["models"][name]["folder"]
    for rel, expected in sorted(manifest["models"][name]["files"].items()):
        path = folder / rel
        if not path.is_file():
            raise ModelError(f"builtin:{name}: shipped file {path} is missing", "reinstall vlsi-edge")
        if _sha256(path) != expected:
            raise ModelError(f"builtin:{name}: {path} does not match its recorded sha256 (modified or damaged)",
                             "reinstall vlsi-edge, or re-make it with scripts/pretrain_tiny.sh")
    return folder


def record(name: str, root: Path = ROOT) -> dict:
    """What the manifest says about a shipped checkpoint: recipe, test accuracies, sizes."""
    return json.loads((root / "manifest.json").read_text())["models"][name]
