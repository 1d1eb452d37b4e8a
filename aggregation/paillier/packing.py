"""Many quantised values per Paillier plaintext, with room for the sum over all sites.

A site's weighted update ``u`` (clipped to ``[-clip, clip]``) is quantised by
:class:`core.quantise.AffineQuantiser` (nearest rounding) to unsigned
integers ``q = round((u + clip) / delta)`` in ``[0, 2^value_bits - 1]`` (signed values by
offset), and ``slots`` of them are laid side by side in one plaintext, each in a slot of
``slot_bits`` bits. Adding the plaintexts of up
to ``max_sites`` sites adds the slots independently: a slot's sum is at most
``max_sites * (2^value_bits - 1) < 2^slot_bits``, so it never carries into its neighbour
(``slot_bits = value_bits + guard_bits``, ``guard_bits = ceil(log2(max_sites))``).
Packing works on bit arrays in NumPy (``packbits``), not a Python loop over values.

Decoding a sum of ``m`` sites: ``sum_u = sum_q * delta - m * clip``; each site's rounding
error is at most ``delta / 2`` per value, so the sum is within ``m * delta / 2`` of the sum
of the clipped values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core.quantise import AffineQuantiser


@dataclass(frozen=True)
class Packer:
    """Quantise and pack vectors into integers below ``2^plaintext_bits``.

    Parameters
    ----------
    clip : values are clipped to ``[-clip, clip]``.
    value_bits : quantisation bits per value.
    max_sites : the most packed vectors that will ever be summed.
    plaintext_bits : usable bits of one plaintext (key size - 1 for Paillier).
    """

    clip: float
    value_bits: int
    max_sites: int
    plaintext_bits: int

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        if not 2 <= self.value_bits <= 48:
            raise ValueError(f"value_bits must be in 2..48, got {self.value_bits}")
        if self.max_sites < 1:
            raise ValueError(f"max_sites must be >= 1, got {self.max_sites}")
        if self.slots < 1:
            raise ValueError(f"a {self.slot_bits}-bit slot does not fit a {self.plaintext_bits}-bit plaintext")

    @property
    def guard_bits(self) -> int:
        """Spare bits per slot so that ``max_sites`` values never overflow into the next slot."""
        return math.ceil(math.log2(self.max_sites))  # max_sites * (2^v - 1) < 2^(v + guard)

    @property
    def slot_bits(self) -> int:
        """Bits per packed value: the value's bits and the guard bits."""
        return self.value_bits + self.guard_bits

    @property
    def slots(self) -> int:
        """Values per plaintext."""
        return self.plaintext_bits // self.slot_bits

    @property
    def quantiser(self) -> AffineQuantiser:
        """The affine quantiser of values in ``[-clip, clip]`` at ``value_bits``."""
        return AffineQuantiser(self.clip, self.value_bits)

    @property
    def delta(self) -> float:
        """The quantisation step."""
        return self.quantiser.delta

    def count(self, size: int) -> int:
        """Plaintexts needed for ``size`` values."""
        return -(-size // self.slots)

    def quantise(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """Unsigned integers (uint64, nearest rounding) of ``values`` and how many were clipped."""
        return self.quantiser.nearest(values)

    def pack(self, q: np.ndarray) -> list[int]:
        """Plaintext integers holding ``q`` (values < ``2^value_bits``), ``slots`` per integer."""
        n = self.count(q.size)
        padded = np.zeros(n * self.slots, dtype="<u8")
        padded[: q.size] = q
        bits = np.unpackbits(padded.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, : self.slot_bits]
        per = bits.reshape(n, self.slots * self.slot_bits)
        flat = np.packbits(per, axis=1, bitorder="little")
        return [int.from_bytes(flat[i].tobytes(), "little") for i in range(n)]

    def unpack(self, plaintexts: list[int], size: int) -> np.ndarray:
        """The ``size`` slot values (uint64) of (sums of) packed plaintexts."""
        width = -(-self.slots * self.slot_bits // 8)
        raw = np.frombuffer(b"".join(p.to_bytes(width, "little") for p in plaintexts), dtype=np.uint8)
        bits = np.unpackbits(raw.reshape(len(plaintexts), width), axis=1, bitorder="little")
        bits = bits[:, : self.slots * self.slot_bits].reshape(-1, self.slot_bits)
        wide = np.zeros((bits.shape[0], 64), dtype=np.uint8)
        wide[:, : self.slot_bits] = bits
        return np.packbits(wide, axis=1, bitorder="little").view("<u8").ravel()[:size].astype(np.uint64)

    def decode_sum(self, sums: np.ndarray, sites: int) -> np.ndarray:
        """Real-valued sum of ``sites`` quantised vectors whose slot sums are ``sums``."""
        if not 1 <= sites <= self.max_sites:
            raise ValueError(f"sites must be in 1..{self.max_sites}, got {sites}")
        return self.quantiser.decode_sum(sums, sites)
