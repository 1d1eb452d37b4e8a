"""Pseudo-random masks from AES-256 in counter mode.

A mask of ``length`` elements of Z_(2^bits) is the AES-256-CTR keystream under the full
32-byte ``seed`` (nonce zero: each seed is used for one mask only), read as little-endian
64-bit words and reduced modulo 2^bits. This replaces Flower's ``pseudo_rand_gen``, which
seeds NumPy's ``RandomState`` with 32 bits of the shared key (flower issue #7522): with
AES-256 guessing the mask costs 2^256 work, not 2^32.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_ZERO_NONCE = bytes(16)


def mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` pseudo-random elements of Z_(2^bits) (``uint64``), deterministic in ``seed``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    words = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    return words if bits == 64 else words & np.uint64((1 << bits) - 1)
