"""Strategies: what is aggregated, with which weights, and what a site adds to its objective.

A registry maps ``strategy.name`` to a builder; :func:`build` makes the Message-API strategy
for a config. Aggregation options (:mod:`aggregation`) and privacy layers (:mod:`privacy`)
wrap the strategy built here; the composition root (``app/config.py``, ``app/composition.py``)
stacks them.
"""

from __future__ import annotations

from collections.abc import Callable

from core.records import RunRecord
from strategies.combine import from_config as combine_from_config
from strategies.config import FedProxConfig, StrategyConfig
from strategies.fedavg import FedAvg, ReplyObserver
from strategies.fedprox import FedProx, client_penalty

Builder = Callable[[StrategyConfig, int, float, RunRecord, list[ReplyObserver]], FedAvg]


def _fedavg(s: StrategyConfig, num_sites: int, fraction_evaluate: float, record: RunRecord,
            observers: list[ReplyObserver]) -> FedAvg:
    return FedAvg(num_sites, fraction_train=s.fraction_train, fraction_evaluate=fraction_evaluate,
                  combine=combine_from_config(s), record=record, observers=observers)


def _fedprox(s: StrategyConfig, num_sites: int, fraction_evaluate: float, record: RunRecord,
             observers: list[ReplyObserver]) -> FedAvg:
    assert isinstance(s, FedProxConfig)
    return FedProx(num_sites, mu=s.mu, fraction_train=s.fraction_train, fraction_evaluate=fraction_evaluate,
                   adaptive_mu=s.adaptive_mu, mu_step=s.mu_step, mu_patience=s.mu_patience,
                   combine=combine_from_config(s), record=record, observers=observers)


#: strategy.name -> builder. A new strategy adds its module, one line here and its schema.
REGISTRY: dict[str, Builder] = {"fedavg": _fedavg, "fedprox": _fedprox}


def build(s: StrategyConfig, num_sites: int, evaluates: bool, record: RunRecord | None = None,
          observers: list[ReplyObserver] | None = None) -> FedAvg:
    """The strategy ``s`` names for ``num_sites`` sites; federated evaluation only if the sites
    hold validation rows (``evaluates``)."""
    if s.name not in REGISTRY:
        raise ValueError(f"strategy.name={s.name!r} is not one of {sorted(REGISTRY)}")
    return REGISTRY[s.name](s, num_sites, s.fraction_evaluate if evaluates else 0.0, record or RunRecord(),
                            list(observers or []))


__all__ = ["REGISTRY", "FedAvg", "FedProx", "build", "client_penalty"]
