"""Our metrics against scikit-learn and SciPy on random and edge-case data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp
from sklearn import metrics as skm

from tasks.metrics import binary_metrics, group_metrics, pool_site_summaries, site_summary

RNG = np.random.default_rng(42)
Y = (RNG.random(2_000) < 0.3).astype(int)
S = np.clip(0.3 * Y + RNG.normal(0.4, 0.25, size=Y.size), 0, 1)


def test_binary_metrics_match_sklearn() -> None:
    m = binary_metrics(Y, S, loss=0.5)
    pred = (S >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(Y, S))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(Y, S))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(Y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(Y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(Y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(Y, pred, pos_label=0))
    assert m["num_examples"] == Y.size


def test_ks_matches_scipy_two_sample_statistic() -> None:
    m = binary_metrics(Y, S, loss=0.0)
    assert m["ks"] == pytest.approx(ks_2samp(S[Y == 1], S[Y == 0]).statistic)


def test_single_class_gives_nan_not_a_made_up_auc() -> None:
    m = binary_metrics(np.ones(10, dtype=int), np.linspace(0, 1, 10), loss=0.1)
    assert math.isnan(m["auc"]) and math.isnan(m["ks"])
    assert m["accuracy"] == pytest.approx(0.5)


def test_group_metrics_per_hospital_and_mean() -> None:
    groups = RNG.integers(0, 3, size=Y.size)
    m = group_metrics(Y, S, groups, ("a", "b", "c"))
    accs = [skm.accuracy_score(Y[groups == g], S[groups == g] >= 0.5) for g in range(3)]
    assert m["accuracy_b"] == pytest.approx(accs[1])
    assert m["accuracy_site_mean"] == pytest.approx(np.mean(accs))
    assert m["auc_c"] == pytest.approx(skm.roc_auc_score(Y[groups == 2], S[groups == 2]))


def test_pooled_site_summaries_equal_metrics_of_the_union() -> None:
    cuts = [0, 300, 1_100, 2_000]
    parts = [(Y[a:b], S[a:b]) for a, b in zip(cuts, cuts[1:])]
    losses = [skm.log_loss(y, s, labels=[0, 1]) for y, s in parts]
    summaries = [site_summary(y, s, loss) for (y, s), loss in zip(parts, losses)]
    pooled = pool_site_summaries(summaries, [len(y) for y, _ in parts])
    whole = binary_metrics(Y, S, skm.log_loss(Y, S))
    for key in ("accuracy", "f1", "sensitivity", "specificity", "precision", "loss"):
        assert pooled[key] == pytest.approx(whole[key]), key
    site_aucs = [skm.roc_auc_score(y, s) for y, s in parts]
    assert pooled["auc_site_weighted"] == pytest.approx(np.average(site_aucs, weights=[300, 800, 900]))


def test_fast_roc_auc_equals_sklearn_with_ties_and_nan_scores_are_undefined() -> None:
    from tasks.metrics import roc_auc

    rng = np.random.default_rng(4)
    for n in (2, 17, 3000):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        scores = np.round(rng.random(n), 1)  # heavy ties
        assert roc_auc(y, scores) == pytest.approx(skm.roc_auc_score(y, scores), abs=1e-12)
    bad = binary_metrics(np.array([0, 1, 1]), np.array([0.2, np.nan, 0.9]), 0.5)
    assert math.isnan(bad["auc"]) and math.isnan(bad["ks"])  # a diverged model: undefined, not a crash
