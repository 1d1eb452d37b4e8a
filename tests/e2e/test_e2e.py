"""End to end: the ``fedsilo`` command runs real Flower simulations on a private SuperLink.

Each test asserts on the ``results.json`` the run leaves, and that every process the run
started (SuperLink, SuperExec, flwr-simulation, Ray) is gone afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from app.runtime.local_grid import run_inprocess
from app.runtime.superlink import LocalSuperLink
from tests.conftest import REPO, make_task

pytestmark = pytest.mark.e2e


#: What the environment of every process a run starts holds: its private FLWR_HOME, made by
#: ``tempfile.mkdtemp(prefix="fedsilo-flwr-")`` (so under ``$TMPDIR`` when that is set).
FLWR_HOME_MARK = f"FLWR_HOME={os.path.join(tempfile.gettempdir(), 'fedsilo-flwr-')}".encode()


def leftover_processes() -> list[str]:
    """Processes whose environment points at a fedsilo-private FLWR_HOME, started from this test process (under
    pytest-xdist: from this worker, whose PYTEST_XDIST_WORKER they inherit; the other worker's runs are its own)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    mine = f"PYTEST_XDIST_WORKER={worker}\0".encode() if worker else b""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
        if FLWR_HOME_MARK in env and (not mine or mine in env + b"\0"):
            found.append(f"{pid}: {cmd}")
    return found


def fedsilo(run_dir: Path, *overrides: str, expect_ok: bool = True) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=900, cwd=run_dir.parent,
    )
    assert not leftover_processes(), leftover_processes()
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc, json.loads((run_dir / "results.json").read_text())
    return proc, {}


def check_layout(results: dict[str, Any], rounds: int, sites: int) -> None:
    assert len(results["history"]) == rounds
    assert [h["round"] for h in results["history"]] == list(range(1, rounds + 1))
    for h in results["history"]:
        assert h["participation"]["train"]["replied"] == sites
        assert h["participation"]["train"]["rejected"] == []
        assert h["train"]["train_loss"] > 0 and h["train"]["local_steps"] > 0
        assert 0 <= h["federated_evaluate"]["accuracy"] <= 1
    for key in ("auc", "accuracy", "loss", "f1", "sensitivity", "specificity"):
        assert isinstance(results["final"][key], float), key
    assert results["final"] == results["history"][-1]["server"]
    assert results["sites"] == sites


@pytest.fixture(scope="module")
def finance_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("finance") / "run"
    _, results = fedsilo(run_dir, "task=finance", "num_rounds=2", "num_sites=3")
    return run_dir, results


def test_finance_run(finance_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, results = finance_run
    check_layout(results, rounds=2, sites=3)
    assert results["final"]["auc"] >= 0.72
    assert results["final"]["ks"] > 0.3
    assert results["config"]["task"]["name"] == "finance" and results["config"]["num_sites"] == 3
    # The saved model is the final global model: it reproduces the reported test AUC.
    task = make_task("finance")
    model = task.build_model()
    model.load_state_dict(torch.load(run_dir / "model.pt"))
    assert task.evaluate(model, task.data().test)["auc"] == pytest.approx(results["final"]["auc"], abs=1e-6)
    assert (run_dir / "metrics.png").stat().st_size > 10_000
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_same_seed_gives_identical_results(finance_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    first_dir, first = finance_run
    _, second = fedsilo(tmp_path / "again", "task=finance", "num_rounds=2", "num_sites=3")
    assert second["final"] == first["final"]
    assert [h["server"] for h in second["history"]] == [h["server"] for h in first["history"]]
    a, b = torch.load(first_dir / "model.pt"), torch.load(tmp_path / "again" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_inprocess_runner_matches_the_simulation_engine(finance_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """The sweep runner (app.runtime.local_grid) gives the simulation engine's results bit for bit."""
    flower_dir, flower = finance_run
    local = run_inprocess(["task=finance", "num_rounds=2", "num_sites=3"], tmp_path)
    assert local["final"] == flower["final"]
    assert [h["federated_evaluate"] for h in local["history"]] == [h["federated_evaluate"] for h in flower["history"]]
    a, b = torch.load(flower_dir / "model.pt"), torch.load(tmp_path / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedprox_with_zero_mu_is_exactly_fedavg(finance_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """FedProx with mu=0 run in process equals FedAvg run by the simulation engine, bit for bit
    (the in-process runner matches the engine: test_inprocess_runner_matches_the_simulation_engine)."""
    fedavg_dir, fedavg = finance_run
    prox = run_inprocess(["task=finance", "strategy=fedprox", "strategy.mu=0", "num_rounds=2", "num_sites=3"],
                         tmp_path / "prox")
    assert prox["config"]["strategy"]["name"] == "fedprox"
    assert prox["final"] == fedavg["final"]
    a, b = torch.load(fedavg_dir / "model.pt"), torch.load(tmp_path / "prox" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stragglers_through_the_simulation_engine(tmp_path: Path) -> None:
    """Dropped stragglers' error replies cross Flower's runtime and are logged, per round;
    FedProx's partial stragglers are aggregated (their replies are ordinary replies: checked in
    process, which the engine matches bit for bit)."""
    _, drop = fedsilo(tmp_path / "drop", "task=medical", "num_rounds=2", "strategy.stragglers=0.5",
                      "strategy.fraction_evaluate=0")
    for h in drop["history"]:
        train = h["participation"]["train"]
        assert train["replied"] == 2 and len(train["rejected"]) == 2
        assert all("did not finish" in r["reason"] for r in train["rejected"])
    partial = run_inprocess(["task=medical", "num_rounds=2", "strategy=fedprox", "strategy.stragglers=0.5",
                             "strategy.fraction_evaluate=0"], tmp_path / "partial")
    for h in partial["history"]:
        train = h["participation"]["train"]
        assert train["replied"] == 4 and train["rejected"] == [] and len(train["stragglers"]) == 2
        assert h["participation"]["mu"] == 0.01


def test_secure_aggregation_through_the_simulation_engine(tmp_path: Path) -> None:
    """aggregation=secagg with a site dropping out before its masked input, in Flower's engine: keys agreed
    once (round 1), the run completes and ends within 1e-4 AUC of plain FedAvg over the same survivors."""
    common = ["task=finance", "num_sites=5", "num_rounds=2", "faults.drop_rate=0.2"]
    _, sec = fedsilo(tmp_path / "secagg", *common, "aggregation=secagg")
    plain = run_inprocess(common, tmp_path / "plain")
    assert sec["status"] == "completed"
    for h in sec["history"]:
        s = h["participation"]["secagg"]
        assert (s["sites"], s["survivors"], s["dropped"], s["threshold"]) == (5, 4, 1, 4)
        assert set(s["stages"]) == ({"keys"} if h["round"] == 1 else set()) | {"masked_input", "unmask"}
        assert h["train"]["clipped_values"] == 0
    assert abs(sec["final"]["auc"] - plain["final"]["auc"]) < 1e-4
    assert sec["history"][0]["participation"]["train"]["replied"] == plain["history"][0]["participation"]["train"]["replied"] == 4


def test_buffered_compressed_rounds_through_the_simulation_engine(tmp_path: Path) -> None:
    """strategy.buffer with top-k updates in Flower's engine: replies are taken as they arrive (push and
    pull), each version buffers two of them, and the replies cross the runtime compressed."""
    _, res = fedsilo(tmp_path / "buf", "task=finance", "num_rounds=3", "strategy.buffer=2",
                     "aggregation.compress=topk", "aggregation.keep=0.05", "strategy.fraction_evaluate=0")
    assert res["status"] == "completed" and [h["round"] for h in res["history"]] == [1, 2, 3]
    for h in res["history"]:
        assert len(h["participation"]["buffered"]["staleness"]) == 2
        assert h["participation"]["train"]["replied"] == 2 and h["participation"]["train"]["rejected"] == []
    assert res["final"]["auc"] > res["initial"]["auc"]


def test_paillier_aggregation_through_the_simulation_engine(tmp_path: Path) -> None:
    """aggregation=paillier with DP-SGD in Flower's engine: sites encrypt their DP-SGD models, the
    server adds ciphertexts and keeps only the encrypted model; results come from federated
    evaluation; each site's epsilon accumulates across the rounds. No key files given: the simulated
    run makes a temporary key pair in its output folder and says so (issue #19). The sites share each
    aggregate's decryption (``decryption=split``: one ``query.paillier_decrypt`` exchange per aggregate)."""
    proc, results = fedsilo(tmp_path / "run", "task=finance", "num_sites=3", "num_rounds=2", "aggregation=paillier",
                            "privacy=dpsgd", "aggregation.decryption=split")
    keys = tmp_path / "run" / "paillier-keys"
    assert f"made a temporary key pair in {keys}" in proc.stdout
    assert results["config"]["aggregation"]["public_key"] == str(keys / "paillier_public.json")
    assert results["status"] == "completed" and results["artifacts"]["model"] == "model.encrypted.pt"
    assert results["final_source"].startswith("federated") and results["final"]["auc_site_weighted"] > 0.7
    assert all(h["participation"]["train"]["replied"] == 3 for h in results["history"])
    assert not (tmp_path / "run" / "model.pt").exists()
    first, second = (h["participation"]["privacy"] for h in results["history"])
    assert set(first) == set(second) and len(first) == 3
    assert all(second[s]["total_steps"] == 2 * first[s]["steps"] for s in first)
    for h in results["history"]:  # every aggregate decrypted in 3 slices by the 3 sites, no fallback
        split = h["participation"]["paillier_decryption"]
        assert split["slices"] == 3 and not split["fallback"] and split["rejected"] == []


def test_medical_run_on_four_hospitals(tmp_path: Path) -> None:
    proc, results = fedsilo(tmp_path / "run", "task=medical", "num_rounds=3", "audit=true", "audit_references=2")
    check_layout(results, rounds=3, sites=4)
    assert "membership-inference audit" in proc.stdout
    audit = results["audit"]  # run by the fedsilo command after the job, written into results.json
    assert audit["members"] > 400 and audit["non_members"] > 100 and audit["references"] == 2
    assert 0.3 < audit["loss_threshold"]["auc"] < 0.7 and 0.3 < audit["offline_lira"]["auc"] < 0.7
    final = results["final"]
    assert final["auc"] >= 0.80
    for hospital in ("cleveland", "hungarian", "switzerland", "va"):
        assert 0 <= final[f"accuracy_{hospital}"] <= 1
    assert final["accuracy_site_mean"] >= 0.65
    assert results["history"][0]["participation"]["train"]["sites"][0].startswith("cleveland")
    # progress a person can follow, and the report written after the run
    for r in (1, 2, 3):
        assert re.search(rf"fedsilo round {r}/3 \| sites 4 sampled, 4 replied, 0 failed \| test auc=0\.\d+", proc.stdout)
    assert "about" in proc.stdout and "s left" in proc.stdout
    assert (tmp_path / "run" / "report.html").is_file() and "report in" in proc.stdout


def test_multirun_sweeps_tasks(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "--multirun", "task=medical,tabular", "learner.name=torch", "num_rounds=1",
         "num_sites=2", f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["config"]["task"]["name"]: r for r in (json.loads((d / "results.json").read_text())
                                                     for d in tmp_path.iterdir() if (d / "results.json").is_file())}
    assert sorted(runs) == ["medical", "tabular"]
    # task=tabular through the engine: federated preprocessing and pooled test metrics from the sites
    assert runs["tabular"]["preprocessing"]["sites"] == 2 and runs["tabular"]["final"]["test_sites"] == 2
    assert runs["tabular"]["test_source"].startswith("sites' held-out test rows")
    assert not leftover_processes()


def test_flower_native_run_config(tmp_path: Path) -> None:
    """``flwr run . --run-config "overrides='task=medical num_rounds=1'"`` with no data path:
    the app finds the bundled data through the installed fedsilo distribution."""
    with LocalSuperLink(tmp_path / "superlink.log") as link:
        proc = link.flwr(
            "run", str(REPO), "fedsilo", "--run-config",
            f"overrides='task=medical num_rounds=1' output-dir='{tmp_path / 'out'}'",
            "--federation-config", "num-supernodes=4 client-resources-num-cpus=1", "--format", "json",
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outcome = link.follow(json.loads(proc.stdout)["run-id"], timeout=600, stream=False)
    assert outcome.ok, outcome
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["task"]["name"] == "medical" and len(results["history"]) == 1
    # the same outputs however the run is started (issue #19): the ServerApp writes the report
    assert "fedsilo run: medical" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "report.html").is_file()
    assert not leftover_processes()


def test_failed_run_is_reported_not_hidden(tmp_path: Path) -> None:
    """A run that fails inside Flower (no site meets the round deadline) ends with exit 1,
    Flower's failed status and the reason; results.json records the failure."""
    proc, _ = fedsilo(tmp_path / "run", "task=medical", "num_rounds=2", "strategy.round_timeout=0.001",
                      expect_ok=False)
    assert proc.returncode == 1
    assert "finished:failed" in proc.stderr and "no site returned a usable update" in proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed"


def test_killed_command_stops_everything_it_started(tmp_path: Path) -> None:
    """SIGTERM mid-run: the command exits and no SuperLink, simulation or Ray process survives."""
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "num_rounds=50", f"hydra.run.dir={tmp_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(8)  # let the simulation (and Ray) get going
    assert leftover_processes(), "the run never started"
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert code == 143, f"exit {code}:\n" + proc.stdout.read()[-4000:]  # type: ignore[union-attr]
    assert not leftover_processes()


def test_coordinator_dies_and_the_fedsilo_command_resumes_it(tmp_path: Path) -> None:
    """Through the simulation engine: the ServerApp dies after round 2 of 4 (the run fails, exit 1,
    checkpoint on disk); ``fedsilo resume=DIR`` finishes it with the uninterrupted run's metrics."""
    from app.support import checkpoint

    common = ("task=medical", "num_rounds=4", "privacy=dpsgd")
    proc, _ = fedsilo(tmp_path / "crash", *common, "faults.crash_after_round=2", expect_ok=False)
    assert proc.returncode == 1 and "failed" in proc.stderr
    assert checkpoint.load(tmp_path / "crash").round == 2
    _, resumed = fedsilo(tmp_path / "resumed", *common, f"resume={tmp_path / 'crash'}")
    full = run_inprocess(list(common), tmp_path / "full")
    assert resumed["final"] == full["final"] and len(resumed["history"]) == 4
    assert len(resumed["privacy"]["epsilon_per_site"]) == 4
    assert sorted(resumed["privacy"]["epsilon_per_site"].values()) == sorted(full["privacy"]["epsilon_per_site"].values())


def test_the_leftover_check_sees_a_process_under_a_private_flwr_home(tmp_path: Path) -> None:
    """The check every run's test relies on finds a process whose FLWR_HOME is made the way the
    runtime makes it (``mkdtemp`` under ``$TMPDIR``), and stops seeing it once it is gone."""
    home = tempfile.mkdtemp(prefix="fedsilo-flwr-")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, "FLWR_HOME": home})
    try:
        deadline = time.monotonic() + 10
        while not any(line.startswith(f"{proc.pid}:") for line in leftover_processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(line.startswith(f"{proc.pid}:") for line in leftover_processes())
    finally:
        proc.kill()
        proc.wait()
    assert not any(line.startswith(f"{proc.pid}:") for line in leftover_processes())
