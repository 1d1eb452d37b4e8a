"""The on-disk cache of prepared data and partitions (tasks/cache.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks import base, cache
from tests.conftest import DATA_DIR, make_task


def _fresh(task_name: str, data_dir: Path = DATA_DIR):  # type: ignore[no-untyped-def]
    base._DATA_CACHE.clear()
    base._SITES_CACHE.clear()
    return make_task(task_name, data_dir)


def test_a_cache_hit_gives_exactly_the_computed_sites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app import config

    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    part = config.compose(["partition=dirichlet", "num_sites=20", "partition.alpha=1"]).partition
    computed = _fresh("finance").sites(part, 20, 3)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # the prepared data and the partition
    cached = _fresh("finance").sites(part, 20, 3)
    for a, b in zip(computed, cached, strict=True):
        assert (a.site_id, a.name) == (b.site_id, b.name)
        for sa, sb in ((a.train, b.train), (a.val, b.val)):
            assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
    natural = _fresh("medical").sites(config.compose(["task=medical"]).partition, 4, 0)
    again = _fresh("medical").sites(config.compose(["task=medical"]).partition, 4, 0)
    assert [s.name for s in again] == [s.name for s in natural] == ["cleveland", "hungarian", "switzerland", "va"]
    assert all(torch.equal(a.train.x, b.train.x) for a, b in zip(natural, again))


def test_a_changed_data_file_or_a_damaged_entry_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR / "uci_heart_disease", data / "uci_heart_disease")
    key_before = cache.fingerprint(_fresh("medical", data))
    _fresh("medical", data).data()
    f = data / "uci_heart_disease" / "processed.va.data"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert cache.fingerprint(_fresh("medical", data)) != key_before
    _fresh("medical", data).data()  # an entry under the new key
    assert cache.load_data(_fresh("medical", data)) is not None
    for entry in (tmp_path / "cache").glob("*.npz"):
        entry.write_bytes(b"PK\x03\x04 damaged")
    assert cache.load_data(_fresh("medical", data)) is None  # damaged: a miss, not a crash
    assert len(_fresh("medical", data).data().pool) == 486  # recomputed


def test_the_cache_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV, "")
    monkeypatch.setenv("HOME", str(tmp_path))
    _fresh("medical").data()
    assert cache.directory() is None and not list(tmp_path.rglob("*.npz"))


@pytest.mark.slow
def test_a_worker_with_a_warm_cache_never_imports_the_preparation_libraries(tmp_path: Path) -> None:
    """What the cache is for: a site process reads its rows without pandas, scikit-learn or datasets."""
    code = ("import sys; from app import config, plan; from flwr.app import Context, RecordDict; "
            "ctx = Context(run_id=1, node_id=1, node_config={'partition-id': 2, 'num-partitions': 30}, "
            "state=RecordDict(), run_config={'overrides': 'partition=dirichlet num_sites=30'}); "
            "site = plan.site_plan(ctx).source; "
            "print(len(site.train), sorted(m for m in ('pandas', 'sklearn', 'datasets') if m in sys.modules))")
    env = {**os.environ, cache.ENV: str(tmp_path / "cache")}
    cold = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    warm = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr[-2000:] + warm.stderr[-2000:]
    rows_cold, rows_warm = cold.stdout.split()[0], warm.stdout.split()[0]
    assert rows_cold == rows_warm and "'datasets'" in cold.stdout
    assert warm.stdout.strip().endswith("[]"), warm.stdout
