"""Host-side evaluation: greedy per-item predictions of a PyTorch model, scored by the one answer parser.

    vlsi-edge eval --model builtin:tiny-qwen2vl-student --data builtin:shapes --split test --out preds.json
    vlsi-edge eval ... --scoring choice    # forced choice: the answer-set entry with the highest log-likelihood

Forced choice needs the items' `choices` (builtin:shapes has them); it never fails to parse, so it measures what the
model knows rather than whether it answers in the expected words, and it is what the reproduction's ablation grid
uses.

Writes the versioned results schema (`vlsi_edge.results`), so host predictions of the teacher and the PyTorch
student join with device results in `vlsi-edge report`.
"""
from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

from vlsi_edge.errors import DataError


def evaluate(model: str, data: str, out: Path, split: str = "test", batch_size: int = 16, max_new_tokens: int = 8,
             limit: int | None = None, image_root: str | None = None, skip_bad: bool = False,
             dtype: str = "float32", device: str = "cpu", name: str | None = None, role: str | None = None,
             scoring: str = "generate", log=print) -> dict:
    import torch

    from vlsi_edge.data.collate import Collator
    from vlsi_edge.data.conversations import open_dataset
    from vlsi_edge.data.scoring import summarize
    from vlsi_edge.fileio import write_json_atomic
    from vlsi_edge.models import load_model
    from vlsi_edge.distill.verbalizer import fingerprint
    from vlsi_edge.results import make_results, tokenizer_fingerprint

    if batch_size < 1 or max_new_tokens < 1 or (limit is not None and limit < 1):
        raise DataError("--batch-size, --max-new-tokens and --limit must be >= 1")
    if scoring not in ("generate", "choice"):
        raise DataError(f"--scoring {scoring!r}: expected generate or choice")
    dataset = open_dataset(data, split=split, image_root=image_root, skip_bad=skip_bad)
    dataset.validate()
    if dataset.skipped:
        log(f"skipped {sum(dataset.skipped.values())} bad samples: "
            + ", ".join(f"{k} x{v}" for k, v in sorted(dataset.skipped.items())), file=sys.stderr)
    samples = list(itertools.islice(iter(dataset), limit))
    if not samples:
        raise DataError(f"{data} split {split!r} has no samples to evaluate")
    if scoring == "choice" and not all(s.meta.get("choices") for s in samples):
        raise DataError(f"{data} split {split!r} has items without a `choices` list, which --scoring choice needs",
                        "use --scoring generate, or add choices to the items")
    adapter = load_model(model, dtype=dtype, device=device)
    collate = Collator(adapter, mode="train" if scoring == "choice" else "generate")
    tok = adapter.tokenizer
    items, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            if scoring == "choice":
                items += _forced_choice(adapter, collate, chunk, device)
                continue
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            gen = adapter.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
            new = gen[:, batch["input_ids"].shape[1]:]
            for sample, ids in zip(chunk, new.tolist()):
                raw = tok.decode(ids, skip_special_tokens=True).strip()
                items.append(_item(sample, raw, sample.meta.get("choices")))
            if 10 * len(items) // len(samples) > 10 * (len(items) - len(chunk)) // len(samples):
                log(f"eval {len(items)}/{len(samples)}", file=sys.stderr)  # every tenth of the way
    seconds = time.perf_counter() - t0
    metrics = summarize(items)
    name = name or Path(str(model)).name.removeprefix("builtin:")
    system = {"name": name, "role": role or ("teacher" if "teacher" in name else "student"),
              "model": adapter.source, "family": adapter.family, "backend": "torch", "precision": dtype,
              "device": device, "scoring": scoring, "weights_fingerprint": fingerprint(adapter.model),
              "tokenizer_fingerprint": tokenizer_fingerprint(tok.backend_tokenizer.to_str())}
    doc = make_results("eval", system, {"spec": data, "split": split}, items, metrics,
                       timing={"seconds": seconds, "items_per_s": len(items) / max(seconds, 1e-9)},
                       skipped=dict(dataset.skipped))
    write_json_atomic(out, doc)
    ov = metrics["overall"]
    log(f"accuracy {ov['acc']:.3f} [{ov['lo']:.3f}, {ov['hi']:.3f}] on {ov['n']} items; parse failures "
        f"{ov['parse_failure_rate']:.3f}; wrote {out}")
    for cat, m in sorted(metrics.get("per_category", {}).items()):
        log(f"  {cat:<12s} {m['acc']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]  n={m['n']}")
    return doc


def _item(sample, raw: str, choices) -> dict:
    """One scored prediction, as the results schema stores it."""
    from vlsi_edge.data.answers import score

    parsed, correct = score(raw, sample.answer, choices)
    return {"id": sample.id, "category": sample.category, "cluster": sample.cluster, "question": sample.question,
            "gold": sample.answer, "raw": raw, "parsed": parsed, "correct": bool(correct)}


def _forced_choice(adapter, collate, chunk: list, device: str) -> list[dict]:
    """Score each item's answer set by the summed log-probability of the whole answer (its tokens and the end of
    the turn) after the prompt, with `collate` a train-mode Collator; the most likely entry is the prediction."""
    import dataclasses

    import torch

    from vlsi_edge.data.collate import IGNORE
    from vlsi_edge.data.conversations import Turn

    variants = [dataclasses.replace(sample, turns=(*sample.turns[:-1], Turn("assistant", str(choice))))
                for sample in chunk for choice in sample.meta["choices"]]
    batch = {k: v.to(device) for k, v in collate(variants).items()}
    labels = batch.pop("labels")
    logits = adapter.model(**batch).logits[:, :-1].float()
    target = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    totals = (logp * (target != IGNORE)).sum(-1).tolist()
    items, pos = [], 0
    for sample in chunk:
        choices = [str(c) for c in sample.meta["choices"]]
        scores = totals[pos:pos + len(choices)]
        pos += len(choices)
        pick = choices[max(range(len(choices)), key=scores.__getitem__)]
        items.append({**_item(sample, pick, choices), "choice_logp": [round(x, 4) for x in scores]})
    return items
