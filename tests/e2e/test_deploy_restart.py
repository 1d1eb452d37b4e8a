"""A coordinator restart in a real deployment: the SuperLink (and with it the ServerApp) is killed
mid-run, started again with the same state database, and the run resumed with ``resume=RUN_DIR``
over the same SuperNodes (TLS, authenticated, each site with its own file and state folder)."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from app import client_app, server_app
from app.runtime import deploy
from app.runtime.local_grid import LocalGrid
from app.support import checkpoint
from app.support.paths import resolve_data_dir
from privacy.site_secret import SECRET_FILE
from tests.conftest import REPO
from tests.e2e.test_e2e import leftover_processes
from tests.integration.test_site_ledger import TARGET, _opacus_epsilon

pytestmark = pytest.mark.e2e

#: One noise secret for every site here, so that the uninterrupted in-process run can use it too.
SECRET = "fedsilo restart test secret 0032"


def _ledgers(dep: deploy.Deployment) -> dict[str, list[dict]]:
    out = {}
    for entry in dep.sites:
        files = list(Path(entry["file"]).with_suffix(".state").glob("*/*/dp-ledger.json"))
        out[entry["name"]] = json.loads(files[0].read_text())["releases"] if files else []
    return out


def _uninterrupted(overrides: list[str], out: Path) -> dict:
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={resolve_data_dir(None)}"]), "output-dir": str(out)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = LocalGrid(client_app.app, 3, run_config, node_config={"dp-noise-seed": SECRET})
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return json.loads((out / "results.json").read_text())


def test_a_killed_coordinator_is_restarted_and_the_run_resumed_over_the_same_supernodes(tmp_path: Path) -> None:
    """Killed once the sites have trained round 3 (their own ledgers say so), before or around the
    coordinator's round-3 checkpoint; resumed from the last checkpoint. The run completes with the
    uninterrupted run's numbers, and each site's own ledger shows one release per round (a replayed
    round's byte-identical update is not charged twice), at most the target, equal to Opacus'
    accountant stepped over the steps it records."""
    overrides, _ = deploy.site_overrides(["task=medical", "num_rounds=4", "strategy.fraction_evaluate=0",
                                          "aggregation=secagg", "privacy=dpsgd", f"privacy.target_epsilon={TARGET}"], 3)
    dep = deploy.prepare(tmp_path, overrides, 3)
    for entry in dep.sites:
        state = Path(entry["file"]).with_suffix(".state")
        state.mkdir(parents=True, exist_ok=True)
        (state / SECRET_FILE).write_bytes(SECRET.encode())
        (state / SECRET_FILE).chmod(0o600)  # a secret others may read is refused (core/secret_files.py)
    first, again = tmp_path / "run", tmp_path / "resumed"
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={resolve_data_dir(None)}"]), "output-dir": str(first)}
    link = deploy.start(dep, tmp_path, database=tmp_path / "superlink.db")
    try:
        run_id = link.submit(REPO, run_config, {})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not all(any(r["round"] == 3 for r in rel)
                                                      for rel in _ledgers(dep).values()):
            time.sleep(0.02)
        link.kill()  # the SuperLink and the ServerApp it runs die; the SuperNodes keep retrying
        killed_after = checkpoint.load(first).round
        assert 2 <= killed_after <= 3 and not (first / "results.json").exists(), killed_after
        link.start()  # the same port and database: the registered nodes, their keys
        resume = {"overrides": shlex.join([*overrides, f"data_dir={resolve_data_dir(None)}", f"resume={first}"]),
                  "output-dir": str(again)}
        outcome = link.follow(link.submit(REPO, resume, {}), timeout=600, stream=False, poll=2.0)
        log = link.logs(outcome.run_id)
    finally:
        link.stop()
    assert not leftover_processes(), leftover_processes()
    assert outcome.ok and run_id != outcome.run_id, (outcome, log[-3000:])
    assert f"resuming from {first}" in log
    results = json.loads((again / "results.json").read_text())
    assert results["status"] == "completed" and len(results["history"]) == 4
    full = _uninterrupted(overrides, tmp_path / "uninterrupted")
    assert results["final"]["auc"] == pytest.approx(full["final"]["auc"], abs=1e-4)  # secagg's fixed point
    assert results["privacy"]["epsilon_per_site"] == pytest.approx(full["privacy"]["epsilon_per_site"], rel=1e-12)
    if killed_after == 2:  # the usual case: round 3 was replayed to sites that had trained it; no one paid twice
        said = [{line.split("round ")[1].split(":")[0] for line in log.read_text().splitlines()
                 if "no new privacy spend" in line} for log in link.node_logs]
        assert said == [{"3"}] * 3, said  # every site recognised round 3's replay, and nothing else
    for site, releases in _ledgers(dep).items():
        assert [r["round"] for r in releases] == [1, 2, 3, 4], (site, releases)
        eps = _opacus_epsilon(releases)
        assert eps <= TARGET and results["privacy"]["epsilon_per_site"][site] == pytest.approx(eps, rel=1e-9)
