"""Strategies: what is aggregated, with which weights, and what a site adds to its objective.

A registry maps ``strategy.name`` to a builder; :func:`build` makes the Message-API strategy
for a config, with its layers: the combine step (:mod:`strategies.combine`), a server
optimizer (:mod:`strategies.server_opt`) and, at the sites, a personalization layer
(:mod:`strategies.personal`). :func:`site` gives the matching site half. Aggregation options
(:mod:`aggregation`) and privacy layers (:mod:`privacy`) wrap the strategy built here; the
composition root (``app/config.py``, ``app/composition.py``) stacks them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from core.records import RunRecord
from strategies import personal
from strategies.buffered import BufferedRounds
from strategies.combine import from_config as combine_from_config
from strategies.config import FedProxConfig, StrategyConfig
from strategies.fedavg import FedAvg, ReplyObserver
from strategies.fednova import FedNova, FedNovaSite
from strategies.fedprox import FedProx, client_penalty
from strategies.scaffold import Scaffold, ScaffoldSite
from strategies.server_opt import ServerOptimizer
from strategies.site import StrategySite

Builder = Callable[[StrategyConfig, int, float, RunRecord, list[ReplyObserver]], FedAvg]


def _common(s: StrategyConfig, fraction_evaluate: float, record: RunRecord, observers: list[ReplyObserver]
            ) -> dict[str, object]:
    opt = None if s.server_opt == "none" else ServerOptimizer(s.server_opt, s.server_lr, s.server_beta1,
                                                              s.server_beta2, s.server_tau)
    keeps_state = s.name == "scaffold" or s.personal != "none"
    return {"fraction_train": s.fraction_train, "fraction_evaluate": fraction_evaluate,
            "combine": combine_from_config(s), "record": record, "observers": observers, "server_opt": opt,
            "job": uuid.uuid4().hex[:16] if keeps_state else None, "personalizes": s.personal != "none"}


def _fedavg(s: StrategyConfig, num_sites: int, fraction_evaluate: float, record: RunRecord,
            observers: list[ReplyObserver]) -> FedAvg:
    return FedAvg(num_sites, **_common(s, fraction_evaluate, record, observers))  # type: ignore[arg-type]


def _fedprox(s: StrategyConfig, num_sites: int, fraction_evaluate: float, record: RunRecord,
             observers: list[ReplyObserver]) -> FedAvg:
    assert isinstance(s, FedProxConfig)
    return FedProx(num_sites, mu=s.mu, adaptive_mu=s.adaptive_mu, mu_step=s.mu_step, mu_patience=s.mu_patience,
                   **_common(s, fraction_evaluate, record, observers))  # type: ignore[arg-type]


def _scaffold(s: StrategyConfig, num_sites: int, fraction_evaluate: float, record: RunRecord,
              observers: list[ReplyObserver]) -> FedAvg:
    return Scaffold(num_sites, **_common(s, fraction_evaluate, record, observers))


def _fednova(s: StrategyConfig, num_sites: int, fraction_evaluate: float, record: RunRecord,
             observers: list[ReplyObserver]) -> FedAvg:
    return FedNova(num_sites, **_common(s, fraction_evaluate, record, observers))  # type: ignore[arg-type]


#: strategy.name -> builder. A new strategy adds its module, one line here and its schema.
REGISTRY: dict[str, Builder] = {"fedavg": _fedavg, "fedprox": _fedprox, "scaffold": _scaffold, "fednova": _fednova}
#: strategy.name -> its site half (FedAvg's for those whose sites need nothing more).
SITES: dict[str, type[StrategySite]] = {"scaffold": ScaffoldSite, "fednova": FedNovaSite}


def build(s: StrategyConfig, num_sites: int, evaluates: bool, record: RunRecord | None = None,
          observers: list[ReplyObserver] | None = None, site_state: bool = False) -> FedAvg:
    """The strategy ``s`` names for ``num_sites`` sites; federated evaluation only if the sites
    hold validation rows (``evaluates``). ``site_state``: another layer keeps state at the
    sites (DP-SGD's ledger), so the run needs a job id even if the strategy keeps none."""
    if s.name not in REGISTRY:
        raise ValueError(f"strategy.name={s.name!r} is not one of {sorted(REGISTRY)}")
    strategy = REGISTRY[s.name](s, num_sites, s.fraction_evaluate if evaluates else 0.0, record or RunRecord(),
                                list(observers or []))
    if site_state and strategy.job is None:
        strategy.job = uuid.uuid4().hex[:16]
    return strategy


def site(s: StrategyConfig) -> StrategySite:
    """The site half of ``s``: the strategy's own, under its personalization layer."""
    return personal.wrap(SITES.get(s.name, StrategySite)(), s)


def buffered(s: StrategyConfig, strategy: object, inner: FedAvg) -> BufferedRounds | None:
    """The buffered asynchronous driver for ``s`` (``strategy.buffer > 0``), or None for synchronous
    rounds (:func:`strategies.loop.run_rounds`). ``strategy``: the outermost layer of the stack."""
    if s.buffer <= 0:
        return None
    return BufferedRounds(strategy, inner, s.buffer, s.concurrency, s.staleness_exponent,  # type: ignore[arg-type]
                          s.max_staleness)


__all__ = ["REGISTRY", "BufferedRounds", "FedAvg", "FedProx", "buffered", "build", "client_penalty", "site"]
