"""Tasks: the data sources (what the data are and how a site reads them), their partitions and models.

``get(name)`` -> the Task class (:mod:`tasks.base`: pooled research data sets; :mod:`tasks.federated`:
a site's own rows). How a model is fitted from a task's data is a learner's (:mod:`tasks.learners`).
"""

from __future__ import annotations

from core.config import check
from tasks import programs as programs  # noqa: E402,I001 - registers the built-in protected-sum programs
from tasks.base import PartitionConfig, PooledTask, SiteData, Split, Task, TaskConfig, TaskData
from tasks.finance import FinanceTask
from tasks.images import ImagesTask
from tasks.medical import MedicalTask
from tasks.medical_imaging import MedicalImagingTask
from tasks.partition import PARTITIONS
from tasks.tabular.task import TabularTask

REGISTRY: dict[str, type[Task]] = {
    t.name: t for t in (FinanceTask, MedicalTask, MedicalImagingTask, TabularTask, ImagesTask)
}


def get(name: str) -> type[Task]:
    """The Task class registered under ``name``; ValueError naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"task.name={name!r} is not one of {sorted(REGISTRY)}") from None


OPTIMIZERS = ("sgd", "adam")




def validate(t: TaskConfig, p: PartitionConfig) -> None:
    """Range and choice checks of the ``task`` and ``partition`` groups."""
    check(t.name in REGISTRY, "task.name", t.name, f"one of {sorted(REGISTRY)}")
    task_cls = get(t.name)
    check(t.model in task_cls.models, "task.model", t.model, f"one of {list(task_cls.models)} for task {t.name}")
    check(t.lr > 0, "task.lr", t.lr, "a number > 0")
    check(0 <= t.momentum < 1, "task.momentum", t.momentum, "0 <= momentum < 1")
    check(t.weight_decay >= 0, "task.weight_decay", t.weight_decay, "a number >= 0")
    check(0 <= t.dropout < 1, "task.dropout", t.dropout, "0 <= dropout < 1")
    check(t.batch_size >= 1, "task.batch_size", t.batch_size, "an integer >= 1")
    check(t.local_epochs >= 1, "task.local_epochs", t.local_epochs, "an integer >= 1")
    check(0 <= t.val_fraction < 1, "task.val_fraction", t.val_fraction, "0 <= val_fraction < 1")
    check(t.train_rows >= 0, "task.train_rows", t.train_rows, "0 (all rows) or an integer >= 1")
    check(all(h >= 1 for h in t.hidden), "task.hidden", t.hidden, "a list of layer widths >= 1")
    check(t.optimizer in OPTIMIZERS, "task.optimizer", t.optimizer, f"one of {list(OPTIMIZERS)}")
    check(p.name in PARTITIONS, "partition.name", p.name, f"one of {list(PARTITIONS)}")
    check(p.alpha > 0, "partition.alpha", p.alpha, "a number > 0")
    check(p.min_partition_size >= 1, "partition.min_partition_size", p.min_partition_size, "an integer >= 1")
    check(p.natural_sites >= 0, "partition.natural_sites", p.natural_sites, "0 (all) or a number of sites >= 2")
    check(0 < t.test_fraction < 1, "task.test_fraction", t.test_fraction, "0 < test_fraction < 1")
    check(64 <= t.auc_bins <= 65536, "task.auc_bins", t.auc_bins, "an integer in 64..65536")
    task_cls.validate_config(t, p)


__all__ = ["REGISTRY", "PartitionConfig", "PooledTask", "SiteData", "Split", "Task", "TaskConfig", "TaskData", "get", "validate"]
