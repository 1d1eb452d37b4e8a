"""What a site encrypts under ``aggregation=paillier``, and how the sum decodes to FedAvg.

The server must never hold a plaintext model, so sites encrypt their *weighted models*
(not updates relative to a model the server would have to know): site ``k`` with ``n_k``
rows packs ``p_k * w_k`` with ``p_k = n_k / weight_unit`` (a public unit of rows, so that the
values stay within ``[-clip, clip]``), and encrypts ``n_k`` on its own. The server adds the
ciphertexts; any site decrypts ``sum_k p_k w_k`` and ``N = sum_k n_k`` and recovers FedAvg's
weighted average ``sum_k n_k w_k / N``.

Error bound (documented contract, tested): with ``m`` sites and quantisation step
``delta = 2 * clip / (2^value_bits - 1)``, every decoded value is within
``m * delta * weight_unit / (2 * N)`` of the weighted average of the sites' clipped values;
when sites hold about ``weight_unit`` rows each this is about ``delta / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aggregation.paillier.packing import Packer


@dataclass(frozen=True)
class ModelCodec:
    """Encode one site's weighted model; decode the sum of ``sites`` encodings."""

    packer: Packer
    weight_unit: float
    size: int

    def __post_init__(self) -> None:
        if not self.weight_unit > 0:
            raise ValueError(f"weight_unit must be > 0, got {self.weight_unit}")

    @property
    def ciphertexts(self) -> int:
        """Ciphertexts one model of :attr:`size` values takes."""
        return self.packer.count(self.size)

    def encode(self, flat: np.ndarray, rows: int) -> tuple[list[int], int]:
        """The plaintexts of ``(rows / weight_unit) * flat`` and how many values were clipped."""
        if flat.shape != (self.size,):
            raise ValueError(f"model has {flat.size} values, expected {self.size}")
        if rows < 1:
            raise ValueError(f"a site needs at least one row, got {rows}")
        q, clipped = self.packer.quantise(flat * (rows / self.weight_unit))
        return self.packer.pack(q), clipped

    def decode(self, sums: list[int], total_rows: int, sites: int) -> np.ndarray:
        """FedAvg's weighted average from the decrypted sums, total rows and site count."""
        if len(sums) != self.ciphertexts:
            raise ValueError(f"{len(sums)} plaintexts, expected {self.ciphertexts}")
        if total_rows < sites:
            raise ValueError(f"total rows {total_rows} below the number of sites {sites}: corrupt aggregate")
        weighted = self.packer.decode_sum(self.packer.unpack(sums, self.size), sites)
        return weighted / (total_rows / self.weight_unit)

    def bound(self, total_rows: int, sites: int) -> float:
        """The documented maximum absolute error of :meth:`decode`."""
        return sites * self.packer.delta * self.weight_unit / (2 * total_rows)
