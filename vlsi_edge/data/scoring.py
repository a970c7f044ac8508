"""Accuracy statistics for every accuracy figure: confidence intervals, per-category summaries, paired tests.

    python -c "from vlsi_edge.data.scoring import accuracy_ci; print(accuracy_ci([True]*81 + [False]*19))"

- `accuracy_ci`: Wilson score interval when every item is its own cluster; when items share a cluster (several
  questions about one image) the Wilson interval is computed on the effective sample size n / deff, where the
  design effect deff comes from the cluster-robust (ratio-estimator) variance and is never below 1. Deterministic.
- `summarize`: overall and per-category `accuracy_ci` plus the parse-failure rate (`parsed is None`).
- `paired_bootstrap`: difference of two systems' accuracies on the same items with a seeded (cluster) bootstrap CI
  and a two-sided p-value; `mcnemar`: exact binomial test on the discordant pairs (chi-square with continuity
  correction once there are 25 or more).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

EXACT_MCNEMAR_BELOW = 25


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson(k: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (n may be fractional: an effective sample size)."""
    if n <= 0:
        return 0.0, 1.0
    z = _z(level)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    lo = 0.0 if k <= 0 else max(0.0, centre - half)
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return lo, hi


def _cluster_ids(clusters: Sequence | None, n: int) -> np.ndarray | None:
    if clusters is None:
        return None
    if len(clusters) != n:
        raise ValueError(f"clusters has {len(clusters)} entries for {n} items")
    _, ids = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    return ids


def accuracy_ci(correct: Sequence[bool], clusters: Sequence[str] | None = None, level: float = 0.95) -> dict:
    """{acc, lo, hi, n, n_clusters, method}; acc/lo/hi are None for zero items."""
    y = np.asarray(correct, dtype=np.float64).reshape(-1)
    n = int(y.size)
    ids = _cluster_ids(clusters, n)
    if n == 0:
        return {"acc": None, "lo": None, "hi": None, "n": 0, "n_clusters": 0, "method": "none"}
    acc = float(y.mean())
    n_clusters = n if ids is None else int(ids.max()) + 1
    if ids is None or n_clusters == n:
        lo, hi = wilson(acc * n, n, level)
        return {"acc": acc, "lo": lo, "hi": hi, "n": n, "n_clusters": n_clusters, "method": "wilson"}
    sums = np.bincount(ids, weights=y)
    sizes = np.bincount(ids).astype(np.float64)
    if n_clusters > 1:
        var_cluster = n_clusters / (n_clusters - 1) * float(((sums - acc * sizes) ** 2).sum()) / (n * n)
    else:
        var_cluster = 0.25
    var_binomial = acc * (1 - acc) / n
    if var_binomial > 0:
        deff = max(1.0, var_cluster / var_binomial)
        n_eff = n / deff
    else:
        n_eff = float(n_clusters)
    lo, hi = wilson(acc * n_eff, n_eff, level)
    return {"acc": acc, "lo": lo, "hi": hi, "n": n, "n_clusters": n_clusters, "method": "wilson-cluster-deff",
            "n_eff": n_eff}


def summarize(records: Sequence[dict], level: float = 0.95) -> dict:
    """{"overall": {...}, "per_category": {cat: {...}}}: each entry is `accuracy_ci` plus parse failures.

    Records need `correct` and `parsed` (None = parse failure); `category` defaults to "all" and `cluster` to
    the record's position (its own cluster)."""
    records = list(records)

    def block(rows: list[dict]) -> dict:
        correct = [bool(r["correct"]) for r in rows]
        has_clusters = any(r.get("cluster") is not None for r in rows)
        clusters = [str(r["cluster"]) if r.get("cluster") is not None else f"#item{r['_i']}" for r in rows]
        out = accuracy_ci(correct, clusters if has_clusters else None, level)
        failures = sum(r.get("parsed") is None for r in rows)
        out["n_parse_failures"] = failures
        out["parse_failure_rate"] = failures / len(rows) if rows else None
        return out

    indexed = [{**r, "_i": i} for i, r in enumerate(records)]
    by_category: dict[str, list[dict]] = {}
    for r in indexed:
        by_category.setdefault(str(r.get("category", "all")), []).append(r)
    return {"overall": block(indexed), "per_category": {c: block(rows) for c, rows in sorted(by_category.items())}}


def paired_bootstrap(a: Sequence[bool], b: Sequence[bool], clusters: Sequence[str] | None = None,
                     n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """acc(a) - acc(b) on the same items, with a percentile bootstrap CI (resampling clusters when given) and a
    two-sided p-value from the bootstrap distribution re-centred on zero."""
    ya = np.asarray(a, dtype=np.float64).reshape(-1)
    yb = np.asarray(b, dtype=np.float64).reshape(-1)
    if ya.size != yb.size:
        raise ValueError(f"paired samples differ in length: {ya.size} vs {yb.size}")
    n = int(ya.size)
    if n == 0:
        return {"diff": None, "lo": None, "hi": None, "p": None, "n": 0, "n_clusters": 0, "n_boot": n_boot,
                "acc_a": None, "acc_b": None, "method": "none"}
    ids = _cluster_ids(clusters, n)
    if ids is None:
        ids = np.arange(n)
    g = int(ids.max()) + 1
    sa, sb = np.bincount(ids, weights=ya, minlength=g), np.bincount(ids, weights=yb, minlength=g)
    sizes = np.bincount(ids, minlength=g).astype(np.float64)
    diff = float(ya.mean() - yb.mean())
    rng = np.random.Generator(np.random.PCG64(seed))
    diffs = np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // max(g, 1)))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        weights = rng.multinomial(g, np.full(g, 1.0 / g), size=m).astype(np.float64)
        totals = weights @ sizes
        diffs[start:start + m] = (weights @ (sa - sb)) / np.maximum(totals, 1.0)
    alpha = 1 - level
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    extreme = int(np.sum(np.abs(diffs - diff) >= abs(diff) - 1e-12))
    p = min(1.0, (1 + extreme) / (1 + n_boot)) if diff != 0 else 1.0
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "p": p, "n": n, "n_clusters": g, "n_boot": n_boot,
            "acc_a": float(ya.mean()), "acc_b": float(yb.mean()),
            "method": "paired-cluster-bootstrap" if g < n else "paired-bootstrap"}


def _binom_cdf(k: int, n: int) -> float:
    return sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """McNemar's test on paired correctness: b01 = a wrong & b right, b10 = a right & b wrong."""
    ya, yb = np.asarray(a, dtype=bool).reshape(-1), np.asarray(b, dtype=bool).reshape(-1)
    if ya.size != yb.size:
        raise ValueError(f"paired samples differ in length: {ya.size} vs {yb.size}")
    b01, b10 = int(np.sum(~ya & yb)), int(np.sum(ya & ~yb))
    discordant = b01 + b10
    if discordant == 0:
        return {"b01": 0, "b10": 0, "n": int(ya.size), "statistic": 0.0, "p": 1.0, "method": "exact"}
    if discordant < EXACT_MCNEMAR_BELOW:
        k = min(b01, b10)
        p = min(1.0, 2 * _binom_cdf(k, discordant))
        return {"b01": b01, "b10": b10, "n": int(ya.size), "statistic": float(k), "p": p, "method": "exact"}
    stat = (abs(b01 - b10) - 1) ** 2 / discordant
    p = math.erfc(math.sqrt(stat / 2))
    return {"b01": b01, "b10": b10, "n": int(ya.size), "statistic": float(stat), "p": p,
            "method": "chi2-continuity"}
