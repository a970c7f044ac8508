"""Atomic, resumable training checkpoints.

A checkpoint is a folder `RUN/state/<stage>-<step>/` written under a temporary name, every file fsynced, the folder
renamed into place and fsynced, and only then `RUN/state/latest.json` replaced (also atomically). A crash at any
moment leaves either the previous checkpoint or the new one as `latest`, never half of one. Tensors go to
safetensors; optimizer state through `torch.save` and back with `weights_only=True`; everything else is JSON.

    save_checkpoint(run / "state", "interact-000120", tensors={...}, optimizer=opt.state_dict(), meta={...})
    ck = load_latest(run / "state")      # None when there is none
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from vlsi_edge.errors import UserError
from vlsi_edge.fileio import disk_full, fsync_dir, fsync_file, write_json_atomic

LATEST = "latest.json"


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    optimizer: dict | None
    meta: dict


def save_checkpoint(state_dir: Path, name: str, tensors: dict[str, torch.Tensor], optimizer: dict | None,
                    meta: dict, keep: int = 2) -> Path:
    from safetensors.torch import save_file

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    final = state_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=state_dir))
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        if optimizer is not None:
            torch.save(optimizer, tmp / "optimizer.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        if final.exists():      # rewritten after a crash between rename and `latest`: retire the old one whole
            _retire(final)
        os.replace(tmp, final)
        fsync_dir(state_dir)
    except BaseException as exc:
        why = _write_failure(exc, state_dir) if isinstance(exc, (OSError, RuntimeError)) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if why is not None:         # torch.save reports a full disk as a RuntimeError, safetensors as an OSError
            raise UserError(f"could not write checkpoint {name} in {state_dir} ({why}); the last good checkpoint "
                            "is kept", "free space (or fix the folder), then rerun with --resume") from None
        raise
    write_json_atomic(state_dir / LATEST, {"name": name})
    _prune(state_dir, keep=keep, protect=name)
    return final


def _write_failure(exc: BaseException, where: Path) -> str:
    """Why a write failed, in the user's words: a full disk is named as such whichever library noticed it."""
    if disk_full(where, exc):
        return "No space left on device"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def _retire(path: Path) -> None:
    """Delete a checkpoint folder so that a kill at any moment leaves it whole or gone: rename it to a hidden name
    first (atomic), then remove that. A half-deleted folder under a checkpoint's own name would look like one."""
    trash = path.parent / f".retired-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(state_dir: Path, keep: int, protect: str) -> None:
    done = sorted((p for p in state_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime)
    for old in done[:-keep] if keep else done:
        if old.name != protect:
            _retire(old)
    for stale in state_dir.glob(".*"):  # temporaries of a killed writer
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def load_latest(state_dir: Path) -> Checkpoint | None:
    from safetensors.torch import load_file

    state_dir = Path(state_dir)
    pointer = state_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["name"]
        path = state_dir / name
        tensors = load_file(str(path / "tensors.safetensors"))
        opt = path / "optimizer.pt"
        optimizer = torch.load(opt, weights_only=True, map_location="cpu") if opt.is_file() else None
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint in {state_dir} cannot be read ({type(e).__name__}: {str(e)[:120]})",
                        "start a new run, or remove the broken state/ folder") from None
    return Checkpoint(path=path, tensors=tensors, optimizer=optimizer, meta=meta)
