"""Adaptive layer matching: candidate bookkeeping, strategies, sampling law, determinism, and the matching log."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from vlsi_edge.config import MatchingConfig
from vlsi_edge.distill.matching import (
    MatchingLog,
    candidate_pairs,
    candidate_range,
    match,
    matching_generator,
    temperature,
)

SWITCHES = list(itertools.product([True, False], repeat=3))  # search_range, order_preservation, adaptive_temperature
SIZES = [(7, 20), (4, 9), (1, 1), (3, 3), (2, 5)]


def _cfg(**kw) -> MatchingConfig:
    return MatchingConfig(**kw)


def _band_kl(t_s, t_l, cfg, gen) -> torch.Tensor:
    kl = torch.full((t_s, t_l), math.inf)
    for i, j in candidate_pairs(t_s, t_l, cfg):
        kl[i, j] = torch.rand((), generator=gen) * 3
    return kl


def test_candidate_range_paper_and_tiny():
    on = _cfg()
    # paper: t_s = 7, t_l = 20 -> layer i may go up to 13 + i
    assert candidate_range(0, 7, 20, 0, on) == (0, 13)
    assert candidate_range(6, 7, 20, 19, on) == (19, 19)
    assert candidate_range(3, 7, 20, 5, on) == (5, 16)
    assert candidate_range(0, 4, 9, 0, on) == (0, 5)
    assert candidate_range(3, 4, 9, 6, on) == (6, 8)
    no_search = _cfg(search_range=False)
    assert candidate_range(0, 7, 20, 0, no_search) == (0, 19)
    assert candidate_range(2, 4, 9, 9, no_search) == (8, 8)  # start past the end: repeat the last layer
    no_order = _cfg(order_preservation=False)
    assert candidate_range(3, 7, 20, 10, no_order) == (0, 16)
    assert candidate_range(1, 4, 9, 4, no_order) == (0, 6)
    assert candidate_range(1, 4, 9, 4, _cfg(search_range=False, order_preservation=False)) == (0, 8)
    with pytest.raises(AssertionError, match="at least as many teacher"):
        candidate_range(0, 5, 4, 0, on)


def test_candidate_pairs_bands():
    def band(t_s, t_l, cfg):
        return {(i, j) for i, j in candidate_pairs(t_s, t_l, cfg)}

    for t_s, t_l in [(7, 20), (4, 9)]:
        assert band(t_s, t_l, _cfg()) == {(i, j) for i in range(t_s) for j in range(i, t_l - t_s + i + 1)}
        assert band(t_s, t_l, _cfg(order_preservation=False)) == {
            (i, j) for i in range(t_s) for j in range(t_l - t_s + i + 1)}
        assert band(t_s, t_l, _cfg(search_range=False)) == {(i, j) for i in range(t_s) for j in range(i, t_l)}
        assert band(t_s, t_l, _cfg(search_range=False, order_preservation=False)) == {
            (i, j) for i in range(t_s) for j in range(t_l)}
    assert len(candidate_pairs(7, 20, _cfg())) == 7 * 14


@pytest.mark.parametrize("strategy", ["multinomial", "random", "uniform", "bottom-k"])
def test_fuzz_ranges_inside_band(strategy):
    g = torch.Generator().manual_seed(0)
    for (search, order, adaptive), (t_s, t_l), temp in itertools.product(SWITCHES, SIZES, "ab"):
        cfg = _cfg(strategy=strategy, search_range=search, order_preservation=order, adaptive_temperature=adaptive,
                   temperature=temp, bottom_k=2)
        band = set(candidate_pairs(t_s, t_l, cfg))
        for step in range(4):
            kl = _band_kl(t_s, t_l, cfg, g)  # +inf outside the band: match asserts if it ever reads one
            r = match(kl, cfg, matching_generator(1, step), step=step)
            for i, ((lo, hi), j, p) in enumerate(zip(r.ranges, r.teacher_index, r.probs)):
                assert lo <= j <= hi and {(i, x) for x in range(lo, hi + 1)} <= band
                assert len(p) == hi - lo + 1 and abs(sum(p) - 1) < 1e-9 and p[j - lo] > 0
            idx = r.teacher_index
            if order and search:  # strictly increasing, and no range ever had to be clamped
                assert all(a < b for a, b in itertools.pairwise(idx))
                starts = [0] + [j + 1 for j in idx[:-1]]
                assert [lo for lo, _ in r.ranges] == starts
                assert all(lo <= hi for lo, hi in r.ranges)
            elif order:  # without search range the last teacher layer may repeat
                assert all(a <= b for a, b in itertools.pairwise(idx))


def test_reads_inf_outside_band_fails_loudly():
    kl = torch.full((2, 3), math.inf)
    with pytest.raises(AssertionError, match="finite KL"):
        match(kl, _cfg(), matching_generator(0, 0), step=7)


def test_reproducible_and_rank_agreement():
    g = torch.Generator().manual_seed(3)
    cfg = _cfg()
    kl = _band_kl(7, 20, cfg, g)
    a = match(kl, cfg, matching_generator(42, 10))
    torch.manual_seed(123)  # global RNG state must not matter
    b = match(kl.clone(), cfg, matching_generator(42, 10))  # "rank 1" builds its own generator from (seed, step)
    assert a == b
    others = {tuple(match(kl, cfg, matching_generator(42, s)).teacher_index) for s in range(20)}
    assert len(others) > 5
    assert not torch.equal(torch.rand(4, generator=matching_generator(43, 10)),
                           torch.rand(4, generator=matching_generator(42, 10)))


def _naive_softmax(row, t):
    w = [math.exp(-x / t) for x in row]
    return [x / sum(w) for x in w]


@pytest.mark.parametrize("reading", ["a", "b"])
def test_sampling_follows_softmax(reading):
    row = [0.3, 0.9, 1.8, 0.5, 1.2, 0.6]  # spread 1.5: (a) T = 2 / 1.5, (b) T = 1.5 / 2
    t = 2 / (1.5 + 1e-6) if reading == "a" else (1.5 + 1e-6) / 2
    expected = _naive_softmax(row, t)
    cfg = _cfg(temperature=reading)
    kl = torch.full((2, 7), math.inf, dtype=torch.float64)
    kl[0, :6] = torch.tensor(row, dtype=torch.float64)
    kl[1, 1:] = 1.0
    n = 24_000
    gen = matching_generator(5, 0)
    counts = [0] * 6
    for _ in range(n):
        r = match(kl, cfg, gen)
        counts[r.teacher_index[0]] += 1
    assert r.temperatures[0] == pytest.approx(t)
    assert r.probs[0] == pytest.approx(expected, abs=1e-9)
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, expected))
    assert chi2 < 25.74, (chi2, counts)  # chi-square, 5 dof, p = 1e-4
    assert max(abs(c / n - p) for c, p in zip(counts, expected)) < 0.01


def test_temperature_formulas():
    x = torch.tensor([0.5, 2.5, 1.0])
    assert temperature(x, _cfg()) == pytest.approx(2.0 / (2.0 + 1e-6))
    assert temperature(x, _cfg(temperature="b")) == pytest.approx((2.0 + 1e-6) / 2.0)
    assert temperature(x, _cfg(scale=4.0, eps=0.5)) == pytest.approx(4.0 / 2.5)
    assert temperature(x, _cfg(adaptive_temperature=False, fixed_temperature=0.7)) == 0.7
    r = match(torch.tensor([[0.1, 0.4, 9.0]], dtype=torch.float64), _cfg(adaptive_temperature=False, fixed_temperature=0.7),
              matching_generator(0, 0))
    assert r.temperatures == [0.7] and r.probs[0] == pytest.approx(_naive_softmax([0.1, 0.4, 9.0], 0.7))


def test_bottom_k():
    cfg1 = _cfg(strategy="bottom-k")
    kl = torch.tensor([[3.0, 1.0, 1.0, 2.0, 0.5], [9.0, 9.0, 0.2, 0.1, 0.1]])
    r = match(kl, cfg1, matching_generator(0, 0))
    assert r.teacher_index == [1, 3]  # argmin among 0..3 with the tie to the lower index; then argmin among 2..4
    assert r.probs[0] == [0, 1, 0, 0] and math.isnan(r.temperatures[0])
    g = torch.Generator().manual_seed(0)
    no_order = _cfg(strategy="bottom-k", order_preservation=False)
    kl = _band_kl(4, 9, no_order, g)
    assert match(kl, no_order, matching_generator(0, 0)).teacher_index == [
        int(kl[i, : 9 - 4 + i + 1].argmin()) for i in range(4)]
    cfg3 = _cfg(strategy="bottom-k", bottom_k=3)
    row = torch.tensor([[0.4, 0.1, 0.9, 0.2, 0.8, 0.3]])
    seen = {match(row, cfg3, matching_generator(0, s)).teacher_index[0] for s in range(200)}
    assert seen == {1, 3, 5}
    assert match(row, _cfg(strategy="bottom-k", bottom_k=50), matching_generator(0, 0)).probs[0] == [1 / 6] * 6


def test_uniform_mapping():
    inf = torch.full((7, 20), math.inf)
    assert match(inf, _cfg(strategy="uniform"), matching_generator(0, 0)).teacher_index == [2, 5, 8, 10, 13, 16, 19]
    r = match(torch.full((4, 9), math.inf), _cfg(strategy="uniform"), matching_generator(0, 0))
    assert r.teacher_index == [1, 4, 6, 8]  # 2.25, 4.5 (half up), 6.75, 9
    assert r.probs[0] == [0, 1, 0, 0, 0, 0]
    assert match(torch.full((3, 3), math.inf), _cfg(strategy="uniform"), None).teacher_index == [0, 1, 2]


def test_random_ignores_kl():
    cfg = _cfg(strategy="random")
    g = torch.Generator().manual_seed(1)
    a = match(_band_kl(4, 9, cfg, g), cfg, matching_generator(2, 3))
    b = match(torch.full((4, 9), math.inf), cfg, matching_generator(2, 3))
    assert a.teacher_index == b.teacher_index
    n, counts = 12_000, [0] * 6
    gen = matching_generator(0, 0)
    kl = torch.full((1, 6), math.inf)
    for _ in range(n):
        counts[match(kl, cfg, gen).teacher_index[0]] += 1
    assert max(abs(c / n - 1 / 6) for c in counts) < 0.015


def test_matching_log_windows_and_round_trip():
    cfg = _cfg()
    g = torch.Generator().manual_seed(0)
    kl = _band_kl(4, 9, cfg, g)
    results = [match(kl, cfg, matching_generator(0, s)) for s in range(23)]
    log = MatchingLog([2, 4, 6, 8], [1, 3, 5, 7, 9, 11, 13, 15, 17], window=10)
    for s, r in enumerate(results[:13]):
        log.record(s, r)
    d = json.loads(json.dumps(log.to_json()))  # resume from a checkpoint
    resumed = MatchingLog.from_json(d)
    assert resumed.to_json() == log.to_json() == d
    for s, r in enumerate(results[13:], start=13):
        log.record(s, r)
        resumed.record(s, r)
    out = resumed.to_json()
    assert out == log.to_json()
    assert out["student_layers"] == [2, 4, 6, 8] and out["window"] == 10
    assert [(w["start_step"], w["end_step"]) for w in out["windows"]] == [(0, 10), (10, 20), (20, 30)]
    assert [sum(map(sum, w["counts"])) for w in out["windows"]] == [40, 40, 12]
    for i in range(4):
        for j in range(9):
            assert out["total"][i][j] == sum(r.teacher_index[i] == j for r in results)
    assert resumed.counts(10, 20) == out["windows"][1]["counts"]
    bad = dict(d, total=[[0] * 9] * 4)
    with pytest.raises(AssertionError, match="total"):
        MatchingLog.from_json(bad)
