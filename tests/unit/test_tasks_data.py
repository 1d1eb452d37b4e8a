"""Loading and preprocessing of the three real data sets, and that no test row leaks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import DATA_DIR, make_task


def test_finance_sizes_and_stratified_test_set() -> None:
    data = make_task("finance").data()
    assert len(data.pool) == 24_000 and len(data.test) == 6_000
    total_rate = (data.pool.y.sum() + data.test.y.sum()).item() / 30_000
    assert total_rate == pytest.approx(0.2212, abs=5e-4)  # 6,636 defaults in 30,000
    assert data.test.y.mean().item() == pytest.approx(total_rate, abs=1e-3)
    assert data.pool.x.shape[1] == len(data.feature_names) == 28
    assert torch.isfinite(data.pool.x).all() and torch.isfinite(data.test.x).all()


def test_medical_matches_flamby_split() -> None:
    data = make_task("medical").data()
    per_site = [(int((data.pool.group == h).sum()), int((data.test.group == h).sum())) for h in range(4)]
    assert per_site == [(199, 104), (172, 89), (30, 16), (85, 45)]
    assert data.pool.x.shape[1] == 13  # FLamby's Linear(13, 1) input
    assert data.group_names == ("cleveland", "hungarian", "switzerland", "va")


def test_medical_imaging_uses_official_test_split() -> None:
    data = make_task("medical_imaging").data()
    assert len(data.pool) == 546 + 78 and len(data.test) == 156
    assert data.pool.x.shape[1:] == (1, 28, 28)
    # label 1 = malignant after flipping MedMNIST's 0: 147 + 21 in the pool, 42 in test
    assert int(data.pool.y.sum()) == 168 and int(data.test.y.sum()) == 42


def test_pool_is_standardised_with_pool_statistics_only() -> None:
    data = make_task("finance").data()
    assert torch.allclose(data.pool.x.mean(0), torch.zeros(28), atol=1e-4)
    assert torch.allclose(data.pool.x.std(0, unbiased=False), torch.ones(28), atol=1e-3)
    assert data.test.x.mean(0).abs().max() > 1e-3  # the test set is not its own reference


def _copy_data(tmp: Path) -> Path:
    out = tmp / "data"
    shutil.copytree(DATA_DIR, out)
    return out


def test_finance_preprocessing_ignores_test_rows(tmp_path: Path) -> None:
    """Changing every held-out row's features must not change a single pool feature."""
    reference = make_task("finance").data()
    altered = _copy_data(tmp_path)
    path = altered / "uci_credit_default_taiwan" / "default_of_credit_card_clients.csv"
    df = pd.read_csv(path)
    from sklearn.model_selection import train_test_split

    from tasks.finance import TARGET, TEST_FRACTION, TEST_SPLIT_SEED

    _, test_idx = train_test_split(np.arange(len(df)), test_size=TEST_FRACTION,
                                   stratify=df[TARGET], random_state=TEST_SPLIT_SEED)
    for col in ("LIMIT_BAL", "AGE", "BILL_AMT1", "PAY_AMT3"):
        df.loc[test_idx, col] = df.loc[test_idx, col] * 50 + 7
    df.to_csv(path, index=False)
    changed = make_task("finance", data_dir=altered).data()
    assert torch.equal(changed.pool.x, reference.pool.x)
    assert not torch.equal(changed.test.x, reference.test.x)


def test_medical_preprocessing_ignores_test_rows(tmp_path: Path) -> None:
    reference = make_task("medical").data()
    altered = _copy_data(tmp_path)
    # Shift the cholesterol of every Cleveland test patient: the pool must not move.
    from tasks.medical import COLUMNS

    path = altered / "uci_heart_disease" / "processed.cleveland.data"
    raw = pd.read_csv(path, header=None, names=list(COLUMNS), na_values="?")
    data = make_task("medical").data()
    assert (data.test.group == 0).sum() == 104
    from sklearn.model_selection import train_test_split

    clean = raw.drop(columns=["slope", "ca", "thal"]).dropna()
    y = (clean["num"] > 0).astype(int).to_numpy()
    _, te = train_test_split(np.arange(len(clean)), test_size=1 - 0.66, train_size=0.66,
                             random_state=43, shuffle=True, stratify=y)
    raw.loc[clean.index[te], "chol"] += 400
    raw.to_csv(path, header=False, index=False, na_rep="?")
    changed = make_task("medical", data_dir=altered).data()
    assert torch.equal(changed.pool.x, reference.pool.x)
    assert not torch.equal(changed.test.x, reference.test.x)


def test_missing_data_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="finance data not found"):
        make_task("finance", data_dir=tmp_path).data()


def test_models_give_one_logit_per_example() -> None:
    for name in ("finance", "medical", "medical_imaging"):
        task = make_task(name)
        x = task.data().test.x[:7]
        assert task.build_model()(x).shape == (7,)


def test_local_training_is_deterministic_and_learns() -> None:
    task = make_task("medical")
    site = task.sites(__import__("tasks").PartitionConfig("natural"), 4, seed=0)[0]
    torch.manual_seed(0)
    a = task.build_model()
    b = task.build_model()
    b.load_state_dict(a.state_dict())
    before = task.evaluate(a, site.train)["loss"]
    task.train(a, site.train, seed=5)
    task.train(b, site.train, seed=5)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert task.evaluate(a, site.train)["loss"] < before


@pytest.mark.parametrize("name", ["finance", "medical", "medical_imaging"])
def test_declared_input_shape_matches_the_data(name: str) -> None:
    """Models are built from ``input_shape`` alone (a site in a deployment has no bundled data)."""
    task = make_task(name)
    assert tuple(task.data().pool.x.shape[1:]) == task.input_shape == tuple(task.data().test.x.shape[1:])
