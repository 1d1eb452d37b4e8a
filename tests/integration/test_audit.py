"""Membership-inference audit: the attacks' scoring, and that they see leakage where there is some."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.cli.audit import audit_run
from app.runtime.local_grid import run_inprocess
from privacy.audit import score_attack

#: A deliberately overfit federation: 5 sites x 50 rows, 400 local epochs in all, a wide MLP.
OVERFIT = ["task=finance", "task.train_rows=50", "task.local_epochs=20", "num_rounds=20", "task.hidden=[256,256]",
           "strategy.fraction_evaluate=0"]


def test_attack_scoring() -> None:
    labels = np.r_[np.ones(500), np.zeros(500)]
    perfect = score_attack(labels + 0.0, labels)
    assert (perfect.auc, perfect.tpr_at_1pct_fpr) == (1.0, 1.0)
    chance = score_attack(np.random.default_rng(0).random(1000), labels)
    assert abs(chance.auc - 0.5) < 0.05 and chance.tpr_at_1pct_fpr < 0.05


@pytest.mark.slow
def test_audit_detects_overfitting_and_dp_removes_it(tmp_path: Path) -> None:
    run_inprocess(OVERFIT, tmp_path / "plain")
    leaky = audit_run(tmp_path / "plain", references=4)
    assert leaky["members"] == 250 and leaky["non_members"] > 2000
    low, high = leaky["loss_threshold"]["auc_ci95"]
    assert low < leaky["loss_threshold"]["auc"] < high
    assert leaky["loss_threshold"]["auc"] >= 0.6 and leaky["offline_lira"]["auc"] >= 0.6
    run_inprocess([*OVERFIT, "privacy=dpsgd", "privacy.target_epsilon=1"], tmp_path / "dp")
    private = audit_run(tmp_path / "dp", references=4)
    for attack in ("loss_threshold", "offline_lira"):
        assert abs(private[attack]["auc"] - 0.5) <= 0.03, (attack, private[attack])
    import json

    recorded = json.loads((tmp_path / "dp" / "results.json").read_text())
    assert recorded["audit"]["max_auc"] == private["max_auc"] and recorded["privacy"]["max_epsilon"] <= 1.0


def test_audit_command_rejects_a_non_run(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "app.cli", "audit", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "results.json does not exist" in proc.stderr
