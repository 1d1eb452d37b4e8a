"""Fixed-point codec: real-valued updates <-> elements of Z_(2^bits) that can be summed.

Built on :class:`core.quantise.AffineQuantiser` (stochastic rounding). Encoding clips each
value to ``[-clip, clip]``, maps it to ``[0, 2^value_bits - 1]`` and rounds stochastically with
a seeded generator (unbiased: E[decode(encode(x))] = x for ``|x| <= clip``). Summing ``n``
encoded vectors modulo 2^bits, with ``bits >= value_bits + ceil(log2(max_sites))``, never
wraps, so the sum decodes exactly to the sum of the quantised values.

Error bound (documented contract, tested): with step ``delta = 2*clip / (2^value_bits - 1)``,
each site's quantisation error per value is below ``delta`` and the decoded sum of ``n``
sites is within ``n * delta`` of the true sum of the clipped values; values beyond
``±clip`` are clipped (the caller chooses ``clip`` so that this does not happen, or
reports how often it did).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core.quantise import AffineQuantiser


@dataclass(frozen=True)
class FieldCodec:
    """Quantiser for one protocol round.

    Parameters
    ----------
    clip : values are clipped to ``[-clip, clip]``.
    value_bits : bits per quantised value (resolution).
    max_sites : most vectors that will ever be summed.
    """

    clip: float
    value_bits: int = 24
    max_sites: int = 1024

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        if not 2 <= self.value_bits <= 52:
            raise ValueError(f"value_bits must be in 2..52, got {self.value_bits}")
        if self.bits > 64:
            raise ValueError(f"value_bits + log2(max_sites) = {self.bits} exceeds 64 bits")

    @property
    def bits(self) -> int:
        """Bits of the field Z_(2^bits): room for ``max_sites`` summed values."""
        return self.value_bits + max(1, math.ceil(math.log2(self.max_sites)))

    @property
    def modulus(self) -> int:
        """The size of the field values live in (``2^bits``)."""
        return 1 << self.bits

    @property
    def quantiser(self) -> AffineQuantiser:
        """The affine quantiser of values in ``[-clip, clip]`` at ``value_bits``."""
        return AffineQuantiser(self.clip, self.value_bits)

    @property
    def delta(self) -> float:
        """Quantisation step."""
        return self.quantiser.delta

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Field elements of ``values`` (uint64, stochastic rounding) and how many values were clipped."""
        return self.quantiser.stochastic(values, rng)

    def reduce(self, words: np.ndarray) -> np.ndarray:
        """64-bit words (sums and differences wrapping mod 2^64) as elements of the field, in place."""
        if self.bits < 64:
            np.bitwise_and(words, np.uint64(self.modulus - 1), out=words)
        return words

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The real-valued sum of ``count`` encoded vectors whose field sum is ``total``."""
        if not 1 <= count <= self.max_sites:
            raise ValueError(f"count must be in 1..{self.max_sites}, got {count}")
        return self.quantiser.decode_sum(total, count)
