"""Medical: heart-disease diagnosis across four hospitals (UCI Heart Disease; Janosi,
Steinbrunn, Pfisterer, Detrano, 1988), prepared as FLamby's Fed-Heart-Disease benchmark.

Hospitals (natural sites): Cleveland, Hungary (Budapest), Switzerland (Zurich/Basel),
VA Long Beach. Preparation, following FLamby: drop ``slope``, ``ca``, ``thal``; drop rows
with a missing value (303/261/46/130 patients); label = any narrowing (``num > 0``);
per-hospital train/test split with ``train_size=0.66``, ``random_state=43``, stratified by
label where both classes have more than two patients (199/104, 172/89, 30/16, 85/45).
Chest-pain type and resting ECG are one-hot encoded with the first level dropped, giving
FLamby's 13 features; the continuous features are standardised with the statistics of the
pooled training rows only.
The held-out test set is the union of the four hospitals' test rows; metrics are reported
pooled and per hospital.
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

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
           "oldpeak", "slope", "ca", "thal", "num")
CONTINUOUS = ("age", "trestbps", "chol", "thalach", "oldpeak")
BINARY = ("sex", "fbs", "exang")
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43


def read_hospital(path: str) -> pd.DataFrame:
    """One ``processed.<hospital>.data`` file, cleaned as FLamby does."""
    import pandas as pd  # lazy: only where data is loaded

    df = pd.read_csv(path, header=None, names=list(COLUMNS), na_values="?")
    if df.shape[1] != len(COLUMNS):
        raise ValueError(f"{path}: expected {len(COLUMNS)} columns, found {df.shape[1]}")
    return df.drop(columns=["slope", "ca", "thal"]).dropna().reset_index(drop=True)


def encode(df: pd.DataFrame) -> tuple[np.ndarray, tuple[str, ...]]:
    """Continuous and binary columns as they are, plus dummies of ``cp`` (2-4 vs 1) and
    ``restecg`` (1-2 vs 0), as ``pd.get_dummies(drop_first=True)`` gives in FLamby."""
    cols = {c: df[c].to_numpy(float) for c in CONTINUOUS + BINARY}
    for v in (2, 3, 4):
        cols[f"cp_{v}"] = (df["cp"].to_numpy() == v).astype(float)
    for v in (1, 2):
        cols[f"restecg_{v}"] = (df["restecg"].to_numpy() == v).astype(float)
    names = tuple(cols)
    return np.column_stack([cols[n] for n in names]), names


class MedicalTask(PooledTask):
    """Heart-disease prediction; logistic regression (FLamby's model) by default."""

    name: ClassVar[str] = "medical"
    input_shape: ClassVar[tuple[int, ...]] = (13,)  # one example (a test checks it against the data)
    models: ClassVar[tuple[str, ...]] = ("logreg", "mlp")
    natural_sites: ClassVar[tuple[str, ...] | None] = HOSPITALS
    data_files: ClassVar[tuple[str, ...]] = tuple(f"uci_heart_disease/processed.{h}.data" for h in HOSPITALS)

    @override
    def load(self) -> TaskData:
        frames = []
        for code, hospital in enumerate(HOSPITALS):
            path = self.data_dir / "uci_heart_disease" / f"processed.{hospital}.data"
            if not path.is_file():
                raise FileNotFoundError(f"medical data not found at {path} (data_dir={self.data_dir})")
            df = read_hospital(str(path))
            y = (df["num"].to_numpy() > 0).astype(np.int64)
            stratify = y if min(np.bincount(y, minlength=2)) > 2 else None
            tr, te = _train_test_split(
                np.arange(len(df)), test_size=1.0 - TRAIN_FRACTION, train_size=TRAIN_FRACTION,
                random_state=SPLIT_SEED, shuffle=True, stratify=stratify,
            )
            df["hospital"] = code
            df["is_test"] = False
            df.loc[te, "is_test"] = True
            frames.append(df)
        import pandas as pd

        df = pd.concat(frames, ignore_index=True)
        x, names = encode(df)
        y = (df["num"].to_numpy() > 0).astype(np.float32)
        group = df["hospital"].to_numpy(np.int64)
        test = df["is_test"].to_numpy(bool)
        cont = [names.index(c) for c in CONTINUOUS]
        mean = x[~test][:, cont].mean(axis=0)
        std = x[~test][:, cont].std(axis=0)
        x[:, cont] = (x[:, cont] - mean) / std
        x = x.astype(np.float32)

        def split(mask: np.ndarray) -> Split:
            return Split(torch.from_numpy(x[mask]), torch.from_numpy(y[mask]), group[mask])

        return TaskData(split(~test), split(test), names, HOSPITALS)

    @override
    def build_model(self) -> nn.Module:
        n = self.input_shape[0]
        if self.cfg.model == "mlp":
            return MLP(n, self.cfg.hidden, self.cfg.dropout)
        return LogisticRegression(n)


def _train_test_split(*args, **kwargs):  # type: ignore[no-untyped-def]
    """sklearn's, imported when the data is loaded (not by every ClientApp process)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(*args, **kwargs)
