"""Exact sums of real numbers across sites: fixed point modulo 2^BITS, and 20-bit limbs.

Federated statistics (means, variances, category counts) and pooled test metrics are sums
over sites. To make every protection give the *same* total, bit for bit, each site encodes
its float64 values as integers ``round(v * 2^FRACTION_BITS) mod 2^BITS`` (two's complement
for negative values); integer sums modulo ``2^BITS`` are then exact whatever the order of
addition, under plain sums, masked sums (secure aggregation) and homomorphic sums
(Paillier). A total decodes correctly as long as its magnitude stays below
``2^(BITS - FRACTION_BITS - 1)`` (about 5.8e17): counts, sums and sums of squares of
standardisable columns are far below.

Precision (the contract, tested): each site's value is rounded to within
``2^-(FRACTION_BITS + 1)`` (4.5e-13); a sum over ``m`` sites is within ``m`` times that of the
exact sum. Integers (counts) are exact.

:func:`limbs` splits each encoded value into ``LIMBS`` little-endian limbs of ``LIMB_BITS``
bits so that secure aggregation's 53-bit field can carry them: the limb sums of up to
``2^(53 - LIMB_BITS)`` sites never wrap, and :func:`join` carries them back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FRACTION_BITS = 40
BITS = 100
MODULUS = 1 << BITS
LIMB_BITS = 20
LIMBS = BITS // LIMB_BITS
MAX_MAGNITUDE = float(1 << (BITS - FRACTION_BITS - 1))


class FixedPointError(ValueError):
    """A value cannot be encoded exactly (not finite, or too large)."""


def encode(values: Sequence[float] | np.ndarray) -> list[int]:
    """Each value as an integer in ``[0, 2^BITS)``: ``round(v * 2^FRACTION_BITS) mod 2^BITS``."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(arr).all():
        raise FixedPointError("a statistic is NaN or infinite and cannot be summed")
    if arr.size and float(np.abs(arr).max()) >= MAX_MAGNITUDE:
        raise FixedPointError(f"a statistic's magnitude {float(np.abs(arr).max()):.3g} exceeds {MAX_MAGNITUDE:.3g}")
    scaled = np.ldexp(arr, FRACTION_BITS)  # exact: a power-of-two scaling
    return [int(round(float(v))) % MODULUS for v in scaled]


def decode(ints: Sequence[int]) -> np.ndarray:
    """float64 values of (sums of) encoded integers, read as signed two's complement."""
    out = np.empty(len(ints), dtype=np.float64)
    half = MODULUS >> 1
    for i, v in enumerate(ints):
        v = int(v) % MODULUS
        signed = v - MODULUS if v >= half else v
        out[i] = signed / (1 << FRACTION_BITS)  # int / int is correctly rounded
    return out


def add(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """Element-wise sum modulo ``2^BITS``."""
    if len(a) != len(b):
        raise ValueError(f"vectors of {len(a)} and {len(b)} values cannot be added")
    return [(x + y) % MODULUS for x, y in zip(a, b)]


def limbs(ints: Sequence[int]) -> np.ndarray:
    """uint64 array of ``LIMBS`` limbs per value (value-major, little-endian limbs)."""
    mask = (1 << LIMB_BITS) - 1
    out = np.empty(len(ints) * LIMBS, dtype=np.uint64)
    for i, v in enumerate(ints):
        for j in range(LIMBS):
            out[i * LIMBS + j] = (int(v) >> (LIMB_BITS * j)) & mask
    return out


def join(limb_sums: np.ndarray) -> list[int]:
    """The values (mod ``2^BITS``) whose limbs, summed over sites, are ``limb_sums``."""
    if limb_sums.size % LIMBS:
        raise ValueError(f"{limb_sums.size} limbs is not a multiple of {LIMBS}")
    rows = limb_sums.reshape(-1, LIMBS)
    return [sum(int(x) << (LIMB_BITS * j) for j, x in enumerate(row)) % MODULUS for row in rows]
