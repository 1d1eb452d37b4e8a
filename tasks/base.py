"""The Task contract: what every task (finance, medical, medical_imaging) provides.

A task owns its data end to end: it reads the raw files under ``data_dir``, holds out a
fixed test set, fits preprocessing on the remaining *pool* only (so no test statistic
leaks into training), builds its model, and exposes the pool split across sites.
Subclasses implement :meth:`Task.load` and :meth:`Task.build_model`; everything else
(partitioning, per-site train/validation split, local training, evaluation, metrics) is
shared and cached per process, so a simulation worker pays the loading cost once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from core.seeding import seed_cpu, seed_for
from tasks import cache
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


class Task(ABC):
    """Base class of all tasks. Subclasses set the class attributes and two methods."""

    name: ClassVar[str]
    models: ClassVar[tuple[str, ...]]
    #: Names of the natural sites (one per group code), or None if there is no natural split.
    natural_sites: ClassVar[tuple[str, ...] | None] = None
    #: Shape of one preprocessed example; models are built from it without loading data.
    input_shape: ClassVar[tuple[int, ...]]
    #: Files (relative to ``data_dir``) the task reads; checked before a run starts.
    data_files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: TaskConfig, data_dir: str | Path) -> None:
        self.cfg = cfg
        self.data_dir = Path(data_dir)

    # ---- to implement -------------------------------------------------------------
    @abstractmethod
    def load(self) -> TaskData:
        """Read raw files, hold out the test set, fit preprocessing on the pool only."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model for ``self.cfg.model`` (one logit per example)."""

    def augmentation(self) -> Augment | None:
        """Optional training-time augmentation; none by default."""
        return None

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

    @property
    def label_kind(self) -> str:
        """binary | multiclass | regression: the loss, scores and metrics of this task's labels."""
        return "binary"

    def local_train_config(self, epochs: int | None = None, lr: float | None = None) -> LocalTrainConfig:
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

    def evaluate(self, model: nn.Module, split: Split) -> dict[str, float]:
        """All test metrics of ``model`` on ``split`` (pooled, and per group if any)."""
        scores, loss = predict(model, split.x, split.y)
        y = split.labels()
        out = binary_metrics(y, scores, loss)
        names = self.data().group_names
        if split.group is not None and names:
            out.update(group_metrics(y, scores, split.group, names))
        return out

