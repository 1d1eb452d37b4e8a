"""The combine step of a round, as stackable layers (TFF's aggregator factories, in small).

A strategy screens a round's replies, then hands the good ones to its :class:`Combine`:

* :class:`WeightedMean`  the strategy's own row-weighted mean (Flower's ``aggregate_arrayrecords``);
* :class:`RobustRule`    a Byzantine-robust rule instead (``strategy.robust``: Krum, Multi-Krum,
  trimmed mean, median; :mod:`strategies.robust`);
* :class:`NormBound`     bounds each update's L2 norm, then calls the step it wraps
  (``strategy.norm_bound``).

Under an aggregation option that hides single updates (secure aggregation) the combine step
happens inside the protocol; what remains for these layers is the unmasked *mean* update,
which :meth:`Combine.bound_mean_update` receives (a norm bound clips it; a robust rule cannot
run there, which the config refuses from the option's capabilities).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log
from typing_extensions import override

from core.clipping import bound_norm
from core.records import PhaseRecord, RobustUse
from core.sites import site_label
from strategies import robust
from strategies.config import StrategyConfig

Aggregated = tuple[ArrayRecord | None, MetricRecord | None]


@dataclass
class CombineContext:
    """What a combine step may use: the round, the global model the replies started from,
    the strategy's weighted mean and metric aggregation, and the round's training record."""

    server_round: int
    current: ArrayRecord | None
    weighted_mean: Callable[[list[Message]], Aggregated]
    metrics: Callable[[list[Message]], MetricRecord | None]
    phase: PhaseRecord


class Combine(ABC):
    """Turns a round's screened replies (in site order) into the aggregate."""

    @abstractmethod
    def __call__(self, replies: list[Message], ctx: CombineContext) -> Aggregated:
        """The aggregate of ``replies`` (at least one)."""

    def bound_mean_update(self, update: np.ndarray, ctx: CombineContext) -> np.ndarray:
        """What this step does to a mean update it did not combine itself (protected aggregation)."""
        return update


class WeightedMean(Combine):
    """The strategy's row-weighted mean: FedAvg."""

    @override
    def __call__(self, replies: list[Message], ctx: CombineContext) -> Aggregated:
        return ctx.weighted_mean(replies)


@dataclass
class RobustRule(Combine):
    """A Byzantine-robust rule (``krum``, ``multikrum``, ``trimmed_mean``, ``median``) with
    ``f = floor(assumed_byzantine * replies)`` (capped as the rule needs)."""

    rule: str
    assumed_byzantine: float

    @override
    def __call__(self, replies: list[Message], ctx: CombineContext) -> Aggregated:
        arrays, used = robust.aggregate(self.rule, replies, self.assumed_byzantine)
        f = robust.byzantine_count(self.rule, len(replies), self.assumed_byzantine)
        ctx.phase.robust = RobustUse(self.rule, f, [site_label(replies[i]) for i in used])
        if len(used) < len(replies):
            log(INFO, "round %s: %s (f=%s) used %s of %s updates: %s", ctx.server_round, self.rule, f, len(used),
                len(replies), ", ".join(site_label(replies[i]) for i in used))
        return arrays, ctx.metrics(replies)

    @override
    def bound_mean_update(self, update: np.ndarray, ctx: CombineContext) -> np.ndarray:
        raise ValueError(f"strategy.robust={self.rule!r} needs every single update; this aggregation hides them")


@dataclass
class NormBound(Combine):
    """Clip each update ``reply - global`` to L2 norm ``bound``, then combine with ``inner``.

    On a mean update (secure aggregation, where the honest sites bound their own updates)
    it clips the mean: one round can never move the global model by more than ``bound``.
    """

    bound: float
    inner: Combine

    @override
    def __call__(self, replies: list[Message], ctx: CombineContext) -> Aggregated:
        assert ctx.current is not None
        bounded = [site_label(m) for m in replies if robust.bound_reply(m, ctx.current, self.bound)]
        ctx.phase.norm_bounded = bounded
        if bounded:
            log(INFO, "round %s: update norm bounded to %g for %s", ctx.server_round, self.bound, ", ".join(bounded))
        return self.inner(replies, ctx)

    @override
    def bound_mean_update(self, update: np.ndarray, ctx: CombineContext) -> np.ndarray:
        step, bounded = bound_norm(update, self.bound)
        if bounded:  # the sites clip their own updates; this bounds what any attacker adds too
            log(INFO, "round %s: mean update norm %.4g bounded to %g", ctx.server_round,
                float(np.linalg.norm(update)), self.bound)
            ctx.phase.norm_bounded = ["aggregate"]
        return self.inner.bound_mean_update(step, ctx)


def from_config(s: StrategyConfig) -> Combine:
    """The combine step ``strategy.robust`` and ``strategy.norm_bound`` ask for."""
    step: Combine = WeightedMean() if s.robust == "none" else RobustRule(s.robust, s.assumed_byzantine)
    return NormBound(s.norm_bound, step) if s.norm_bound > 0 else step
