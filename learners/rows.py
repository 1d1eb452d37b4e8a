"""A site's rows as the matrices learners fit: features (NaN = missing), labels, names.

Two kinds of site data reach the learner: a bundled task's preprocessed tensors
(:class:`~tasks.data.SiteData`: train and validation rows; the test rows are the coordinator's)
and a site's own table (:class:`~tasks.federated.RawSite` of ``task=tabular``: train, validation
and held-out test rows). Trees need no scaling or imputation: numeric and boolean features are
taken raw, missing values stay missing (each split learns where they go), and a categorical
feature becomes one 0/1 column per level of the federation's vocabulary (missing: NaN in each).
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.programs import Gather, ProgramError, SiteCall
from tasks.base import PooledTask, Task
from tasks.data import SiteData, Split
from tasks.federated import RawSite
from tasks.tabular.table import MISSING_LEVEL
from tasks.tabular.task import TabularTask


@dataclass
class Rows:
    """Rows of one split: features (rows x features, float64, NaN = missing) and labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


def objective_of(task: Task) -> str:
    """The objective the task's label calls for: binary, multiclass or regression."""
    if isinstance(task, TabularTask):
        if task.label_kind == "survival":
            raise ProgramError("a survival label (time and event) is analysed by learner.name=survival (or the "
                               "default learner), not by a classifier or regression")
        return task.label_kind
    return "binary"


def classes_of(task: Task) -> int:
    """Outputs per row: the classes of a multiclass label, else 1."""
    if isinstance(task, TabularTask) and task.label_kind == "multiclass":
        return len(task.schema.label.classes)
    return 1


def feature_names(task: Task, vocab: dict[str, list[str]]) -> list[str]:
    """The model's input columns, in order."""
    if isinstance(task, TabularTask):
        names: list[str] = []
        for f in task.schema.features:
            if f.type == "categorical":
                names += [f"{f.name}={level}" for level in levels(f, vocab)]
            else:
                names.append(f.name)
        return names
    if isinstance(task, PooledTask):
        return list(task.data().feature_names)
    raise ProgramError(f"task={getattr(task, 'name', '?')} has no table for trees: learner=gbdt takes a bundled tabular "
                       "task or task=tabular")


def levels(feature: Any, vocab: dict[str, list[str]]) -> list[str]:
    """A categorical feature's levels: the schema's, else the federation's discovered ones."""
    return list(feature.categories) if feature.categories is not None else list(vocab.get(feature.name, []))


def table_rows(schema: Any, table: Any, vocab: dict[str, list[str]]) -> Rows:
    """A site table's rows (read by ``schema``, a :class:`~tasks.tabular.schema.Schema`) as features and labels."""
    cols: list[np.ndarray] = []
    for f in schema.features:
        if f.type == "categorical":
            cells = np.asarray(table.categorical[f.name]).astype(str)
            missing = cells == MISSING_LEVEL
            for level in levels(f, vocab):
                col = (cells == level).astype(np.float64)
                col[missing] = np.nan
                cols.append(col)
        else:
            cols.append(np.asarray(table.numeric[f.name], dtype=np.float64))
    x = np.column_stack(cols) if cols else np.zeros((len(table), 0))
    return Rows(x, np.asarray(table.label, dtype=np.float64))


def split_rows(split: Split) -> Rows:
    """A bundled task's preprocessed split as features and 0/1 labels."""
    return Rows(split.x.numpy().astype(np.float64), split.y.numpy().astype(np.float64))


def site_rows(task: Task, data: Any, vocab: dict[str, list[str]]) -> tuple[Rows, Rows, Rows | None]:
    """The site's training, validation and (its own, if it holds them) test rows."""
    if isinstance(data, RawSite) and isinstance(task, TabularTask):
        schema = task.schema
        return table_rows(schema, data.train, vocab), table_rows(schema, data.val, vocab), table_rows(schema, data.test, vocab)
    if isinstance(data, SiteData):
        return split_rows(data.train), split_rows(data.val), None
    raise ProgramError(f"task={getattr(task, 'name', '?')}: this site's data are not a table (learner=gbdt)")


#: (id of the site's data, vocabulary digest) -> (that data object, its rows). The entry holds the data object
#: itself, so no other object can take its id while the entry lives (an id alone could be reused once freed).
_CACHE: dict[tuple[int, str], tuple[Any, tuple[Rows, Rows, Rows | None]]] = {}


def cached_site_rows(task: Task, data: Any, vocab: dict[str, list[str]]) -> tuple[Rows, Rows, Rows | None]:
    """:func:`site_rows`, kept per site data and vocabulary for the run (every step of a program reads them)."""
    import hashlib

    key = (id(data), hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest())
    held = _CACHE.get(key)
    if held is None or held[0] is not data:
        if len(_CACHE) > 64:
            _CACHE.clear()
        held = _CACHE[key] = (data, site_rows(task, data, vocab))
    return held[1]


def discover(task: Task) -> Generator[Gather, Any, dict[str, list[str]]]:
    """A program's first step for ``task=tabular`` with categories left to discovery: the names, merged
    (each site names only categories it holds at least its ``statistics.min_rows`` times)."""
    if isinstance(task, TabularTask) and task.discovers():
        got = yield Gather("vocab")
        return task.merge_vocab([json.loads(str(v)) for v in got.values])
    return {}


def local_vocab(call: SiteCall) -> str:
    """A site's answer to :func:`discover`."""
    task = call.task
    if not isinstance(task, TabularTask) or not isinstance(call.data, RawSite):
        raise ProgramError("only task=tabular discovers categories")
    return json.dumps(task.local_vocab(call.data.fit_rows, call.policy.statistics.min_rows), sort_keys=True)
