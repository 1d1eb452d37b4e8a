"""The data-source contract: what a task's data are and how a site reads them.

Two kinds of task implement it:

* :class:`PooledTask` (``finance``, ``medical``, ``medical_imaging``): research data sets bundled
  with fedsilo. The task reads the raw files under ``data_dir``, holds out a fixed test set, fits
  preprocessing on the remaining *pool* only (so no test statistic leaks into training) and splits
  the pool across sites; the coordinator of a simulation may score the global model on the test set.
* :class:`tasks.federated.FederatedTask` (``tabular``, ``images``): a site's own rows, which never
  leave it; preprocessing and test metrics are protected-sum programs (:mod:`core.programs`).

Both give a site the same things through the same methods (:meth:`Task.site_from_partition`,
:meth:`Task.site_from_file`, :meth:`Task.site_data`, :meth:`Task.own_test_rows`), so the
ClientApp never asks which kind it holds. How a model is fitted from the data is the learner's
(:mod:`tasks.learners`): the torch learner trains :meth:`Task.build_model` by local rounds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from core.config import check
from core.seeding import seed_cpu, seed_for
from tasks import cache, site_file
from tasks.data import SiteData, Split, TaskData
from tasks.metrics import binary_metrics, group_metrics
from tasks.partition import PartitionError, partition_indices, split_train_val
from tasks.training import Augment, LocalTrainConfig, Penalty, predict, train_local


@dataclass
class TaskConfig:
    """Hydra schema of the ``task`` group (``conf/task/*.yaml``)."""

    name: str = "finance"
    model: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    local_epochs: int = 1
    val_fraction: float = 0.1
    augment: bool = False
    default_partition: str = "iid"
    train_rows: int = 0          # keep at most this many training rows per site (0 = all); e.g. for audits
    # task=tabular (a site's own table; paths relative to data_dir):
    schema: str = ""             # the schema YAML (tasks/tabular/schema.py)
    data: str = ""               # one CSV/Parquet file (split by partition) or a folder of one file per site
    test_fraction: float = 0.2   # each site's seeded, stratified held-out test rows (unless the schema has a split column)
    auc_bins: int = 8192         # logit histogram bins of the pooled test AUC (finer: tighter bound, bigger sums)
    # task=images (folders of images per site):
    classes: list[str] = field(default_factory=list)  # the class folder names, in order (binary: [negative, positive])
    image_size: int = 28         # every image is resized to image_size x image_size
    channels: int = 1            # 1 (grey) or 3 (RGB)
    min_rows: int = 20           # task=images: a site with fewer images is refused


@dataclass
class PartitionConfig:
    """Hydra schema of the ``partition`` group (``conf/partition/*.yaml``)."""

    name: str = "iid"
    alpha: float = 0.5
    min_partition_size: int = 10
    natural_sites: int = 0       # natural split only: the first k natural sites take part (0 = all)


_DATA_CACHE: dict[tuple[Any, ...], TaskData] = {}
_SITES_CACHE: dict[tuple[Any, ...], list[SiteData] | PartitionError] = {}


class SiteSource(Protocol):
    """A site's data as its task keeps them: prepared tensors (:class:`SiteData`) or raw rows."""

    @property
    def site_id(self) -> int:
        """The site's index in the federation."""

    @property
    def name(self) -> str:
        """The site's name."""

    @property
    def train(self) -> Any:
        """The site's training rows."""

    @property
    def val(self) -> Any:
        """The site's validation rows."""


#: Opens a total a protected-sum program sent in a message's config (the aggregation option's site half).
OpenTotal = Callable[[str], np.ndarray]


class Task(ABC):
    """The data-source contract every task implements (see the module docstring)."""

    name: ClassVar[str]
    models: ClassVar[tuple[str, ...]]
    #: Names of the natural sites (one per group code), or None if there is no natural split.
    natural_sites: ClassVar[tuple[str, ...] | None] = None
    #: Shape of one preprocessed example; models are built from it without loading data.
    input_shape: ClassVar[tuple[int, ...]]
    #: Files (relative to ``data_dir``) the task reads; checked before a run starts.
    data_files: ClassVar[tuple[str, ...]] = ()
    #: Whether the rows stay at the sites (no process pools them; the coordinator holds no test set).
    federated_data: ClassVar[bool] = False
    #: The learner a run of this task uses when ``learner.name`` is not set (:mod:`tasks.learners`).
    default_learner: ClassVar[str] = "torch"

    def __init__(self, cfg: TaskConfig, data_dir: str | Path) -> None:
        self.cfg = cfg
        self.data_dir = Path(data_dir)

    # ---- the model family that fits these inputs ----------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model for ``self.cfg.model`` (one logit per example, or per class)."""

    def augmentation(self) -> Augment | None:
        """Optional training-time augmentation; none by default."""
        return None

    @property
    def label_kind(self) -> str:
        """The label kind, binary | multiclass | regression: the loss, scores and metrics of this task's labels."""
        return "binary"

    # ---- how a site reads its data -------------------------------------------------------------
    @classmethod
    def num_sites(cls, partition: PartitionConfig, num_sites: int, cfg: TaskConfig | None = None,
                  data_dir: str | Path | None = None) -> int:
        """How many sites a partition yields (natural splits have their own count)."""
        return num_sites

    @classmethod
    def validate_config(cls, t: TaskConfig, p: PartitionConfig) -> None:
        """Checks of this task's own keys, beyond the ``task`` group's common ones (none by default)."""

    @abstractmethod
    def site_from_partition(self, partition: PartitionConfig, num_sites: int, seed: int, site_id: int) -> SiteSource:
        """Simulation: site ``site_id``'s share of the task's data for this partition and seed."""

    @abstractmethod
    def site_from_file(self, path: str | Path, site_id: int, name: str, seed: int, num_sites: int) -> SiteSource:
        """Deployment: the site's own data file or folder (its node config ``data-path``)."""

    @abstractmethod
    def check_setup(self, partition: PartitionConfig, num_sites: int, seed: int) -> None:
        """Before a run starts, where the data are: ValueError saying which key or file to change."""

    def agree(self, schema_sha256: str) -> None:
        """Refuse (:class:`~tasks.tabular.schema.SchemaError`) if the site's policy agreed to another
        schema; tasks without a schema have nothing to agree to."""

    @abstractmethod
    def site_data(self, source: SiteSource, config: Mapping[str, Any] | None, open_total: OpenTotal) -> SiteData:
        """The site's training and validation tensors, for a message whose config is ``config``
        (federated data: transformed by the preprocessing the config's totals describe)."""

    @abstractmethod
    def own_test_rows(self, source: SiteSource, config: Mapping[str, Any] | None, open_total: OpenTotal,
                      partition: PartitionConfig | None) -> tuple[SiteData, Split, str]:
        """(the site's data, the held-out rows of its own it scores personal models on, what they are);
        ``partition`` is the simulation's, None at a deployed site (its own file)."""

    # ---- local training (the torch learner) --------------------------------------------------------
    def local_train_config(self, epochs: int | None = None, lr: float | None = None) -> LocalTrainConfig:
        """The optimiser settings of one round of local training (``epochs``, ``lr``: overrides)."""
        c = self.cfg
        return LocalTrainConfig(
            epochs=c.local_epochs if epochs is None else epochs, batch_size=c.batch_size, lr=c.lr if lr is None else lr,
            momentum=c.momentum, weight_decay=c.weight_decay, optimizer=c.optimizer, loss=self.label_kind,
        )

    def train(
        self,
        model: nn.Module,
        split: Split,
        seed: int,
        *,
        epochs: int | None = None,
        max_steps: int | None = None,
        penalty: Penalty | None = None,
        lr: float | None = None,
    ) -> dict[str, float]:
        """One site's local training for one round; deterministic given ``seed``.

        ``epochs`` overrides the task's ``local_epochs``; ``max_steps`` caps the optimiser
        steps (partial work); ``penalty`` is added to the loss (e.g. FedProx's term); ``lr``
        overrides the task's learning rate (personal training).
        """
        seed_cpu(seed)  # dropout draws from the global generator
        gen = torch.Generator().manual_seed(seed)
        aug = self.augmentation() if self.cfg.augment else None
        return train_local(model, split.x, split.y, self.local_train_config(epochs, lr), gen, aug,
                           penalty=penalty, max_steps=max_steps)


class PooledTask(Task):
    """A bundled research data set: loaded, split into a test set and a pool, the pool across sites.

    Subclasses set the class attributes and implement :meth:`load` and :meth:`build_model`;
    partitioning, the per-site train/validation split and evaluation are shared and cached per
    process, so a simulation worker pays the loading cost once.
    """

    # ---- to implement -------------------------------------------------------------
    @abstractmethod
    def load(self) -> TaskData:
        """Read raw files, hold out the test set, fit preprocessing on the pool only."""

    # ---- shared behaviour -------------------------------------------------------------
    def data(self) -> TaskData:
        """The task's data, loaded once per process."""
        key = (type(self), str(self.data_dir.resolve()))
        if key not in _DATA_CACHE:
            data = cache.load_data(self)  # prepared by another process of the run (tasks/cache.py)
            if data is None:
                data = self.load()
                cache.save_data(self, data)
            _DATA_CACHE[key] = data
        return _DATA_CACHE[key]

    @classmethod
    def num_sites(cls, partition: PartitionConfig, num_sites: int, cfg: TaskConfig | None = None,
                  data_dir: str | Path | None = None) -> int:
        """How many sites a partition yields: natural splits have their own count."""
        if partition.name == "natural":
            if cls.natural_sites is None:
                raise PartitionError(
                    f"partition.name='natural': task {cls.name!r} has no natural split; "
                    "use iid or dirichlet"
                )
            return min(partition.natural_sites, len(cls.natural_sites)) if partition.natural_sites > 0 \
                else len(cls.natural_sites)
        return num_sites

    @classmethod
    def validate_config(cls, t: TaskConfig, p: PartitionConfig) -> None:
        """A natural partition needs the task's natural split (the first ``natural_sites`` of its sites)."""
        if p.name == "natural":
            check(cls.natural_sites is not None, "partition.name", p.name,
                  f"iid or dirichlet: task {t.name} has no natural split")
            n_natural = len(cls.natural_sites or ())
            check(p.natural_sites == 0 or 2 <= p.natural_sites <= n_natural, "partition.natural_sites",
                  p.natural_sites, f"0 (all {n_natural}) or 2..{n_natural}: the first k of task {t.name}'s natural "
                  f"sites {list(cls.natural_sites or ())}")

    def check_setup(self, partition: PartitionConfig, num_sites: int, seed: int) -> None:
        """Every site of the partition has training rows (a natural split is the data set's own)."""
        if partition.name == "natural":
            return
        try:
            sites = self.sites(partition, num_sites, seed)
        except PartitionError as err:
            hint = ("raise partition.alpha, lower num_sites or partition.min_partition_size, or try another seed"
                    if partition.name == "dirichlet" else "lower num_sites")
            raise PartitionError(f"{err} (task={self.name}, partition={partition.name}, num_sites={num_sites}, "
                                 f"seed={seed}); {hint}") from err
        empty = [s.name for s in sites if len(s.train) == 0]
        if empty:
            raise ValueError(f"sites {empty} have no training rows after the validation split "
                             f"(task.val_fraction={self.cfg.val_fraction}); lower num_sites or val_fraction")

    def sites(self, partition: PartitionConfig, num_sites: int, seed: int) -> list[SiteData]:
        """All sites' data for this partition and seed (computed once per process)."""
        key = (
            type(self), str(self.data_dir.resolve()), partition.name, num_sites, seed,
            partition.alpha, partition.min_partition_size, self.cfg.val_fraction, self.cfg.train_rows,
            partition.natural_sites,
        )
        if key not in _SITES_CACHE:
            try:
                _SITES_CACHE[key] = self._make_sites(partition, num_sites, seed)
            except PartitionError as err:  # deterministic: remember it, fail fast next time
                _SITES_CACHE[key] = err
        cached = _SITES_CACHE[key]
        if isinstance(cached, PartitionError):
            raise cached
        return cached

    def _make_sites(self, partition: PartitionConfig, num_sites: int, seed: int) -> list[SiteData]:
        pool = self.data().pool
        key = ("sites", partition.name, num_sites, seed, partition.alpha, partition.min_partition_size,
               partition.natural_sites, self.cfg.val_fraction, self.cfg.train_rows)
        rows = cache.load_sites(self, key)  # made by another process of the run (tasks/cache.py)
        if rows is None:
            rows = self._site_rows(pool, partition, num_sites, seed)
            cache.save_sites(self, key, rows)
        return [SiteData(i, name, pool.take(tr), pool.take(va)) for i, (name, tr, va) in enumerate(rows)]

    def _site_rows(self, pool: Split, partition: PartitionConfig, num_sites: int, seed: int
                   ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Each site's name and its training and validation rows of the pool."""
        labels = pool.labels()
        parts = partition_indices(
            labels, pool.group, partition.name, num_sites, seed,
            alpha=partition.alpha, min_partition_size=partition.min_partition_size,
        )
        if partition.name == "natural" and partition.natural_sites > 0:
            parts = parts[: partition.natural_sites]  # the other natural sites stay out of the federation
        out = []
        for site_id, rows in enumerate(parts):
            tr, va = split_train_val(rows, labels, self.cfg.val_fraction, seed=seed * 7919 + site_id)
            if 0 < self.cfg.train_rows < tr.size:  # a seeded subset, in the original order
                keep = np.random.default_rng(seed_for(seed, site_id, 0x7241)).choice(tr.size, self.cfg.train_rows,
                                                                                    replace=False)
                tr = tr[np.sort(keep)]
            name = (
                self.natural_sites[site_id]
                if partition.name == "natural" and self.natural_sites
                else f"site-{site_id}"
            )
            out.append((name, tr, va))
        return out

    def site_from_partition(self, partition: PartitionConfig, num_sites: int, seed: int, site_id: int) -> SiteData:
        """Simulation: the site's share of the pool (:meth:`sites`)."""
        return self.sites(partition, num_sites, seed)[site_id]

    def site_from_file(self, path: str | Path, site_id: int, name: str, seed: int, num_sites: int) -> SiteData:
        """Deployment: the site's file written by ``fedsilo data split`` (:mod:`tasks.site_file`)."""
        return site_file.load(str(path), task=self.name, num_sites=num_sites, input_shape=self.input_shape)

    def site_data(self, source: SiteSource, config: Mapping[str, Any] | None, open_total: OpenTotal) -> SiteData:
        """The site's tensors, preprocessed already (on the pool)."""
        assert isinstance(source, SiteData)
        return source

    def own_test_rows(self, source: SiteSource, config: Mapping[str, Any] | None, open_total: OpenTotal,
                      partition: PartitionConfig | None) -> tuple[SiteData, Split, str]:
        """Split by natural sites (FLamby's hospitals) in a simulation: the site's share of the task's
        test set, its local test set. Any other split: its validation rows (its only held-out rows of
        its own distribution)."""
        assert isinstance(source, SiteData)
        if partition is not None and partition.name == "natural":
            test = self.data().test
            assert test.group is not None
            return source, test.take(np.flatnonzero(test.group == source.site_id)), "local test rows"
        return source, source.val, "validation rows"

    def evaluate(self, model: nn.Module, split: Split) -> dict[str, float]:
        """All test metrics of ``model`` on ``split`` (pooled, and per group if any)."""
        scores, loss = predict(model, split.x, split.y)
        y = split.labels()
        out = binary_metrics(y, scores, loss)
        names = self.data().group_names
        if split.group is not None and names:
            out.update(group_metrics(y, scores, split.group, names))
        return out

