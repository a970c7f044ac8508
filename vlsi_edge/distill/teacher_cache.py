"""Offline teacher cache: top-k teacher log-probs on every response token, so `interact` runs without the teacher.

    vlsi-edge distill --teacher T --student S --data D --cache-teacher runs/tcache --out runs/vlsi

METHOD.md ("Teacher cache"): every teacher distribution is kept as its top-k entries; the losses add one "rest"
bucket (1 - sum of the k probabilities) on both sides. For every training sample, on its response tokens only, the
cache holds the top-k of each teacher target layer's verbalizer and of the final layer (stored under the key
`final_layer` = the teacher's depth, like `stages.Side`).

Layout of DIR:
    shard-00000.safetensors ...  up to `shard_items` samples each, in sample order:
        ids.<layer>  (T, k) int32     lp.<layer>  (T, k) float32    offsets  (items + 1,) int64, offsets[0] = 0
        metadata: {"format", "version", "ids": JSON list of sample ids, "key": hash of what the shard depends on}
    manifest.json                written last: identity, layers, k, vocab, per-shard items/tokens/bytes/sha256, totals

Log-probs are stored in float32 (8 bytes per entry with the int32 id): fp16 would cost 2^-6 absolute on log-probs
near -16, i.e. ~1.5% relative error on tail probabilities. Shards are written under a temporary name, fsynced and
renamed; a rerun after a kill keeps every shard that opens and holds exactly the expected samples and redoes the
rest. Without a complete manifest the cache is "not ready"; `open_cache` refuses missing shards or wrong totals.

    build_cache(dir, teacher_side, t_layers, samples, Collator(teacher, mode="train"), vocab, top_k=64, chunk=1024,
                shard_items=512, batch_size=8, identity={...})
    cache = open_cache(dir, expect_identity={...}, device="cuda")
    out = cache.lookup([s.id for s in batch_samples], t_layers, final_only=False)   # {"n", "final", "layers"}
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vlsi_edge.distill import losses
from vlsi_edge.errors import UserError
from vlsi_edge.fileio import atomic_path, write_json_atomic

FORMAT = "vlsi-edge/teacher-cache"
VERSION = "1"
MANIFEST = "manifest.json"
ENTRY_BYTES = 4 + 4  # int32 id + float32 log-prob
_OPEN_SHARDS = 32    # memory-mapped shard handles kept open by a TeacherCache
_READ_ERRORS = (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError)


def estimate_bytes(n_tokens: int, n_layers: int, k: int) -> int:
    """Payload bytes of a cache: n_tokens x (n_layers target layers + the final layer) x k x (int32 + float32)."""
    return int(n_tokens) * (int(n_layers) + 1) * int(k) * ENTRY_BYTES


def count_response_tokens(collate, samples) -> int:
    """Response tokens of `samples` by tokenising their trainable text segments only (no images, no model forward).

    Equals the sum of `(labels[b, 1:] != -100).sum()` of the collated batches unless `max_length` truncates."""
    texts = [text for s in samples for text, trainable in collate._segments(s)[1:] if trainable]
    n = 0
    for lo in range(0, len(texts), 1024):
        n += sum(len(ids) for ids in collate.tokenizer(texts[lo:lo + 1024], add_special_tokens=False)["input_ids"])
    return n


def _canon(obj):
    """JSON round trip: tuples become lists, keys strings, so stored and expected identities compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _layout(identity: dict, t_layers: list[int], final_layer: int, vocab: int, k: int) -> dict:
    """Everything the cached numbers depend on: what a manifest (and each shard, as a hash) must agree with."""
    return _canon({"identity": identity, "layers": list(t_layers), "final_layer": int(final_layer),
                   "vocab": int(vocab), "k": int(k), "temperature": 1.0, "logprobs_dtype": "float32"})


def _key(layout: dict) -> str:
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()


def _diff(found: dict, expected: dict, keys=None) -> list[str]:
    keys = sorted(set(found) | set(expected)) if keys is None else sorted(keys)
    return [k for k in keys if found.get(k, "<missing>") != expected.get(k, "<missing>")]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"teacher cache manifest {path} cannot be read ({type(e).__name__})",
                        "delete the cache folder and rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise UserError(f"{path} is not a complete vlsi-edge teacher cache manifest",
                        "use another --cache-teacher DIR or delete it")
    return manifest


# ------------------------------------------------------------------------------------------------ building
def build_cache(out: Path, teacher_side, t_layers: list[int], samples: list, collate, vocab: int, top_k: int,
                chunk: int, shard_items: int, batch_size: int, identity: dict, log=print) -> Path:
    """Write (or finish, or confirm) the top-k cache of `teacher_side` on `samples` in `out`; returns `out`.

    Batches are made in sample order within each shard, so the result is deterministic and a resumed build
    reproduces the shards it redoes. Run it on one process only (rank 0) and have the others wait."""
    out = Path(out)
    assert shard_items > 0 and batch_size > 0, f"shard_items {shard_items}, batch_size {batch_size}: expected > 0"
    final = teacher_side.adapter.num_layers
    layout = _layout(identity, t_layers, final, vocab, top_k)
    manifest = _read_manifest(out)
    if manifest is not None:
        bad = _diff(manifest.get("identity", {}), layout["identity"])
        bad += [f for f in layout if f != "identity" and manifest.get(f) != layout[f]]
        if bad:
            raise UserError(f"teacher cache {out} was built for another setup (differs in: {', '.join(bad)})",
                            "use another --cache-teacher DIR or delete this one")
        try:
            TeacherCache(out, manifest)
            log(f"teacher cache {out} is complete ({manifest['total_items']} samples, "
                f"{manifest['total_tokens']} tokens)")
            return out
        except UserError as e:
            log(f"teacher cache {out} is broken ({e}); redoing what is missing")
            (out / MANIFEST).unlink()

    ids = [str(s.id) for s in samples]
    seen: set[str] = set()
    dup = next((i for i in ids if i in seen or seen.add(i)), None)
    if dup is not None:
        raise UserError(f"sample id {dup!r} occurs twice in the data; the teacher cache is keyed by sample id",
                        "give every sample a unique id")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(".shard-*.tmp"), *out.glob(f".{MANIFEST}.*.tmp")]:  # temporaries of a killed build
        stale.unlink(missing_ok=True)

    n_shards = math.ceil(len(samples) / shard_items)
    n_tokens = count_response_tokens(collate, samples)
    estimate = estimate_bytes(n_tokens, len(t_layers), top_k) + 8 * (len(samples) + n_shards)
    log(f"teacher cache {out}: {len(samples)} samples, {n_tokens} response tokens (counted by tokenising, no model "
        f"forward) x {len(t_layers) + 1} layers x top-{top_k} -> about {_human(estimate)} ({estimate} bytes) "
        f"in {n_shards} shards")

    key = _key(layout)
    layers = [*t_layers, final]
    device = next(teacher_side.parameters()).device
    weight = teacher_side.adapter.lm_head.weight
    entries = []
    for s in range(n_shards):
        part = samples[s * shard_items:(s + 1) * shard_items]
        path = out / _shard_name(s)
        entry = _check_shard(path, key, ids[s * shard_items:(s + 1) * shard_items], layers, top_k)
        if entry is not None:
            log(f"teacher cache: shard {s + 1}/{n_shards} already complete, kept")
        else:
            tensors = _compute_shard(teacher_side, part, collate, layers, weight, vocab, top_k, chunk,
                                     batch_size, device)
            meta = {"format": FORMAT, "version": VERSION, "key": key, "ids": json.dumps([str(x.id) for x in part])}
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
                sha = _sha256(tmp)
            entry = {"name": path.name, "items": len(part), "tokens": int(tensors["offsets"][-1]),
                     "bytes": path.stat().st_size, "sha256": sha}
            log(f"teacher cache: shard {s + 1}/{n_shards} written ({entry['tokens']} tokens)")
        entries.append(entry)

    total_bytes = sum(e["bytes"] for e in entries)
    write_json_atomic(out / MANIFEST, {
        "format": FORMAT, "version": VERSION, **layout, "shards": entries, "total_items": len(samples),
        "total_tokens": sum(e["tokens"] for e in entries), "total_bytes": total_bytes, "complete": True})
    log(f"teacher cache {out} ready: {_human(total_bytes)} written (estimate {_human(estimate)})")
    return out


def _compute_shard(teacher_side, part: list, collate, layers: list[int], weight, vocab: int, k: int, chunk: int,
                   batch_size: int, device) -> dict[str, torch.Tensor]:
    got: dict[int, list[losses.TopK]] = {layer: [] for layer in layers}
    counts: list[torch.Tensor] = []
    with torch.no_grad():
        for lo in range(0, len(part), batch_size):
            batch = collate(part[lo:lo + batch_size])
            labels = batch.pop("labels")
            counts.append((labels[:, 1:] != losses.IGNORE).sum(1))                   # (B,) tokens per sample
            index, _ = losses.response_positions(labels)                              # (N,) row-major
            batch = {n: (v.to(device) if torch.is_tensor(v) else v) for n, v in batch.items()}
            feats = teacher_side(batch, layers, index.to(device), backbone_grad=False)  # {layer: (N, D)}
            for layer in layers:
                got[layer].append(losses.topk_logprobs(feats[layer], weight, vocab, k, chunk))
    per_sample = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), per_sample.cumsum(0)])     # (items + 1,)
    tensors = {"offsets": offsets.to(torch.int64).contiguous()}
    for layer in layers:
        ids = torch.cat([t.ids for t in got[layer]]) if got[layer] else torch.zeros(0, k, dtype=torch.long)
        lp = torch.cat([t.logprobs for t in got[layer]]) if got[layer] else torch.zeros(0, k)
        assert ids.shape[0] == int(offsets[-1]), f"layer {layer}: {ids.shape[0]} rows vs {int(offsets[-1])} tokens"
        tensors[f"ids.{layer}"] = ids.to("cpu", torch.int32).contiguous()    # (T, k)
        tensors[f"lp.{layer}"] = lp.to("cpu", torch.float32).contiguous()    # (T, k)
    return tensors


def _check_shard(path: Path, key: str, ids: list[str], layers: list[int], k: int) -> dict | None:
    """The manifest entry of an existing shard that holds exactly `ids` with well-formed tensors, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("key") != key or json.loads(meta.get("ids", "null")) != ids:
                return None
            offsets = f.get_tensor("offsets")
            rows = int(offsets[-1])
            if offsets.shape != (len(ids) + 1,) or int(offsets[0]) != 0 or bool((offsets.diff() < 0).any()):
                return None
            for layer in layers:
                i, lp = f.get_tensor(f"ids.{layer}"), f.get_tensor(f"lp.{layer}")
                if i.shape != (rows, k) or lp.shape != (rows, k) or i.dtype != torch.int32 \
                        or not bool(torch.isfinite(lp).all()):
                    return None
    except _READ_ERRORS:  # truncated, corrupt or foreign file: redo it
        return None
    return {"name": path.name, "items": len(ids), "tokens": rows, "bytes": path.stat().st_size,
            "sha256": _sha256(path)}


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


# ------------------------------------------------------------------------------------------------ reading
class TeacherCache:
    """A complete cache, memory-mapped shard by shard (safetensors `safe_open`); rows are read per lookup."""

    def __init__(self, folder: Path, manifest: dict, device: str | torch.device = "cpu", verify: bool = False):
        self.folder, self.manifest, self.device = Path(folder), manifest, torch.device(device)
        self.layers, self.final_layer = list(manifest["layers"]), int(manifest["final_layer"])
        self.k, self.vocab, self.temperature = int(manifest["k"]), int(manifest["vocab"]), manifest["temperature"]
        self._index: dict[str, tuple[int, int, int]] = {}   # sample id -> (shard, first row, end row)
        self._handles: OrderedDict[int, object] = OrderedDict()
        where = f"teacher cache {self.folder}"
        hint = "rebuild it (rerun with the teacher; complete shards are kept) or delete the folder"
        items = tokens = 0
        for s, entry in enumerate(manifest["shards"]):
            path = self.folder / entry["name"]
            if not path.is_file():
                raise UserError(f"{where}: shard {entry['name']} listed in the manifest is missing", hint)
            if path.stat().st_size != entry["bytes"] or (verify and _sha256(path) != entry["sha256"]):
                raise UserError(f"{where}: shard {entry['name']} differs from the manifest (size or sha256)", hint)
            try:
                with safe_open(str(path), "pt") as f:
                    ids = json.loads((f.metadata() or {})["ids"])
                    offsets = f.get_tensor("offsets").tolist()
            except _READ_ERRORS as e:
                raise UserError(f"{where}: shard {entry['name']} cannot be read ({type(e).__name__})", hint) from None
            if len(ids) != entry["items"] or len(offsets) != len(ids) + 1 or offsets[-1] != entry["tokens"]:
                raise UserError(f"{where}: shard {entry['name']} holds {len(ids)} samples / {offsets[-1]} tokens, the "
                                f"manifest says {entry['items']} / {entry['tokens']}", hint)
            for j, item in enumerate(ids):
                self._index[item] = (s, offsets[j], offsets[j + 1])
            items, tokens = items + len(ids), tokens + offsets[-1]
        if (items, tokens) != (manifest["total_items"], manifest["total_tokens"]) or len(self._index) != items:
            raise UserError(f"{where}: shards hold {items} samples / {tokens} tokens ({len(self._index)} distinct), "
                            f"the manifest totals are {manifest['total_items']} / {manifest['total_tokens']}", hint)

    def __len__(self) -> int:
        return len(self._index)

    def _shard(self, s: int):
        if s in self._handles:
            self._handles.move_to_end(s)
        else:
            self._handles[s] = safe_open(str(self.folder / self.manifest["shards"][s]["name"]), "pt")
            if len(self._handles) > _OPEN_SHARDS:
                self._handles.popitem(last=False)
        return self._handles[s]

    def lookup(self, item_ids: list[str], t_layers: list[int], final_only: bool) -> dict:
        """Teacher top-k of the samples' response tokens, rows concatenated in `item_ids` order (each sample's tokens
        in order): `{"n", "final": TopK, "layers": [TopK per t_layers]}` ("layers" omitted when final_only)."""
        locs = []
        for item in item_ids:
            loc = self._index.get(str(item))
            if loc is None:
                raise UserError(f"sample {item!r} is not in teacher cache {self.folder} ({len(self)} samples): the "
                                "cache was built for different data", "use another --cache-teacher DIR or delete it")
            locs.append(loc)
        wanted = [] if final_only else list(t_layers)
        missing = [k for k in wanted if k not in self.layers]
        if missing:
            raise UserError(f"teacher cache {self.folder} holds target layers {self.layers}, asked for {missing}",
                            "use the teacher target layers the cache was built with, or rebuild it")
        out = {"n": sum(hi - lo for _, lo, hi in locs), "final": self._rows(locs, self.final_layer)}
        if not final_only:
            out["layers"] = [self._rows(locs, k) for k in wanted]
        return out

    def _rows(self, locs: list[tuple[int, int, int]], layer: int) -> losses.TopK:
        ids, lps = [], []
        for s, lo, hi in locs:
            if hi > lo:
                f = self._shard(s)
                ids.append(f.get_slice(f"ids.{layer}")[lo:hi])
                lps.append(f.get_slice(f"lp.{layer}")[lo:hi])
        if not ids:
            return losses.TopK(torch.zeros(0, self.k, dtype=torch.long, device=self.device),
                               torch.zeros(0, self.k, device=self.device), self.temperature)
        return losses.TopK(torch.cat(ids).to(self.device, torch.int64),       # (N, k)
                           torch.cat(lps).to(self.device, torch.float32),     # (N, k)
                           self.temperature)


def open_cache(folder: str | Path, expect_identity: dict, device: str | torch.device = "cpu",
               verify: bool = False) -> TeacherCache:
    """Open a complete cache whose identity agrees with every field of `expect_identity` (fields the caller cannot
    know yet, e.g. the teacher fingerprint before loading it, may be left out). `verify` also checks each shard's
    sha256 (reads every byte). UserError when not ready, built for something else, or short."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise UserError(f"teacher cache {folder} is not ready (no complete {MANIFEST})",
                        "build it first: run distill with --teacher and --cache-teacher (an interrupted build resumes)")
    stored = manifest.get("identity", {})
    expected = _canon(expect_identity)
    bad = _diff(stored, expected, keys=expected)
    if bad:
        raise UserError(f"teacher cache {folder} was built for another setup (differs in: {', '.join(bad)})",
                        "use another --cache-teacher DIR or delete this one")
    return TeacherCache(folder, manifest, device=device, verify=verify)


def ready(folder: str | Path, expect_identity: dict) -> bool:
    """True when `folder` holds a complete, intact cache; False when there is none or it is unfinished or broken
    (a build will resume it). Raises the UserError of `open_cache` when it was built for another identity."""
    try:
        manifest = _read_manifest(Path(folder))
    except UserError:
        return False
    if manifest is None:
        return False
    bad = _diff(manifest.get("identity", {}), _canon(expect_identity), keys=_canon(expect_identity))
    if bad:
        open_cache(folder, expect_identity)  # raises, naming the fields
    try:
        TeacherCache(Path(folder), manifest)
    except UserError:
        return False
    return True
