"""What a site puts into the secure sum: its weighted update and its weight, as field elements.

Site ``k`` with ``n_k`` training rows, global weights ``w`` and local weights ``w_k`` sends
one vector of ``Z_(2^53)``:

    [ n_k * q(w_k - w)  (one per model value) | n_k | n_k * round(loss_k * 2^16) | clipped_k ]

where ``q`` is :class:`~aggregation.secagg.codec.FieldCodec`'s clipped, stochastically
rounded quantisation. The server unmasks only the sum over the round's survivors, so it
learns the weighted sum of updates, the *total* weight ``N = sum n_k``, the weighted mean
training loss and how many values were clipped in total, never a site's own count,
update or loss. The new global model is ``w + sum(n_k * update_k) / N``: exactly FedAvg's
weighted average, up to quantisation.

Error bound (the documented contract, tested): every averaged value is within one
quantisation step ``delta = 2 * clip / (2^value_bits - 1)`` of the weighted average of
the sites' clipped updates (each site's rounding error is below ``delta``, and a weighted
mean of such errors is too). Values of ``|w_k - w|`` above ``clip`` are clipped; the
round's total count of clipped values is reported so that ``clip`` can be raised.

The 53-bit field keeps every sum exact in float64 and never wraps as long as
``N < 2^(53 - value_bits)`` (5.4e8 rows at 24 bits), which sites and server check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aggregation.secagg.codec import FieldCodec

FIELD_BITS = 53
LOSS_SCALE = 1 << 16
TAIL = 3  # weight, weighted loss, clipped count


@dataclass(frozen=True)
class Aggregate:
    """What the server learns from one secure round."""

    mean_update: np.ndarray  # weighted mean of the survivors' clipped updates
    total_weight: int
    mean_loss: float
    clipped: int


@dataclass(frozen=True)
class WeightedUpdateCodec:
    """Encodes one site's weighted update; decodes the survivors' sum. ``size`` model values."""

    clip: float
    value_bits: int
    size: int

    @property
    def field(self) -> FieldCodec:
        return FieldCodec(self.clip, self.value_bits, max_sites=1 << (FIELD_BITS - self.value_bits))

    @property
    def length(self) -> int:
        return self.size + TAIL

    @property
    def max_weight(self) -> int:
        return (1 << (FIELD_BITS - self.value_bits)) - 1

    def encode(self, update: np.ndarray, weight: int, loss: float, rng: np.random.Generator) -> np.ndarray:
        """The site's vector (uint64); ``weight`` is its row count, ``loss`` its training loss."""
        if update.shape != (self.size,):
            raise ValueError(f"update has shape {update.shape}, expected ({self.size},)")
        if not 1 <= weight <= self.max_weight:
            raise ValueError(f"weight must be in 1..{self.max_weight} at value_bits={self.value_bits}, got {weight}")
        if not (np.isfinite(loss) and 0 <= loss < 1024):
            raise ValueError(f"training loss must be finite and in [0, 1024), got {loss}")
        q, clipped = self.field.encode(update, rng)
        w = np.uint64(weight)
        tail = np.array([weight, weight * int(round(loss * LOSS_SCALE)), clipped], dtype=np.uint64)
        return np.concatenate([q * w, tail])

    def decode(self, total: np.ndarray) -> Aggregate:
        """The survivors' aggregate from the unmasked field sum."""
        if total.shape != (self.length,):
            raise ValueError(f"sum has shape {total.shape}, expected ({self.length},)")
        n = int(total[self.size])
        if not 1 <= n <= self.max_weight:
            raise ValueError(f"decoded total weight {n} is outside 1..{self.max_weight}: the sum is corrupt")
        mean = self.field.decode_sum(total[: self.size], n) / n
        return Aggregate(mean, n, int(total[self.size + 1]) / LOSS_SCALE / n, int(total[self.size + 2]))
