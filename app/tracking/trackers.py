"""``logger=...``: where a run's figures go besides ``results.json`` and the report.

One :class:`Tracker` per value of ``logger``, in :data:`REGISTRY`; the ServerApp opens the
configured one (:func:`open_tracker`), hands it every round (:meth:`Tracker.log_round`) and,
once ``results.json`` and the report are written, the finished run directory
(:meth:`Tracker.finish`). A new tracker is a module with a :class:`Tracker` subclass and one
registry line; the apps do not change.

* ``none``: files only;
* ``tensorboard``: scalars per round in ``<run dir>/tensorboard`` (:mod:`app.tracking.tensorboard`);
* ``mlflow``: params, per-round metrics, the final model and the report in an MLflow tracking
  store (:mod:`app.tracking.mlflow_tracker`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import extras


class Tracker(ABC):
    """Receives a run's figures as they are made."""

    @classmethod
    @abstractmethod
    def start(cls, out_dir: Path, cfg: Any, config_dict: dict[str, Any], run_id: int) -> Tracker | None:
        """The tracker for the run in ``out_dir`` (``cfg`` typed, ``config_dict`` resolved), or None
        if it cannot start (it says why): a tracker is never worth the run."""

    @abstractmethod
    def log_round(self, server_round: int, server: dict[str, Any], train: dict[str, Any], evaluate: dict[str, Any],
                  participation: dict[str, Any], traffic: dict[str, Any], seconds: float | None,
                  names: dict[str, str]) -> None:
        """One round: test metrics, aggregated site metrics, participation (with per-site privacy
        records), traffic, seconds; ``names`` maps reply labels to site names."""

    def finish(self, out_dir: Path) -> None:
        """The run is complete: ``results.json``, the model and the report are in ``out_dir``."""

    def close(self) -> None:
        """Release what the tracker holds; called once, whether the run succeeded or not."""


@dataclass(frozen=True)
class TrackerInfo:
    """Where a tracker lives and the extra that installs what it needs."""

    module: str          # the module holding the tracker class
    cls: str
    extra: str           # the pip extra that installs what it imports (core.extras.EXTRAS)


#: ``logger`` value -> its tracker (``none`` has none).
REGISTRY: dict[str, TrackerInfo | None] = {
    "none": None,
    "tensorboard": TrackerInfo("app.tracking.tensorboard", "TensorBoardLogger", "tensorboard"),
    "mlflow": TrackerInfo("app.tracking.mlflow_tracker", "MlflowTracker", "mlflow"),
}


def missing(name: str) -> str | None:
    """Why ``logger=name`` cannot run here (its package is not installed), or None."""
    info = REGISTRY.get(name)
    return None if info is None else extras.message(f"logger={name}", info.extra)


def open_tracker(name: str, out_dir: Path, cfg: Any, config_dict: dict[str, Any], run_id: int) -> Tracker | None:
    """The tracker ``logger=name`` names, started for the run in ``out_dir`` (None for ``none``)."""
    info = REGISTRY[name]
    if info is None:
        return None
    cls = getattr(importlib.import_module(info.module), info.cls)
    tracker: Tracker | None = cls.start(out_dir, cfg, config_dict, run_id)
    return tracker
