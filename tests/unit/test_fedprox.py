"""FedProx: the proximal term, its effect, adaptive mu, and systems heterogeneity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from app import client_app, config
from strategies import heterogeneity
from strategies.fedprox import MU_KEY, FedProx, ProximalTerm, client_penalty
from tasks.models import MLP
from tasks.training import LocalTrainConfig, steps_per_epoch, train_local
from tests.conftest import make_task

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return MLP(4, [3])


def test_proximal_gradient_is_mu_times_distance() -> None:
    model = _tiny()
    term = ProximalTerm(model, mu=0.7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.zero_grad()
    term(model).backward()
    for p, anchor in zip(model.parameters(), term.anchor):
        assert torch.allclose(p.grad, 0.7 * (p.detach() - anchor), atol=1e-6)
    expected = 0.35 * sum(((p.detach() - a) ** 2).sum() for p, a in zip(model.parameters(), term.anchor))
    assert term(model).item() == pytest.approx(float(expected), rel=1e-6)


def test_one_training_step_adds_the_proximal_gradient() -> None:
    """A plain-SGD step with the term equals the data-gradient step plus lr*mu*(w - w_global)."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 4), (torch.rand(8) > 0.5).float()
    start = _tiny()
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.1)
    anchor_model = _tiny()  # the "global" weights the term pulls towards
    mu, lr = 2.0, 0.1
    cfg = LocalTrainConfig(epochs=1, batch_size=8, lr=lr)

    with_term = copy.deepcopy(start)
    term = ProximalTerm(anchor_model, mu)
    train_local(with_term, x, y, cfg, torch.Generator().manual_seed(0), penalty=term)

    manual = copy.deepcopy(start)
    loss = nn.functional.binary_cross_entropy_with_logits(manual(x), y)
    grads = torch.autograd.grad(loss, list(manual.parameters()))
    with torch.no_grad():
        for p, g, a in zip(manual.parameters(), grads, anchor_model.parameters()):
            p -= lr * (g + mu * (p - a))
    for a, b in zip(with_term.parameters(), manual.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_zero_mu_adds_no_term_and_large_mu_keeps_the_model_home() -> None:
    task = make_task("finance", local_epochs=2)
    site = task.sites(config.compose().partition, 5, seed=0)[0]
    assert client_penalty(ConfigRecord({MU_KEY: 0.0}), task.build_model()) is None

    def distance(mu: float) -> float:
        torch.manual_seed(0)
        model = task.build_model()
        start = [p.detach().clone() for p in model.parameters()]
        penalty = client_penalty(ConfigRecord({MU_KEY: mu}), model)
        task.train(model, site.train, seed=3, penalty=penalty)
        return float(sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start)) ** 0.5)

    # lr * mu must stay below SGD's stability limit 2(1 + momentum) = 3.8; 30 * 0.05 = 1.5.
    free, tight = distance(0.0), distance(30.0)
    assert free > 0.5
    assert tight < 0.05 * free


def test_adaptive_mu_follows_the_papers_heuristic() -> None:
    s = FedProx(num_sites=2, mu=0.5, adaptive_mu=True, mu_step=0.1, mu_patience=2)
    for loss in (1.0, 1.2):  # first loss only sets the reference; a rise adds a step
        s._adapt(1, loss)
    assert s.mu == pytest.approx(0.6)
    for loss in (1.1, 1.0):  # two consecutive decreases remove a step
        s._adapt(1, loss)
    assert s.mu == pytest.approx(0.5)
    fixed = FedProx(num_sites=2, mu=0.5)
    for loss in (1.0, 2.0, 3.0):
        fixed._adapt(1, loss)
    assert fixed.mu == 0.5


def test_straggler_plan_is_seeded_and_partial() -> None:
    cfg = config.compose(["strategy=fedprox", "strategy.stragglers=0.5"]).strategy
    chosen = heterogeneity.stragglers(0, 3, 10, 0.5)
    assert len(chosen) == 5 and chosen == heterogeneity.stragglers(0, 3, 10, 0.5)
    assert chosen != heterogeneity.stragglers(0, 4, 10, 0.5)
    for site in range(10):
        work = heterogeneity.plan(cfg, 1, 68, seed=0, server_round=3, site_id=site, num_sites=10)
        assert work.straggler == (site in chosen)
        if work.straggler:
            assert work.max_steps is not None and 1 <= work.max_steps < 68 and not work.dropped
        else:
            assert work.max_steps is None
    per_site = config.compose(["strategy.local_epochs=[1,3]"]).strategy
    assert [heterogeneity.plan(per_site, 1, 10, 0, 1, i, 4).epochs for i in range(4)] == [1, 3, 1, 3]


def _train_message(task, mu: float, server_round: int = 1) -> Message:
    torch.manual_seed(0)
    content = RecordDict({
        "arrays": ArrayRecord(task.build_model().state_dict()),
        "config": ConfigRecord({"server-round": server_round, MU_KEY: mu}),
    })
    return Message(content, dst_node_id=7, message_type="train")


def _context(overrides: str, partition_id: int, num_partitions: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition_id, "num-partitions": num_partitions},
                   state=RecordDict(), run_config={"overrides": overrides})


def _site_replies(overrides: str, mu: float) -> list[Message]:
    """Round-1 replies of the real ClientApp train handler at the four hospitals."""
    task = make_task("medical")
    return [client_app.train(_train_message(task, mu), _context(overrides, pid, 4)) for pid in range(4)]


def test_client_app_straggler_does_partial_work_with_full_weight() -> None:
    chosen = heterogeneity.stragglers(0, 1, 4, 0.5)
    task = make_task("medical")
    replies = _site_replies("task=medical strategy=fedprox strategy.stragglers=0.5 strategy.mu=0.1", 0.1)
    for pid, reply in enumerate(replies):
        site = task.sites(config.compose(["task=medical"]).partition, 4, 0)[pid]
        metrics = reply.content["metrics"]
        full = steps_per_epoch(len(site.train), 32)
        assert metrics["num-examples"] == len(site.train)  # weight p_k = n_k / n, as in the paper
        assert bool(reply.content["site"]["straggler"]) == (pid in chosen)
        if pid in chosen and full > 1:  # a one-step site cannot do less than one step
            assert 1 <= metrics["local_steps"] < full
        else:
            assert metrics["local_steps"] == full


def test_client_app_drop_policy_misses_the_round() -> None:
    chosen = heterogeneity.stragglers(0, 1, 4, 0.5)
    for pid, reply in enumerate(_site_replies("task=medical strategy=fedavg strategy.stragglers=0.5", 0.0)):
        assert reply.has_error() == (pid in chosen)
        if reply.has_error():
            assert "did not finish" in reply.error.reason


def test_partial_updates_are_averaged_by_rows() -> None:
    """The straggler's update enters the average with weight n_k, like any site's."""
    overrides = "task=medical strategy=fedprox strategy.stragglers=0.5"
    task = make_task("medical")
    s = FedProx(num_sites=4, mu=0.0)
    msg = _train_message(task, 0.0)
    s.reference = {k: (tuple(v.shape), np.dtype(v.numpy().dtype)) for k, v in msg.content["arrays"].items()}
    replies = [Message(client_app.train(msg, _context(overrides, pid, 4)).content, reply_to=msg) for pid in range(4)]
    arrays, _ = s.aggregate_train(1, replies)
    weights = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=float)
    for key in arrays.keys():
        stacked = np.stack([r.content["arrays"][key].numpy() for r in replies])
        expected = np.tensordot(weights / weights.sum(), stacked, axes=1)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert len(s.participation[1]["train"]["stragglers"]) == 2
