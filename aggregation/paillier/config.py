"""Schema and range checks of ``aggregation=paillier``, and the packing both halves derive from it."""

from __future__ import annotations

from dataclasses import dataclass

from aggregation.base import AggregationConfig
from aggregation.paillier.packing import Packer
from core.config import check

# The option's names live here, not beside the code that implements them (crypto.py, split.py): this
# module is imported to compose every config, and those import phe and gmpy2, the optional extra.
#: Obfuscator makers (aggregation.obfuscators; aggregation/paillier/crypto.py).
OBFUSCATORS = ("full", "djn")
#: Who decrypts an aggregate (aggregation.decryption; aggregation/paillier/split.py).
DECRYPTIONS = ("each", "split")

#: A deployed site's node-config key naming its key-pair file (the server never gets it).
NODE_CONFIG_KEY = "paillier-keypair"


@dataclass
class PaillierConfig(AggregationConfig):
    """Schema of ``aggregation=paillier`` (:mod:`aggregation.paillier`)."""

    name: str = "paillier"
    public_key: str | None = None  # the server's public-key file (fedsilo keys paillier --out DIR)
    keypair: str | None = None     # the sites' key-pair file (simulation; a SuperNode's node config wins)
    clip: float = 8.0              # weighted model values (rows/weight_unit * w) clipped to [-clip, clip]
    value_bits: int = 20           # quantisation bits per value
    weight_unit: float = 1000.0    # rows that count as weight 1 when weighting models
    max_sites: int = 16            # most sites whose sum must fit a slot (guard bits)
    workers: int = 1               # processes a site encrypts/decrypts with; 0 = all its cores
    obfuscators: str = "full"      # full (r^n: Paillier's own) | djn (short exponents: an extra assumption, docs/paillier.md)
    decryption: str = "each"       # each (every site decrypts the aggregate) | split (each decrypts a slice, shares it sealed)
    stage_timeout: float = 120.0   # seconds to wait for the sites' slices (decryption=split)


def validate(a: PaillierConfig, num_sites: int) -> None:
    """Range checks of the ``aggregation=paillier`` keys for a federation of ``num_sites``."""
    check(a.clip > 0, "aggregation.clip", a.clip, "a number > 0")
    check(8 <= a.value_bits <= 32, "aggregation.value_bits", a.value_bits, "an integer in 8..32")
    check(a.weight_unit > 0, "aggregation.weight_unit", a.weight_unit, "rows > 0")
    check(a.obfuscators in OBFUSCATORS, "aggregation.obfuscators", a.obfuscators,
          f"one of {list(OBFUSCATORS)} (djn: short-exponent obfuscators under an extra assumption, docs/paillier.md)")
    check(a.decryption in DECRYPTIONS, "aggregation.decryption", a.decryption,
          f"one of {list(DECRYPTIONS)} (split: each site decrypts a slice of the aggregate, docs/paillier.md)")
    check(a.stage_timeout > 0, "aggregation.stage_timeout", a.stage_timeout, "seconds > 0")
    check(a.workers >= 0, "aggregation.workers", a.workers, "0 (all cores) or a number of processes >= 1")
    check(a.max_sites >= num_sites, "aggregation.max_sites", a.max_sites, f"at least the number of sites ({num_sites})")


def packer_for(a: PaillierConfig, key_bits: int) -> Packer:
    """The packing both halves use: plaintexts below the modulus."""
    return Packer(a.clip, a.value_bits, a.max_sites, key_bits - 1)
