"""The one versioned results schema every producer writes (`eval` on the host, `bench` on a device).

A results document: what produced it, on which data, the per-item predictions, and the summary metrics. `report`
joins documents by item id. Torch-free: it runs on a Jetson.

    {"schema": "vlsi-edge/results", "schema_version": 1, "producer": "eval", "system": {...},
     "data": {"spec", "split", "n", "ids_sha256"}, "metrics": {...}, "items": [{"id", "category", ...}], ...}
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

from vlsi_edge.errors import UserError

SCHEMA = "vlsi-edge/results"
SCHEMA_VERSION = 1
ITEM_KEYS = ("id", "category", "cluster", "question", "gold", "raw", "parsed", "correct")


def ids_fingerprint(ids) -> str:
    return hashlib.sha256("\n".join(sorted(map(str, ids))).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer_json: str) -> str:
    """A hash of a tokenizer's vocabulary and merges (its `model` section), the same whether the file was saved
    pretty or compact: two systems whose answers are compared must read the same token ids."""
    return hashlib.sha256(json.dumps(json.loads(tokenizer_json)["model"], sort_keys=True).encode()).hexdigest()


def library_versions(names=("numpy", "PIL", "tokenizers", "torch", "transformers", "onnxruntime", "executorch")):
    from importlib import metadata

    dist = {"PIL": "pillow"}
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = metadata.version(dist.get(name, name))
        except metadata.PackageNotFoundError:
            pass
    return out


def make_results(producer: str, system: dict, data: dict, items: list[dict], metrics: dict, **extra) -> dict:
    missing = [k for k in ITEM_KEYS if items and k not in items[0]]
    assert not missing, f"result items lack {missing}"
    doc = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "producer": producer,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "system": system, "data": {**data, "n": len(items), "ids_sha256": ids_fingerprint(i["id"] for i in items)},
        "host": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "versions": library_versions(), "metrics": metrics, "items": items,
    }
    doc.update(extra)
    return doc


def read_results(path: Path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"results file {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a results JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a vlsi-edge results document (schema {SCHEMA!r} expected)")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path} has results schema version {doc.get('schema_version')}; this vlsi-edge reads "
                        f"version {SCHEMA_VERSION}", "regenerate it with this version of vlsi-edge")
    return doc
