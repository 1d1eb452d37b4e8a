"""A real deployment on loopback: SuperLink + SuperNodes as separate processes, TLS, node
authentication, each site reading its own data file; a site leaving mid-run; the refusals."""

from __future__ import annotations

import json
import shlex
import signal
import time
from pathlib import Path

import pytest

from app.runtime import deploy
from app.runtime.local_grid import run_inprocess
from app.runtime.superlink import LocalSuperLink
from app.support.paths import resolve_data_dir
from tests.conftest import REPO
from tests.e2e.test_e2e import leftover_processes

pytestmark = pytest.mark.e2e


def test_tls_authenticated_sites_with_own_files_survive_a_site_leaving(tmp_path: Path) -> None:
    """Four hospitals, TLS and SuperNode authentication, each with its own data file, DP-SGD;
    one SuperNode is stopped after round 1. The run completes with the other three, the log
    and results.json say which site left and when, each remaining site's privacy ledger
    survived every round, and nothing is left running."""
    overrides, _ = deploy.site_overrides(["task=medical", "num_rounds=6", "strategy.fraction_evaluate=0",
                                          "privacy=dpsgd", "privacy.target_epsilon=4"], 4)
    dep = deploy.prepare(tmp_path, overrides, 4)
    assert [s["name"] for s in dep.sites] == ["cleveland", "hungarian", "switzerland", "va"]
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={resolve_data_dir(None)}"]),
                  "output-dir": str(tmp_path)}
    link = deploy.start(dep, tmp_path)
    try:
        assert "root-certificates" in (link.home / "config.toml").read_text()
        run_id = link.submit(REPO, run_config, {})
        assert link.wait_for_log(run_id, "fedsilo round 1/6", 180, poll=0.5), link.logs(run_id)[-3000:]
        va = link.supernodes[3]
        va.send_signal(signal.SIGTERM)  # the site's operator stops its SuperNode mid-run
        va.wait(timeout=60)
        outcome = link.follow(run_id, timeout=600, stream=False, poll=2.0)
        log = link.logs(run_id)
    finally:
        link.stop()
    assert not leftover_processes(), leftover_processes()
    assert outcome.ok, (outcome, log[-3000:])
    results = json.loads((tmp_path / "results.json").read_text())
    # The departure is named either way the coordinator can learn it: the SuperLink no longer lists the
    # node at a round's start ("left the federation"), or the round sampled it and the SuperLink answered
    # for it (its heartbeat stopped). With rounds of a few seconds (the site worker) the second is usual.
    left = [e for h in results["history"] for e in h["participation"].get("left", [])]
    lost = [r for h in results["history"] for r in h["participation"]["train"]["rejected"]]
    assert [e["site"] for e in left] == ["va"] and left[0]["noticed"] and "left the federation" in log or \
        [r["site"].split(" (")[0] for r in lost] == ["va"] and "Node Unavailable" in lost[0]["reason"], (left, lost)
    assert "va (node" in log
    assert results["history"][0]["participation"]["train"]["replied"] == 4
    assert results["history"][-1]["participation"]["train"]["replied"] == 3
    assert results["history"][-1]["server"]["auc"] > 0.7
    ledgers = [h["participation"]["privacy"] for h in results["history"]]
    for site, rec in ledgers[-1].items():  # cumulative over the rounds
        assert rec["total_steps"] == sum(r[site]["steps"] for r in ledgers) and rec["epsilon"] > ledgers[0][site]["epsilon"]
    # each site's own ledger, in its own state folder: every release it made, and the figure it reported
    for entry in dep.sites[:3]:
        (own,) = Path(entry["file"]).with_suffix(".state").glob("*/*/dp-ledger.json")
        releases = json.loads(own.read_text())["releases"]
        assert [r["round"] for r in releases] == list(range(1, 7)), entry["name"]
        assert results["privacy"]["sites"][entry["name"]]["total_steps"] == sum(r["steps"] for r in releases)
        assert (Path(entry["file"]).with_suffix(".state") / "dp-noise-secret").stat().st_size == 32


def test_deploy_local_matches_the_simulation(tmp_path: Path) -> None:
    """`fedsilo deploy local --sites 3 task=medical aggregation=secagg num_rounds=2`: TLS,
    authenticated nodes, the first three hospitals, each with its identity key and the roster; keys
    signed and agreed once (round 1), round 2 ratchets them; same final AUC as the in-process
    simulation of the same overrides (which the engine matches bit for bit)."""
    args = ["task=medical", "aggregation=secagg", "num_rounds=2"]
    outcome, results = deploy.run(args, 3, tmp_path / "deploy", stream=False)
    assert not leftover_processes(), leftover_processes()
    assert outcome.ok and results is not None, outcome
    assert results["deployment"]["tls"] and results["deployment"]["supernode_auth"]
    assert [h["participation"]["secagg"]["survivors"] for h in results["history"]] == [3, 3]
    assert [h["participation"]["secagg"]["key_exchange"] for h in results["history"]] == [True, False]
    simulated = run_inprocess([*args, "num_sites=3", "partition.natural_sites=3"], tmp_path / "sim")
    assert abs(results["final"]["auc"] - simulated["final"]["auc"]) < 1e-4  # in fact equal up to secagg rounding


def test_deploy_local_runs_buffered_compressed_rounds_with_a_slow_site(tmp_path: Path) -> None:
    """`fedsilo deploy local --sites 3 strategy.buffer=2 aggregation.compress=topk` with one slow site:
    the deployed ServerApp pushes and pulls work per site (each SuperNode's worker answers one task at a
    time), moves the model every two replies and decodes the sites' compressed updates; every site
    keeps its error-feedback residual in its own state folder."""
    args = ["task=finance", "num_rounds=4", "strategy.buffer=2", "aggregation.compress=topk", "aggregation.keep=0.05",
            "faults.slow_fraction=0.34", "faults.slow_factor=3", "strategy.fraction_evaluate=0"]
    outcome, results = deploy.run(args, 3, tmp_path / "deploy", stream=False)
    assert not leftover_processes(), leftover_processes()
    assert outcome.ok and results is not None, outcome
    assert [h["round"] for h in results["history"]] == [1, 2, 3, 4]
    for h in results["history"]:
        assert len(h["participation"]["buffered"]["staleness"]) == 2 and h["participation"]["train"]["replied"] == 2
        assert min(h["participation"]["buffered"]["dispatches"]) >= 10_000
    assert results["final"]["auc"] > results["initial"]["auc"]
    assert len({p.parent for p in (tmp_path / "deploy").rglob("residual-*.pt")}) == 3


def test_deploy_local_of_own_tables_with_a_coordinator_that_holds_no_data(tmp_path: Path) -> None:
    """`fedsilo deploy local --sites 2 task=tabular ...` (two hospitals' own CSV files, the default learner
    `auto`: a linear model and boosted trees by protected sums): the ServerApp's data folder is empty, the
    sites pool their test metrics; the fits equal the simulation of the same overrides (the trees node for
    node), and the run's model scores new rows."""
    args = ["task=tabular", "task.schema=schemas/heart.yaml", "task.data=uci_heart_disease/sites",
            "partition=natural", "+learner.options.gbdt.trees=2", "+learner.options.gbdt.max_depth=2",
            "+learner.options.gbdt.early_stopping=0", "+learner.options.glm.max_iter=3"]  # each sum is an exchange
    out = tmp_path / "deploy"
    outcome, results = deploy.run(args, 2, out, stream=False)
    assert not leftover_processes(), leftover_processes()
    assert outcome.ok and results is not None, outcome
    coordinator = out / "coordinator"
    assert results["config"]["data_dir"] == str(coordinator.resolve()) and not any(coordinator.iterdir())
    assert sorted(p.name for p in (out / "sites").glob("*.csv")) == ["cleveland.csv", "hungarian.csv"]
    got = results["learner"]
    assert results["config"]["learner"]["name"] == "auto" and got["test"]["test_sites"] == 2
    simulated = run_inprocess([*args, "num_sites=2", "partition.natural_sites=2"], tmp_path / "sim")["learner"]
    assert got["chosen"] == simulated["chosen"] and got["val_loss"]["gbdt"] == simulated["val_loss"]["gbdt"]
    assert abs(got["val_loss"]["glm"] - simulated["val_loss"]["glm"]) <= 1e-9
    assert got["parts"]["gbdt"]["history"] == simulated["parts"]["gbdt"]["history"]
    from app.cli import predict

    assert predict.main([str(out), str(out / "sites" / "hungarian.csv"), "--out", str(tmp_path / "s.csv")]) == 0


def test_deploy_local_of_survival_tables_and_table1_equal_the_simulation(tmp_path: Path) -> None:
    """`fedsilo deploy local --sites 3 task=tabular` with a survival schema (three NCCTG institutions' own files,
    TLS, authenticated nodes, secure aggregation), two jobs on the one federation: the default learner, the
    survival analysis (its curves and three Newton steps of the Cox fit equal the simulation of the same three
    sites), then a Table 1 by sex (`learner.name=table1`, what `fedsilo stats` runs: its pooled and per-site
    columns equal the simulation's, and every count in a site's own column is 0 or at least the default
    min_count)."""
    lung = ["task=tabular", "task.schema=schemas/lung.yaml", "task.data=ncctg_lung/sites", "partition=natural",
            "aggregation=secagg"]
    args = [*lung, "+learner.options.score_bins=0", "+learner.options.max_iter=3"]
    table1 = [*lung, "learner.name=table1", "+learner.options.group=sex"]
    out = tmp_path / "deploy"
    outcome, results = deploy.run(args, 3, out, stream=False, then=[table1])
    assert not leftover_processes(), leftover_processes()
    assert outcome.ok and results is not None, outcome
    got = results["learner"]
    assert got["analysis"] == "survival" and got["sites"] == 3 and got["cox"]["iterations"] == 3
    simulated = run_inprocess([*args, "partition.natural_sites=3"], tmp_path / "sim")["learner"]
    assert got["curves"] == simulated["curves"] and got["rows"] == simulated["rows"]
    for name, c in got["cox"]["coefficients"].items():
        assert abs(c["coef"] - simulated["cox"]["coefficients"][name]["coef"]) <= 1e-9, name
    (second,) = results["then"]
    assert second["outcome"].ok and second["results"]["deployment"]["run_id"] != results["deployment"]["run_id"]
    got = second["results"]["learner"]
    simulated = run_inprocess([*table1, "partition.natural_sites=3"], tmp_path / "sim-table1")["learner"]
    assert got["pooled"] == simulated["pooled"] and got["sites"] == simulated["sites"] and len(got["sites"]) == 3
    counts = [n for site in got["sites"].values() for col in site.values() for v in col["variables"].values()
              for n in v.get("counts", {}).values()]
    assert counts and all(n == 0 or n >= 5 for n in counts)
    assert "| variable |" in (out / "job-2" / "table1.md").read_text()


def test_unregistered_key_and_plaintext_node_are_refused(tmp_path: Path) -> None:
    """A SuperNode whose key was not registered, and one without TLS, never join."""
    from app.runtime import pki

    certs = pki.make_certificates(tmp_path / "pki", ["localhost"], ["127.0.0.1"])
    (registered, registered_pub), (stranger, _) = pki.make_supernode_keys(tmp_path / "keys", 2)
    with LocalSuperLink(tmp_path / "superlink.log", simulation=False, certs=certs, supernode_auth=True) as link:
        link.register(registered_pub)
        link.add_supernodes(["partition-id=0"], [registered])
        link.add_supernodes(["partition-id=1"], [stranger])
        link.add_supernodes(["partition-id=2"], [registered], insecure=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            online = [n for n in link.connected_nodes() if str(n.get("status", "")).lower() == "online"]
            if online:
                break
            time.sleep(1)
        time.sleep(5)
        nodes = link.connected_nodes()
        logs = [p.read_text(errors="replace") for p in link.node_logs]
    assert not leftover_processes(), leftover_processes()
    statuses = [str(n.get("status", "")).lower() for n in nodes]
    assert statuses.count("online") == 1, nodes  # only the registered, TLS node
    assert logs[1] and logs[2], "the refused nodes say why"


@pytest.mark.parametrize("model", ["split_nn", "hetero_lr", "secureboost"])
def test_deploy_local_vertical_parties_match_the_simulation(model: str, tmp_path: Path) -> None:
    """`fedsilo deploy local --sites 2 vertical=...`: one SuperNode per party (TLS, authenticated),
    each with its own folder and node config (role, data, schema, held-out file, model folder); the
    coordinator's data folder is empty; PSI and training give the simulation's model parts bit for bit
    (no held-out files: every message starts a ClientApp process, so the test keeps to the few steps).
    Under hetero LR and SecureBoost each party's Paillier key is made at the party: the coordinator's whole output
    folder holds no key file (the messages it relays are checked in tests/integration/test_vertical*.py and
    test_secureboost.py). SecureBoost's parts: the bank's trees and the platform's split table."""
    import numpy as np

    from tests.integration.test_vertical import small_files

    files = small_files(tmp_path / "files")
    args = [f"vertical={model}", "vertical.epochs=1", "vertical.batch_size=0",
            f"vertical.parties.0.data={files['bank']}", "vertical.parties.0.test=null",
            f"vertical.parties.1.data={files['platform']}", "vertical.parties.1.test=null"]
    out = tmp_path / "deploy"
    outcome, results = deploy.run(args, 2, out, stream=False)
    assert not leftover_processes(), leftover_processes()
    assert outcome.ok and results is not None, outcome
    coordinator = out / "coordinator"
    assert results["config"]["data_dir"] == str(coordinator.resolve()) and not any(coordinator.iterdir())
    assert results["vertical"]["intersection"] == {"train": 400, "test": 0}
    assert results["vertical"]["passive"] == ["platform"] and results["vertical"]["active"] == "bank"
    run_inprocess(args, tmp_path / "sim")
    for party in ("bank", "platform"):
        with np.load(out / "sites" / party / "models" / f"{party}.vertical.npz") as deployed, \
                np.load(tmp_path / "sim" / "parties" / f"{party}.vertical.npz") as simulated:
            weights = [k for k in deployed.files if k.startswith("p:") or k in ("w", "model")]
            assert weights and all(np.array_equal(deployed[k], simulated[k]) for k in weights), party
    outside_sites = [p for p in out.rglob("*") if p.is_file() and "sites" not in p.relative_to(out).parts]
    assert outside_sites and not [p for p in outside_sites if "paillier" in p.name.lower()], outside_sites


def test_site_worker_runs_fedsilo_in_process_and_refuses_other_apps(tmp_path: Path) -> None:
    """Issue #19: on SuperNodes started with the site worker, fedsilo's messages are handled in the
    worker's process (no ``flwr-clientapp`` process is started for them) and a round of secure
    aggregation takes seconds, not half a minute. Issue #33 (attack 9): a different Flower app a
    coordinator submits to the same SuperNodes (Flower's quickstart-style FedAvg) gets an error
    reply for every message and no process: nothing of it is installed or run at the site."""
    import shutil

    outcome, results = deploy.run(["task=medical", "aggregation=secagg", "num_rounds=3"], 3, tmp_path / "fedsilo",
                                  stream=False)
    assert outcome.ok and results is not None, outcome
    assert results["deployment"]["site_worker"]
    logs = [p.read_text(errors="replace") for p in sorted((tmp_path / "fedsilo").glob("supernode-*.log"))]
    assert len(logs) == 3
    for log in logs:
        # every message of the run: 3 rounds x (train + unmask + evaluate) plus the key stages
        assert log.count("handled in this process") >= 9 and "Start `flwr-clientapp` process" not in log
    later = results["timing"]["round_seconds"][1:]
    assert max(later) < 15.0, later  # 32-34 s a round before the worker (benchmarks/deployment.py)

    app = tmp_path / "flower-app"
    app.mkdir()
    for name in ("baseline_app.py", "pyproject.toml"):
        shutil.copy(REPO / "benchmarks" / "flower_baseline" / name, app)
    timing = tmp_path / "timing.json"
    with LocalSuperLink(tmp_path / "flower" / "superlink.log", simulation=False) as link:
        link.add_supernodes([f"partition-id={i} num-partitions=2" for i in range(2)], insecure=True)
        run_config = {"num-server-rounds": 2, "num-sites": 2, "rows-per-site": 100, "val-rows": 20, "test-rows": 50,
                      "features": 13, "timing-file": str(timing)}
        flower = link.follow(link.submit(app, run_config, {}), timeout=600, stream=False, poll=1.0)
        node_logs = [p.read_text(errors="replace") for p in link.node_logs]
    for log in node_logs:
        assert "is not the installed fedsilo" in log and "its tasks are refused" in log
        assert "refused a message of FAB" in log
        assert "Start `flwr-clientapp` process" not in log and "handled in this process" not in log
    del flower, timing
    assert not leftover_processes(), leftover_processes()


def test_sites_refuse_by_their_own_policy_in_a_deployment(tmp_path: Path) -> None:
    """Issue #33: `fedsilo deploy local` with a policy per site (TLS, authenticated SuperNodes, the site
    worker). A coordinator that sends epsilon = 1e6 is refused by every site; a second job (a fresh job id) on
    the same sites' data starts from what the first spent, and the sites stop at their own cap. (A foreign FAB:
    the test above; privacy=none to sites whose policy requires DP-SGD, refused by the same Flower mod:
    tests/integration/test_site_policy.py.)"""
    strict = tmp_path / "strict.yaml"
    strict.write_text("privacy: {required: dpsgd, max_epsilon: 3.0}\naggregation: {allowed: [plain, secagg]}\n")
    loose = tmp_path / "loose.yaml"  # the third site's operator allows more, but still caps its data's epsilon
    loose.write_text("privacy: {required: dpsgd, max_epsilon: 3.0}\n")
    policies = [strict, strict, loose]
    base = ["task=medical", "num_rounds=1", "strategy.fraction_evaluate=0"]

    outcome, results = deploy.run([*base, "privacy=dpsgd", "privacy.target_epsilon=1000000"], 3, tmp_path / "greedy",
                                  stream=False, policies=policies)
    assert results is not None
    for h in results["history"]:
        reasons = [r["reason"] for r in h["participation"]["train"]["rejected"]]
        assert len(reasons) == 3 and all("exceeds the policy's max_epsilon=3" in r for r in reasons), reasons

    # two jobs on one deployment of the same sites and data: the second (a fresh job id, another learning rate, so
    # other updates) is charged on top of the first (a byte-identical replay would be free: test_site_ledger.py)
    same = tmp_path / "jobs"
    job = [*base, "num_rounds=3", "privacy=dpsgd", "privacy.target_epsilon=2.5"]
    outcome, first = deploy.run(job, 3, same, stream=False, policies=policies, then=[[*job, "task.lr=0.06"]])
    assert outcome.ok and first is not None and first["privacy"]["max_epsilon"] <= 2.5
    second = first["then"][0]["results"]  # the second job, on the same deployment
    assert second is not None and second["privacy"].get("budget_exhausted"), second["privacy"]
    assert all("max_epsilon 3" in why for why in second["privacy"]["budget_exhausted"].values())
    from app.cli import ledger as ledger_cli

    for state in sorted((same / "sites").glob("*.state")):
        (entry,) = ledger_cli.read(state)
        assert entry["scope"] == "data set" and len(entry["jobs"]) == 2 and entry["epsilon"] <= 3.0, entry
        assert entry["epsilon"] > max(first["privacy"]["epsilon_per_site"].values())
