"""Adaptive layer matching for the interaction stage: pick one teacher target layer per student target layer.

VLsI, https://arxiv.org/abs/2412.01822 §3.2 and Algorithm 1, with METHOD.md's corrected bookkeeping: the sampled
index is relative to the candidate range, so the next range starts at `start + j_rel + 1` (the paper's pseudocode
forgets to add the range start). The trainer computes, without grad, the mean per-token KL(teacher j || student i)
for every pair in `candidate_pairs` (+inf elsewhere), calls `match`, then recomputes only the chosen pairs with grad.

    gen = matching_generator(cfg.train.seed, step)        # same on every rank and after a resume; nothing to save
    result = match(kl, cfg.matching, gen, step=step)      # kl: (t_s, t_l), already all-reduced over ranks
    log.record(step, result)                              # MatchingLog -> matching.json (the paper's Fig. 5)

Distributed runs: `kl` must be identical on every rank, i.e. the caller all-reduces the per-pair KL sums and token
counts before dividing; with that and the shared (seed, step) generator, N processes sample exactly the matching
one process would on the same global micro-batch, with no broadcast.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from vlsi_edge.config import MatchingConfig

STRATEGIES = ("multinomial", "random", "uniform", "bottom-k")


@dataclass
class MatchResult:
    teacher_index: list[int]            # absolute index into the teacher's target-layer list, per student layer
    probs: list[list[float]]            # distribution over the candidates [lo, hi] that was used (for logging)
    ranges: list[tuple[int, int]]       # inclusive candidate range per student layer
    temperatures: list[float]           # T per student layer; nan for strategies that use no temperature


def _check_sizes(t_s: int, t_l: int) -> None:
    assert t_s >= 1 and t_l >= t_s, (
        f"layer matching needs at least as many teacher target layers as student target layers (and at least one); "
        f"got t_s={t_s} student, t_l={t_l} teacher")


def candidate_range(i: int, t_s: int, t_l: int, start: int, cfg: MatchingConfig) -> tuple[int, int]:
    """Inclusive [lo, hi] of teacher target-layer indices student layer `i` may match, given the range `start`."""
    _check_sizes(t_s, t_l)
    assert 0 <= i < t_s, f"student layer index {i} outside 0..{t_s - 1}"
    hi = t_l - t_s + i if cfg.search_range else t_l - 1  # search range: leave one teacher layer per later student
    lo = start if cfg.order_preservation else 0
    return min(lo, hi), hi  # lo > hi only without search range: the student layer repeats the last teacher layer


def candidate_pairs(t_s: int, t_l: int, cfg: MatchingConfig) -> list[tuple[int, int]]:
    """Every (i, j) that is a candidate for some start `match` can reach: the band of `kl` the trainer must fill.

    With order preservation every step advances `start` by at least one, so student layer i sees start >= i; the
    union of its ranges is then [i, hi]. Without it the range is always [0, hi].
    """
    _check_sizes(t_s, t_l)
    pairs = []
    for i in range(t_s):
        lo, hi = candidate_range(i, t_s, t_l, i if cfg.order_preservation else 0, cfg)
        pairs += [(i, j) for j in range(lo, hi + 1)]
    return pairs


def temperature(kl_candidates: torch.Tensor, cfg: MatchingConfig) -> float:
    """Softmax temperature from the candidates' KL spread: (a) scale / (max - min + eps), (b) its reading upside
    down, (max - min + eps) / scale; `fixed_temperature` when adaptive temperature is off."""
    if not cfg.adaptive_temperature:
        return float(cfg.fixed_temperature)
    spread = float(kl_candidates.max() - kl_candidates.min()) + cfg.eps
    if cfg.temperature == "a":
        return cfg.scale / spread
    if cfg.temperature == "b":
        return spread / cfg.scale
    raise ValueError(f"matching.temperature = {cfg.temperature!r}: expected 'a' or 'b'")


def matching_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator derived from (seed, step) only: identical on every rank and after a resume, nothing to
    checkpoint. With grad accumulation, make one per optimizer step and use it for that step's micro-batches in
    order (or pass a per-micro-batch counter as `step`)."""
    digest = hashlib.blake2b(f"vlsi-matching:{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


def _uniform_index(i: int, t_s: int, t_l: int) -> int:
    return (2 * (i + 1) * t_l + t_s) // (2 * t_s) - 1  # round((i + 1) * t_l / t_s) - 1, halves rounded up


def match(kl: torch.Tensor, cfg: MatchingConfig, generator: torch.Generator, step: int | None = None) -> MatchResult:
    """Walk student layers i = 0..t_s-1, pick a teacher layer for each from its candidate range by `cfg.strategy`.

    kl: (t_s, t_l) mean per-token KL(teacher j || student i), identical on every rank (all-reduced by the caller);
    only the entries in `candidate_pairs` are read, and "random"/"uniform" read none (only the shape).
    generator: CPU generator, e.g. `matching_generator(seed, step)`. `step` only labels error messages.
    """
    # https://arxiv.org/abs/2412.01822 §3.2, Algorithm 1 (with the range start added back, METHOD.md Step 2)
    assert kl.dim() == 2, f"kl must be (t_s, t_l); got shape {tuple(kl.shape)}"
    t_s, t_l = kl.shape
    _check_sizes(t_s, t_l)
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"matching.strategy = {cfg.strategy!r}: expected one of {list(STRATEGIES)}")
    kl = kl.detach().to("cpu", torch.float64)
    at = "" if step is None else f" at step {step}"
    result = MatchResult([], [], [], [])
    start = 0
    for i in range(t_s):
        lo, hi = candidate_range(i, t_s, t_l, start, cfg)
        n = hi - lo + 1
        row = kl[i, lo:hi + 1]  # (n,)
        t = math.nan
        if cfg.strategy in ("multinomial", "bottom-k"):
            assert torch.isfinite(row).all(), (
                f"kl[{i}, {lo}:{hi + 1}] = {row.tolist()}{at}: every pair from candidate_pairs must hold a finite KL")
        if cfg.strategy == "multinomial":
            t = temperature(row, cfg)
            p = torch.softmax(-row / t, dim=0)
            j_rel = int(torch.multinomial(p, 1, generator=generator))
            probs = p.tolist()
        elif cfg.strategy == "random":
            j_rel = int(torch.randint(n, (1,), generator=generator))
            probs = [1.0 / n] * n
        elif cfg.strategy == "uniform":
            j_rel = min(max(_uniform_index(i, t_s, t_l), lo), hi) - lo
            probs = [float(j == j_rel) for j in range(n)]
        else:  # bottom-k: uniform among the k smallest KLs, ties to the lower index
            k = min(cfg.bottom_k, n)
            smallest = torch.sort(row, stable=True).indices[:k].tolist()
            j_rel = smallest[int(torch.randint(k, (1,), generator=generator))] if k > 1 else smallest[0]
            probs = [1.0 / k if j in smallest else 0.0 for j in range(n)]
        j_abs = lo + j_rel
        result.teacher_index.append(j_abs)
        result.probs.append(probs)
        result.ranges.append((lo, hi))
        result.temperatures.append(t)
        if cfg.order_preservation:
            start = j_abs + 1
    return result


class MatchingLog:
    """Match counts per student layer (rows) and teacher layer (columns) for each window of `window` optimizer
    steps: window w holds steps [w * window, (w + 1) * window). Written to matching.json; the heatmap of the
    paper's Fig. 5 is `counts(start_step, end_step)` for any stretch of training."""

    def __init__(self, student_layers: list[int], teacher_layers: list[int], window: int):
        assert window > 0, f"matching window must be > 0 steps; got {window}"
        _check_sizes(len(student_layers), len(teacher_layers))
        self.student_layers = list(student_layers)
        self.teacher_layers = list(teacher_layers)
        self.window = window
        self.windows: dict[int, list[list[int]]] = {}  # window index -> (t_s, t_l) counts

    def _zeros(self) -> list[list[int]]:
        return [[0] * len(self.teacher_layers) for _ in self.student_layers]

    def record(self, step: int, result: MatchResult) -> None:
        assert step >= 0, f"step {step} must be >= 0"
        assert len(result.teacher_index) == len(self.student_layers), (
            f"matching has {len(result.teacher_index)} student layers; the log has {len(self.student_layers)}")
        counts = self.windows.setdefault(step // self.window, self._zeros())
        for i, j in enumerate(result.teacher_index):
            assert 0 <= j < len(self.teacher_layers), f"teacher index {j} outside 0..{len(self.teacher_layers) - 1}"
            counts[i][j] += 1

    def counts(self, start_step: int = 0, end_step: int | None = None) -> list[list[int]]:
        """Summed counts of the windows that start in [start_step, end_step)."""
        total = self._zeros()
        for w, c in self.windows.items():
            if w * self.window >= start_step and (end_step is None or w * self.window < end_step):
                for row, add in zip(total, c):
                    row[:] = [a + b for a, b in zip(row, add)]
        return total

    def to_json(self) -> dict:
        return {"student_layers": list(self.student_layers), "teacher_layers": list(self.teacher_layers),
                "window": self.window,
                "windows": [{"start_step": w * self.window, "end_step": (w + 1) * self.window,
                             "counts": [list(r) for r in self.windows[w]]} for w in sorted(self.windows)],
                "total": self.counts()}

    @classmethod
    def from_json(cls, d: dict) -> MatchingLog:
        log = cls(d["student_layers"], d["teacher_layers"], d["window"])
        for entry in d["windows"]:
            w, rem = divmod(entry["start_step"], log.window)
            assert rem == 0 and entry["end_step"] == entry["start_step"] + log.window, (
                f"matching.json window {entry['start_step']}..{entry['end_step']} does not fit window {log.window}")
            log.windows[w] = [[int(x) for x in r] for r in entry["counts"]]
        assert log.counts() == d["total"], "matching.json: total does not equal the sum of its windows"
        return log
