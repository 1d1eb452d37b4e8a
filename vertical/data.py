"""The parties' tables: the vertical split of the bundled credit table, and loading a party's file.

A party's file is a table read through a schema of the tabular task (:mod:`tasks.tabular`): its
``id`` column names the customer, its features are the party's own columns, and only the active
party's file has the label. Each party fits its preprocessing on its own rows (it holds every row
of its columns, so nothing about them needs to leave it: :func:`tasks.tabular.prep.fit_local`).

:func:`split_credit` writes the bank-and-payment-platform demo from the UCI credit default table:
the held-out test customers are chosen by id first (the table's own ``split`` column: the same
6,000 customers ``task=finance`` tests on), then the remaining customers are dealt to the two
parties so that a chosen share of them is held by both.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.tabular import prep
from tasks.tabular.schema import Schema, SchemaError
from tasks.tabular.table import SiteInputError, read

ROLES = ("active", "passive")
BANK = ["LIMIT_BAL", "SEX", "EDUCATION", "MARRIAGE", "AGE", *(f"BILL_AMT{k}" for k in range(1, 7))]
PLATFORM = ["PAY_0", *(f"PAY_{k}" for k in range(2, 7)), *(f"PAY_AMT{k}" for k in range(1, 7))]
LABEL = "default.payment.next.month"
ID = "ID"


class PartyDataError(SiteInputError):
    """A party's file or schema does not fit its role: names the file, column or row
    (``public``: what the coordinator may read, never a value or an id; see SiteInputError)."""


@dataclass(frozen=True)
class PartyTable:
    """One party's rows, preprocessed: ids (str), model inputs, labels (active party only)."""

    name: str
    role: str
    path: str
    ids: np.ndarray                 # object array of str, one per row
    x: np.ndarray                   # float64 rows x features, standardised on the party's own rows
    y: np.ndarray | None            # 0/1 labels (active) or None
    features: tuple[str, ...]
    fingerprint: str                # the schema's fingerprint
    prep: prep.Preprocessor

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def check_ids(ids: np.ndarray, path: str, lines: np.ndarray) -> np.ndarray:
    """Ids as stripped strings; a clear error for an empty or duplicated id (file and row named)."""
    out = np.array([str(v).strip() for v in ids], dtype=object)
    empty = np.array([v == "" or v.lower() in ("nan", "none", "null", "na") for v in out])
    if empty.any():
        k = int(np.argmax(empty))
        raise PartyDataError(f"{path}: the id at row {lines[k]} is empty or missing; every row needs a customer id")
    _, first, counts = np.unique(out.astype(str), return_index=True, return_counts=True)
    if (counts > 1).any():
        k = int(first[np.argmax(counts > 1)])
        again = int(np.flatnonzero(out == out[k])[1])
        raise PartyDataError(f"{path}: id {out[k]!r} appears more than once (rows {lines[k]} and {lines[again]}); ids "
                             "must be unique", public=f"{path}: an id appears more than once (rows {lines[k]} and "
                             f"{lines[again]}); ids must be unique")
    return out


def load_party(name: str, role: str, path: str | Path, schema_path: str | Path,
               fitted: prep.Preprocessor | None = None) -> PartyTable:
    """Read and preprocess a party's file. ``fitted``: apply a saved transform (scoring) instead of fitting."""
    if role not in ROLES:
        raise PartyDataError(f"party {name}: role {role!r} is not one of {list(ROLES)}")
    try:
        schema = Schema.load(schema_path)
    except SchemaError as err:
        raise PartyDataError(str(err)) from err
    if not schema.id:
        raise PartyDataError(f"party {name}: schema {schema_path} names no 'id' column; vertical parties match "
                             "rows by a customer id")
    try:
        table = read(path, schema, labelled=(role == "active"))
    except SiteInputError as err:
        raise PartyDataError(str(err), public=err.public) from err
    assert table.ids is not None
    ids = check_ids(table.ids, str(path), table.line)
    if role == "active" and schema.label.kind != "binary":
        raise PartyDataError(f"party {name}: schema {schema_path} has a {schema.label.kind} label; vertical "
                             "models here predict a binary label")
    p = fitted or prep.fit_local(table, schema)
    x = p.transform(table).astype(np.float64)
    return PartyTable(name, role, str(path), ids, x, table.label.astype(np.float64) if role == "active" else None,
                      p.feature_names, schema.fingerprint(), p)


_CACHE: dict[tuple, PartyTable] = {}


def cached_party(name: str, role: str, path: str, schema_path: str,
                 fitted_on: PartyTable | None = None) -> PartyTable:
    """:func:`load_party`, cached per process (a few tables) by the files' paths and modification
    times; ``fitted_on``: apply that table's transform (held-out rows) instead of fitting."""
    key = (name, role, path, schema_path, *(Path(p).stat().st_mtime_ns if Path(p).exists() else 0
                                           for p in (path, schema_path)),
           None if fitted_on is None else (fitted_on.path, fitted_on.prep.digest()))
    if key not in _CACHE:
        while len(_CACHE) >= 8:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = load_party(name, role, path, schema_path, None if fitted_on is None else fitted_on.prep)
    return _CACHE[key]


def split_credit(source: Path, out: Path, overlap: float = 0.85, seed: int = 0) -> dict:
    """Write the bank and the payment platform's files (train and held-out test) from ``source``.

    Test customers: the rows whose ``split`` is ``test``, held out by id before the split; both
    parties hold them (``*_test.csv``). The other customers: a share ``overlap`` of them is held by
    both parties, the rest by one party only (half each). Returns the counts written.
    """
    if not 0 < overlap <= 1:
        raise ValueError(f"overlap must be in (0, 1], got {overlap}")
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    need = [ID, "split", LABEL, *BANK, *PLATFORM]
    missing = [c for c in need if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}")
    test = [r for r in rows if r["split"].strip() == "test"]
    rest = [r for r in rows if r["split"].strip() != "test"]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rest))
    n_both = int(round(overlap * len(rest)))
    n_bank_only = (len(rest) - n_both) // 2
    both = order[:n_both]
    bank_only = order[n_both:n_both + n_bank_only]
    platform_only = order[n_both + n_bank_only:]
    # each party keeps its rows in an order of its own: alignment is the protocol's job
    bank_rows = rng.permutation(np.concatenate([both, bank_only])).tolist()
    platform_rows = rng.permutation(np.concatenate([both, platform_only])).tolist()
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, items: list[dict], cols: list[str]) -> str:
        path = out / name
        with open(path, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(cols)
            for r in items:
                w.writerow([r[c] for c in cols])
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    bank_cols, platform_cols = [ID, LABEL, *BANK], [ID, *PLATFORM]
    digests = {
        "bank.csv": write("bank.csv", [rest[i] for i in bank_rows], bank_cols),
        "platform.csv": write("platform.csv", [rest[i] for i in platform_rows], platform_cols),
        "bank_test.csv": write("bank_test.csv", test, bank_cols),
        "platform_test.csv": write("platform_test.csv", test, platform_cols),
    }
    summary = {"source": source.name, "seed": seed, "overlap": overlap, "test_customers": len(test),
               "bank_rows": len(bank_rows), "platform_rows": len(platform_rows), "both": n_both,
               "bank_only": len(bank_only), "platform_only": len(platform_only), "sha256_16": digests}
    (out / "split.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
