"""Exact federated sums and what they are used for: the fixed-point encodings, the federated
preprocessing statistics against the pooled ones, and the pooled test metrics against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, mean_absolute_error, mean_squared_error, r2_score, roc_auc_score

from aggregation.paillier.sums import IntPacker
from core.fixedpoint import COUNTS, STATS, FixedPointError
from tasks.base import PartitionConfig, TaskConfig
from tasks.finance import FinanceTask
from tasks.tabular import evaluation
from tasks.tabular.prep import Preprocessor, StatLayout, transformed
from tasks.tabular.task import TabularTask

DATA = "tasks/data"


def test_fixed_point_sums_are_exact_in_any_order_and_within_the_bound() -> None:
    rng = np.random.default_rng(0)
    sites = [rng.normal(0, 1e4, 50) * rng.choice([1e-6, 1.0, 1e3], 50) for _ in range(7)]
    totals = []
    for order in (range(7), reversed(range(7)), [3, 0, 6, 1, 5, 2, 4]):
        acc = [0] * 50
        for k in order:
            acc = STATS.add(acc, STATS.encode(sites[k]))
        totals.append(STATS.decode(acc))
    assert all(np.array_equal(totals[0], t) for t in totals)  # bit for bit
    exact = np.sum([np.asarray(s, dtype=np.longdouble) for s in sites], axis=0)
    assert np.all(np.abs(totals[0] - exact) <= 7 * 2.0 ** -(STATS.fraction_bits + 1) + 1e-12 * np.abs(exact))
    limbs = sum(STATS.limbs(STATS.encode(s)) for s in sites)  # what secure aggregation adds up
    assert np.array_equal(STATS.decode(STATS.join(limbs)), totals[0])
    assert COUNTS.decode(COUNTS.add(COUNTS.encode([-3, 5]), COUNTS.encode([1, 1]))).tolist() == [-2, 6]


def test_fixed_point_refuses_what_it_cannot_sum() -> None:
    with pytest.raises(FixedPointError, match="NaN"):
        STATS.encode([1.0, float("nan")])
    with pytest.raises(FixedPointError, match="exceeds"):
        STATS.encode([1e18])


def test_paillier_slots_hold_the_sum_of_every_site() -> None:
    packer = IntPacker(2047, 16, STATS)
    rng = np.random.default_rng(1)
    vectors = [STATS.encode(rng.normal(0, 100, 40)) for _ in range(16)]
    plain = [sum(col) for col in zip(*(packer.pack(v) for v in vectors))]  # what decrypting the product gives
    acc = [0] * 40
    for v in vectors:
        acc = STATS.add(acc, v)
    assert packer.unpack(plain, 40) == acc and packer.slots == 2047 // packer.slot_bits


def _credit_sites() -> tuple[TabularTask, list]:
    cfg = TaskConfig(name="tabular", schema="schemas/credit_default.yaml",
                     data="uci_credit_default_taiwan/credit_default.csv")
    task = TabularTask(cfg, DATA)
    return task, task.raw_sites(PartitionConfig(name="iid"), 5, 0)


def _fit(task: TabularTask, sites: list) -> Preprocessor:
    lay = StatLayout(task.schema, {})
    acc = [0] * lay.moments_size
    for s in sites:
        for t in s.fit_rows:
            acc = STATS.add(acc, STATS.encode(lay.moments(t)))
    moments = STATS.decode(acc)
    means = lay.means(moments)
    acc = [0] * lay.spread_size
    for s in sites:
        for t in s.fit_rows:
            acc = STATS.add(acc, STATS.encode(lay.spread(t, means)))
    return Preprocessor(task.schema, {}, tuple(moments), tuple(STATS.decode(acc)), "all")


@pytest.mark.slow
def test_federated_statistics_equal_the_pooled_ones_and_reproduce_the_finance_features() -> None:
    task, sites = _credit_sites()
    prep = _fit(task, sites)
    num, _ = prep._stats()
    for f in prep.layout.numeric:
        pooled = np.concatenate([transformed(t, f) for s in sites for t in s.fit_rows])
        mean, std = num[f.name]
        assert abs(mean - pooled.mean()) <= 1e-9 * max(1.0, abs(pooled.mean()))
        assert abs(std ** 2 - pooled.var()) <= 1e-9 * pooled.var()
    site, _ = task.prepared(sites[0], prep)
    finance = FinanceTask(TaskConfig(), DATA).sites(PartitionConfig(name="iid"), 5, 0)[0]
    assert site.train.x.shape == finance.train.x.shape == (4320, 28)
    assert float((site.train.x - finance.train.x).abs().max()) < 1e-6  # the same 28 inputs, same rows
    assert bool((site.train.y == finance.train.y).all())


def test_pooled_binary_auc_is_within_its_bound_of_sklearn() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 6000)
    logits = rng.normal(0, 1.5, 6000) + 1.2 * y
    parts = np.array_split(np.arange(6000), 5)
    total = sum(evaluation.site_vector(logits[p], y[p], 0.0) for p in parts)
    m = evaluation.metrics(total)
    exact = roc_auc_score(y, logits)
    assert abs(m["auc"] - exact) <= m["auc_bound"] and m["auc_bound"] < 1e-3
    assert m["accuracy"] == pytest.approx(np.mean((logits >= 0) == y))


def test_pooled_multiclass_and_regression_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    k, n = 4, 3000
    y = rng.integers(0, k, n)
    out = rng.normal(0, 1, (n, k))
    out[np.arange(n), y] += 1.0
    spec = evaluation.Spec("multiclass", k, 8192)
    parts = np.array_split(np.arange(n), 3)
    m = spec.metrics(sum(spec.site_vector(out[p], y[p]) for p in parts))
    p = np.exp(out - out.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert m["accuracy"] == pytest.approx(np.mean(out.argmax(1) == y))
    assert m["macro_f1"] == pytest.approx(f1_score(y, out.argmax(1), average="macro"))
    assert abs(m["macro_auc"] - roc_auc_score(y, p, multi_class="ovr", average="macro")) <= m["auc_bound"]
    assert m["loss"] == pytest.approx(-np.mean(np.log(p[np.arange(n), y])), abs=1e-6)
    target = rng.normal(150, 70, n)
    pred_std = rng.normal(0, 1, n)
    reg = evaluation.Spec("regression")
    total = sum(reg.site_vector(pred_std[q], target[q], (150.0, 70.0)) for q in parts)
    r = reg.metrics(total)
    pred = pred_std * 70 + 150
    assert r["mse"] == pytest.approx(mean_squared_error(target, pred))
    assert r["mae"] == pytest.approx(mean_absolute_error(target, pred))
    assert r["r2"] == pytest.approx(r2_score(target, pred))
