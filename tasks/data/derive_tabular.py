"""Derive the tabular forms of the bundled data sets (run once; the outputs are committed).

* ``uci_credit_default_taiwan/credit_default.csv``: the original file plus a ``split``
  column holding finance's fixed held-out test rows (stratified 20 %, random_state=2009),
  so that ``task=tabular`` is scored on the same clients as ``task=finance``.
* ``uci_heart_disease/sites/<hospital>.csv``: each hospital's ``processed.*.data`` with a
  header, a ``patient`` id and FLamby's per-hospital ``split`` (train_size 0.66,
  random_state 43, stratified where both classes have more than two patients, over the
  rows without missing values in the 10 columns FLamby keeps; rows with a missing value
  are kept, with split ``train``, and dropped by the schema's ``missing: drop_row``).

    python tasks/data/derive_tabular.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent


def credit() -> None:
    """Write the credit table (UCI Default of Credit Card Clients) as fedsilo reads it, from its source file."""
    src = HERE / "uci_credit_default_taiwan" / "default_of_credit_card_clients.csv"
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    y = df["default.payment.next.month"].astype(int).to_numpy()
    _, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=2009)
    split = np.array(["train"] * len(y), dtype=object)
    split[test] = "test"
    df.insert(1, "split", split)
    df.to_csv(src.parent / "credit_default.csv", index=False)


def heart() -> None:
    """Write the four hospitals' heart-disease tables (FLamby's split) from the UCI source files."""
    cols = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak", "slope", "ca",
            "thal", "num"]
    out = HERE / "uci_heart_disease" / "sites"
    out.mkdir(exist_ok=True)
    for h in ("cleveland", "hungarian", "switzerland", "va"):
        df = pd.read_csv(HERE / "uci_heart_disease" / f"processed.{h}.data", header=None, names=cols, dtype=str,
                         keep_default_na=False)
        complete = ~df.drop(columns=["slope", "ca", "thal"]).isin(["?"]).any(axis=1).to_numpy()
        idx = np.flatnonzero(complete)
        y = (df["num"].astype(float).to_numpy()[idx] > 0).astype(int)
        stratify = y if min(np.bincount(y, minlength=2)) > 2 else None
        _, te = train_test_split(np.arange(idx.size), test_size=1 - 0.66, train_size=0.66, random_state=43,
                                 shuffle=True, stratify=stratify)
        split = np.array(["train"] * len(df), dtype=object)
        split[idx[te]] = "test"
        df.insert(0, "split", split)
        df.insert(0, "patient", [f"{h}-{k + 1}" for k in range(len(df))])
        df.to_csv(out / f"{h}.csv", index=False)


def sklearn_table(loader: str, folder: str, file: str, id_column: str, label: str) -> None:
    """Write one of scikit-learn's bundled tables (column names lower-cased, an id first, the target renamed)."""
    import re

    import numpy as np
    import sklearn.datasets

    frame = getattr(sklearn.datasets, loader)(as_frame=True).frame
    frame.columns = [re.sub(r"[^a-z0-9]+", "_", c.lower()).strip("_") for c in frame.columns]
    frame.insert(0, id_column, np.arange(1, len(frame) + 1))
    (HERE / folder).mkdir(exist_ok=True)
    frame.rename(columns={"target": label}).to_csv(HERE / folder / file, index=False)


def lifelines_survival() -> None:
    """Issue #37's survival tables, from lifelines' bundled copies (lifelines 0.30.3, MIT): NCCTG lung (228
    patients) split by institution, GBSG2 (686 patients) split over four sites by a seeded draw. Values unchanged;
    a ``patient`` id is added first."""
    import numpy as np
    from lifelines import datasets

    lung = datasets.load_lung()
    lung.insert(0, "patient", np.arange(1, len(lung) + 1))
    (HERE / "ncctg_lung" / "sites").mkdir(parents=True, exist_ok=True)
    lung.to_csv(HERE / "ncctg_lung" / "lung.csv", index=False)
    # sites: institutions in code order, merged until a site holds at least 30 patients (a short tail joins the last
    # site); the one patient without an institution code is left out of the sites (it stays in lung.csv)
    coded = lung[lung["inst"].notna()]
    sites: list[list[float]] = [[]]
    for inst in sorted(coded["inst"].unique()):
        sites[-1].append(inst)
        if int(coded["inst"].isin(sites[-1]).sum()) >= 30:
            sites.append([])
    if not sites[-1]:
        sites.pop()
    elif len(sites) > 1:
        tail = sites.pop()
        sites[-1] += tail
    for members in sites:
        name = "inst_" + "_".join(str(int(i)) for i in members)
        coded[coded["inst"].isin(members)].to_csv(HERE / "ncctg_lung" / "sites" / f"{name}.csv", index=False)
    gbsg = datasets.load_gbsg2()
    gbsg.insert(0, "patient", np.arange(1, len(gbsg) + 1))
    (HERE / "gbsg2" / "sites").mkdir(parents=True, exist_ok=True)
    gbsg.to_csv(HERE / "gbsg2" / "gbsg2.csv", index=False)
    site = np.random.default_rng(37).permutation(len(gbsg)) % 4  # four sites of 171-172 patients
    for k in range(4):
        gbsg[site == k].to_csv(HERE / "gbsg2" / "sites" / f"site_{k + 1}.csv", index=False)


if __name__ == "__main__":
    credit()
    heart()
    sklearn_table("load_wine", "wine", "wine.csv", "sample", "cultivar")  # issue #36's small multiclass table
    sklearn_table("load_breast_cancer", "breast_cancer", "wdbc.csv", "patient", "benign")
    lifelines_survival()  # issue #37
