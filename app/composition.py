"""The composition root at run time: one config -> the coordinator's stack and a site's layers.

The only place that knows every axis. The coordinator's stack, inside out:

1. the strategy (:mod:`strategies`), with its combine step and the privacy option's reply
   observers (DP-SGD's budget ledger);
2. the privacy option's coordinator wrapper (central DP), if any;
3. the aggregation option's coordinator half (secure aggregation, Paillier; plain adds none).

A site's layers: the aggregation option's site half and the privacy option's trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

import aggregation
import privacy
import strategies
from aggregation.base import AggregationOption, SiteHalf
from app.config import FedsiloConfig
from core.records import RunRecord
from privacy.base import Coordinator, LocalTrainer
from strategies.fedavg import FedAvg


@dataclass
class CoordinatorStack:
    """What the ServerApp runs: the outermost strategy and the parts it reports from."""

    strategy: Strategy          # the outermost layer: what the round loop drives
    inner: FedAvg               # the strategy itself
    record: RunRecord           # every round, as all layers recorded it
    aggregation: AggregationOption
    privacy: Coordinator

    @property
    def holds_plaintext_model(self) -> bool:
        """Whether the coordinator can score the global model itself (else the sites' evaluation counts)."""
        return self.aggregation.capabilities.holds_plaintext_model

    @property
    def evaluation_in_clear_warning(self) -> bool:
        """Training is protected from the coordinator but federated evaluation is not."""
        caps = self.aggregation.capabilities
        return not caps.sees_individual_updates and caps.holds_plaintext_model and self.inner.fraction_evaluate > 0


def coordinator(cfg: FedsiloConfig, num_sites: int, initial: ArrayRecord) -> CoordinatorStack:
    """The coordinator's strategy stack for ``cfg`` (``initial``: the public initial model)."""
    record = RunRecord()
    mechanism = privacy.get(cfg.privacy.name).coordinator(cfg.privacy, num_sites, record)
    option = aggregation.get(cfg.aggregation.name)
    inner = strategies.build(cfg.strategy, num_sites, evaluates=cfg.task.val_fraction > 0, record=record,
                             observers=mechanism.observers(),
                             site_state=mechanism.keeps_site_state or option.keeps_site_state(cfg.aggregation))
    top = option.server(mechanism.wrap(inner), cfg.aggregation, initial, record)
    return CoordinatorStack(top, inner, record, option, mechanism)


@dataclass(frozen=True)
class SiteLayers:
    """What a site runs besides the task: how its update leaves, how it trains."""

    aggregation: SiteHalf
    trainer: LocalTrainer


def site(cfg: FedsiloConfig) -> SiteLayers:
    """The site's layers for ``cfg``."""
    return SiteLayers(aggregation.get(cfg.aggregation.name).site(cfg.aggregation),
                      privacy.get(cfg.privacy.name).trainer(cfg.privacy, cfg.num_rounds, cfg.task.batch_size))
