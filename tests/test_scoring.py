"""Accuracy statistics: Wilson, clustered CIs, summaries, paired bootstrap, McNemar."""
from __future__ import annotations

import math

import pytest

from vlsi_edge.data.scoring import accuracy_ci, mcnemar, paired_bootstrap, summarize, wilson


def test_wilson_known_values():
    ci = accuracy_ci([True] * 81 + [False] * 19)
    assert ci["method"] == "wilson" and ci["n"] == 100 and ci["n_clusters"] == 100 and ci["acc"] == 0.81
    assert ci["lo"] == pytest.approx(0.7222, abs=1e-4) and ci["hi"] == pytest.approx(0.8749, abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo99, hi99 = wilson(81, 100, level=0.99)
    assert lo99 < ci["lo"] and hi99 > ci["hi"]
    assert accuracy_ci([])["acc"] is None


def test_singleton_clusters_are_plain_wilson():
    correct = [i % 3 == 0 for i in range(60)]
    assert accuracy_ci(correct, [f"c{i}" for i in range(60)]) == accuracy_ci(correct)


def test_correlated_clusters_widen_the_interval():
    correct, clusters = [], []
    for g in range(20):
        correct += [g % 2 == 0] * 10
        clusters += [f"img{g}"] * 10
    plain, clustered = accuracy_ci(correct), accuracy_ci(correct, clusters)
    assert clustered["acc"] == plain["acc"] == 0.5 and clustered["n_clusters"] == 20
    assert clustered["method"] == "wilson-cluster-deff"
    assert clustered["hi"] - clustered["lo"] > 2.5 * (plain["hi"] - plain["lo"])
    assert clustered["n_eff"] == pytest.approx(20 * 19 / 20 * 10 / 10, rel=0.1)
    assert accuracy_ci(correct, clusters) == clustered
    independent = [(i * 7) % 3 == 0 for i in range(200)]
    mixed = accuracy_ci(independent, clusters)
    assert mixed["hi"] - mixed["lo"] >= accuracy_ci(independent)["hi"] - accuracy_ci(independent)["lo"] - 1e-12


def test_all_correct_clusters_fall_back_to_cluster_count():
    ci = accuracy_ci([True] * 40, [f"g{i // 10}" for i in range(40)])
    assert ci["acc"] == 1.0 and ci["hi"] == 1.0 and ci["lo"] == pytest.approx(wilson(4, 4)[0])


def test_summarize():
    records = [
        {"category": "colour", "correct": True, "parsed": "red", "cluster": "a"},
        {"category": "colour", "correct": False, "parsed": None, "cluster": "b"},
        {"category": "count", "correct": True, "parsed": "3", "cluster": "c"},
        {"category": "count", "correct": False, "parsed": "4", "cluster": "d"},
    ]
    out = summarize(records)
    assert out["overall"]["acc"] == 0.5 and out["overall"]["n"] == 4 and out["overall"]["parse_failure_rate"] == 0.25
    assert set(out["per_category"]) == {"colour", "count"}
    assert out["per_category"]["colour"]["parse_failure_rate"] == 0.5
    assert out["per_category"]["count"]["n_parse_failures"] == 0
    assert summarize([{"correct": True, "parsed": "x"}])["per_category"]["all"]["acc"] == 1.0


def test_paired_bootstrap_known_example():
    a = [True] * 20
    b = [True] * 10 + [False] * 10
    out = paired_bootstrap(a, b, n_boot=4000, seed=1)
    assert out["diff"] == 0.5 and out["acc_a"] == 1.0 and out["acc_b"] == 0.5
    assert 0.25 < out["lo"] < 0.5 < out["hi"] <= 0.75 and out["p"] < 0.01
    assert out == paired_bootstrap(a, b, n_boot=4000, seed=1)
    same = paired_bootstrap(a, a, n_boot=500)
    assert same["diff"] == 0.0 and same["p"] == 1.0 and same["lo"] == same["hi"] == 0.0


def test_paired_bootstrap_clusters_widen():
    a = [True] * 30 + [False] * 30
    b = [False] * 15 + [True] * 45
    clusters = [f"g{i // 15}" for i in range(60)]
    plain = paired_bootstrap(a, b, n_boot=3000)
    clustered = paired_bootstrap(a, b, clusters, n_boot=3000)
    assert clustered["n_clusters"] == 4 and clustered["method"] == "paired-cluster-bootstrap"
    assert clustered["hi"] - clustered["lo"] > plain["hi"] - plain["lo"]
    with pytest.raises(ValueError):
        paired_bootstrap([True], [True, False])


def test_mcnemar_exact_and_chi_square():
    a = [False] * 2 + [True] * 8 + [True] * 5
    b = [True] * 2 + [False] * 8 + [True] * 5
    out = mcnemar(a, b)
    assert (out["b01"], out["b10"], out["n"], out["method"]) == (2, 8, 15, "exact")
    assert out["p"] == pytest.approx(2 * (1 + 10 + 45) / 1024)
    a = [False] * 10 + [True] * 30
    b = [True] * 10 + [False] * 30
    out = mcnemar(a, b)
    assert out["method"] == "chi2-continuity" and out["statistic"] == pytest.approx(19 ** 2 / 40)
    assert out["p"] == pytest.approx(math.erfc(math.sqrt(9.025 / 2))) and out["p"] == pytest.approx(0.00266, abs=1e-4)
    assert mcnemar([True, False], [True, False])["p"] == 1.0
