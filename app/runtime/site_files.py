"""Per-site data files for a deployment (``fedsilo data split``, ``fedsilo deploy local``).

Splits the task's data exactly as the simulation would for the same config (``task``,
``partition``, ``num_sites``, ``seed``): a bundled task's sites as ``<site>.npz``
(:mod:`tasks.site_file`), a site's own rows (``task=tabular|images``) as its raw file or folder and
a copy of the schema; ``sites.json`` lists file, rows and label balance per site (never records).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np

from tasks.base import PooledTask


def split(overrides: list[str], out: Path) -> list[dict[str, Any]]:
    """Write every site's file for the config ``overrides``; return the ``sites.json`` entries."""
    import tasks
    from app import config
    from app.runtime.preflight import preflight
    from tasks import site_file

    cfg = config.compose(overrides)
    data_dir = preflight(cfg)
    task = tasks.get(cfg.task.name)(cfg.task, data_dir)
    n = config.num_sites(cfg)
    if task.federated_data:  # each site's own raw rows, preprocessed federally at run time
        return _split_tables(task, cfg, n, out)
    entries = []
    pooled = cast(PooledTask, task)  # a bundled task (not task.federated_data)
    for site in pooled.sites(cfg.partition, n, cfg.seed):
        path = site_file.write(out / f"{site.name}.npz", site, task=cfg.task.name, num_sites=n,
                               partition=cfg.partition.name, seed=cfg.seed, features=pooled.data().feature_names)
        entries.append({"site_id": site.site_id, "name": site.name, "file": str(path.resolve()),
                        "rows_train": len(site.train), "rows_val": len(site.val),
                        "positive_share_train": float(site.train.y.mean()) if len(site.train) else None})
    (out / "sites.json").write_text(json.dumps({"task": cfg.task.name, "partition": cfg.partition.name,
                                                 "seed": cfg.seed, "sites": entries}, indent=2) + "\n")
    return entries


def _split_tables(task: Any, cfg: Any, n: int, out: Path) -> list[dict[str, Any]]:
    """``task=tabular``: each site's own raw table (its rows of the shared file, or its own file), as CSV.

    The rows keep every column (the split column too, so a site holds out the same test rows
    as in simulation); nothing is preprocessed: each site is preprocessed federally at run time.
    """
    import shutil

    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    files = task.site_files()
    # each site holds its own copy of the federation's schema: a deployed site reads no path the coordinator sends
    source_schema = task.path(cfg.task.schema, "schema")
    schema = Path(shutil.copyfile(source_schema, out / f"schema{source_schema.suffix}"))
    entries = []
    for k in range(n):
        site = task.raw_site(cfg.partition, n, cfg.seed, k)
        dest = out / f"{site.name}.csv"
        if files and files[k].is_dir():  # a site's folder (task=images)
            dest = out / site.name
            shutil.copytree(files[k], dest, dirs_exist_ok=True)
        elif files:
            shutil.copyfile(files[k], dest)
        elif not task.path(cfg.task.data, "data").is_file():
            raise ValueError(f"task={cfg.task.name}: to give each site its own data, make task.data a folder of "
                             "site folders (partition=natural)")
        else:
            source = pd.read_csv(task.path(cfg.task.data, "data"), dtype=str, keep_default_na=False)
            lines = np.sort(np.concatenate([site.train.line, site.val.line, site.test.line]))
            source.iloc[lines - 2].to_csv(dest, index=False)
        entries.append({"site_id": k, "name": site.name, "file": str(dest.resolve()),
                        "rows_train": len(site.train), "rows_val": len(site.val), "rows_test": len(site.test),
                        "node": {"partition-id": k, "site-name": site.name, "schema-path": str(schema.resolve())}})
    (out / "sites.json").write_text(json.dumps({"task": cfg.task.name, "partition": cfg.partition.name,
                                                 "seed": cfg.seed, "sites": entries}, indent=2) + "\n")
    return entries


