"""Position schemes, computed on the device in numpy from the prompt ids (the bundle names the scheme).

- `linear`: position = index in the sequence (every family but Qwen2-VL/Qwen2.5-VL).
- `mrope`: Qwen2-VL's 3-D rotary positions. Text tokens advance all three axes together; the image's tokens take
  (t, row, col) offsets on its merged grid from the position where the image starts, and the text after it resumes
  at one past the largest position used. Decode steps continue from there (`next_positions`).

Arrays follow the text decoder's `position_ids` input: `[1, S]` (linear) or `[3, 1, S]` (mrope), int64.
"""
from __future__ import annotations

import numpy as np


def prompt_positions(ids: np.ndarray, scheme: dict) -> tuple[np.ndarray, int]:
    """Positions of a prompt `ids` ([S]) and the position the first generated token takes."""
    n = len(ids)
    if scheme["kind"] == "linear":
        return np.arange(n, dtype=np.int64)[None, :], n
    if scheme["kind"] != "mrope":
        raise ValueError(f"unknown position scheme {scheme['kind']!r}")
    rows, cols = scheme["grid"]
    is_image = ids == scheme["image_token_id"]
    pos = np.zeros((3, n), dtype=np.int64)
    i, nxt = 0, 0
    while i < n:
        if is_image[i]:
            k = rows * cols
            if not is_image[i:i + k].all():
                raise ValueError(f"expected {k} consecutive image tokens at {i}")
            r, c = np.divmod(np.arange(k), cols)
            pos[0, i:i + k] = nxt
            pos[1, i:i + k] = nxt + r
            pos[2, i:i + k] = nxt + c
            nxt = int(pos[:, i:i + k].max()) + 1
            i += k
        else:
            pos[:, i] = nxt
            nxt += 1
            i += 1
    return pos[:, None, :], nxt


def step_positions(start: int, count: int, scheme: dict) -> np.ndarray:
    """Positions of `count` text tokens starting at position `start`."""
    p = np.arange(start, start + count, dtype=np.int64)[None, :]
    return p if scheme["kind"] == "linear" else np.repeat(p[None], 3, axis=0)
