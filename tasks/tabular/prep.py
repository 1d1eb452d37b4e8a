"""Federated preprocessing: each site's statistics, their totals, and the transform every site applies.

Three steps before round 1 (the preprocessing program, :class:`tasks.programs.Preprocessing`):

1. ``vocab`` (only for categorical features whose categories the schema does not list):
   each site sends the *names* of the categories it has; the union, sorted, is every
   site's vocabulary. The coordinator learns these names (never their counts).
2. ``moments``: per site, over its non-test rows: the row count and label counts; per
   numeric or boolean feature the observed count and sum; per categorical feature the count
   of each code. Summed under the run's protection (:mod:`core.fixedpoint`).
3. ``spread``: per numeric feature the sum of squared deviations from the federated mean
   (two passes: exact where ``E[x^2] - E[x]^2`` would cancel).

:class:`Preprocessor` turns the totals into the transform: numeric features transformed
(log1p, signed log1p), missing values imputed with the federated mean, standardised with
the federated mean and population standard deviation; booleans 0/1; categoricals one-hot.
Every site derives the same transform from the same totals, so they apply identical
preprocessing; the preprocessor is saved with the model (``model.fedsilo.json``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.tabular.schema import Feature, Schema
from tasks.tabular.table import MISSING_LEVEL, OTHER, SiteInputError, Table

LABEL = "(label)"  # the regression label's key among the means


def transformed(table: Table, f: Feature) -> np.ndarray:
    """A numeric feature after its transform (NaN stays NaN); a clear error for values outside its domain."""
    x = table.numeric[f.name]
    if f.transform == "log1p":
        bad = x <= -1
        if bad.any():
            k = int(np.argmax(bad))
            raise SiteInputError(f"site file {table.path}: column {f.name!r} has transform log1p but row "
                                 f"{table.line[k]} holds {x[k]:g} (log1p needs values > -1)")
        return np.log1p(x)
    if f.transform == "signed_log1p":
        return np.sign(x) * np.log1p(np.abs(x))
    return x


def levels(f: Feature, vocab: dict[str, list[str]]) -> list[str]:
    """A categorical feature's levels: listed or discovered, plus ``(other)`` where asked."""
    base = list(f.categories) if f.categories is not None else list(vocab.get(f.name, []))
    return base + ([OTHER] if f.other else [])


def local_vocab(table: Table | list[Table], schema: Schema, min_count: int = 1) -> dict[str, list[str]]:
    """The category names this site has (in ``table``, or in all of a list of tables), for each
    feature whose categories are discovered: those in at least ``min_count`` of its rows (a site's
    disclosure control; see app/site_policy.py)."""
    tables = table if isinstance(table, list) else [table]
    out = {}
    for name in schema.discovered():
        values, counts = np.unique(np.concatenate([t.categorical[name] for t in tables]), return_counts=True)
        out[name] = sorted(str(v) for v, c in zip(values, counts, strict=True) if c >= min_count and v != MISSING_LEVEL)
    return out


def merge_vocab(parts: list[dict[str, list[str]]], schema: Schema) -> dict[str, list[str]]:
    """The federation's vocabulary: the union of the sites' names per discovered feature, sorted."""
    return {name: sorted({v for p in parts for v in p.get(name, [])}) for name in schema.discovered()}


@dataclass(frozen=True)
class StatLayout:
    """Where each statistic sits in the ``moments`` and ``spread`` vectors."""

    schema: Schema
    vocab: dict[str, list[str]]

    @property
    def numeric(self) -> list[Feature]:
        """The numeric and boolean features."""
        return [f for f in self.schema.features if f.type in ("numeric", "boolean")]

    @property
    def categorical(self) -> list[Feature]:
        """The categorical features."""
        return [f for f in self.schema.features if f.type == "categorical"]

    @property
    def label_slots(self) -> int:
        """Label values in the ``moments`` sum (binary: 1; multiclass: one per class; regression: 2)."""
        lab = self.schema.label
        return {"binary": 1, "multiclass": len(lab.classes), "regression": 2}[lab.kind]

    @property
    def moments_size(self) -> int:
        """Values of the ``moments`` sum."""
        return 1 + self.label_slots + 2 * len(self.numeric) + sum(len(levels(f, self.vocab)) for f in self.categorical)

    @property
    def spread_size(self) -> int:
        """Values of the ``spread`` sum."""
        return len(self.numeric) + (1 if self.schema.label.kind == "regression" else 0)

    def label_mean(self, moments: np.ndarray) -> float:
        """Regression: the federated mean of the label (0 for classes)."""
        if self.schema.label.kind != "regression" or moments[0] <= 0:
            return 0.0
        return float(moments[1] / moments[0])

    def moments(self, table: Table) -> np.ndarray:
        """The site's moments vector (over the rows it is given: its non-test rows)."""
        out: list[float] = [float(len(table))]
        lab = self.schema.label
        if lab.kind == "binary":
            out.append(float(table.label.sum()))
        elif lab.kind == "multiclass":
            out.extend(np.bincount(table.label, minlength=len(lab.classes)).astype(float))
        else:
            out.extend([float(table.label.sum()), float(np.square(table.label).sum())])
        for f in self.numeric:
            x = transformed(table, f)
            seen = ~np.isnan(x)
            out.extend([float(seen.sum()), float(x[seen].sum())])
        for f in self.categorical:
            col = table.categorical[f.name]
            names = levels(f, self.vocab)
            listed = set(names) - {OTHER}
            for name in names:
                if name == OTHER:
                    out.append(float(np.sum(~np.isin(col, list(listed)) & (col != MISSING_LEVEL))))
                else:
                    out.append(float(np.sum(col == name)))
        return np.asarray(out, dtype=np.float64)

    def spread(self, table: Table, means: dict[str, float]) -> np.ndarray:
        """Sum of squared deviations from the federated mean, per numeric feature."""
        out = []
        for f in self.numeric:
            x = transformed(table, f)
            d = x[~np.isnan(x)] - means[f.name]
            out.append(float(np.dot(d, d)))
        if self.schema.label.kind == "regression":
            d = table.label - means[LABEL]
            out.append(float(np.dot(d, d)))
        return np.asarray(out, dtype=np.float64)

    def means(self, moments: np.ndarray) -> dict[str, float]:
        """The federated mean of every numeric feature (and of a regression label, under :data:`LABEL`)."""
        base = 1 + self.label_slots
        out = {LABEL: self.label_mean(moments)}
        for k, f in enumerate(self.numeric):
            n, s = moments[base + 2 * k], moments[base + 2 * k + 1]
            out[f.name] = float(s / n) if n > 0 else 0.0
        return out


@dataclass(frozen=True)
class Preprocessor:
    """The fitted transform: the same at every site (a pure function of the schema and the totals)."""

    schema: Schema
    vocab: dict[str, list[str]]
    moments: tuple[float, ...]
    spread: tuple[float, ...]
    standardize: str = "numeric"    # numeric | all (booleans and one-hot codes too)

    @property
    def layout(self) -> StatLayout:
        """The statistics layout these totals came from."""
        return StatLayout(self.schema, self.vocab)

    @property
    def rows(self) -> int:
        """The federation's rows the totals count."""
        return int(round(self.moments[0]))

    def label_scale(self) -> tuple[float, float]:
        """(mean, std) the model's regression target is standardised with; (0, 1) for classes."""
        if self.schema.label.kind != "regression":
            return 0.0, 1.0
        m = np.asarray(self.moments)
        n = m[0]
        std = float(np.sqrt(self.spread[-1] / n)) if n > 0 else 1.0
        return self.layout.label_mean(m), std if std > 0 else 1.0

    def target(self, table: Table) -> np.ndarray:
        """The model's training target of each row: the label, standardised for regression."""
        mean, std = self.label_scale()
        return ((table.label - mean) / std).astype(np.float32) if self.schema.label.kind == "regression" \
            else table.label.astype(np.float32)

    def columns(self) -> list[tuple[str, str, str | None]]:
        """(output name, feature, level) of every model input, in order."""
        out: list[tuple[str, str, str | None]] = []
        for f in self.schema.features:
            if f.type != "categorical":
                out.append((f.name, f.name, None))
                continue
            names = levels(f, self.vocab)
            for j, name in enumerate(names):
                if f.drop_first and j == 0:
                    continue
                out.append((f"{f.name}={name}", f.name, name))
        return out

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The model's input names, in order."""
        return tuple(c[0] for c in self.columns())

    @property
    def width(self) -> int:
        """Model inputs per row."""
        return len(self.columns())

    def _stats(self) -> tuple[dict[str, tuple[float, float]], dict[tuple[str, str], tuple[float, float]]]:
        """Per numeric feature (mean, std); per categorical code (mean, std) of its 0/1 indicator."""
        lay = self.layout
        m = np.asarray(self.moments)
        means = lay.means(m)
        num = {}
        for k, f in enumerate(lay.numeric):
            n = m[1 + lay.label_slots + 2 * k]
            var = self.spread[k] / n if n > 0 else 0.0
            std = float(np.sqrt(var))
            num[f.name] = (means[f.name], std if std > 0 else 1.0)
        cat = {}
        pos = 1 + lay.label_slots + 2 * len(lay.numeric)
        rows = max(m[0], 1.0)
        for f in lay.categorical:
            for name in levels(f, self.vocab):
                p = float(m[pos] / rows)
                std = float(np.sqrt(p * (1 - p)))
                cat[(f.name, name)] = (p, std if std > 0 else 1.0)
                pos += 1
        return num, cat

    def transform(self, table: Table) -> np.ndarray:
        """The model inputs (float32, rows x width) of a site's raw rows."""
        num, cat = self._stats()
        cols = []
        for _name, feat, level in self.columns():
            f = self.schema.feature(feat)
            if level is None:
                x = transformed(table, f)
                mean, std = num[feat]
                x = np.where(np.isnan(x), mean, x)
                if f.type == "numeric" or self.standardize == "all":
                    x = (x - mean) / std
                cols.append(x)
            else:
                col = table.categorical[feat]
                if level == OTHER:
                    listed = [n for n in levels(f, self.vocab) if n != OTHER]
                    x = (~np.isin(col, listed) & (col != MISSING_LEVEL)).astype(np.float64)
                else:
                    x = (col == level).astype(np.float64)
                if self.standardize == "all":
                    mean, std = cat[(feat, level)]
                    x = (x - mean) / std
                cols.append(x)
        return np.column_stack(cols).astype(np.float32) if cols else np.zeros((len(table), 0), np.float32)

    def to_dict(self) -> dict[str, Any]:
        """The transform as the model file keeps it."""
        return {"schema": self.schema.to_dict(), "vocab": self.vocab, "moments": list(self.moments),
                "spread": list(self.spread), "standardize": self.standardize}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        """The transform :meth:`to_dict` wrote."""
        schema = Schema.parse({k: v for k, v in d["schema"].items()}, "saved model")
        return cls(schema, {k: list(v) for k, v in d["vocab"].items()}, tuple(map(float, d["moments"])),
                   tuple(map(float, d["spread"])), str(d.get("standardize", "numeric")))

    def digest(self) -> str:
        """A short digest of the transform (equal transforms, equal digests)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:24]


def fit_local(table: Table, schema: Schema, standardize: str | None = None) -> Preprocessor:
    """The transform fitted on one party's own rows (vertical learning: a party holds every row of
    its columns, so its statistics need no federation and never leave it)."""
    vocab = local_vocab(table, schema)
    layout = StatLayout(schema, vocab)
    moments = layout.moments(table)
    spread = layout.spread(table, layout.means(moments))
    return Preprocessor(schema, vocab, tuple(map(float, moments)), tuple(map(float, spread)),
                        standardize or schema.standardize)
