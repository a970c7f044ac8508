"""Batches for training and generation (host side: torch + the family's processor).

Each conversation is rendered with the family's `ChatFormat` into segments; the first segment (system + first user
turn, holding the image placeholder) goes through the HF processor, which expands the image tokens and makes the
pixel tensors in the family's layout; later segments are tokenized on their own. Labels are -100 everywhere but
assistant text and its end-of-turn token, so losses see response tokens only.

    collate = Collator(adapter, mode="train")
    batch = collate(samples)     # input_ids, attention_mask, labels, pixel tensors ...
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from vlsi_edge.data.conversations import Sample
from vlsi_edge.data.images import load_image
from vlsi_edge.models.chat import CHAT_FORMATS

IGNORE = -100
_NOT_PER_TOKEN = {"input_ids", "attention_mask", "labels"}


class Collator:
    """Turns `Sample`s into model inputs; `mode="generate"` stops at the last user turn and pads on the left."""

    def __init__(self, adapter, mode: Literal["train", "generate"] = "train", max_length: int | None = None):
        self.processor = adapter.processor
        self.tokenizer = adapter.processor.tokenizer
        self.format = CHAT_FORMATS[adapter.family]
        self.image_size = adapter.image_size
        self.mode = mode
        self.max_length = max_length
        self.pad_id = self.tokenizer.pad_token_id
        self.truncated = 0

    def _segments(self, sample: Sample) -> list[tuple[str, bool]]:
        turns = [(t.role, t.text) for t in sample.turns]
        if self.mode == "generate":
            last_user = max(i for i, (r, _) in enumerate(turns) if r == "user")
            return self.format.segments(turns[: last_user + 1], sample.image is not None, add_generation_prompt=True)
        return self.format.segments(turns, sample.image is not None)

    def __call__(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        rendered = [self._segments(s) for s in samples]
        heads = [segs[0][0] for segs in rendered]
        kwargs = dict(text=heads, return_tensors="pt", padding=True)
        if any(s.image is not None for s in samples):  # nested per sample: some processors read a flat list as
            kwargs["images"] = [[_square(load_image(s.image), self.image_size)] if s.image is not None else []
                                for s in samples]   # "all images belong to the first prompt"
        head = dict(self.processor(**kwargs))
        head_ids, head_mask = head.pop("input_ids"), head.pop("attention_mask")
        per_token = {k: head.pop(k) for k in list(head)
                     if torch.is_tensor(head[k]) and head[k].dim() == 2 and head[k].shape == head_ids.shape}

        rows: list[dict[str, list[int]]] = []
        for i, segs in enumerate(rendered):
            keep = head_mask[i].bool()
            ids = head_ids[i][keep].tolist()
            prompt_len = len(ids)
            row = {"input_ids": list(ids), "labels": [IGNORE] * len(ids) if not segs[0][1] else list(ids)}
            for k, v in per_token.items():
                row[k] = v[i][keep].tolist()
            for text, trainable in segs[1:]:
                more = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                row["input_ids"] += more
                row["labels"] += more if trainable else [IGNORE] * len(more)
                for k in per_token:
                    row[k] += [0] * len(more)
            if self.max_length and len(row["input_ids"]) > self.max_length:
                self.truncated += 1  # cut responses, never the prompt (it holds the image tokens)
                keep = max(self.max_length, prompt_len)
                row = {k: v[:keep] for k, v in row.items()}
            rows.append(row)

        width = max(len(r["input_ids"]) for r in rows)
        left = self.mode == "generate"
        out: dict[str, torch.Tensor] = {}
        for key, fill in [("input_ids", self.pad_id), ("labels", IGNORE)] + [(k, 0) for k in per_token]:
            out[key] = torch.tensor([_pad(r[key], width, fill, left) for r in rows], dtype=torch.long)
        out["attention_mask"] = torch.tensor(
            [_pad([1] * len(r["input_ids"]), width, 0, left) for r in rows], dtype=torch.long)
        if self.mode == "generate":
            out.pop("labels")
        out.update(head)
        return out


def _pad(values: list[int], width: int, fill: int, left: bool) -> list[int]:
    pad = [fill] * (width - len(values))
    return pad + values if left else values + pad


def _square(image, size: int):
    from vlsi_edge.models.common import square_image

    return square_image(image, size)
