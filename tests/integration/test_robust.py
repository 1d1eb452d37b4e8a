"""Byzantine sites (app/attacks.py) and what the server does about them (strategies/robust.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from app import config
from app.faults import attacks
from app.runtime.local_grid import run_inprocess
from strategies import robust
from strategies.fedavg import FedAvg
from tasks.base import Split

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _reply(site: int, w: np.ndarray, n: float = 10.0) -> Message:
    ins = Message(RecordDict(), dst_node_id=100 + site, message_type="train")
    return Message(RecordDict({
        "arrays": ArrayRecord({"w": Array(w.astype(np.float32))}),
        "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5}),
        "site": ConfigRecord({"id": site, "name": f"site-{site}", "round": 1}),
    }), reply_to=ins)


def _honest_and_one_liar(n: int = 6) -> list[Message]:
    rng = np.random.default_rng(0)
    replies = [_reply(i, 1.0 + 0.01 * rng.normal(size=4), n=10 + i) for i in range(n - 1)]
    return [*replies, _reply(n - 1, np.full(4, -100.0), n=1000)]  # a liar with a huge claimed weight


@pytest.mark.parametrize("rule", ["krum", "multikrum", "trimmed_mean", "median"])
def test_every_rule_ignores_an_outlier_that_breaks_the_weighted_mean(rule: str) -> None:
    replies = _honest_and_one_liar()
    out, used = robust.aggregate(rule, replies, assumed=0.2)
    assert np.all(np.abs(out["w"].numpy() - 1.0) < 0.05), out["w"].numpy()
    if rule in ("krum", "multikrum"):
        assert 5 not in used and len(used) == (1 if rule == "krum" else 5)
    plain = FedAvg(num_sites=6)
    plain.reference = {"w": ((4,), np.dtype(np.float32))}
    mean, _ = plain.aggregate_train(1, replies)  # plain FedAvg: dragged to about -92
    assert mean is not None and np.all(mean["w"].numpy() < -50)


def test_multikrum_averages_the_chosen_updates_by_rows() -> None:
    replies = [_reply(0, np.zeros(3), n=10), _reply(1, np.ones(3) * 0.1, n=30), _reply(2, np.ones(3) * 0.05, n=20),
               _reply(3, np.full(3, 50.0), n=10)]
    out, used = robust.aggregate("multikrum", replies, assumed=0.25)
    assert used == [0, 1, 2]
    np.testing.assert_allclose(out["w"].numpy(), (0 * 10 + 0.1 * 30 + 0.05 * 20) / 60, rtol=1e-6)


def test_byzantine_count_is_capped_to_what_each_rule_can_use() -> None:
    assert robust.byzantine_count("median", 10, 0.3) == 3
    assert robust.byzantine_count("krum", 4, 0.49) == 1  # n - f - 2 >= 1
    assert robust.byzantine_count("trimmed_mean", 3, 0.49) == 1 and robust.byzantine_count("trimmed_mean", 2, 0.49) == 0


def test_norm_bound_clips_the_update_not_the_model() -> None:
    glob = ArrayRecord({"w": Array(np.ones(4, np.float32)), "steps": Array(np.array([3], np.int64))})
    msg = _reply(0, np.ones(4) + np.array([3.0, 4.0, 0.0, 0.0]))
    msg.content["arrays"]["steps"] = Array(np.array([7], np.int64))
    assert robust.bound_reply(msg, glob, 1.0)
    w = msg.content["arrays"]["w"].numpy()
    assert w.dtype == np.float32 and np.linalg.norm(w - 1.0) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(w - 1.0, [0.6, 0.8, 0, 0], rtol=1e-6)  # same direction, length 1
    assert msg.content["arrays"]["steps"].numpy()[0] == 7  # integer buffers are not updates
    assert not robust.bound_reply(_reply(1, np.ones(4) * 1.1), glob, 1.0)  # short updates stay as they are


def test_attackers_are_a_fixed_seeded_set_and_attacks_do_what_they_say() -> None:
    cfg = config.compose(["num_sites=10", "faults.byzantine_fraction=0.3"])
    chosen = attacks.attackers(cfg.seed, 10, 0.3)
    assert len(chosen) == 3 and chosen == attacks.attackers(cfg.seed, 10, 0.3)
    assert sum(attacks.is_attacker(cfg, i, 10) for i in range(10)) == 3
    glob = {"w": torch.zeros(3), "n": torch.tensor([1])}
    local = {"w": torch.tensor([1.0, 2.0, 3.0]), "n": torch.tensor([2])}
    flip = attacks.poison_model(cfg, local, glob, 1, 0)
    assert torch.equal(flip["w"], torch.tensor([-4.0, -8.0, -12.0])) and flip["n"].item() == 2
    scale = attacks.poison_model(config.compose(["faults.attack=scale", "faults.attack_scale=10"]), local, glob, 1, 0)
    assert torch.equal(scale["w"], torch.tensor([10.0, 20.0, 30.0]))
    gauss_cfg = config.compose(["faults.attack=gaussian"])
    g1, g2 = (attacks.poison_model(gauss_cfg, local, glob, r, 0)["w"] for r in (1, 2))
    assert not torch.equal(g1, g2) and torch.equal(g1, attacks.poison_model(gauss_cfg, local, glob, 1, 0)["w"])
    split = Split(torch.zeros(3, 2), torch.tensor([0.0, 1.0, 1.0]))
    assert attacks.poison_data(config.compose(["faults.attack=label_flip"]), split).y.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.slow
def test_sign_flip_attackers_break_fedavg_and_median_holds(tmp_path: Path) -> None:
    common = ["task=finance", "num_sites=10", "num_rounds=5"]
    clean = run_inprocess(common, tmp_path / "clean")["final"]["auc"]
    attacked = [*common, "faults.byzantine_fraction=0.2", "faults.attack=sign_flip"]
    fedavg = run_inprocess(attacked, tmp_path / "fedavg")["final"]["auc"]
    res = run_inprocess([*attacked, "strategy=fedprox", "strategy.robust=multikrum"], tmp_path / "mk")
    assert fedavg < clean - 0.05
    assert abs(res["final"]["auc"] - clean) < 0.02
    cfg = config.compose(attacked)
    liars = {f"site-{i}" for i in attacks.attackers(cfg.seed, 10, 0.2)}
    for h in res["history"]:
        used = {label.split(" (node")[0] for label in h["participation"]["train"]["robust"]["used"]}
        assert not used & liars and len(used) == 8  # multikrum keeps n - f = 10 - floor(0.2 * 10)


@pytest.mark.slow  # among the heaviest; the full suite runs it (fast tier: README)
def test_norm_bound_under_secure_aggregation_contains_a_scaling_attack(tmp_path: Path) -> None:
    attacked = ["task=finance", "num_sites=10", "num_rounds=4", "aggregation=secagg", "faults.byzantine_fraction=0.2",
                "faults.attack=scale"]
    clean = run_inprocess(["task=finance", "num_sites=10", "num_rounds=4"], tmp_path / "clean")["final"]["auc"]
    unbounded = run_inprocess(attacked, tmp_path / "open")["final"]["auc"]
    bounded = run_inprocess([*attacked, "strategy.norm_bound=0.5"], tmp_path / "bounded")
    assert unbounded < clean - 0.1
    assert abs(bounded["final"]["auc"] - clean) < 0.02
    assert all(h["participation"]["train"].get("norm_bounded") == ["aggregate"] for h in bounded["history"])


def test_a_model_driven_to_divergence_ends_the_run_cleanly(tmp_path: Path) -> None:
    """Scaled sign flips blow the model up until its scores are NaN and every site's update is
    rejected as non-finite: the run still completes, AUC is reported as undefined (null)."""
    res = run_inprocess(["task=finance", "num_sites=10", "num_rounds=10", "faults.byzantine_fraction=0.2",
                         "faults.attack_scale=10"], tmp_path)
    assert res["status"] == "completed" and res["final"]["auc"] is None
    last = res["history"][-1]["participation"]["train"]
    assert last["replied"] == 0 and all("NaN or Inf" in r["reason"] for r in last["rejected"])
