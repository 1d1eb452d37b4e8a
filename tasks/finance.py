"""Finance: credit-card default prediction on the UCI "default of credit card clients"
data set (Taiwan, 2005; 30,000 clients, 22.1% default). Yeh & Lien (2009).

Held-out test set: a fixed stratified 20% (``random_state=2009``, independent of the run
seed, so runs with different seeds are scored on the same clients). Natural split: the
client's education level (graduate school, university, high school, other), the way a
bank's customer segments differ.

Features (28): log credit limit, sex, one-hot education (4) and marital status (3), age,
the six repayment-status codes, signed-log bill amounts (6) and log payment amounts (6),
all standardised with the pool's mean and standard deviation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn
from typing_extensions import override

if TYPE_CHECKING:
    import pandas as pd

from tasks.base import PooledTask, Split, TaskData
from tasks.models import MLP, LogisticRegression

FILE = "uci_credit_default_taiwan/default_of_credit_card_clients.csv"
TARGET = "default.payment.next.month"
TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 2009
EDUCATION_GROUPS = ("graduate_school", "university", "high_school", "other")


def education_group(education: np.ndarray) -> np.ndarray:
    """Map EDUCATION codes (1 grad school, 2 university, 3 high school, else other) to 0..3."""
    return np.where(np.isin(education, (1, 2, 3)), education - 1, 3).astype(np.int64)


def engineer(df: pd.DataFrame) -> tuple[np.ndarray, tuple[str, ...]]:
    """Raw columns -> unscaled feature matrix (no statistics of the data are used)."""
    cols: dict[str, np.ndarray] = {"log_limit_bal": np.log1p(df["LIMIT_BAL"].to_numpy(float))}
    cols["female"] = (df["SEX"].to_numpy() == 2).astype(float)
    edu = education_group(df["EDUCATION"].to_numpy())
    for code, name in enumerate(EDUCATION_GROUPS):
        cols[f"education_{name}"] = (edu == code).astype(float)
    marriage = df["MARRIAGE"].to_numpy()
    cols["married"] = (marriage == 1).astype(float)
    cols["single"] = (marriage == 2).astype(float)
    cols["marriage_other"] = (~np.isin(marriage, (1, 2))).astype(float)
    cols["age"] = df["AGE"].to_numpy(float)
    for c in ("PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6"):
        cols[c.lower()] = df[c].to_numpy(float)
    for i in range(1, 7):
        bill = df[f"BILL_AMT{i}"].to_numpy(float)
        cols[f"bill_amt{i}"] = np.sign(bill) * np.log1p(np.abs(bill))
        cols[f"pay_amt{i}"] = np.log1p(np.maximum(df[f"PAY_AMT{i}"].to_numpy(float), 0.0))
    names = tuple(cols)
    return np.column_stack([cols[n] for n in names]), names


class FinanceTask(PooledTask):
    """Binary default prediction; MLP by default, logistic regression as ``task.model=logreg``."""

    name: ClassVar[str] = "finance"
    input_shape: ClassVar[tuple[int, ...]] = (28,)  # one example (a test checks it against the data)
    models: ClassVar[tuple[str, ...]] = ("mlp", "logreg")
    natural_sites: ClassVar[tuple[str, ...] | None] = EDUCATION_GROUPS
    data_files: ClassVar[tuple[str, ...]] = (FILE,)

    @override
    def load(self) -> TaskData:
        path = self.data_dir / FILE
        if not path.is_file():
            raise FileNotFoundError(f"finance data not found at {path} (data_dir={self.data_dir})")
        import pandas as pd  # lazy: only where data is loaded

        df = pd.read_csv(path)
        missing = {TARGET, "LIMIT_BAL", "EDUCATION", "PAY_AMT6"} - set(df.columns)
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        x, names = engineer(df)
        y = df[TARGET].to_numpy(np.int64)
        group = education_group(df["EDUCATION"].to_numpy())
        idx_pool, idx_test = _train_test_split(
            np.arange(len(y)), test_size=TEST_FRACTION, stratify=y, random_state=TEST_SPLIT_SEED
        )
        mean = x[idx_pool].mean(axis=0)
        std = x[idx_pool].std(axis=0)
        std[std == 0] = 1.0
        xs = ((x - mean) / std).astype(np.float32)

        def split(idx: np.ndarray) -> Split:
            idx = np.sort(idx)
            return Split(torch.from_numpy(xs[idx]), torch.from_numpy(y[idx].astype(np.float32)), group[idx])

        return TaskData(split(idx_pool), split(idx_test), names, EDUCATION_GROUPS)

    @override
    def build_model(self) -> nn.Module:
        n = self.input_shape[0]
        if self.cfg.model == "logreg":
            return LogisticRegression(n)
        return MLP(n, self.cfg.hidden, self.cfg.dropout)


def _train_test_split(*args, **kwargs):  # type: ignore[no-untyped-def]
    """sklearn's, imported when the data is loaded (not by every ClientApp process)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(*args, **kwargs)
