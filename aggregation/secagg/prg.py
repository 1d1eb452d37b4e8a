"""Pseudo-random masks from AES-256 in counter mode.

A mask of ``length`` elements of Z_(2^bits) is the AES-256-CTR keystream under the full
32-byte ``seed`` (nonce zero: each seed is used for one mask only), read as little-endian
64-bit words (:func:`words`) and reduced modulo 2^bits (:meth:`FieldCodec.reduce
<aggregation.secagg.codec.FieldCodec.reduce>`, once after the words are summed). This replaces Flower's ``pseudo_rand_gen``, which
seeds NumPy's ``RandomState`` with 32 bits of the shared key (flower issue #7522): with
AES-256 guessing the mask costs 2^256 work, not 2^32.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_ZERO_NONCE = bytes(16)


def words(seed: bytes, length: int) -> np.ndarray:
    """The mask's ``length`` 64-bit words before reduction (read-only ``uint64``). Since 2^bits
    divides 2^64, masks can be added and subtracted as words (wrapping mod 2^64) and reduced
    once: the result equals the sum of the reduced masks in Z_(2^bits)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8")
