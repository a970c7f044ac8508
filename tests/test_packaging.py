"""`slow` tier: the wheel carries the design-card layout inside the vlsi_edge namespace and imports from it."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_maps_rooms_into_namespace(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("vlsi_edge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for must in ("vlsi_edge/export/__init__.py", "vlsi_edge/runtimes/__init__.py",
                 "vlsi_edge/benchmarks/__init__.py", "vlsi_edge/assets/corpus.txt", "vlsi_edge/models/qwen2vl.py",
                 "vlsi_edge/data/shapes.py"):
        assert must in names, must
    assert not [n for n in names if n.split("/")[0] in ("export", "runtimes", "benchmarks", "tests")]
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    code = ("import vlsi_edge, vlsi_edge.runtimes, vlsi_edge.export, vlsi_edge.benchmarks;"
            "from vlsi_edge.models.tokenizer import base_tokenizer; print(vlsi_edge.__file__,"
            " base_tokenizer().get_vocab_size())")
    r = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); "
                        + "sys.path[:] = [p for p in sys.path if 'work/main' not in p or 'site-packages' in p];"
                        + code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert str(target) in r.stdout
