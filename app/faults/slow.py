"""Fault injection (``faults.slow_fraction``, ``faults.slow_factor``): sites that compute slowly.

A fixed set of ``round(slow_fraction * num_sites)`` sites, drawn from the seed (every site
computes the same set on its own), takes ``slow_factor`` times as long per local step as it
would: after its local work such a site waits ``(slow_factor - 1)`` times the seconds that
work took, so a partial round (a FedProx straggler) is slowed in proportion to the steps it
ran. The wait holds no CPU, so a benchmark measures waiting, not contention. What a strategy
does about slow sites is the strategy's business: synchronous rounds wait for them (or drop
or shorten their work with ``strategy.wait_for_slow=false``), buffered asynchronous rounds do
not wait (``strategy.buffer``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from core.seeding import chosen_sites

if TYPE_CHECKING:
    from app.config import FedsiloConfig


def slowdown(cfg: FedsiloConfig, site_id: int, num_sites: int) -> float:
    """How many times longer each local step takes at site ``site_id`` of ``num_sites`` (1.0 = its own pace)."""
    f = cfg.faults
    if f.slow_fraction <= 0 or f.slow_factor <= 1:
        return 1.0
    slow = chosen_sites(cfg.seed, 0, num_sites, f.slow_fraction, 0x510E)
    return float(f.slow_factor) if site_id in slow else 1.0


def wait(factor: float, worked_seconds: float) -> None:
    """Make ``worked_seconds`` of local work last ``factor`` times as long."""
    if factor > 1:
        time.sleep((factor - 1) * worked_seconds)
