"""Compressed updates and buffered asynchronous rounds, end to end through fedsilo's real apps (in process)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from app import client_app, server_app
from app.runtime.local_grid import LocalGrid, run_inprocess
from app.server_app import CoordinatorCrash
from tests.conftest import DATA_DIR


def _run(overrides: list[str], out: Path, state: Path, workers: int = 1, sites: int = 5) -> dict[str, Any]:
    run_config = {"overrides": shlex.join([*overrides, f"data_dir={DATA_DIR}"]), "output-dir": str(out)}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = LocalGrid(client_app.app, sites, run_config, node_config={"state-dir": str(state)}, workers=workers)
    try:
        server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    finally:
        if grid._pool is not None:
            grid._pool.shutdown(wait=True)
    return json.loads((out / "results.json").read_text())


def _up(res: dict[str, Any]) -> float:
    return float(np.mean([h["traffic"]["bytes_from_sites"] for h in res["history"]]))


def test_topk_with_error_feedback_sends_far_fewer_bytes_and_keeps_its_residual(tmp_path: Path) -> None:
    common = ["task=finance", "num_rounds=4", "strategy.fraction_evaluate=0"]
    full = _run(common, tmp_path / "full", tmp_path / "s0")
    top = _run([*common, "aggregation.compress=topk", "aggregation.keep=0.05"], tmp_path / "top", tmp_path / "s1")
    assert _up(full) / _up(top) > 15
    assert abs(full["final"]["auc"] - top["final"]["auc"]) < 0.02
    assert all(h["participation"]["train"]["replied"] == 5 for h in top["history"])
    residuals = sorted((tmp_path / "s1").rglob("residual-*.pt"))
    assert len({p.parent for p in residuals}) == 5  # every site keeps its own residual
    assert not list((tmp_path / "s0").rglob("residual-*.pt"))


@pytest.mark.slow
def test_error_feedback_survives_a_coordinator_resume_bit_for_bit(tmp_path: Path) -> None:
    """A crash after round 2 and a resume give the same model as an uninterrupted run: each site
    reads the residual it left before the resumed round from its state folder."""
    common = ["task=finance", "num_rounds=4", "strategy.fraction_evaluate=0", "aggregation.compress=topk",
              "aggregation.keep=0.05", "checkpoint=true"]
    whole = _run(common, tmp_path / "whole", tmp_path / "sw")
    with pytest.raises(CoordinatorCrash):
        _run([*common, "faults.crash_after_round=2"], tmp_path / "cut", tmp_path / "sc")
    resumed = _run([*common, f"resume={tmp_path / 'cut'}"], tmp_path / "cut", tmp_path / "sc")
    assert [h["server"]["auc"] for h in resumed["history"]] == [h["server"]["auc"] for h in whole["history"]]
    no_ef = run_inprocess(["task=finance", "num_rounds=4", "strategy.fraction_evaluate=0",
                           "aggregation.compress=topk", "aggregation.keep=0.05", "aggregation.error_feedback=false"],
                          tmp_path / "noef")
    assert no_ef["final"]["auc"] != whole["final"]["auc"]  # the residual changes what is learnt


def test_randk_under_secure_aggregation_sums_the_shared_positions(tmp_path: Path) -> None:
    common = ["task=finance", "num_rounds=3", "strategy.fraction_evaluate=0", "aggregation=secagg"]
    sec = run_inprocess(common, tmp_path / "sec")
    rk = _run([*common, "aggregation.compress=randk", "aggregation.keep=0.1"], tmp_path / "rk", tmp_path / "s")
    assert _up(sec) / _up(rk) > 5
    assert rk["final"]["auc"] > 0.72
    for h in rk["history"]:
        assert h["participation"]["secagg"]["survivors"] == 5 and h["train"]["clipped_values"] == 0
    # fewer bits per value and for the total weight: a 24-bit field, so a shorter masked vector
    short = run_inprocess([*common, "aggregation.value_bits=8", "aggregation.weight_bits=16", "aggregation.clip=0.5"],
                          tmp_path / "short")
    assert _up(short) < 0.55 * _up(sec)
    assert abs(short["final"]["auc"] - sec["final"]["auc"]) < 0.005


def test_buffered_rounds_do_not_wait_for_the_slow_site(tmp_path: Path) -> None:
    slow = ["task=finance", "strategy.fraction_evaluate=0", "faults.slow_fraction=0.2", "faults.slow_factor=4"]
    res = _run([*slow, "num_rounds=6", "strategy.buffer=2"], tmp_path / "buf", tmp_path / "s", workers=5)
    assert [h["round"] for h in res["history"]] == list(range(1, 7))
    stale = [h["participation"]["buffered"] for h in res["history"]]
    assert all(len(b["staleness"]) == 2 for b in stale)
    assert any(t > 0 for b in stale for t in b["staleness"])   # later versions take replies started earlier
    assert all(w == pytest.approx((1 + t) ** -0.5, abs=1e-6) for b in stale for t, w in zip(b["staleness"], b["weights"]))
    dispatches = [d for b in stale for d in b["dispatches"]]
    assert len(set(dispatches)) == len(dispatches) and min(dispatches) >= 10_000
    # each site trained under the number it was sent (its own seed, its own ledger entry)
    assert [s for b in stale for s in b.get("site_rounds", [])] == dispatches
    assert res["final"]["auc"] > res["initial"]["auc"] + 0.03
    assert all(h["participation"]["train"]["replied"] == 2 for h in res["history"])


@pytest.mark.slow
def test_buffered_rounds_with_dpsgd_charge_each_dispatch_in_the_sites_ledgers(tmp_path: Path) -> None:
    res = _run(["task=finance", "num_rounds=4", "strategy.fraction_evaluate=0", "strategy.buffer=2",
                "privacy=dpsgd", "privacy.target_epsilon=8"], tmp_path / "dp", tmp_path / "s", workers=3, sites=5)
    assert res["status"] == "completed"
    ledgers = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "s").rglob("dp-ledger.json")}
    rounds = [r["round"] for doc in ledgers.values() for r in doc["releases"]]
    assert len(rounds) >= 8 and min(rounds) >= 10_000     # every dispatch is a release with its own number
    spent = res["privacy"]["epsilon_per_site"]
    assert all(0 < e <= 8 for e in spent.values())


def test_buffered_rounds_resume_from_a_checkpoint_and_report(tmp_path: Path) -> None:
    """A coordinator that dies after version 2 resumes at version 3 with the same dispatch numbers'
    scheme; the finished run has every version, its progress records and its report."""
    common = ["task=finance", "num_rounds=4", "strategy.fraction_evaluate=0", "strategy.buffer=2", "checkpoint=true"]
    with pytest.raises(CoordinatorCrash):
        _run([*common, "faults.crash_after_round=2"], tmp_path / "run", tmp_path / "s", workers=3)
    res = _run([*common, f"resume={tmp_path / 'run'}"], tmp_path / "run", tmp_path / "s", workers=3)
    assert res["status"] == "completed" and [h["round"] for h in res["history"]] == [1, 2, 3, 4]
    assert all(len(h["participation"]["buffered"]["staleness"]) == 2 for h in res["history"])
    later = [d for h in res["history"][2:] for d in h["participation"]["buffered"]["dispatches"]]
    assert min(later) >= 3 * 10_000  # dispatched from version 2 or later
    assert "staleness of the buffered replies" in (tmp_path / "run" / "report.md").read_text()
    assert res["final"]["auc"] > res["initial"]["auc"]


@pytest.mark.slow
def test_side_values_compress_with_the_update(tmp_path: Path) -> None:
    """FedNova's step count and SCAFFOLD's control variate are arrays of the same reply: compressed with
    the update, each in its own quantisation blocks, and the run learns as without compression."""
    common = ["task=finance", "num_rounds=2", "strategy.fraction_evaluate=0"]
    for strategy, method in (("fednova", "int8"), ("scaffold", "topk")):
        full = run_inprocess([*common, f"strategy={strategy}"], tmp_path / f"{strategy}-full")
        comp = run_inprocess([*common, f"strategy={strategy}", f"aggregation.compress={method}",
                              "aggregation.keep=0.1"], tmp_path / f"{strategy}-comp")
        assert all(h["participation"]["train"]["replied"] == 5 for h in comp["history"])
        assert abs(comp["history"][0]["server"]["auc"] - full["history"][0]["server"]["auc"]) < 0.01
        assert _up(full) / _up(comp) > 3.5
