"""Lean imports and safety scans: the device side imports without torch/transformers; no pickle anywhere."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")
        return None
sys.meta_path.insert(0, _Block())
"""


def _run(code: str, blocked=("torch", "transformers")) -> subprocess.CompletedProcess:
    src = _BLOCK.format(blocked=set(blocked)) + code
    return subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=120)


def test_device_side_imports_without_torch_or_transformers():
    code = """
import vlsi_edge, vlsi_edge.runtimes, vlsi_edge.benchmarks, vlsi_edge.results, vlsi_edge.cli
import vlsi_edge.data.conversations, vlsi_edge.data.images, vlsi_edge.data.answers, vlsi_edge.data.scoring
import vlsi_edge.data.shapes, vlsi_edge.data.solver, vlsi_edge.models.chat
print("ok")
"""
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_import_vlsi_edge_pulls_no_backend():
    r = _run("import vlsi_edge, vlsi_edge.cli, sys; "
             "print(sorted(m for m in ('torch','transformers','onnxruntime','executorch','tensorrt','onnx') "
             "if m in sys.modules))", blocked=())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_host_verb_without_host_extra_is_one_line():
    r = _run("import sys; from vlsi_edge.cli import main; sys.exit(main(['inspect', '--list']))")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "host extra" in lines[0] and "Traceback" not in r.stderr


def test_no_pickle_anywhere_in_the_source_tree():
    bad = []
    pat = re.compile(r"\bimport\s+(c?pickle|dill|cloudpickle)\b|\bfrom\s+(c?pickle|dill)\b|pickle\.loads?\(")
    for folder in ("vlsi_edge", "export", "runtimes", "benchmarks", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for n, line in enumerate(text.splitlines(), 1):
                if pat.search(line):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
                if "torch.load(" in line and "weights_only=True" not in line:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: torch.load without weights_only=True")
    assert not bad, "\n".join(bad)
