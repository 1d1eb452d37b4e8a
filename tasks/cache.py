"""On-disk cache of a task's prepared data and of its partitions, shared by the processes of a run.

Every simulation worker (and every ClientApp process in a deployment drawn from bundled
data) needs the same preprocessed pool and the same partition. Computed from scratch
each costs seconds: pandas and scikit-learn to prepare the data, Hugging Face
``datasets`` and Flower Datasets to partition it (for 1000 Dirichlet sites, 5-8 s per
process). The first process that computes them writes them here; the others read an
``.npz`` (milliseconds, no pickles) and never import those libraries.

Entries are keyed by a fingerprint of everything they depend on: the task's class and the
source of the modules that compute them, each data file's name, size and modification
time, and the partition's parameters; anything else changing makes a new key. Files are
written to a temporary name and renamed, so a reader never sees half a file. The
location is ``$FEDSILO_CACHE_DIR`` (default ``~/.cache/fedsilo``); set it to an empty
string to turn the cache off.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tasks import partition
from tasks.data import Split, TaskData

if TYPE_CHECKING:
    from tasks.base import PooledTask as Task

ENV = "FEDSILO_CACHE_DIR"


def directory() -> Path | None:
    """The cache folder, or None when the cache is off."""
    value = os.environ.get(ENV)
    if value == "":
        return None
    return Path(value) if value else Path.home() / ".cache" / "fedsilo"


def _source_digest(task: Task) -> str:
    """Digest of the code that prepares ``task``'s data: every module of its class hierarchy
    (the task's own module and ``tasks.base``), the partitioning and the data containers."""
    modules = {c.__module__ for c in type(task).__mro__ if c.__module__.startswith("tasks")}
    h = hashlib.sha256()
    for module in [*(sys.modules[m] for m in sorted(modules)), partition, sys.modules[Split.__module__]]:
        h.update(Path(inspect.getfile(module)).read_bytes())
    return h.hexdigest()


def fingerprint(task: Task, *extra: Any) -> str:
    """Key of ``task``'s entries: its code, its data files' identity, and ``extra``."""
    h = hashlib.sha256(f"{type(task).__module__}.{type(task).__name__}".encode())
    h.update(_source_digest(task).encode())
    for name in sorted(type(task).data_files):
        stat = (task.data_dir / name).stat()
        h.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    h.update(repr(extra).encode())
    return h.hexdigest()[:32]


def _entry(task: Task, kind: str, *extra: Any) -> Path | None:
    """Where ``task``'s entry of ``kind`` lives, or None (cache off, or a data file missing: the
    task's own loading then fails with its clear message)."""
    d = directory()
    if d is None:
        return None
    try:
        return d / f"{kind}-{fingerprint(task, *extra)}.npz"
    except OSError:
        return None


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError):  # missing, or unreadable: recompute
        return None
    except Exception:  # noqa: BLE001 - a damaged zip raises zipfile.BadZipFile and others: recompute
        return None


# ---- a task's prepared data ----------------------------------------------------------------
def load_data(task: Task) -> TaskData | None:
    """The task's prepared data from the run's cache, or None (not cached, or the cache is off)."""
    path = _entry(task, "data")
    z = None if path is None else _read(path)
    if z is None:
        return None

    def split(prefix: str) -> Split:
        return Split(torch.from_numpy(z[f"{prefix}_x"]), torch.from_numpy(z[f"{prefix}_y"]), z.get(f"{prefix}_group"))

    groups = tuple(str(g) for g in z["group_names"]) if z["has_group_names"].item() else None
    return TaskData(split("pool"), split("test"), tuple(str(f) for f in z["feature_names"]), groups)


def save_data(task: Task, data: TaskData) -> None:
    """Keep the task's prepared data in the run's cache for the run's other processes."""
    path = _entry(task, "data")
    if path is None:
        return
    arrays: dict[str, np.ndarray] = {"feature_names": np.array(data.feature_names, dtype=str),
                                     "group_names": np.array(data.group_names or (), dtype=str),
                                     "has_group_names": np.array(data.group_names is not None)}
    for prefix, s in (("pool", data.pool), ("test", data.test)):
        arrays[f"{prefix}_x"], arrays[f"{prefix}_y"] = s.x.numpy(), s.y.numpy()
        if s.group is not None:
            arrays[f"{prefix}_group"] = np.asarray(s.group)
    try:
        _write(path, arrays)
    except OSError:  # a read-only home: the cache is an optimisation, never a requirement
        pass


# ---- a partition: each site's name and training/validation rows of the pool ---------------
def load_sites(task: Task, key: tuple[Any, ...]) -> list[tuple[str, np.ndarray, np.ndarray]] | None:
    """The sites' rows of a partition (``key``) from the run's cache, or None."""
    path = _entry(task, "sites", *key)
    z = None if path is None else _read(path)
    if z is None:
        return None
    return [(str(name), z[f"train_{i}"], z[f"val_{i}"]) for i, name in enumerate(z["names"])]


def save_sites(task: Task, key: tuple[Any, ...], sites: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Keep the sites' rows of a partition (``key``) in the run's cache."""
    path = _entry(task, "sites", *key)
    if path is None:
        return
    arrays: dict[str, np.ndarray] = {"names": np.array([s[0] for s in sites], dtype=str)}
    for i, (_, tr, va) in enumerate(sites):
        arrays[f"train_{i}"], arrays[f"val_{i}"] = np.asarray(tr, np.int64), np.asarray(va, np.int64)
    try:
        _write(path, arrays)
    except OSError:
        pass
