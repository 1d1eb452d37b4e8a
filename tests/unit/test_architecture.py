"""The layers compose: options are registered and described by capabilities, wrappers take any
strategy, combine steps stack, and every round is a typed record."""

from __future__ import annotations

import dataclasses
import random
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.supercore.task_identity import TaskIdentity

import aggregation
import privacy
import tasks
from aggregation import programs
from aggregation.base import SUM_REQUEST, AggregationConfig, Capabilities, hand_over
from aggregation.plain import Plain
from aggregation.secagg.server import SecureAggregator
from aggregation.secagg.strategy import SecAggStrategy
from app import client_app, composition, config
from app.runtime.local_grid import LocalGrid
from core.handover import ProtectedAggregate
from core.records import Arrival, Departure, PhaseRecord, Rejection, RobustUse, RoundRecord, RunRecord
from core.replies import ReplyError, SiteRefusal
from core.sites import SiteDirectory, SiteId
from strategies.combine import NormBound, RobustRule, WeightedMean
from strategies.loop import run_rounds
from tests.conftest import DATA_DIR
from tests.unit.test_strategy import SHAPES, _arrays, _reply, _strategy

# ---- options and the config rules their capabilities imply --------------------------------


@pytest.mark.parametrize("name", sorted(aggregation.REGISTRY))
def test_config_rules_follow_each_options_capabilities(name: str) -> None:
    """robust rules need single updates, norm bounds a plaintext model, central DP single updates:
    whatever an option declares decides what the config accepts with it."""
    caps = aggregation.get(name).capabilities
    cases = [(["strategy.robust=median"], "strategy.robust", caps.sees_individual_updates),
             (["strategy.norm_bound=1"], "strategy.norm_bound", caps.holds_plaintext_model),
             (["privacy=central"], "aggregation.name", caps.sees_individual_updates)]
    for extra, key, allowed in cases:
        overrides = ["task=medical", f"aggregation={name}", *extra]
        if allowed:
            config.compose(overrides)
        else:
            with pytest.raises(config.ConfigError) as err:
                config.compose(overrides)
            assert err.value.key == key
            assert name in str(err.value) and err.value.allowed  # names the option and what is allowed


def test_a_new_option_gets_its_rules_from_its_capabilities_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """An option registered without touching app/: its declared capabilities make the composition
    root refuse a robust rule and accept a norm bound, with the reason in the message."""

    class Masked(Plain):
        name = "masked-toy"
        capabilities = Capabilities(sees_individual_updates=False, holds_plaintext_model=True)

    monkeypatch.setitem(aggregation.REGISTRY, "masked-toy", Masked())
    base = config.compose(["task=medical"])
    toy = dataclasses.replace(base, aggregation=AggregationConfig(name="masked-toy"))
    with pytest.raises(config.ConfigError, match="cannot see single updates"):
        config.validate(dataclasses.replace(toy, strategy=dataclasses.replace(base.strategy, robust="krum")))
    config.validate(dataclasses.replace(toy, strategy=dataclasses.replace(base.strategy, norm_bound=1.0)))
    with pytest.raises(config.ConfigError) as err:
        config.validate(dataclasses.replace(base, aggregation=AggregationConfig(name="nonesuch")))
    assert err.value.key == "aggregation.name" and "masked-toy" in err.value.allowed


def test_unknown_capability_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown capabilities"):
        Capabilities(True, True).missing(["sees_everything"])


def test_every_privacy_options_needs_are_capabilities() -> None:
    for option in privacy.REGISTRY.values():
        Capabilities(True, True).missing(list(option.needs))  # raises on a name no option declares


# ---- wrappers take any strategy ---------------------------------------------------------------


def _initial(cfg: config.FedsiloConfig) -> ArrayRecord:
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return ArrayRecord(tasks.get(cfg.task.name)(cfg.task, DATA_DIR).build_model().state_dict())


def _run(strategy: Any, overrides: list[str], rounds: int) -> ArrayRecord:
    cfg = config.compose(overrides)
    run_config: dict[str, Any] = {"overrides": shlex.join([*overrides, f"data_dir={DATA_DIR}"])}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = LocalGrid(client_app.app, config.num_sites(cfg), run_config)
    initial = _initial(cfg)
    strategy = strategy(cfg, initial) if callable(strategy) else strategy
    return run_rounds(strategy, grid, initial, rounds, 60.0).arrays


def test_secure_aggregation_wraps_flowers_own_fedavg_and_gives_fedsilos_model() -> None:
    """SecAggStrategy around an unmodified ``flwr.serverapp.strategy.FedAvg`` (which knows nothing
    of fedsilo) trains the same model, bit for bit, as around fedsilo's FedAvg."""
    overrides = ["task=medical", "aggregation=secagg", "strategy.fraction_evaluate=0"]

    def flower(cfg: config.FedsiloConfig, initial: ArrayRecord) -> Any:
        a = cfg.aggregation
        inner = FlowerFedAvg(fraction_evaluate=0.0, min_available_nodes=4, weighted_by_key="num-examples")
        protocol = SecureAggregator(a.clip, a.value_bits, a.threshold, a.stage_timeout, a.neighbours)
        return SecAggStrategy(inner, protocol, RunRecord())

    def fedsilo(cfg: config.FedsiloConfig, initial: ArrayRecord) -> Any:
        return composition.coordinator(cfg, 4, initial).strategy

    ours, theirs = _run(fedsilo, overrides, 2), _run(flower, overrides, 2)
    assert list(ours.keys()) == list(theirs.keys())
    for k in ours.keys():
        assert np.array_equal(ours[k].numpy(), theirs[k].numpy()), k


def test_hand_over_passes_an_encrypted_sum_through_a_foreign_strategy() -> None:
    enc = ArrayRecord({"ct": Array(np.zeros((2, 4), np.uint8))})
    arrays, metrics = hand_over(FlowerFedAvg(), 1, [], ProtectedAggregate(MetricRecord({"sites": 2}), arrays=enc), None)
    assert arrays is enc and metrics is not None and metrics["sites"] == 2
    with pytest.raises(ValueError, match="either a mean update or an encrypted sum"):
        ProtectedAggregate(MetricRecord({}))


# ---- combine steps stack ----------------------------------------------------------------------


def test_norm_bound_wraps_a_robust_rule() -> None:
    """NormBound(RobustRule(median)): every update is clipped first, then the median is taken;
    both layers write their part of the round's record."""
    s = _strategy()
    s.combine = NormBound(1.0, RobustRule("median", 0.2))
    s.current = _arrays(0.0)
    replies = [_reply(11, 0, _arrays(0.1)), _reply(12, 1, _arrays(0.2)), _reply(13, 2, _arrays(50.0))]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None
    norm = np.sqrt(sum(np.prod(sh) for sh in SHAPES.values()))  # norm of an all-ones update
    np.testing.assert_allclose(arrays["w"].numpy(), min(0.2, 1.0 / norm), rtol=1e-6)
    rec = s.record.round(1).train
    assert rec is not None and rec.norm_bounded == ["site-2 (node 13)"] and rec.robust is not None
    assert rec.robust.rule == "median" and rec.robust.used == ["site-0 (node 11)", "site-1 (node 12)", "site-2 (node 13)"]


def test_a_robust_rule_cannot_bound_a_mean_it_never_saw() -> None:
    with pytest.raises(ValueError, match="needs every single update"):
        RobustRule("krum", 0.2).bound_mean_update(np.zeros(3), None)  # type: ignore[arg-type]
    assert WeightedMean().bound_mean_update(np.ones(2), None).tolist() == [1.0, 1.0]  # type: ignore[arg-type]


# ---- typed records, identities, error codes -------------------------------------------------


def test_round_record_round_trips_through_its_results_json_form() -> None:
    rec = RoundRecord(
        train=PhaseRecord(sampled=3, replied=2, rejected=[Rejection("site-1 (node 5)", "error reply: boom")],
                          sites=["a (node 4)", "b (node 6)"], stragglers=[], norm_bounded=["aggregate"],
                          robust=RobustUse("krum", 0, ["a (node 4)"])),
        evaluate=PhaseRecord(sampled=3, replied=3, rejected=[], sites=[], stragglers=[]),
        left=[Departure("c", 7, "2026-12-01T00:00:00+00:00")], joined=[Arrival(8, "2026-12-01T00:00:00+00:00")],
        budget_exhausted=1, privacy={"a (node 4)": {"epsilon": 1.0}}, mu=0.1, protocol={"secagg": {"survivors": 2}})
    as_json = rec.to_dict()
    assert RoundRecord.from_dict(as_json).to_dict() == as_json
    assert set(as_json) == {"train", "evaluate", "left", "joined", "budget_exhausted", "privacy", "secagg", "mu"}
    assert RoundRecord().to_dict() == {}  # nothing recorded, nothing written
    run = RunRecord()
    run.round(2).mu = 0.5
    copy = RunRecord()
    copy.load({str(r): e for r, e in run.to_dict().items()}, {"4": "a"})
    assert copy.to_dict() == {2: {"mu": 0.5}} and copy.sites.label(4) == "a (node 4)"


def test_site_identity_labels_without_parsing() -> None:
    d = SiteDirectory({4: "cleveland", 9: "va long beach (node x)"})
    assert d.label(4) == "cleveland (node 4)" and d.label(5) == "node 5"
    assert d.names_by_label()["va long beach (node x) (node 9)"] == "va long beach (node x)"  # names may hold anything
    assert str(SiteId(3, "s")) == "s (node 3)"


def test_reply_error_codes_are_distinct_and_a_refusal_names_the_site() -> None:
    assert len({int(c) for c in ReplyError}) == len(ReplyError)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    ins = Message(RecordDict(), dst_node_id=3, message_type="train")
    reply = SiteRefusal(ReplyError.BUDGET_EXHAUSTED, "privacy budget exhausted").reply(ins, "cleveland")
    assert reply.has_error() and reply.error.code == 429 and reply.error.reason == "cleveland: privacy budget exhausted"


def test_the_client_app_answers_every_registered_options_messages(tmp_path: Path) -> None:
    """The ClientApp knows no option by name: each option's train and query message names reach it."""
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(),
                  run_config={"overrides": shlex.join(["task=medical", "aggregation=secagg", f"data_dir={DATA_DIR}"])})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    for name in aggregation.query_names():
        msg = Message(RecordDict({"secagg": ConfigRecord({"round": 1})}), dst_node_id=7, message_type=f"query.{name}")
        reply = client_app.app(msg, ctx)  # answered by the option's site half (here: refused, out of order)
        assert reply.has_error() and ("secagg" in reply.error.reason if name.startswith("secagg")
                                      else "SecAggSite answers no" in reply.error.reason)
    for name in (*aggregation.sum_names(), programs.GATHER_MESSAGE):  # protected-sum programs: a handler answers
        request = ConfigRecord({"program": "fedsilo.preprocessing", "what": "moments", "length": 3})
        reply = client_app.app(Message(RecordDict({SUM_REQUEST: request}), dst_node_id=7, message_type=name), ctx)
        assert reply.has_error() and "task=medical keeps no rows" in reply.error.reason, reply.error.reason
    assert aggregation.train_names() == ["secagg"]
    ins = Message(RecordDict(), dst_node_id=7, message_type="query.nonesuch")
    with pytest.raises(Exception):  # noqa: B017 - Flower: no handler registered for this message
        client_app.app(ins, ctx)
    assert Error(code=1, reason="x").code == 1


def test_the_old_runner_path_still_works_and_says_where_it_moved() -> None:
    import importlib
    import sys

    sys.modules.pop("app.local_grid", None)
    with pytest.warns(DeprecationWarning, match="app.runtime.local_grid"):
        old = importlib.import_module("app.local_grid")
    from app.runtime import local_grid

    assert old.run_inprocess is local_grid.run_inprocess and old.LocalGrid is local_grid.LocalGrid


@pytest.mark.parametrize("old,new", [("app.runtime.paths", "app.support.paths"),
                                     ("app.runtime.checkpoint", "app.support.checkpoint"),
                                     ("app.runtime.traffic", "app.support.traffic"),
                                     ("app.runtime.flower_tuning", "app.support.flower_tuning"),
                                     ("app.reporting.trackers", "app.tracking.trackers"),
                                     ("app.reporting.mlflow_tracker", "app.tracking.mlflow_tracker"),
                                     ("app.reporting.tensorboard", "app.tracking.tensorboard")])
def test_the_modules_issue_35_moved_still_import_and_say_where_they_went(old: str, new: str) -> None:
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}.*0.15.0"):
        shim = importlib.import_module(old)
    moved = importlib.import_module(new)
    public = [n for n in vars(moved) if not n.startswith("_") and callable(getattr(moved, n))]
    assert public and all(getattr(shim, n) is getattr(moved, n) for n in public)
