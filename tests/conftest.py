"""Shared test helpers: the bundled data folder and task construction."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
            # under `-n 2 --dist loadgroup` (the README's commands) the end-to-end runs go in two chains of about
            # equal length, one per worker: the simulation-engine runs (test_e2e.py) and the deployments (the
            # other files). A run waits on process start-up, heartbeats and polling much of its time, so two
            # chains overlap well; within a chain they go one after another, and the rest fill both workers.
            chain = "e2e-sim" if Path(str(item.fspath)).name == "test_e2e.py" else "e2e-deploy"
            item.add_marker(pytest.mark.xdist_group(chain))
    if config.getoption("dist", "no") == "loadgroup":
        # the end-to-end group first, so that its worker starts on it while the other takes everything else
        # (serially the cheapest tiers stay first: failures show early)
        items.sort(key=lambda item: Path(str(item.fspath)).parent.name != "e2e")


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
