"""The in-process runner drives the real ServerApp and ClientApp objects."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from app import server_app
from app.runtime.local_grid import LocalGrid, run_inprocess
from tests.conftest import DATA_DIR


def test_inprocess_run_writes_results(tmp_path: Path) -> None:
    results = run_inprocess(["task=medical", "num_rounds=2"], tmp_path)
    assert len(results["history"]) == 2 and results["status"] == "completed"
    assert results["final"]["auc"] > results["initial"]["auc"]


def test_run_where_no_site_ever_delivers_fails_loudly(tmp_path: Path) -> None:
    broken = ClientApp()

    @broken.train()
    def train(msg: Message, context: Context) -> Message:
        raise RuntimeError("disk full at the site")

    run_config = {"overrides": shlex.join(["task=medical", "num_rounds=2", f"data_dir={DATA_DIR}",
                                           "strategy.fraction_evaluate=0"]),
                  "output-dir": str(tmp_path)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = LocalGrid(broken, 4, run_config)
    with pytest.raises(RuntimeError, match="never trained.*disk full at the site"):
        server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed"
    assert all(h["participation"]["train"]["replied"] == 0 for h in results["history"])


def test_medical_imaging_run_learns(tmp_path: Path) -> None:
    """The CNN task (BreastMNIST) learns through the real ServerApp and ClientApp."""
    results = run_inprocess(["task=medical_imaging", "num_rounds=2", "num_sites=3"], tmp_path)
    assert len(results["history"]) == 2 and results["status"] == "completed"
    for h in results["history"]:
        assert h["participation"]["train"]["replied"] == 3 and h["participation"]["train"]["rejected"] == []
        assert 0 <= h["federated_evaluate"]["accuracy"] <= 1
    assert results["final"]["auc"] >= 0.65
    assert results["final"]["loss"] < results["initial"]["loss"]
