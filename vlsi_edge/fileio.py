"""Crash-safe file writes, torch-free (checkpoints, caches, results and bundles all use these).

    with atomic_path(out / "model.safetensors") as tmp:   # write tmp; on success it is fsynced and renamed
        save_file(tensors, str(tmp))
    write_json_atomic(out / "manifest.json", manifest)

A reader, or a process that resumes after a crash, sees either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a bundle copied to a device is read by other users
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
    removed when `overwrite`, else `appeared_error()` is raised: it appeared while we were building. Modes follow
    the umask first: some writers (mkstemp, onnx's external data) make files only their owner can read, and a
    bundle copied to a device is often run by another user."""
    for root, dirs, files in os.walk(tmp):
        for name in files:
            path = os.path.join(root, name)
            executable = os.stat(path).st_mode & 0o111      # scripts such as a kit's run_on_phone.sh stay so
            os.chmod(path, (0o777 if executable else 0o666) & ~_UMASK)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~_UMASK)
    os.chmod(tmp, 0o777 & ~_UMASK)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(out: Path) -> Path:
    """A fresh hidden folder beside `out` to build it in (`.NAME.tmp-PID-RAND`), after removing the staging folders
    that killed builders of the same `out` left behind (their PID is gone), so a crash never leaks a bundle-sized
    folder for good."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def disk_full(where: Path, exc: BaseException | None = None, margin: int = 1 << 20) -> bool:
    """Whether a failed write at `where` is best explained by a full disk: `exc` (or an exception it was raised from)
    is ENOSPC, or the file system has under `margin` bytes free. Libraries report a full disk in their own words
    (torch.save: RuntimeError; numpy under onnx: OSError without errno) and some delete their partial file first,
    so callers pass the size they were about to write as `margin`."""
    seen = exc
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(where).free < margin
    except OSError:
        return False
