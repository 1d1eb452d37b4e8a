"""``task=tabular``: any site's own table, described by a schema, preprocessed federally.

Where the rows come from (``task.data``, relative paths under ``data_dir``):

* one CSV/Parquet file: in simulation, split across ``num_sites`` sites by ``partition``
  (iid or dirichlet); in a deployment each SuperNode's ``data-path`` names its own file;
* a folder of files, one per site (their natural split, ``partition=natural``): site names
  are the file names without extension, in sorted order.

Each site keeps a held-out test split of its own rows: the schema's ``split`` column if
it has one, else a seeded, stratified ``task.test_fraction`` of its rows. Its other rows
are split into training and validation rows as for every task. No process ever pools the
sites' rows: the coordinator has the schema and the federated totals only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from core.config import check
from core.seeding import seed_for
from tasks.base import PartitionConfig, SiteData, Split, Task, TaskConfig, TaskData
from tasks.models import MLP, LogisticRegression
from tasks.partition import PartitionError, partition_indices, split_train_val
from tasks.tabular.evaluation import Spec
from tasks.tabular.prep import Preprocessor, StatLayout, local_vocab, merge_vocab
from tasks.tabular.schema import Schema
from tasks.tabular.table import SUFFIXES, SiteInputError, Table, read

TEST_SEED = 0x7E57


def load_schema(path: str) -> Schema:
    """The schema in ``path``, parsed once per process and content (an edited file is parsed again)."""
    p = Path(path).expanduser()
    return _schema(str(p), p.read_bytes() if p.is_file() else b"")


@lru_cache(maxsize=16)
def _schema(path: str, content: bytes) -> Schema:
    return Schema.load(path)


@lru_cache(maxsize=64)
def _read(path: str, mtime: float, schema: Schema) -> Table:
    return read(path, schema)


def read_table(path: str | Path, schema: Schema) -> Table:
    """A site file, read once per process (re-read when the file changes)."""
    p = Path(path).expanduser()
    return _read(str(p.resolve()), p.stat().st_mtime if p.is_file() else 0.0, schema)


@dataclass(frozen=True)
class RawSite:
    """One site's checked raw rows: training, validation and held-out test."""

    site_id: int
    name: str
    train: Table
    val: Table
    test: Table

    @property
    def fit_rows(self) -> list[Table]:
        """The rows statistics are computed on: everything but the held-out test rows."""
        return [self.train, self.val]


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a seeded, stratified held-out share of the rows (per class, rounded)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(labels.shape[0], dtype=bool)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        mask[rng.permutation(members)[: int(round(fraction * members.size))]] = True
    return mask


class TabularTask(Task):
    """A schema-driven task over sites' own tables (binary labels; MLP or logistic regression)."""

    name: ClassVar[str] = "tabular"
    models: ClassVar[tuple[str, ...]] = ("mlp", "logreg")
    input_shape: ClassVar[tuple[int, ...]] = (0,)  # known once the vocabulary is (see width)
    federated_data: ClassVar[bool] = True

    def __init__(self, cfg: TaskConfig, data_dir: str | Path) -> None:
        super().__init__(cfg, data_dir)
        self.width = 0

    # ---- where things are ---------------------------------------------------------------
    def path(self, value: str, key: str) -> Path:
        if not value:
            raise ValueError(f"task.{key} is not set: task=tabular needs task.schema=FILE.yaml and task.data=FILE|DIR")
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.data_dir / p

    @property
    def schema(self) -> Schema:
        return load_schema(str(self.path(self.cfg.schema, "schema")))

    def site_files(self) -> list[Path]:
        """The per-site files of a folder (natural split), sorted by name."""
        p = self.path(self.cfg.data, "data")
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES) if p.is_dir() else []
        if p.is_dir() and not files:
            raise SiteInputError(f"task.data folder {p} holds no {list(SUFFIXES)} files (one per site)")
        return files

    def read_site(self, path: str | Path) -> Table:
        """One site's checked rows (cached per process)."""
        return read_table(path, self.schema)

    def natural_count(self) -> int:
        return len(self.site_files())

    @classmethod
    def num_sites(cls, partition: PartitionConfig, num_sites: int, cfg: TaskConfig | None = None,
                  data_dir: str | Path | None = None) -> int:
        """Natural split: one site per file of ``task.data`` (the first ``natural_sites`` of them)."""
        if partition.name != "natural" or cfg is None or data_dir is None:
            return num_sites
        task = cls(cfg, data_dir)
        if not task.path(cfg.data, "data").is_dir():  # a coordinator without data: the sites are the nodes
            return partition.natural_sites or num_sites
        count = task.natural_count()
        return min(partition.natural_sites, count) if partition.natural_sites > 0 else count

    # ---- Task contract ------------------------------------------------------------------------
    def load(self) -> TaskData:
        raise RuntimeError("task=tabular has no pooled data: each site reads its own file and the coordinator "
                           "sees only federated totals (tasks/tabular)")

    @property
    def label_kind(self) -> str:
        return self.schema.label.kind

    @property
    def outputs(self) -> int:
        """Model outputs: one logit per class (multiclass), else one."""
        lab = self.schema.label
        return len(lab.classes) if lab.kind == "multiclass" else 1

    def build_model(self) -> nn.Module:
        if self.width <= 0:
            raise RuntimeError("task=tabular: the model's width is known after federated preprocessing")
        if self.cfg.model == "logreg":  # multinomial logistic regression for multiclass labels, linear for regression
            return LogisticRegression(self.width, self.outputs)
        return MLP(self.width, self.cfg.hidden, self.cfg.dropout, self.outputs)

    def use(self, width: int) -> TabularTask:
        self.width = width
        return self

    def evaluate(self, model: nn.Module, split: Split) -> dict[str, float]:
        raise RuntimeError("task=tabular: test metrics are pooled from the sites (tasks/tabular/evaluation.py)")

    # ---- sites' rows --------------------------------------------------------------------------
    def _holdout(self, table: Table, seed: int) -> tuple[Table, Table]:
        """(non-test rows, test rows) of one site's table."""
        if table.is_test is not None:
            test = table.is_test
        else:
            strata = table.label if self.schema.label.kind != "regression" else np.zeros(len(table), np.int64)
            test = stratified_holdout(strata, self.cfg.test_fraction, seed)
        return table.take(np.flatnonzero(~test)), table.take(np.flatnonzero(test))

    def _site(self, site_id: int, name: str, rest: Table, test: Table, seed: int) -> RawSite:
        schema = self.schema
        labels = rest.label if schema.label.kind != "regression" else np.zeros(len(rest), np.int64)
        tr, va = split_train_val(np.arange(len(rest)), labels, self.cfg.val_fraction, seed=seed * 7919 + site_id)
        site = RawSite(site_id, name, rest.take(tr), rest.take(va), test)
        self.check_site(site)
        return site

    def check_site(self, site: RawSite) -> None:
        """Refuse sites too small to take part safely or with a single class."""
        schema, where = self.schema, f"site {site.name} ({site.train.path})"
        rows = len(site.train) + len(site.val)
        if rows < schema.min_rows:
            raise SiteInputError(f"{where}: {rows} usable rows, below the schema's min_rows={schema.min_rows}; "
                                 "a site this small would leak its records through its updates")
        if schema.label.kind != "regression" and schema.single_class == "refuse":
            present = np.unique(np.concatenate([site.train.label, site.val.label]))
            if present.size < 2:
                raise SiteInputError(f"{where}: every training row has the same label "
                                     f"({schema.label.column!r} class {int(present[0])}); a site needs at least two "
                                     "classes to train a classifier (or the schema's single_class: allow)")

    def raw_sites(self, partition: PartitionConfig, num_sites: int, seed: int) -> list[RawSite]:
        """Simulation: every site's rows (one file split by ``partition``, or one file per site)."""
        files = self.site_files()
        if files:
            chosen = files[: partition.natural_sites] if partition.natural_sites > 0 else files
            return [self.raw_site(partition, num_sites, seed, k) for k in range(len(chosen))]
        table = self.read_site(self.path(self.cfg.data, "data"))
        if partition.name == "natural":
            raise PartitionError("partition.name='natural' with task=tabular needs task.data to be a folder of "
                                 "per-site files")
        if table.is_test is not None:  # a fixed held-out split: partition its two parts alike
            pool, test_rows = np.flatnonzero(~table.is_test), np.flatnonzero(table.is_test)
        else:
            pool, test_rows = np.arange(len(table)), np.array([], dtype=np.int64)
        parts = self._partition(table.label[pool], partition, num_sites, seed)
        tparts = self._partition(table.label[test_rows], partition, num_sites, seed + 1) if test_rows.size else None
        out = []
        for k in range(num_sites):
            rows = table.take(pool[parts[k]])
            if tparts is not None:
                rest, test = rows, table.take(test_rows[tparts[k]])
            else:
                rest, test = self._holdout(rows, seed_for(seed, k, TEST_SEED))
            out.append(self._site(k, f"site-{k}", rest, test, seed))
        return out

    def raw_site(self, partition: PartitionConfig, num_sites: int, seed: int, site_id: int) -> RawSite:
        """Simulation: one site's rows. With one file per site only that site's file is read (a bad file
        leaves its own site out); one shared file is read and partitioned once per process."""
        files = self.site_files()
        if files:
            f = files[site_id]
            rest, test = self._holdout(self.read_site(f), seed_for(seed, site_id, TEST_SEED))
            return self._site(site_id, f.stem, rest, test, seed)
        key = (str(self.path(self.cfg.data, "data")), self.cfg.schema, partition.name, num_sites, seed, partition.alpha,
               partition.min_partition_size, self.cfg.val_fraction, self.cfg.test_fraction)
        if key not in _RAW:
            _RAW.clear()
            _RAW[key] = self.raw_sites(partition, num_sites, seed)
        return _RAW[key][site_id]

    def _partition(self, labels: np.ndarray, partition: PartitionConfig, num_sites: int, seed: int
                   ) -> list[np.ndarray]:
        if self.schema.label.kind == "regression":
            labels = np.zeros(labels.shape[0], np.int64)
        return partition_indices(labels, None, partition.name, num_sites, seed, alpha=partition.alpha,
                                 min_partition_size=partition.min_partition_size)

    def raw_site_file(self, path: str | Path, site_id: int, name: str, seed: int) -> RawSite:
        """Deployment: this SuperNode's own file (its ``data-path``)."""
        rest, test = self._holdout(self.read_site(path), seed_for(seed, TEST_SEED))
        return self._site(site_id, name, rest, test, seed)

    @classmethod
    def validate_config(cls, t: TaskConfig, p: PartitionConfig) -> None:
        """Range checks of this task's keys (its files are read, and checked, where the data are)."""
        check(bool(t.schema), "task.schema", t.schema, "the path of a schema YAML (fedsilo data schema infer FILE)")
        check(bool(t.data), "task.data", t.data, "a CSV/Parquet file, or a folder with one file per site")

    # ---- the federated-data contract (app/federated.py) -------------------------------------------
    def fingerprint(self) -> str:
        """Equal at every site of a federation, or the site is refused."""
        return self.schema.fingerprint()

    def described_by(self) -> str:
        return self.schema.source

    def discovers(self) -> bool:
        """Whether a vocabulary step (names in the clear) comes before the statistics."""
        return bool(self.schema.discovered())

    def local_vocab(self, table: Table | list[Table], min_count: int = 1) -> dict[str, list[str]]:
        return local_vocab(table, self.schema, min_count)

    def merge_vocab(self, parts: list[dict[str, list[str]]]) -> dict[str, list[str]]:
        return merge_vocab(parts, self.schema)

    def layout(self, vocab: dict[str, list[str]]) -> StatLayout:
        return StatLayout(self.schema, vocab)

    def preprocessor(self, vocab: dict[str, list[str]], moments: tuple[float, ...], spread: tuple[float, ...],
                     standardize: str) -> Preprocessor:
        return Preprocessor(self.schema, vocab, moments, spread, standardize)

    def eval_spec(self, bins: int) -> Spec:
        lab = self.schema.label
        return Spec(lab.kind, max(2, len(lab.classes)), bins)

    def artefact_meta(self) -> dict[str, Any]:
        """What the model file keeps to rebuild this task's model and read its inputs."""
        return {"task": self.name, "schema": self.schema.to_dict(), "kind": self.label_kind}

    def prepared(self, raw: RawSite, prep: Preprocessor) -> tuple[SiteData, Split]:
        """The site's training and validation data and its test split, preprocessed by ``prep``."""
        key = (id(raw), prep.digest())
        if key not in _PREPARED:
            if len(_PREPARED) > 256:
                _PREPARED.clear()

            def split(t: Table) -> Split:
                return Split(torch.from_numpy(prep.transform(t)), torch.from_numpy(prep.target(t)))

            _PREPARED[key] = (SiteData(raw.site_id, raw.name, split(raw.train), split(raw.val)), split(raw.test), raw)
        site, test, _ = _PREPARED[key]
        return site, test


_PREPARED: dict[tuple[int, str], tuple[SiteData, Split, Any]] = {}
_RAW: dict[tuple[Any, ...], list[RawSite]] = {}
