"""Site-level (user-level) DP at the server: the server half of ``privacy=central``.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): each round the server clips every site's update ``w_k - w_global`` to L2 norm
``C``, averages the clipped updates **with equal weights** over the ``m`` accepted sites,
and adds Gaussian noise of standard deviation ``sigma * C / m``. Built on Flower's
``DifferentialPrivacyServerSideFixedClipping`` (its clipping and noise) and accounted
with Flower's ``RdpAccountant`` (Google's dp-accounting) across all rounds, with no
amplification by sampling (Flower's only supported mode for fixed clipping).

What it protects: whether a *whole site* took part, against everyone who sees the global
models (the other sites, whoever receives the final model). It does **not** protect
against the server, which sees each site's update in the clear; for that use
``privacy=dpsgd`` (noise added at the site), alone or with ``aggregation=secagg``.

Differences from using Flower's wrapper directly, each needed by a cross-silo job:

* replies are screened by the inner strategy first; a failed or malformed reply is
  dropped with a logged reason (Flower's wrapper skips the whole round on one error);
* weights are made equal (Flower's accounted mode requires it; a row-weighted mean has a
  larger sensitivity than ``C/m``), and the noise uses the number of accepted sites;
* a round that would take epsilon past ``target_epsilon`` is not started.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting import (
    PrivacyConfig as AccountingConfig,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from typing_extensions import override

from core.config import check
from core.records import RoundRecord, RunRecord
from core.sites import WEIGHT_KEY
from privacy.base import Coordinator, PrivacyConfig, PrivacyOption

#: Where each round's central-DP figures go in the run record (``history[].participation``).
PARTICIPATION_KEY = "privacy_central"


@dataclass
class CentralDPConfig(PrivacyConfig):
    """Schema of ``privacy=central``: site-level DP at the server.

    Each site's update (local - global) is clipped to L2 norm ``clipping_norm``, the
    updates are averaged with equal weights, and Gaussian noise of standard deviation
    ``noise_multiplier * clipping_norm / sampled sites`` is added (DP-FedAvg).
    """

    name: str = "central"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None    # stop training before the next round would exceed it


def validate(d: CentralDPConfig) -> None:
    """Range checks of the ``privacy=central`` keys."""
    check(d.noise_multiplier > 0, "privacy.noise_multiplier", d.noise_multiplier, "a number > 0")
    check(d.clipping_norm > 0, "privacy.clipping_norm", d.clipping_norm, "a number > 0")
    check(0 < d.delta < 1, "privacy.delta", d.delta, "0 < delta < 1")
    check(d.target_epsilon is None or d.target_epsilon > 0, "privacy.target_epsilon", d.target_epsilon,
          "null (no limit) or a number > 0")


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Wrap a fedsilo strategy (FedAvg, FedProx, ...) with DP-FedAvg, through its public hooks only.

    The wrapped strategy must offer ``observe``, ``screen_train``, ``combine_train`` and
    ``finish_train`` (:mod:`strategies.fedavg`) and a ``fraction_train``.

    Parameters
    ----------
    strategy : FedAvg-like
        The strategy whose rounds are privatised.
    noise_multiplier, clipping_norm : float
        ``sigma`` and ``C``: noise standard deviation ``sigma * C / m`` on the mean.
    num_sites : int
        The federation's population (for the accountant's record).
    delta : float
        The delta epsilon is reported at.
    target_epsilon : float or None
        Stop training before a round would exceed it (None: no limit).
    record : RunRecord
        Where each round's release is recorded (``privacy_central``).
    """

    def __init__(self, strategy: Any, noise_multiplier: float, clipping_norm: float, num_sites: int,
                 delta: float, target_epsilon: float | None = None, record: RunRecord | None = None) -> None:
        sampled = max(1, int(round(strategy.fraction_train * num_sites)))
        super().__init__(strategy, noise_multiplier, clipping_norm, sampled)  # Flower's accounted mode needs its own FedAvg
        self.num_sites = num_sites
        self.delta, self.target_epsilon = delta, target_epsilon
        self.ledger = RdpAccountant(AccountingConfig(
            target_delta=delta, population_size=num_sites, neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=target_epsilon))
        self.stopped_at: int | None = None
        self.record = record if record is not None else getattr(strategy, "record", None) or RunRecord()

    @property
    def inner(self) -> Any:
        """The wrapped strategy."""
        return self.strategy

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first release)."""
        return float(self.ledger.get_privacy_spent().epsilon) if self.ledger.num_releases else 0.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        """As the inner strategy, unless one more release would exceed ``target_epsilon``."""
        event = GaussianPrivacyEvent(self.noise_multiplier, self.num_sampled_clients, self.num_sites)
        if self.target_epsilon is not None and self.ledger.would_exceed(event):
            if self.stopped_at is None:
                self.stopped_at = server_round
                log(WARNING, "round %s: central DP budget reached (epsilon %.3f of %.3f at delta=%g): no more "
                    "training, the global model stays as it is", server_round, self.epsilon(), self.target_epsilon,
                    self.delta)
            self.record.round(server_round).privacy_central = {"skipped": "privacy budget reached",
                                                                "epsilon": self.epsilon()}
            self.current_arrays = arrays
            return []
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, give every accepted site weight 1, clip, average, add noise, account.

        The same steps as Flower's ``aggregate_train`` with its own clipping and noise
        helpers, minus its two failure modes: one error reply skipping the round, and an
        all-zero update (a site sending the global model back) dividing by zero.
        """
        inner = self.inner
        replies = list(replies)
        inner.observe(server_round, replies)
        good = inner.screen_train(server_round, replies)
        if not good:
            log(WARNING, "round %s: no usable training reply; the global model is unchanged", server_round)
            return None, None
        for msg in good:  # equal weights: the mean's sensitivity to one site is then C/m
            metrics = next(iter(msg.content.metric_records.values()))
            metrics[WEIGHT_KEY] = 1.0
        self.num_sampled_clients = len(good)
        current = self.current_arrays.to_numpy_ndarrays()
        for msg in good:  # Flower's clipping, skipping all-zero updates (its helper divides by their norm)
            record = msg.content["arrays"]
            local = record.to_numpy_ndarrays()
            if any(np.any(a != b) for a, b in zip(local, current, strict=True)):
                compute_clip_model_update(param1=local, param2=current, clipping_norm=self.clipping_norm)
                msg.content["arrays"] = ArrayRecord(dict(zip(record.keys(), (Array(np.asarray(v)) for v in local),
                                                             strict=True)))
        arrays, metrics = inner.finish_train(server_round, *inner.combine_train(server_round, good))
        if arrays is not None:
            arrays = self._add_noise_to_aggregated_arrays(arrays)
            self.ledger.compose(GaussianPrivacyEvent(self.noise_multiplier, len(good), self.num_sites))
            stdv = compute_stdv(self.noise_multiplier, self.clipping_norm, len(good))
            self.record.round(server_round).privacy_central = {
                "epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "clipping_norm": self.clipping_norm, "sites": len(good), "noise_std": stdv,
                "releases": self.ledger.num_releases}
            log(INFO, "round %s: central DP over %s sites, noise std %.4g; epsilon so far %.3f (delta=%g)",
                server_round, len(good), stdv, self.epsilon(), self.delta)
        return arrays, metrics

    def state_dict(self) -> dict[str, Any]:
        """The inner strategy's state plus this wrapper's releases (each one's noise and sites)."""
        entries = [rec.privacy_central or {} for _, rec in sorted(self.record.rounds.items())]
        releases = [[e["noise_multiplier"], e["sites"]] for e in entries if "sites" in e]
        return {**self.inner.state_dict(), "central_releases": releases, "central_stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the inner strategy and replay the releases into the accountant."""
        self.inner.load_state_dict(state)
        for noise, sites in state["central_releases"]:
            self.ledger.compose(GaussianPrivacyEvent(float(noise), int(sites), self.num_sites))
        self.stopped_at = state["central_stopped_at"]

    def summary_record(self) -> dict[str, Any]:
        """``results.json``'s ``privacy`` section."""
        return {
            "mechanism": "central",
            "guarantee": ("site-level (epsilon, delta)-DP: whether a whole site took part, against everyone who "
                          "sees the global models; NOT against the server, which sees each site's update"),
            "epsilon": self.epsilon(), "delta": self.delta, "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm,
            "releases": self.ledger.num_releases, "accountant": "rdp (Flower RdpAccountant, no sampling amplification)",
            "stopped_at_round": self.stopped_at,
        }


class CentralCoordinator(Coordinator):
    """``privacy=central``'s coordinator half: :class:`CentralDP` around the strategy."""

    def __init__(self, cfg: CentralDPConfig, num_sites: int, record: RunRecord) -> None:
        self.cfg, self.num_sites, self.record = cfg, num_sites, record
        self.dp: CentralDP | None = None

    @override
    def wrap(self, strategy: Any) -> Any:
        c = self.cfg
        self.dp = CentralDP(strategy, c.noise_multiplier, c.clipping_norm, self.num_sites, c.delta, c.target_epsilon,
                            self.record)
        return self.dp

    @override
    def summary(self) -> dict[str, Any] | None:
        return self.dp.summary_record() if self.dp is not None else None

    @override
    def note(self, rnd: RoundRecord) -> str:
        e = rnd.privacy_central
        return f" | central DP epsilon {e['epsilon']:.3f}" if e and "epsilon" in e else ""


class Central(PrivacyOption):
    """``privacy=central``: the coordinator clips each site's update and noises their mean (docs/privacy.md)."""

    name = "central"
    schema = CentralDPConfig
    needs = {"sees_individual_updates": "the server clips each site's update, so it must see them; use "
                                        "privacy=dpsgd with secagg or paillier"}

    @override
    def validate(self, cfg: Any) -> None:
        validate(cfg)

    @override
    def tables(self, summary: dict[str, Any]) -> tuple[list[str], list[tuple[list[str], list[list[str]]]]]:
        def fmt(v: Any) -> str:
            return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
        return [], [(["epsilon", "delta", "noise multiplier", "clipping norm", "releases"], [[
            f"{summary['epsilon']:.3f}", f"{summary['delta']:g}", fmt(summary["noise_multiplier"]),
            fmt(summary["clipping_norm"]), str(summary["releases"])]])]

    def check_strategy(self, s: Any) -> None:
        """Central DP already clips every update and weighs sites equally: no robust rule or norm bound on top."""
        check(s.robust == "none" and s.norm_bound == 0, "strategy.robust", s.robust,
              "none (and strategy.norm_bound=0) with privacy=central, which already clips every update to "
              "privacy.clipping_norm and averages with equal weights")
        check(getattr(s, "buffer", 0) == 0, "strategy.buffer", getattr(s, "buffer", 0),
              "0 with privacy=central: its noise and accounting are per round over one cohort of updates, and "
              "buffered rounds weight stale updates down; use privacy=dpsgd (each site's own ledger)")

    @override
    def coordinator(self, cfg: Any, num_sites: int, record: RunRecord) -> Coordinator:
        return CentralCoordinator(cfg, num_sites, record)
