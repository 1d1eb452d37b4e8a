"""Split a task's training pool across sites with Flower Datasets partitioners.

``iid``        shuffled equal shards (``IidPartitioner`` over a seeded shuffle),
``dirichlet``  label skew with concentration ``alpha`` (``DirichletPartitioner``),
``natural``    one site per natural group, e.g. hospital (``NaturalIdPartitioner``).

The partitioners work on a Hugging Face ``Dataset``; we give them a two-column table
(row index, label, natural group) and take back row indices, so the data itself never has
to be converted.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np

PARTITIONS = ("iid", "dirichlet", "natural")


class PartitionError(ValueError):
    """The requested partition cannot be made from this data (named key and reason)."""


def partition_indices(
    labels: np.ndarray,
    groups: np.ndarray | None,
    scheme: str,
    num_sites: int,
    seed: int,
    alpha: float = 0.5,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Return one sorted array of row indices per site; together they cover every row once.

    Parameters
    ----------
    labels : 0/1 label per row (the Dirichlet partitioner skews on it).
    groups : integer natural-group code per row, required for ``natural``.
    scheme : one of :data:`PARTITIONS`.
    num_sites : number of sites (ignored by ``natural``, which has one site per group).
    seed : seeds the shuffle and the Dirichlet draws.
    alpha : Dirichlet concentration; small values give strong label skew.
    min_partition_size : Dirichlet redraws until every site has at least this many rows.
    """
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
    )

    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    n = len(labels)
    if scheme not in PARTITIONS:
        raise PartitionError(f"partition.name={scheme!r} is not one of {list(PARTITIONS)}")
    if scheme != "natural" and num_sites > n:
        raise PartitionError(f"num_sites={num_sites} exceeds the {n} training rows")
    table = {"row": np.arange(n, dtype=np.int64), "label": np.asarray(labels, dtype=np.int64)}
    if scheme == "natural":
        if groups is None:
            raise PartitionError("partition.name='natural' needs a task with a natural split")
        table["group"] = np.asarray(groups, dtype=np.int64)
    ds = datasets.Dataset.from_dict(table)

    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_sites)
        ds = ds.shuffle(seed=seed)
    elif scheme == "dirichlet":
        if num_sites * min_partition_size > n:
            raise PartitionError(
                f"num_sites={num_sites} x min_partition_size={min_partition_size} "
                f"exceeds the {n} training rows"
            )
        partitioner = DirichletPartitioner(
            num_partitions=num_sites,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        partitioner = NaturalIdPartitioner(partition_by="group")
    partitioner.dataset = ds
    count = len(np.unique(table["group"])) if scheme == "natural" else num_sites
    try:
        with warnings.catch_warnings():  # its per-redraw warnings; a failure is reported below
            warnings.simplefilter("ignore", UserWarning)
            parts = [np.sort(np.asarray(partitioner.load_partition(i)["row"])) for i in range(count)]
    except ValueError as err:  # Dirichlet gives up after too many redraws
        raise PartitionError(f"partition.name={scheme!r} failed: {err}") from err
    return parts


def split_train_val(
    indices: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one site's rows into local train and validation rows, stratified by label.

    Each class contributes ``round(val_fraction * class_size)`` rows to validation, so a
    site keeps its label balance in both halves. ``val_fraction=0`` gives no validation rows.
    """
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for cls in np.unique(labels[indices]):
        members = indices[labels[indices] == cls]
        k = int(round(val_fraction * members.size))
        val.append(rng.permutation(members)[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    train_idx = np.setdiff1d(indices, val_idx, assume_unique=True)
    return train_idx, val_idx
