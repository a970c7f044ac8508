"""Crash-safe file writes, torch-free (checkpoints, caches, results and bundles all use these).

    with atomic_path(out / "model.safetensors") as tmp:   # write tmp; on success it is fsynced and renamed
        save_file(tensors, str(tmp))
    write_json_atomic(out / "manifest.json", manifest)

A reader, or a process that resumes after a crash, sees either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def publish_dir(tmp: Path, out: Path, overwrite: bool, appeared_error) -> None:
    """Rename a finished folder `tmp` to `out` (an empty `out` is replaced). An existing `out` is swapped out and
    removed when `overwrite`, else `appeared_error()` is raised: it appeared while we were building."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    if not overwrite:
        raise appeared_error()
    trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, trash)
    os.replace(tmp, out)
    shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink()
