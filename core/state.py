"""A site's own state on its own disk: what must outlive a message, a run and a restart.

SCAFFOLD's control variate, FedPer/FedBN's personal layers, Ditto's personal model and the
site's DP-SGD ledger (:mod:`privacy.site_ledger`) belong to the site and never reach the
coordinator (the ledger's figures are reported; the coordinator's view is a copy).
A deployment starts a new ClientApp process for every
message, and a resumed run (``resume=RUN_DIR``) is a new Flower run with a fresh
``context.state``, so this state lives in files under the site's state folder (node config
``state-dir``; in simulation a folder under fedsilo's cache), one folder per *job*: the
coordinator draws a job id when a run starts, keeps it in its checkpoint and sends it with
every instruction, so a resumed run finds its sites' state again.

Each entry is saved per round (``<name>-<round>.pt``) and read as "the latest saved before
round r": a coordinator that died after round k and resumes at k+1 gets the sites' state of
round k even if some site had already trained round k+1, so a resumed run equals the
uninterrupted one bit for bit. The last :data:`KEEP` versions of each entry are kept.
Documents that are not per round (the DP-SGD ledger) are JSON files written whole and atomically
(:meth:`SiteStore.write_json`: temporary file, fsync, rename, fsync of the folder), so a site
killed mid-write keeps the previous version, never a torn one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

#: Train-config key of the job id (the coordinator's; see module docstring).
JOB_KEY = "fedsilo-job"
KEEP = 3
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def is_simulated(node_config: Any) -> bool:
    """Whether a node is a simulated one: no data of its own (no ``data-path``), only a share of
    bundled data (``partition-id``), as Flower's simulation engine gives every node. The whole
    federation is then one process of one operator; a deployed site always names its own file."""
    return "data-path" not in node_config and "partition-id" in node_config


def default_root() -> Path:
    """Where sites keep their state when the node config names no ``state-dir`` (simulation)."""
    cache = os.environ.get("FEDSILO_CACHE_DIR")
    base = Path(cache) if cache else Path(tempfile.gettempdir())
    return base / "site-state"


class SiteStore:
    """One site's state files for one job."""

    def __init__(self, root: str | Path, job: str, site: str) -> None:
        if not job or _SAFE.search(job):
            raise ValueError(f"job id {job!r}: expected letters, digits, '_', '.', '-'")
        self.folder = Path(root).expanduser() / job / _SAFE.sub("_", site)

    def _versions(self, name: str) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        out = []
        for path in self.folder.glob(f"{name}-*.pt"):
            tail = path.stem[len(name) + 1:]
            if tail.isdigit():
                out.append((int(tail), path))
        return sorted(out)

    def load(self, name: str, before_round: int) -> dict[str, torch.Tensor] | None:
        """The latest ``name`` saved in a round before ``before_round``, or None."""
        older = [p for r, p in self._versions(name) if r < before_round]
        if not older:
            return None
        return dict(torch.load(older[-1], weights_only=True))

    def save(self, name: str, server_round: int, tensors: dict[str, torch.Tensor]) -> Path:
        """Keep ``tensors`` as ``name`` after ``server_round`` (atomic; older versions pruned)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}-{server_round}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({k: v.detach().clone() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
        for _, old in self._versions(name)[:-KEEP]:
            old.unlink(missing_ok=True)
        return path

    def read_json(self, name: str) -> Any | None:
        """The JSON document ``name`` (``<name>.json``), or None if the site has none yet.
        A file that does not parse raises ValueError naming it: a site never silently
        starts over from an empty document it cannot read."""
        path = self.folder / f"{name}.json"
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); restore it from a backup or move it away") from err

    def write_json(self, name: str, document: Any) -> Path:
        """Replace ``<name>.json`` with ``document``, atomically and durably (see module docstring)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(document, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path
