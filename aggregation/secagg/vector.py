"""What a site puts into the secure sum: its weighted update and its weight, as field elements.

Site ``k`` with ``n_k`` training rows, global weights ``w`` and local weights ``w_k`` sends
one vector of ``Z_(2^B)``, ``B = value_bits + weight_bits`` (``aggregation.weight_bits``; by
default ``B = 53``):

    [ n_k * q(w_k - w)  (one per model value) | n_k | n_k * loss limbs | clipped limbs ]

the loss ``round(loss_k * 2^16)`` and the count of clipped values written in limbs of
``value_bits`` bits, so that every element's sum over the sites stays below ``2^B``.
On the wire each masked element takes ``B`` bits (:func:`pack_field`), not a 64-bit word:
fewer ``value_bits`` and ``weight_bits`` mean a shorter masked vector.

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

The field keeps every sum exact in float64 and never wraps as long as
``N < 2^weight_bits`` (5.4e8 rows at the default 24 + 29 bits), which sites and server check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array

from aggregation.secagg.codec import FieldCodec

FIELD_BITS = 53
LOSS_SCALE = 1 << 16
LOSS_BITS = 26  # losses below 1024, at 2^-16 resolution


def _limbs(value: int, bits: int, count: int) -> list[int]:
    return [(value >> (bits * j)) & ((1 << bits) - 1) for j in range(count)]


def _join(limbs: np.ndarray, bits: int) -> int:
    return sum(int(v) << (bits * j) for j, v in enumerate(limbs))


def pack_field(y: np.ndarray, bits: int) -> Array:
    """Field elements (uint64 below ``2^bits``) as a raw array of ``bits`` bits each."""
    wide = np.unpackbits(np.ascontiguousarray(y, dtype="<u8").view(np.uint8).reshape(-1, 8), axis=1,
                         bitorder="little")[:, :bits]
    data = np.packbits(wide.ravel(), bitorder="little").tobytes()
    return Array(dtype="uint64", shape=(int(y.size),), stype=f"{PACKED}{bits}", data=data)


def unpack_field(array: Array, bits: int) -> np.ndarray:
    """The uint64 field elements of :func:`pack_field` (ValueError if the array is not one)."""
    if array.stype != f"{PACKED}{bits}":
        raise ValueError(f"masked vector is {array.stype!r}, expected {PACKED}{bits}")
    n = int(array.shape[0])
    raw = np.frombuffer(array.data, dtype=np.uint8)
    if raw.size != -(-n * bits // 8):
        raise ValueError(f"masked vector has {raw.size} bytes, expected {-(-n * bits // 8)} for {n} elements")
    flat = np.unpackbits(raw, bitorder="little")[: n * bits].reshape(n, bits)
    wide = np.zeros((n, 64), dtype=np.uint8)
    wide[:, :bits] = flat
    return np.packbits(wide, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)


PACKED = "fedsilo.field"


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
    field_bits: int = FIELD_BITS

    def __post_init__(self) -> None:
        if not self.value_bits < self.field_bits <= FIELD_BITS:
            raise ValueError(f"field_bits must be in {self.value_bits + 1}..{FIELD_BITS}, got {self.field_bits}")

    @property
    def field(self) -> FieldCodec:
        """The field codec of the update's values."""
        return FieldCodec(self.clip, self.value_bits, max_sites=1 << (self.field_bits - self.value_bits))

    @property
    def loss_limbs(self) -> int:
        """Field values the loss takes."""
        return -(-LOSS_BITS // self.value_bits)

    @property
    def clipped_limbs(self) -> int:
        """Field values the count of clipped values takes."""
        return -(-max(1, self.size.bit_length()) // self.value_bits)

    @property
    def length(self) -> int:
        """Field values of one site's vector: the update, its weight, its loss and its clipped count."""
        return self.size + 1 + self.loss_limbs + self.clipped_limbs

    @property
    def max_weight(self) -> int:
        """The largest weight (training rows) a round's sum can hold."""
        return (1 << (self.field_bits - self.value_bits)) - 1

    def encode(self, update: np.ndarray, weight: int, loss: float, rng: np.random.Generator) -> np.ndarray:
        """The site's vector (uint64); ``weight`` is its row count, ``loss`` its training loss."""
        if update.shape != (self.size,):
            raise ValueError(f"update has shape {update.shape}, expected ({self.size},)")
        if not 1 <= weight <= self.max_weight:
            raise ValueError(f"weight must be in 1..{self.max_weight} at value_bits={self.value_bits}, "
                             f"field_bits={self.field_bits}, got {weight}")
        if not (np.isfinite(loss) and 0 <= loss < 1 << (LOSS_BITS - 16)):
            raise ValueError(f"training loss must be finite and in [0, 1024), got {loss}")
        q, clipped = self.field.encode(update, rng)
        w = np.uint64(weight)
        loss_q = _limbs(int(round(loss * LOSS_SCALE)), self.value_bits, self.loss_limbs)
        tail = np.array([weight, *(weight * v for v in loss_q),
                         *_limbs(clipped, self.value_bits, self.clipped_limbs)], dtype=np.uint64)
        return np.concatenate([q * w, tail])

    def decode(self, total: np.ndarray) -> Aggregate:
        """The survivors' aggregate from the unmasked field sum."""
        if total.shape != (self.length,):
            raise ValueError(f"sum has shape {total.shape}, expected ({self.length},)")
        n = int(total[self.size])
        if not 1 <= n <= self.max_weight:
            raise ValueError(f"decoded total weight {n} is outside 1..{self.max_weight}: the sum is corrupt")
        mean = self.field.decode_sum(total[: self.size], n) / n
        at = self.size + 1
        loss = _join(total[at: at + self.loss_limbs], self.value_bits)
        clipped = _join(total[at + self.loss_limbs:], self.value_bits)
        return Aggregate(mean, n, loss / LOSS_SCALE / n, clipped)
