"""Exact sums of real numbers across sites: fixed point modulo 2^bits, and 20-bit limbs.

Federated statistics (means, variances, category counts) and pooled test metrics are sums
over sites. To make every protection give the *same* total, bit for bit, each site encodes
its float64 values as integers ``round(v * 2^fraction_bits) mod 2^bits`` (two's complement
for negative values); integer sums modulo ``2^bits`` are then exact whatever the order of
addition, under plain sums, masked sums (secure aggregation) and homomorphic sums
(Paillier). A total decodes correctly as long as its magnitude stays below
``2^(bits - fraction_bits - 1)``.

Two encodings (:class:`Encoding`): :data:`STATS` (40 fraction bits in 100: totals up to
5.8e17, each site's value rounded to within 4.5e-13) for the preprocessing statistics, and
:data:`COUNTS` (integers in 48 bits) for test metrics, which are counts (the one loss sum
is sent as ``round(loss * 2^20)``). Precision (the contract, tested): a sum over ``m``
sites is within ``m * 2^-(fraction_bits + 1)`` of the exact sum; integers are exact.

:meth:`Encoding.limbs` splits each value into little-endian limbs of ``LIMB_BITS`` bits so
that secure aggregation's 53-bit field can carry them: the limb sums of up to
``2^(53 - LIMB_BITS)`` sites never wrap, and :meth:`Encoding.join` carries them back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LIMB_BITS = 20


class FixedPointError(ValueError):
    """A value cannot be encoded exactly (not finite, or too large)."""


@dataclass(frozen=True)
class Encoding:
    """Fixed point with ``fraction_bits`` below the binary point, modulo ``2^bits``."""

    fraction_bits: int
    bits: int

    @property
    def modulus(self) -> int:
        """The modulus sums wrap at (``2^bits``)."""
        return 1 << self.bits

    @property
    def limbs_per_value(self) -> int:
        """Limbs of :data:`LIMB_BITS` per encoded value."""
        return -(-self.bits // LIMB_BITS)

    @property
    def max_magnitude(self) -> float:
        """The largest magnitude a value may have."""
        return float(1 << (self.bits - self.fraction_bits - 1))

    def encode(self, values: Sequence[float] | np.ndarray) -> list[int]:
        """Each value as an integer in ``[0, 2^bits)``: ``round(v * 2^fraction_bits) mod 2^bits``."""
        arr = np.asarray(values, dtype=np.float64).ravel()
        if not np.isfinite(arr).all():
            raise FixedPointError("a statistic is NaN or infinite and cannot be summed")
        if arr.size and float(np.abs(arr).max()) >= self.max_magnitude:
            raise FixedPointError(f"a statistic's magnitude {float(np.abs(arr).max()):.3g} exceeds "
                                  f"{self.max_magnitude:.3g}")
        scaled = np.ldexp(arr, self.fraction_bits)  # exact: a power-of-two scaling
        return [int(round(float(v))) % self.modulus for v in scaled]

    def decode(self, ints: Sequence[int]) -> np.ndarray:
        """float64 values of (sums of) encoded integers, read as signed two's complement."""
        out = np.empty(len(ints), dtype=np.float64)
        half, mod = self.modulus >> 1, self.modulus
        for i, v in enumerate(ints):
            v = int(v) % mod
            out[i] = (v - mod if v >= half else v) / (1 << self.fraction_bits)  # int / int: correctly rounded
        return out

    def add(self, a: Sequence[int], b: Sequence[int]) -> list[int]:
        """Element-wise sum modulo ``2^bits``."""
        if len(a) != len(b):
            raise ValueError(f"vectors of {len(a)} and {len(b)} values cannot be added")
        return [(x + y) % self.modulus for x, y in zip(a, b)]

    def limbs(self, ints: Sequence[int]) -> np.ndarray:
        """uint64 array of :attr:`limbs_per_value` limbs per value (value-major, little-endian limbs)."""
        k, mask = self.limbs_per_value, (1 << LIMB_BITS) - 1
        out = np.empty(len(ints) * k, dtype=np.uint64)
        for i, v in enumerate(ints):
            for j in range(k):
                out[i * k + j] = (int(v) >> (LIMB_BITS * j)) & mask
        return out

    def join(self, limb_sums: np.ndarray) -> list[int]:
        """The values (mod ``2^bits``) whose limbs, summed over sites, are ``limb_sums``."""
        k = self.limbs_per_value
        if limb_sums.size % k:
            raise ValueError(f"{limb_sums.size} limbs is not a multiple of {k}")
        rows = limb_sums.reshape(-1, k)
        return [sum(int(x) << (LIMB_BITS * j) for j, x in enumerate(row)) % self.modulus for row in rows]

    def to_record(self) -> dict[str, int]:
        """The encoding as a request carries it."""
        return {"fraction-bits": self.fraction_bits, "bits": self.bits}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Encoding:
        """The encoding a request names (a ConfigRecord or a dict; STATS if it names none)."""
        enc = cls(int(rec.get("fraction-bits", STATS.fraction_bits)), int(rec.get("bits", STATS.bits)))
        if enc not in ENCODINGS:
            raise FixedPointError(f"unknown encoding {enc}; known: {ENCODINGS}")
        return enc


STATS = Encoding(40, 100)
COUNTS = Encoding(0, 48)
#: sums of multiples of 2^-24 (histogram trees' gradients: :mod:`learners.gbdt.trees`), magnitudes below 2^35
HISTOGRAMS = Encoding(24, 60)
ENCODINGS = (STATS, COUNTS, HISTOGRAMS)
