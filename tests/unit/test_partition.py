"""Partitioning with Flower Datasets: coverage, disjointness, skew, natural sites."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.base import PartitionConfig
from tasks.partition import PartitionError, partition_indices, split_train_val
from tests.conftest import make_task

RNG = np.random.default_rng(0)
LABELS = (RNG.random(5_000) < 0.25).astype(np.int64)


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n  # every row exactly once


def test_iid_equal_sizes_and_balanced_labels() -> None:
    parts = partition_indices(LABELS, None, "iid", 5, seed=0)
    _check_cover(parts, len(LABELS))
    assert {len(p) for p in parts} == {1_000}
    rates = [LABELS[p].mean() for p in parts]
    assert max(rates) - min(rates) < 0.06


def test_partitions_are_seeded() -> None:
    a = partition_indices(LABELS, None, "dirichlet", 5, seed=1, alpha=0.3)
    b = partition_indices(LABELS, None, "dirichlet", 5, seed=1, alpha=0.3)
    c = partition_indices(LABELS, None, "dirichlet", 5, seed=2, alpha=0.3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_small_alpha_skews_labels_more() -> None:
    def spread(alpha: float) -> float:
        parts = partition_indices(LABELS, None, "dirichlet", 5, seed=0, alpha=alpha)
        _check_cover(parts, len(LABELS))
        assert min(len(p) for p in parts) >= 10
        return float(np.std([LABELS[p].mean() for p in parts]))

    assert spread(0.1) > 3 * spread(100.0)


def test_natural_split_one_site_per_group() -> None:
    groups = RNG.integers(0, 4, size=len(LABELS))
    parts = partition_indices(LABELS, groups, "natural", 99, seed=0)
    assert len(parts) == 4
    for code, rows in enumerate(parts):
        assert set(groups[rows]) == {code}


def test_impossible_partitions_fail_clearly() -> None:
    with pytest.raises(PartitionError, match="natural split"):
        partition_indices(LABELS, None, "natural", 4, seed=0)
    with pytest.raises(PartitionError, match="num_sites=6000"):
        partition_indices(LABELS, None, "iid", 6_000, seed=0)
    with pytest.raises(PartitionError, match="min_partition_size"):
        partition_indices(LABELS, None, "dirichlet", 600, seed=0, min_partition_size=10)


def test_site_val_split_is_disjoint_and_stratified() -> None:
    rows = np.arange(1_000)
    train, val = split_train_val(rows, LABELS, 0.2, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 1_000
    assert LABELS[val].mean() == pytest.approx(LABELS[rows].mean(), abs=0.01)


def test_medical_natural_sites_are_the_hospitals() -> None:
    task = make_task("medical")
    sites = task.sites(PartitionConfig("natural"), 4, seed=0)
    assert [s.name for s in sites] == ["cleveland", "hungarian", "switzerland", "va"]
    assert [len(s.train) + len(s.val) for s in sites] == [199, 172, 30, 85]
    for code, s in enumerate(sites):
        assert set(s.train.group) == {code}


def test_finance_natural_sites_are_education_levels() -> None:
    task = make_task("finance")
    sites = task.sites(PartitionConfig("natural"), 5, seed=0)
    assert [s.name for s in sites] == ["graduate_school", "university", "high_school", "other"]
    assert sum(len(s.train) + len(s.val) for s in sites) == 24_000
