"""Checkpoints and resume: a coordinator that dies after round 2 of 4 and is resumed ends with
exactly the metrics of a run that was never interrupted (real ServerApp and ClientApp, in process)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from aggregation.paillier import keys
from app import client_app, server_app
from app.runtime.local_grid import LocalGrid, run_inprocess
from app.server_app import CoordinatorCrash
from app.support import checkpoint
from tests.conftest import DATA_DIR

MEDICAL = ["task=medical", "num_rounds=4"]


def _crash_then_resume(tmp_path: Path, overrides: list[str], runner: Any = run_inprocess) -> tuple[dict, dict]:
    full = runner([*overrides], tmp_path / "full")
    with pytest.raises(CoordinatorCrash, match="after round 2"):
        runner([*overrides, "faults.crash_after_round=2"], tmp_path / "crash")
    crashed = checkpoint.load(tmp_path / "crash")
    assert crashed.round == 2 and not (tmp_path / "crash" / "results.json").exists()
    resumed = runner([*overrides, f"resume={tmp_path / 'crash'}"], tmp_path / "resumed")
    return full, resumed


def _assert_same_run(full: dict, resumed: dict) -> None:
    assert resumed["status"] == "completed"
    assert resumed["final"] == full["final"]  # exactly: every metric of the final model
    assert [h["server"] for h in resumed["history"]] == [h["server"] for h in full["history"]]
    assert [h["train"] for h in resumed["history"]] == [h["train"] for h in full["history"]]
    assert resumed["initial"] == full["initial"] and len(resumed["history"]) == 4


@pytest.mark.parametrize("extra", [
    [],
    ["strategy=fedprox", "strategy.adaptive_mu=true", "strategy.mu_patience=1", "strategy.fraction_train=0.5"],
    ["aggregation=secagg"],
    ["privacy=central", "privacy.noise_multiplier=0.5"],
    ["strategy.robust=median", "faults.byzantine_fraction=0.25"],
], ids=["fedavg", "fedprox-adaptive-sampled", "secagg", "central-dp", "median-under-attack"])
def test_resumed_run_ends_exactly_as_the_uninterrupted_one(tmp_path: Path, extra: list[str]) -> None:
    full, resumed = _crash_then_resume(tmp_path, [*MEDICAL, *extra])
    _assert_same_run(full, resumed)
    if "privacy=central" in extra:
        assert resumed["privacy"]["epsilon"] == full["privacy"]["epsilon"] and resumed["privacy"]["releases"] == 4
    if "strategy=fedprox" in extra:
        assert [h["participation"]["mu"] for h in resumed["history"]] == [h["participation"]["mu"] for h in full["history"]]


@pytest.mark.slow
def test_dpsgd_ledgers_survive_a_coordinator_restart(tmp_path: Path) -> None:
    """The resumed run's sites start with empty node state; the checkpoint gives them back their
    ledgers, so epsilon is cumulative over all 4 rounds, not over the 2 after the restart."""
    full, resumed = _crash_then_resume(tmp_path, [*MEDICAL, "privacy=dpsgd"])
    _assert_same_run(full, resumed)
    assert resumed["privacy"]["epsilon_per_site"] == full["privacy"]["epsilon_per_site"]
    assert max(resumed["privacy"]["epsilon_per_site"].values()) > 7.9  # the whole budget of 8, all rounds
    last = resumed["history"][-1]["participation"]["privacy"]
    assert all(r["total_steps"] == full["history"][-1]["participation"]["privacy"][k]["total_steps"]
               for k, r in last.items())


@pytest.mark.slow
def test_paillier_resumes_from_the_encrypted_model(tmp_path: Path) -> None:
    key_pair, public = keys.generate(tmp_path / "keys")

    def runner(overrides: list[str], out: Path) -> dict:
        run_config = {"overrides": shlex.join([*overrides, f"data_dir={DATA_DIR}"]), "output-dir": str(out)}
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        grid = LocalGrid(client_app.app, 3, run_config, node_config={"paillier-keypair": str(key_pair)})
        server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
        return json.loads((out / "results.json").read_text())

    overrides = ["task=finance", "num_sites=3", "num_rounds=4", "aggregation=paillier",
                 f"aggregation.public_key={public}"]
    full, resumed = _crash_then_resume(tmp_path, overrides, runner)
    saved = checkpoint.load(tmp_path / "crash")
    assert "ct" in saved.arrays  # the server checkpoints ciphertexts: it never had the model
    assert resumed["final"] == full["final"] and resumed["status"] == "completed"


def test_checkpoint_is_replaced_atomically_and_holds_the_round(tmp_path: Path) -> None:
    run_inprocess([*MEDICAL, "num_rounds=2"], tmp_path)
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.round == 2 and ckpt.trained and set(ckpt.result["evaluate_serverapp"]) == {0, 1, 2}
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place
    assert ckpt.config["num_rounds"] == 2 and "participation" in ckpt.strategy


def test_rng_state_round_trips(tmp_path: Path) -> None:
    import random

    import torch

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    meta, arrays = checkpoint.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(meta, arrays)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_resume_refuses_a_different_config_a_finished_run_and_garbage(tmp_path: Path) -> None:
    """Checked before any process starts (preflight: PreflightError, a ValueError like CheckpointError)."""
    run_inprocess([*MEDICAL, "num_rounds=2"], tmp_path / "done")
    with pytest.raises(ValueError, match=r"task.lr: checkpoint 0.05, now 0.1"):
        run_inprocess([*MEDICAL, "num_rounds=2", "task.lr=0.1", f"resume={tmp_path / 'done'}"], tmp_path / "r1")
    with pytest.raises(ValueError, match="already completed all 2 rounds"):
        run_inprocess([*MEDICAL, "num_rounds=2", f"resume={tmp_path / 'done'}"], tmp_path / "r2")
    with pytest.raises(ValueError, match="no checkpoint there"):
        run_inprocess([*MEDICAL, f"resume={tmp_path / 'nowhere'}"], tmp_path / "r3")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / checkpoint.FILE).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a readable fedsilo checkpoint"):
        run_inprocess([*MEDICAL, f"resume={tmp_path / 'bad'}"], tmp_path / "r4")
