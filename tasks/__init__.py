"""Tasks: data, preprocessing, partitions, model and local loops. ``get(name)`` -> Task class."""

from __future__ import annotations

from tasks.base import PartitionConfig, SiteData, Split, Task, TaskConfig, TaskData
from tasks.finance import FinanceTask
from tasks.medical import MedicalTask
from tasks.medical_imaging import MedicalImagingTask

REGISTRY: dict[str, type[Task]] = {
    t.name: t for t in (FinanceTask, MedicalTask, MedicalImagingTask)
}


def get(name: str) -> type[Task]:
    """The Task class registered under ``name``; ValueError naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"task.name={name!r} is not one of {sorted(REGISTRY)}") from None


__all__ = ["REGISTRY", "PartitionConfig", "SiteData", "Split", "Task", "TaskConfig", "TaskData", "get"]
