"""Schema and range checks of ``aggregation=secagg``."""

from __future__ import annotations

from dataclasses import dataclass

from aggregation.base import AggregationConfig
from core.config import check


@dataclass
class SecAggConfig(AggregationConfig):
    """Schema of ``aggregation=secagg`` (:mod:`aggregation.secagg`)."""

    name: str = "secagg"
    clip: float = 4.0          # each site's update (local - global weights) clipped to [-clip, clip]
    value_bits: int = 24       # quantisation bits per value: step 2*clip/(2^bits - 1)
    weight_bits: int = 0       # bits of a round's total training rows; field = value_bits + weight_bits; 0 = 53 - value_bits
    threshold: float = 0.6     # Shamir threshold as a share of a site's neighbourhood (> 0.5)
    neighbours: int = 0        # SecAgg+ neighbours per site; 0 = complete graph up to 20 sites, then O(log n)
    stage_timeout: float = 120.0  # seconds to wait for the sites' replies in each protocol stage
    rekey_every: int = 0       # a fresh key agreement every this many rounds (0: once per job, and when a site joins)


def validate(a: SecAggConfig) -> None:
    """Range checks of the ``aggregation=secagg`` keys."""
    check(a.clip > 0, "aggregation.clip", a.clip, "a number > 0")
    check(4 <= a.value_bits <= 32, "aggregation.value_bits", a.value_bits, "an integer in 4..32")
    check(a.weight_bits == 0 or 1 <= a.weight_bits <= 53 - a.value_bits, "aggregation.weight_bits", a.weight_bits,
          f"0 (53 - value_bits) or 1..{53 - a.value_bits}: bits of the most training rows a round sums")
    check(0.5 < a.threshold <= 1, "aggregation.threshold", a.threshold,
          "0.5 < threshold <= 1 (a majority of the round's sites)")
    check(a.rekey_every >= 0, "aggregation.rekey_every", a.rekey_every,
          "0 (keys agreed once per job) or a number of rounds >= 1")
    check(a.stage_timeout > 0, "aggregation.stage_timeout", a.stage_timeout, "seconds > 0")
    check(a.neighbours == 0 or (a.neighbours >= 2 and a.neighbours % 2 == 0), "aggregation.neighbours",
          a.neighbours, "0 (automatic) or an even number >= 2")


def field_bits(a: SecAggConfig) -> int:
    """Bits of the field the training rounds mask in: ``value_bits + weight_bits`` (53 by default)."""
    return a.value_bits + (a.weight_bits or 53 - a.value_bits)
