"""Tasks whose rows never leave the sites (``task=tabular``, ``task=images``): the shared machinery.

Where a site's rows come from (``task.data``, relative paths under ``data_dir``):

* one file (or one site folder): in simulation, split across ``num_sites`` sites by ``partition``
  (iid or dirichlet); in a deployment each SuperNode's ``data-path`` names its own;
* a folder holding one file or folder per site (their natural split, ``partition=natural``):
  site names are the file names without extension, in sorted order.

Each site keeps a held-out test split of its own rows: the schema's ``split`` column if it has
one, else a seeded, stratified ``task.test_fraction`` of its rows. Its other rows are split into
training and validation rows as for every task. No process pools the sites' rows: the
coordinator has the schema and the totals of two protected-sum programs only
(:mod:`tasks.programs`: federated preprocessing before round 1, pooled test metrics after each).

A concrete task says how its rows are read and described (:class:`FederatedTask`'s abstract
members: a table by a schema, images by their class folders); everything else is here.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from core.config import check
from core.seeding import seed_for
from tasks.base import OpenTotal, PartitionConfig, SiteData, SiteSource, Split, Task, TaskConfig
from tasks.partition import PartitionError, partition_indices, split_train_val
from tasks.tabular.evaluation import Spec
from tasks.tabular.schema import Schema, SchemaError
from tasks.tabular.table import SiteInputError

TEST_SEED = 0x7E57


class Rows(Protocol):
    """A site's checked rows (:class:`~tasks.tabular.table.Table`, :class:`~tasks.images.ImageTable`)."""

    @property
    def path(self) -> str:
        """The site's file or folder (refusals name it)."""

    @property
    def label(self) -> np.ndarray:
        """Each row's label."""

    @property
    def line(self) -> np.ndarray:
        """Each row's line (CSV), row number (Parquet) or file index (images): refusals name it."""

    @property
    def is_test(self) -> np.ndarray | None:
        """Each row's held-out flag (the schema's split column), or None."""

    def __len__(self) -> int: ...

    def take(self, idx: np.ndarray) -> Any:
        """The rows ``idx``."""


class Layout(Protocol):
    """Where each statistic of the preprocessing sums sits (:class:`~tasks.tabular.prep.StatLayout`)."""

    @property
    def moments_size(self) -> int:
        """Values of the ``moments`` sum."""

    @property
    def spread_size(self) -> int:
        """Values of the ``spread`` sum."""

    def moments(self, t: Any) -> np.ndarray:
        """The site's ``moments`` vector of rows ``t``."""

    def means(self, moments: np.ndarray) -> Any:
        """The means the ``spread`` step centres on, from the ``moments`` total."""

    def spread(self, t: Any, means: Any) -> np.ndarray:
        """The site's ``spread`` vector of rows ``t`` about ``means``."""


class Transform(Protocol):
    """A fitted preprocessing (:class:`~tasks.tabular.prep.Preprocessor`), the same at every site."""

    @property
    def width(self) -> int:
        """Model inputs per row."""

    def transform(self, t: Any) -> np.ndarray:
        """The model inputs of rows ``t``."""

    def target(self, t: Any) -> np.ndarray:
        """The model targets of rows ``t``."""

    def label_scale(self) -> tuple[float, float]:
        """(mean, std) the model's regression output is scaled by ((0, 1) for classes)."""

    def digest(self) -> str:
        """A short digest of the transform (equal transforms, equal digests)."""

    def to_dict(self) -> dict[str, Any]:
        """The transform as the model file keeps it."""


@dataclass(frozen=True)
class RawSite:
    """One site's checked raw rows: training, validation and held-out test."""

    site_id: int
    name: str
    train: Any
    val: Any
    test: Any

    @property
    def fit_rows(self) -> list[Any]:
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


class SchemaMismatch(ValueError):
    """A site's schema is not the coordinator's (a different fingerprint)."""


class FederatedTask(Task):
    """The data-source contract for rows that stay at the sites (see the module docstring)."""

    federated_data: ClassVar[bool] = True
    input_shape: ClassVar[tuple[int, ...]] = (0,)  # known once the preprocessing is (see width)

    def __init__(self, cfg: TaskConfig, data_dir: str | Path) -> None:
        super().__init__(cfg, data_dir)
        self.width = 0

    # ---- how a concrete task reads and describes its rows ------------------------------------------
    @property
    @abstractmethod
    def schema(self) -> Schema:
        """The label and the refusal rules (min_rows, single_class) the shared machinery reads."""

    @abstractmethod
    def site_files(self) -> list[Path]:
        """The per-site files or folders of a natural split, sorted by name (empty: one shared source)."""

    @abstractmethod
    def read_site(self, path: str | Path) -> Rows:
        """One site's checked rows (cached per process); :class:`SiteInputError` naming file, column and row."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Equal at every site of a federation, or the site is refused."""

    @abstractmethod
    def described_by(self) -> str:
        """What the fingerprint stands for, in words (a refusal names it)."""

    @abstractmethod
    def layout(self, vocab: dict[str, list[str]]) -> Layout:
        """The statistics the preprocessing program sums, for this vocabulary."""

    @abstractmethod
    def preprocessor(self, vocab: dict[str, list[str]], moments: tuple[float, ...], spread: tuple[float, ...],
                     standardize: str) -> Transform:
        """The transform the totals describe (empty totals: only its width is known)."""

    @abstractmethod
    def eval_spec(self, bins: int) -> Spec:
        """The pooled test-metric sum of this task's labels."""

    @abstractmethod
    def artefact_meta(self) -> dict[str, Any]:
        """What the model file keeps to rebuild this task's model and read its inputs."""

    @property
    @abstractmethod
    def outputs(self) -> int:
        """Model outputs: one logit per class (multiclass), else one."""

    def discovers(self) -> bool:
        """Whether a vocabulary step (names in the clear) comes before the statistics (none by default)."""
        return False

    def local_vocab(self, rows: list[Any], min_count: int = 1) -> dict[str, list[str]]:
        """The discovered categories' names in ``rows`` seen at least ``min_count`` times (none by default)."""
        return {}

    def merge_vocab(self, parts: list[dict[str, list[str]]]) -> dict[str, list[str]]:
        """The federation's vocabulary from the sites' (none by default)."""
        return {}

    def standardize(self) -> str:
        """How numeric inputs are standardised (the schema's choice)."""
        return self.schema.standardize

    # ---- where things are -------------------------------------------------------------------------
    def path(self, value: str, key: str) -> Path:
        """``task.<key>``'s path, relative to ``data_dir``; a clear error if it is not set."""
        if not value:
            raise ValueError(f"task.{key} is not set: task={self.name} needs task.{key}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.data_dir / p

    @property
    def label_kind(self) -> str:
        """The schema's label kind: binary, multiclass or regression."""
        return self.schema.label.kind

    def use(self, width: int) -> FederatedTask:
        """Fix the model's input width (known after federated preprocessing)."""
        self.width = width
        return self

    @classmethod
    def num_sites(cls, partition: PartitionConfig, num_sites: int, cfg: TaskConfig | None = None,
                  data_dir: str | Path | None = None) -> int:
        """Natural split: one site per file of ``task.data`` (the first ``natural_sites`` of them)."""
        if partition.name != "natural" or cfg is None or data_dir is None:
            return num_sites
        task = cls(cfg, data_dir)
        if not task.path(cfg.data, "data").is_dir():  # a coordinator without data: the sites are the nodes
            return partition.natural_sites or num_sites
        count = len(task.site_files())
        return min(partition.natural_sites, count) if partition.natural_sites > 0 else count

    @classmethod
    def validate_config(cls, t: TaskConfig, p: PartitionConfig) -> None:
        """The partitions a site's own rows allow (range checks of the task's keys are the subclass's)."""
        check(p.name in ("iid", "dirichlet", "natural"), "partition.name", p.name, "iid, dirichlet or natural")

    def check_setup(self, partition: PartitionConfig, num_sites: int, seed: int) -> None:
        """The schema parses and the data path exists. The sites' files are checked where they are read,
        each by its own site (a bad file leaves that site out, not the run)."""
        self.schema  # noqa: B018 - parsing is the check (SchemaError is a ValueError)
        data = self.path(self.cfg.data, "data")
        if not data.exists():
            raise ValueError(f"task.data={self.cfg.data!r}: {data} does not exist")
        if partition.name == "natural" and not self.site_files():
            raise ValueError(f"partition=natural with task={self.name} needs task.data to be a folder of per-site "
                             f"files; {data} is a file")

    def agree(self, schema_sha256: str) -> None:
        """Refuse a schema other than the one the site's policy agreed to (``schema_sha256``)."""
        if schema_sha256 and self.fingerprint() != schema_sha256:
            raise SchemaError(f"this site's schema ({self.described_by()}) has fingerprint {self.fingerprint()}, not "
                              f"the one its policy agreed to (schema_sha256: {schema_sha256})")

    def check_fingerprint(self, request: Mapping[str, Any]) -> None:
        """Refuse a request made for another schema (:class:`SchemaMismatch`)."""
        mine, theirs = self.fingerprint(), str(request.get("prep-fingerprint", ""))
        if mine != theirs:
            raise SchemaMismatch(f"this site's schema ({self.described_by()}, fingerprint {mine}) differs from the "
                                 f"coordinator's (fingerprint {theirs}): every site must use the same schema file")

    # ---- sites' rows --------------------------------------------------------------------------
    def _holdout(self, table: Rows, seed: int) -> tuple[Any, Any]:
        """(non-test rows, test rows) of one site's table."""
        if table.is_test is not None:
            test = table.is_test
        else:
            test = stratified_holdout(self._strata(table), self.cfg.test_fraction, seed)
        return table.take(np.flatnonzero(~test)), table.take(np.flatnonzero(test))

    def _site(self, site_id: int, name: str, rest: Rows, test: Rows, seed: int) -> RawSite:
        labels = self._strata(rest)
        tr, va = split_train_val(np.arange(len(rest)), labels, self.cfg.val_fraction, seed=seed * 7919 + site_id)
        site = RawSite(site_id, name, rest.take(tr), rest.take(va), test)
        self.check_site(site)
        return site

    def _strata(self, table: Any) -> np.ndarray:
        """What a site's held-out and validation rows are stratified by: the class, a survival label's event
        indicator, nothing for a regression."""
        kind = self.schema.label.kind
        if kind == "regression":
            return np.zeros(len(table), np.int64)
        return table.label[:, 1].astype(np.int64) if kind == "survival" else table.label

    def check_site(self, site: RawSite) -> None:
        """Refuse sites too small to take part safely or with a single class."""
        schema, where = self.schema, f"site {site.name} ({site.train.path})"
        rows = len(site.train) + len(site.val)
        if rows < schema.min_rows:
            raise SiteInputError(f"{where}: {rows} usable rows, below the schema's min_rows={schema.min_rows}; "
                                 "a site this small would leak its records through its updates")
        if schema.label.kind == "survival":
            if schema.single_class == "refuse" and not any(np.any(t.label[:, 1] > 0) for t in (site.train, site.val,
                                                                                                site.test)):
                raise SiteInputError(f"{where}: no row has an event ({schema.label.event!r}: every time is censored); "
                                     "such a site reveals that none of its patients had one (or the schema's "
                                     "single_class: allow)")
        elif schema.label.kind != "regression" and schema.single_class == "refuse":
            present = np.unique(np.concatenate([site.train.label, site.val.label]))
            if present.size < 2:
                raise SiteInputError(f"{where}: every training row has the same label "
                                     f"({schema.label.column!r} class {int(present[0])}); a site needs at least two "
                                     "classes to train a classifier (or the schema's single_class: allow)")

    def raw_sites(self, partition: PartitionConfig, num_sites: int, seed: int) -> list[RawSite]:
        """Simulation: every site's rows (one source split by ``partition``, or one per site)."""
        files = self.site_files()
        if files:
            chosen = files[: partition.natural_sites] if partition.natural_sites > 0 else files
            return [self.raw_site(partition, num_sites, seed, k) for k in range(len(chosen))]
        table = self.read_site(self.path(self.cfg.data, "data"))
        if partition.name == "natural":
            raise PartitionError(f"partition.name='natural' with task={self.name} needs task.data to be a folder of "
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
        key = (self.name, str(self.path(self.cfg.data, "data")), self.cfg.schema, partition.name, num_sites, seed,
               partition.alpha, partition.min_partition_size, self.cfg.val_fraction, self.cfg.test_fraction)
        if key not in _RAW:
            _RAW.clear()
            _RAW[key] = self.raw_sites(partition, num_sites, seed)
        return _RAW[key][site_id]

    def _partition(self, labels: np.ndarray, partition: PartitionConfig, num_sites: int, seed: int
                   ) -> list[np.ndarray]:
        if self.schema.label.kind == "regression":
            labels = np.zeros(labels.shape[0], np.int64)
        elif self.schema.label.kind == "survival":  # partitioned by the event indicator
            labels = labels[:, 1].astype(np.int64)
        return partition_indices(labels, None, partition.name, num_sites, seed, alpha=partition.alpha,
                                 min_partition_size=partition.min_partition_size)

    def raw_site_file(self, path: str | Path, site_id: int, name: str, seed: int) -> RawSite:
        """Deployment: this SuperNode's own file (its ``data-path``)."""
        rest, test = self._holdout(self.read_site(path), seed_for(seed, TEST_SEED))
        return self._site(site_id, name, rest, test, seed)

    # ---- the data-source contract ------------------------------------------------------------------
    def site_from_partition(self, partition: PartitionConfig, num_sites: int, seed: int, site_id: int) -> RawSite:
        """Simulation: the site's raw rows (:meth:`raw_site`)."""
        return self.raw_site(partition, num_sites, seed, site_id)

    def site_from_file(self, path: str | Path, site_id: int, name: str, seed: int, num_sites: int) -> RawSite:
        """Deployment: the site's own file or folder (:meth:`raw_site_file`)."""
        return self.raw_site_file(Path(path).expanduser(), site_id, name, seed)

    def transform_for(self, config: Mapping[str, Any], open_total: OpenTotal) -> Transform:
        """The transform the ``prep-*`` entries of a message's config describe (``open_total`` opens the
        totals: Paillier decrypts them at the site); fixes the model's width."""
        self.check_fingerprint(config)
        vocab = {k: list(v) for k, v in json.loads(str(config["prep-vocab"])).items()}
        prep = self.preprocessor(vocab, tuple(open_total("prep-moments")), tuple(open_total("prep-spread")),
                                 str(config.get("prep-standardize", "numeric")))
        self.use(prep.width)
        return prep

    def _prepared(self, source: SiteSource, config: Mapping[str, Any] | None, open_total: OpenTotal
                  ) -> tuple[SiteData, Split]:
        if config is None or "prep-vocab" not in config:
            raise ValueError(f"task={self.name}: a message without the preprocessing config reached the site")
        assert isinstance(source, RawSite)
        return self.prepared(source, self.transform_for(config, open_total))

    def site_data(self, source: SiteSource, config: Mapping[str, Any] | None, open_total: OpenTotal) -> SiteData:
        """The site's training and validation tensors, transformed as the message's config describes."""
        return self._prepared(source, config, open_total)[0]

    def own_test_rows(self, source: SiteSource, config: Mapping[str, Any] | None, open_total: OpenTotal,
                      partition: PartitionConfig | None) -> tuple[SiteData, Split, str]:
        """The site's own held-out test rows, transformed as the message's config describes."""
        site, test = self._prepared(source, config, open_total)
        return site, test, "own test rows"

    def prepared(self, raw: RawSite, prep: Transform) -> tuple[SiteData, Split]:
        """The site's training and validation data and its test split, preprocessed by ``prep``."""
        key = (id(raw), prep.digest())
        if key not in _PREPARED:
            if len(_PREPARED) > 256:
                _PREPARED.clear()

            def split(t: Any) -> Split:
                return Split(torch.from_numpy(prep.transform(t)), torch.from_numpy(prep.target(t)))

            _PREPARED[key] = (SiteData(raw.site_id, raw.name, split(raw.train), split(raw.val)), split(raw.test), raw)
        site, test, _ = _PREPARED[key]
        return site, test


_PREPARED: dict[tuple[int, str], tuple[SiteData, Split, Any]] = {}
_RAW: dict[tuple[Any, ...], list[RawSite]] = {}
