"""Seeds: one run seed, independent streams derived from it, and seeded choices of sites.

Every process of a run (the coordinator, each site, each simulation worker) derives the
same numbers from the run's ``seed`` and the round, site and purpose, so no process has to
tell another which sites straggle, drop out or attack: each computes it.
"""

from __future__ import annotations

import numpy as np
import torch


def seed_for(seed: int, *parts: int) -> int:
    """Derive an independent 31-bit seed from the run seed and e.g. (round, site)."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_cpu(seed: int) -> None:
    """``torch.manual_seed`` for the CPU generator only: the same draws on a CPU, without the
    accelerator seeding ``torch.manual_seed`` queues on every call (a traceback captured per
    device, 1 ms per call: a cost per message at hundreds of sites)."""
    torch.default_generator.manual_seed(seed)


def chosen_sites(seed: int, server_round: int, num_sites: int, fraction: float, salt: int) -> set[int]:
    """``round(fraction * num_sites)`` site ids drawn for ``server_round`` from the seed and ``salt``."""
    count = int(round(fraction * num_sites))
    if count == 0:
        return set()
    rng = np.random.default_rng(seed_for(seed, server_round, salt))
    return {int(i) for i in rng.choice(num_sites, size=count, replace=False)}
