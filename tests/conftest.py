"""Shared test helpers: the bundled data folder and task construction."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# torch, MKL and oneDNN pick their CPU kernels by instruction set (AVX2, AVX-512): float sums differ in
# the last bits. Pin what can be pinned before anything imports torch (child processes inherit it); the
# regression grid compares bit for bit only where the numerics fingerprint matches (tests/numerics.py).
from tests import numerics  # noqa: E402  (imports no torch)

numerics.pin()
# The prepared-data cache (tasks/cache.py) of this test session only: hermetic, and exercised.
os.environ.setdefault("FEDSILO_CACHE_DIR", tempfile.mkdtemp(prefix="fedsilo-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "tasks" / "data"


TIERS = ("unit", "integration", "e2e")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test carries its tier's marker from its folder: ``tests/unit`` (no federated run),
    ``tests/integration`` (the real ServerApp and ClientApp in process), ``tests/e2e`` (real
    Flower processes). The fast loop is ``python -m pytest -m "not e2e and not slow"`` (README)."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        if tier == "e2e":
            # under `-n 2 --dist loadgroup` (the README's commands) the end-to-end runs, each a federation of
            # processes using both cores, go one after another on one worker ("e2e", first in the queue) while
            # the other takes everything else; a few of them ("e2e-tail", last in the queue) are taken by that
            # other worker once it is done, so that neither worker idles at the end (measured: the one chain was
            # the suite's critical path, its other worker idle for minutes)
            item.add_marker(pytest.mark.xdist_group("e2e-tail" if _tail(item) else "e2e"))
    if config.getoption("dist", "no") == "loadgroup":
        # the end-to-end group first, so that its worker starts on it while the other takes everything else,
        # the tail group last (serially the cheapest tiers stay first: failures show early)
        def order(item: pytest.Item) -> int:
            if Path(str(item.fspath)).parent.name != "e2e":
                return 1
            return 2 if _tail(item) else 0

        items.sort(key=order)


#: end-to-end tests the other worker runs at the end (about 250 s of the chain's 1,250 s, measured 2026-12-06)
TAIL = ("test_deploy_restart.py", "test_deploy.py::test_sites_refuse_by_their_own_policy_in_a_deployment",
        "test_deploy.py::test_deploy_local_of_survival_tables_and_table1_equal_the_simulation")


def pooled_site_files(folder: str) -> Any:
    """The site files of ``DATA_DIR/folder``, pooled (only a test may pool them) as one pandas frame with a ``site``
    column (the file's stem)."""
    import pandas as pd

    frames = []
    for f in sorted((DATA_DIR / folder).glob("*.csv")):
        d = pd.read_csv(f)
        d["site"] = f.stem
        frames.append(d)
    return pd.concat(frames).reset_index(drop=True)


def _tail(item: pytest.Item) -> bool:
    return any(item.nodeid.split("/")[-1].startswith(t) for t in TAIL)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


def make_task(name: str, data_dir: Path = DATA_DIR, **overrides: object):
    """A task built from its real Hydra config (plus field overrides)."""
    import dataclasses

    import tasks
    from app import config

    cfg = config.compose([f"task={name}"]).task
    return tasks.get(name)(dataclasses.replace(cfg, **overrides), data_dir)
