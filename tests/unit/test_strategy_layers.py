"""Server optimizers, SCAFFOLD, FedNova and personalization: their maths and their contracts,
one piece at a time (the federated runs are in ``tests/integration/test_strategy_runs.py``)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import nn

from app import config
from core.config import ConfigError
from core.state import SiteStore
from strategies import fednova, personal, scaffold
from strategies.fednova import FedNova, FedNovaSite
from strategies.scaffold import ScaffoldSite
from strategies.server_opt import ServerOptimizer
from strategies.site import SiteRound, StrategySite, step_normalizer
from tasks.models import MLP, LogisticRegression, SmallCNN


def _rec(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.asarray(v, dtype=np.float32))) for k, v in arrays.items()))


def _vec(rec: ArrayRecord) -> np.ndarray:
    return np.concatenate([rec[k].numpy().ravel() for k in rec.keys()]).astype(np.float64)


# ---- server optimizers ---------------------------------------------------------------------
def test_avgm_without_momentum_and_unit_step_is_fedavg() -> None:
    opt = ServerOptimizer("avgm", lr=1.0, beta1=0.0)
    cur, agg = _rec(w=[1.0, 2.0], b=[0.5]), _rec(w=[1.5, 1.0], b=[0.25])
    assert np.array_equal(_vec(opt.step(cur, agg)), _vec(agg))


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad", "avgm"])
def test_server_optimizer_follows_reddi_et_al(name: str) -> None:
    """Two steps against the paper's update rules, written out by hand in float64."""
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = ServerOptimizer(name, lr, b1, b2, tau)
    x = np.array([1.0, -2.0, 0.5])
    m, v = np.zeros(3), np.zeros(3)
    rng = np.random.default_rng(0)
    for _ in range(2):
        target = x + rng.normal(0, 0.3, 3)
        delta = target.astype(np.float32).astype(np.float64) - x.astype(np.float32).astype(np.float64)
        out = _vec(opt.step(_rec(w=x), _rec(w=target)))
        if name == "avgm":
            m = b1 * m + delta
            expect = x.astype(np.float32) + lr * m
        else:
            m = b1 * m + (1 - b1) * delta
            if name == "adam":
                v = b2 * v + (1 - b2) * delta**2
            elif name == "yogi":
                v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
            else:
                v = v + delta**2
            expect = x.astype(np.float32) + lr * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(out, expect.astype(np.float32), rtol=1e-6)
        x = out
    restored = ServerOptimizer(name, lr, b1, b2, tau)
    restored.load_state_dict(opt.state_dict())
    step_a = _vec(opt.step(_rec(w=x), _rec(w=x + 0.1)))
    step_b = _vec(restored.step(_rec(w=x), _rec(w=x + 0.1)))
    assert np.array_equal(step_a, step_b)  # a checkpoint's moments step identically


def test_server_optimizer_ignores_side_values_of_the_current_record() -> None:
    opt = ServerOptimizer("adam", 0.1)
    cur = _rec(w=[1.0], **{"scaffold.c/w": [9.0]})
    out = opt.step(cur, _rec(w=[2.0]))
    assert list(out.keys()) == ["w"]


# ---- FedNova -------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_step_normalizer_counts_what_momentum_sgd_moved(momentum: float) -> None:
    """Under a constant gradient g, tau momentum-SGD steps move the weights by -lr * a * g."""
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.1, momentum=momentum)
    for _ in range(7):
        opt.zero_grad()
        (w * 2.0).sum().backward()  # gradient 2
        opt.step()
    assert float(w.detach()) == pytest.approx(-0.1 * 2.0 * step_normalizer(7, momentum), rel=1e-12)


def test_fednova_site_and_coordinator_halves_give_the_paper_update() -> None:
    model = LogisticRegression(2)
    glob = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    glob[fednova.KEY] = torch.zeros(1, dtype=torch.float64)
    rnd = SiteRound(ConfigRecord(), 1, None, lr=0.1, momentum=0.0)
    replies = []
    for steps, shift, rows in ((2, 1.0, 30), (8, 2.0, 10)):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(shift)
        replies.append((FedNovaSite().finish(model, glob, {"local_steps": float(steps)}, rnd), rows))
    # the row-weighted mean the combine step (or secagg's sum) computes
    total = sum(r for _, r in replies)
    mean = {k: sum(r * s[k].double() for s, r in replies) / total for k in replies[0][0]}
    strategy = FedNova(2)
    strategy.current = ArrayRecord(OrderedDict((k, Array(v.numpy())) for k, v in glob.items()))
    agg = ArrayRecord(OrderedDict((k, Array(v.numpy().astype(glob[k].numpy().dtype))) for k, v in mean.items()))
    new, metrics = strategy.finish_train(1, agg, None)
    assert new is not None and fednova.KEY not in new.keys()
    p = np.array([30, 10]) / 40
    tau_eff = p @ np.array([2, 8])
    expect = tau_eff * (p @ np.array([1.0 / 2, 2.0 / 8]))  # x + tau_eff * sum_i p_i (y_i - x) / a_i
    np.testing.assert_allclose(new["linear.weight"].numpy(), expect, rtol=1e-6)


# ---- SCAFFOLD ------------------------------------------------------------------------------
def test_scaffold_site_corrects_the_gradient_and_updates_its_control_variate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LogisticRegression(3)
    x = {k: v.clone() for k, v in model.state_dict().items()}
    c = {k: torch.full_like(v, 0.2) for k, v in x.items()}
    glob = {**x, **{scaffold.PREFIX + k: v for k, v in c.items()}}
    store = SiteStore(tmp_path, "job1", "site-a")
    ci_old = {k: torch.full_like(v, -0.1) for k, v in x.items()}
    store.save(scaffold.STATE, 1, ci_old)
    rnd = SiteRound(ConfigRecord(), 2, store, lr=0.05, momentum=0.0)
    half = ScaffoldSite()
    penalty = half.start(glob, model, rnd)
    assert penalty is not None
    model.zero_grad()
    penalty(model).backward()  # the correction alone: c - c_i = 0.3 everywhere
    assert all(torch.allclose(p.grad, torch.full_like(p, 0.3)) for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.05 * 4 * 0.3)  # four plain SGD steps of the correction
    out = half.finish(model, glob, {"local_steps": 4.0}, rnd)
    new_ci = store.load(scaffold.STATE, 3)
    assert new_ci is not None
    for k in x:  # c_i+ = c_i - c + (x - y) / (K lr) = -0.1 - 0.2 + 0.3
        torch.testing.assert_close(new_ci[k], torch.zeros_like(x[k]), atol=1e-6, rtol=0)
        torch.testing.assert_close(out[scaffold.PREFIX + k], c[k] + new_ci[k] - ci_old[k])
    assert set(out) == set(glob)  # the reply is the model and the control variate, one record


# ---- site state and personalization --------------------------------------------------------
def test_site_store_reads_the_latest_state_before_a_round_and_prunes(tmp_path: Path) -> None:
    store = SiteStore(tmp_path, "abc", "hospital/1")
    assert store.load("personal", 5) is None
    for r in range(1, 6):
        store.save("personal", r, {"w": torch.tensor([float(r)])})
    assert float(store.load("personal", 5)["w"]) == 4.0  # type: ignore[index]
    assert float(store.load("personal", 99)["w"]) == 5.0  # type: ignore[index]
    assert store.load("personal", 3) is None  # pruned: only the last three kept
    assert len(list(store.folder.glob("personal-*.pt"))) == 3
    with pytest.raises(ValueError, match="job id"):
        SiteStore(tmp_path, "../escape", "a")


def test_personal_layers_are_the_head_or_the_normalization_layers() -> None:
    assert personal.head_keys(MLP(5, [4])) == ["net.2.weight", "net.2.bias"]
    assert all(".1." in k or ".5." in k for k in personal.norm_keys(SmallCNN()))
    with pytest.raises(personal.PersonalError, match="all head"):
        personal.head_keys(LogisticRegression(5))
    with pytest.raises(personal.PersonalError, match="no normalization layers"):
        personal.norm_keys(MLP(5, [4]))


def test_fedper_keeps_its_head_and_sends_the_received_one_back(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = MLP(3, [4])
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    store = SiteStore(tmp_path, "job", "s")
    half = personal.wrap(StrategySite(), config.compose(["task=finance", "strategy.personal=fedper"]).strategy)
    rnd = SiteRound(ConfigRecord(), 1, store, lr=0.1, momentum=0.0)
    half.start(glob, model, rnd)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "training"
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    reply = half.finish(model, glob, {}, rnd)
    for k in ("net.2.weight", "net.2.bias"):  # the head: the received values, a zero update
        assert torch.equal(reply[k], glob[k])
    assert torch.equal(reply["net.0.weight"], trained["net.0.weight"])  # the body is shared
    kept = store.load(personal.PERSONAL, 2)
    assert kept is not None and set(kept) == {"net.2.weight", "net.2.bias"}
    assert torch.equal(kept["net.2.weight"], trained["net.2.weight"])
    # next round: the site starts from the new global body and its own head
    fresh = MLP(3, [4])
    half.start({k: torch.zeros_like(v) for k, v in glob.items()}, fresh, SiteRound(ConfigRecord(), 2, store, 0.1, 0.0))
    assert torch.equal(fresh.state_dict()["net.2.weight"], trained["net.2.weight"])
    assert float(fresh.state_dict()["net.0.weight"].abs().sum()) == 0.0


# ---- config: what composes and what is refused --------------------------------------------
@pytest.mark.parametrize(("overrides", "key", "hint"), [
    (["aggregation=paillier", "strategy=fedyogi"], "strategy.server_opt", "cannot step on ciphertexts"),
    (["aggregation=paillier", "strategy=scaffold"], "strategy.name", "side values in the clear"),
    (["strategy=scaffold", "task.optimizer=adam"], "task.optimizer", "normalizer counts SGD steps"),
    (["strategy=fednova", "privacy=central"], "privacy.name", "central DP would clip"),
    (["strategy=scaffold", "strategy.norm_bound=1"], "strategy.norm_bound", "clip its side values"),
    (["task=medical", "strategy.personal=fedper"], "task.model", "all head"),
    (["task=medical", "strategy.personal=fedbn", "task.model=mlp"], "task.model", "normalization layers"),
    (["strategy.server_opt=sgdm"], "strategy.server_opt", "['none', 'avgm', 'adagrad', 'adam', 'yogi']"),
    (["strategy.personal=mine"], "strategy.personal", "['none', 'fedper', 'fedbn', 'ditto', 'finetune']"),
])
def test_config_names_the_key_and_what_to_do(overrides: list[str], key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.compose(overrides)
    assert key in str(err.value) and hint in str(err.value)


def test_every_new_strategy_composes_with_secagg_and_fedprox_with_fedyogi() -> None:
    for name in ("fedadam", "fedyogi", "fedadagrad", "fedavgm", "scaffold", "fednova", "ditto"):
        cfg = config.compose([f"strategy={name}", "aggregation=secagg"])
        assert cfg.aggregation.name == "secagg"
    cfg = config.compose(["strategy=fedprox", "strategy.server_opt=yogi"])
    assert cfg.strategy.name == "fedprox" and cfg.strategy.server_opt == "yogi"


# ---- SCAFFOLD and FedNova remove client drift: both halves on two quadratic sites -----------
class _Point(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


def _federate(kind: str, momentum: float, rounds: int = 150, lr: float = 0.02) -> np.ndarray:
    """Two sites with f_i(w) = |w - b_i|^2 / 2, equal rows, 1 and 10 local steps per round: the
    federation's optimum is the mean of the b_i. Each round runs the real site halves (start, local
    momentum SGD, finish), the row-weighted mean the combine step computes, and the real
    coordinator half's finish_train."""
    from strategies.fedavg import FedAvg
    from strategies.scaffold import Scaffold

    targets, steps = [torch.tensor([1.0, -1.0]), torch.tensor([-3.0, 2.0])], [1, 10]
    coordinator = {"fedavg": FedAvg, "scaffold": Scaffold, "fednova": FedNova}[kind](2)
    half = {"fedavg": StrategySite, "scaffold": ScaffoldSite, "fednova": FedNovaSite}[kind]
    x = np.zeros(2, dtype=np.float32)
    stores = [SiteStore(Path(__import__("tempfile").mkdtemp()), "job", f"s{i}") for i in range(2)]
    c = {"w": np.zeros(2, dtype=np.float32)}
    if kind == "scaffold":
        coordinator.c = c  # type: ignore[attr-defined]
    for rnd in range(1, rounds + 1):
        sent = {"w": torch.tensor(x)}
        if kind == "scaffold":
            sent.update({scaffold.PREFIX + "w": torch.tensor(coordinator.c["w"])})  # type: ignore[attr-defined]
        if kind == "fednova":
            sent[fednova.KEY] = torch.zeros(1, dtype=torch.float64)
        coordinator.current = ArrayRecord(OrderedDict((k, Array(v.numpy())) for k, v in sent.items()))
        replies = []
        for i in range(2):
            model, site = _Point(), half()
            info = SiteRound(ConfigRecord(), rnd, stores[i], lr=lr, momentum=momentum)
            penalty = site.start(sent, model, info)
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
            for _ in range(steps[i]):
                opt.zero_grad()
                loss = 0.5 * ((model.w - targets[i]) ** 2).sum() + (penalty(model) if penalty else 0.0)
                loss.backward()
                opt.step()
            replies.append(site.finish(model, sent, {"local_steps": float(steps[i])}, info))
        mean = OrderedDict((k, Array(((replies[0][k].double() + replies[1][k].double()) / 2).numpy()
                                     .astype(sent[k].numpy().dtype))) for k in sent)
        new, _ = coordinator.finish_train(rnd, ArrayRecord(mean), None)
        assert new is not None
        x = new["w"].numpy()
    return x


@pytest.mark.parametrize("momentum", [0.0, pytest.param(0.9, marks=pytest.mark.slow)])
def test_scaffold_and_fednova_reach_the_optimum_fedavg_drifts_from(momentum: float) -> None:
    optimum = np.array([-1.0, 0.5])
    drift = np.linalg.norm(_federate("fedavg", momentum) - optimum)
    assert drift > 0.5  # FedAvg converges towards the site that takes more steps
    assert np.linalg.norm(_federate("scaffold", momentum) - optimum) < 1e-3  # exact: control variates cancel drift
    assert np.linalg.norm(_federate("fednova", momentum) - optimum) < 0.2 * drift  # first-order consistent
