"""The affine quantiser: real values in ``[-clip, clip]`` <-> integers in ``[0, 2^value_bits - 1]``.

``q = (clip(x) + clip) / delta`` with step ``delta = 2 * clip / (2^value_bits - 1)``, rounded
either stochastically (unbiased: ``E[decode(q)] = x``; secure aggregation) or to the nearest
integer (Paillier packing). A sum of ``count`` quantised vectors decodes as
``sum_q * delta - count * clip``. Both protections build their codecs on this one class, so
their error bounds are stated once:

* stochastic rounding: each value's error is below ``delta``;
* nearest rounding: each value's error is at most ``delta / 2``;
* values beyond ``±clip`` are clipped, and the count of clipped values is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AffineQuantiser:
    """Quantise to ``value_bits`` bits over ``[-clip, clip]``."""

    clip: float
    value_bits: int

    @property
    def delta(self) -> float:
        """Quantisation step."""
        return 2 * self.clip / ((1 << self.value_bits) - 1)

    @property
    def top(self) -> int:
        """The largest quantised value, ``2^value_bits - 1``."""
        return (1 << self.value_bits) - 1

    def clipped_count(self, x: np.ndarray) -> int:
        """How many values of ``x`` lie outside ``[-clip, clip]``."""
        return int(np.count_nonzero(np.abs(x) > self.clip))

    def scaled(self, x: np.ndarray) -> np.ndarray:
        """``(clip(x) + clip) / delta``: values in ``[0, 2^value_bits - 1]``, not yet rounded."""
        return (np.clip(x, -self.clip, self.clip) + self.clip) / self.delta

    def stochastic(self, values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Unbiased stochastic rounding (uint64) and how many values were clipped."""
        x = np.asarray(values, dtype=np.float64)
        scaled = self.scaled(x)
        floor = np.floor(scaled)
        q = floor + (rng.random(x.shape) < (scaled - floor))
        return np.minimum(q, self.top).astype(np.uint64), self.clipped_count(x)

    def nearest(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """Round to the nearest level (uint64) and how many values were clipped."""
        x = np.asarray(values, dtype=np.float64)
        return np.minimum(np.rint(self.scaled(x)), self.top).astype(np.uint64), self.clipped_count(x)

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The real-valued sum of ``count`` quantised vectors whose integer sum is ``total``."""
        return total.astype(np.float64) * self.delta - count * self.clip
