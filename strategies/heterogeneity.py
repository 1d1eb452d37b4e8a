"""Systems heterogeneity: how much local work each site does in a round.

Sites differ in compute: some run more local epochs than others
(``strategy.local_epochs``), and each round some sites are stragglers that finish only
part of their work (``strategy.stragglers``), as in the FedProx paper's experiments.
Every site computes its own plan from the shared config and seed, so the same seed gives
the same stragglers in every run and no site identity has to be known by the server.
A straggler's work is a uniformly drawn number of optimiser steps in
``[1, full_steps - 1]``; under ``straggler_policy=drop`` it misses the round instead and
replies with an error the server logs (FedAvg's behaviour in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.seeding import chosen_sites, seed_for
from strategies.config import StrategyConfig

#: Reason a dropped straggler gives; the server logs it as the reply's rejection reason.
MISSED_DEADLINE = "straggler: did not finish its local work before the round deadline"


@dataclass(frozen=True)
class LocalWork:
    """One site's plan for one round."""

    epochs: int
    max_steps: int | None = None  # None = all steps of ``epochs`` epochs
    straggler: bool = False
    dropped: bool = False


def stragglers(seed: int, server_round: int, num_sites: int, fraction: float) -> set[int]:
    """The site ids that straggle in ``server_round``: ``round(fraction * num_sites)`` of them."""
    return chosen_sites(seed, server_round, num_sites, fraction, 0x5757)


def plan(
    strategy: StrategyConfig,
    default_epochs: int,
    steps_per_epoch: int,
    seed: int,
    server_round: int,
    site_id: int,
    num_sites: int,
    slowdown: float = 1.0,
) -> LocalWork:
    """What site ``site_id`` does in ``server_round`` under ``strategy``'s heterogeneity settings.

    ``slowdown``: how many times longer the site's steps take than its peers'. With
    ``strategy.wait_for_slow=false`` such a site is a straggler in every round: under
    ``straggler_policy=partial`` it does the ``1/slowdown`` share of its steps that fits the
    time its peers take (FedProx's partial work), under ``drop`` it misses the round."""
    epochs = strategy.local_epochs[site_id % len(strategy.local_epochs)] if strategy.local_epochs else default_epochs
    full = epochs * steps_per_epoch
    if slowdown > 1 and not strategy.wait_for_slow:
        if strategy.straggler_policy == "drop":
            return LocalWork(epochs, straggler=True, dropped=True)
        return LocalWork(epochs, max_steps=max(1, int(full / slowdown)), straggler=True)
    if site_id not in stragglers(seed, server_round, num_sites, strategy.stragglers):
        return LocalWork(epochs)
    if strategy.straggler_policy == "drop":
        return LocalWork(epochs, straggler=True, dropped=True)
    rng = np.random.default_rng(seed_for(seed, server_round, site_id, 0x5757))
    steps = int(rng.integers(1, full)) if full > 1 else 1
    return LocalWork(epochs, max_steps=steps, straggler=True)
