"""One site's own data as a file: what a SuperNode's ``data-path`` points at.

In a deployment every site keeps its rows on its own machine. ``fedsilo data split``
writes one file per site from a task's bundled data (natural, IID or Dirichlet split, the
same partitioning as the simulation), so a demo or a test can stand up sites; a real site
writes the same format from its own records, preprocessed as the manifest says.

Format: a NumPy ``.npz`` (no pickles) with ``x_train``, ``y_train``, ``x_val``, ``y_val``
(float32; optional ``group_train``/``group_val`` int64) and ``manifest``, a JSON string:
``{"format": "fedsilo-site-v1", "task", "site_id", "name", "num_sites", "partition",
"seed", "features"}``. :func:`load` checks all of it and says what is wrong and where.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.data import SiteData, Split

FORMAT = "fedsilo-site-v1"
_ARRAYS = ("x_train", "y_train", "x_val", "y_val")
_CACHE: dict[tuple[str, float, int], SiteData] = {}


class SiteDataError(ValueError):
    """A site's data file is missing, malformed or belongs to another federation."""


def write(path: Path, site: SiteData, *, task: str, num_sites: int, partition: str, seed: int,
          features: tuple[str, ...]) -> Path:
    """Write ``site`` to ``path`` (``.npz``); return the path."""
    manifest = {"format": FORMAT, "task": task, "site_id": site.site_id, "name": site.name, "num_sites": num_sites,
                "partition": partition, "seed": seed, "features": list(features),
                "rows_train": len(site.train), "rows_val": len(site.val)}
    arrays: dict[str, Any] = {"x_train": site.train.x.numpy(), "y_train": site.train.y.numpy(),
                              "x_val": site.val.x.numpy(), "y_val": site.val.y.numpy(),
                              "manifest": np.array(json.dumps(manifest))}
    if site.train.group is not None and site.val.group is not None:
        arrays.update(group_train=site.train.group.astype(np.int64), group_val=site.val.group.astype(np.int64))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load(path: str | Path, *, task: str, num_sites: int, input_shape: tuple[int, ...]) -> SiteData:
    """The site in ``path``, checked against the federation's task, size and example shape."""
    p = Path(path).expanduser()
    where = f"site data file {p} (node config data-path)"
    if not p.is_file():
        raise SiteDataError(f"{where} does not exist")
    key = (str(p.resolve()), p.stat().st_mtime, p.stat().st_size)
    if key in _CACHE:
        return _CACHE[key]
    try:
        with np.load(p, allow_pickle=False) as z:
            contents = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise SiteDataError(f"{where} is not a readable .npz file: {err}") from err
    missing = [k for k in (*_ARRAYS, "manifest") if k not in contents]
    if missing:
        raise SiteDataError(f"{where} lacks {missing}: write it with `fedsilo data split`")
    try:
        manifest = json.loads(str(contents["manifest"]))
    except json.JSONDecodeError as err:
        raise SiteDataError(f"{where}: manifest is not JSON ({err})") from err
    if manifest.get("format") != FORMAT:
        raise SiteDataError(f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("task") != task:
        raise SiteDataError(f"{where} holds task {manifest.get('task')!r} data, but this run's task is {task!r}")
    if manifest.get("num_sites") != num_sites:
        raise SiteDataError(f"{where} was split for {manifest.get('num_sites')} sites, but this federation has "
                            f"{num_sites}")
    if not isinstance(manifest.get("site_id"), int) or not 0 <= manifest["site_id"] < num_sites:
        raise SiteDataError(f"{where}: site_id {manifest.get('site_id')!r} is not in 0..{num_sites - 1}")
    splits = {}
    for part in ("train", "val"):
        x, y = contents[f"x_{part}"], contents[f"y_{part}"]
        if tuple(x.shape[1:]) != tuple(input_shape) or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise SiteDataError(f"{where}: x_{part} has shape {x.shape} and y_{part} {y.shape}; expected "
                                f"(rows, {', '.join(map(str, input_shape))}) and (rows,)")
        if x.dtype != np.float32 or y.dtype != np.float32:
            raise SiteDataError(f"{where}: x_{part}/y_{part} must be float32, got {x.dtype}/{y.dtype}")
        if not (np.isfinite(x).all() and np.isin(y, (0.0, 1.0)).all()):
            raise SiteDataError(f"{where}: x_{part} has NaN/Inf values or y_{part} labels other than 0/1")
        group = contents.get(f"group_{part}")
        splits[part] = Split(torch.from_numpy(x), torch.from_numpy(y), None if group is None else group)
    if len(splits["train"]) == 0:
        raise SiteDataError(f"{where} has no training rows")
    site = SiteData(int(manifest["site_id"]), str(manifest.get("name", f"site-{manifest['site_id']}")),
                    splits["train"], splits["val"])
    _CACHE[key] = site
    return site
