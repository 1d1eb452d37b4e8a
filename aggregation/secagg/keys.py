"""Keys derived from the self-mask seeds: HKDF-SHA256 with a purpose label.

A site's self-mask seed ``b`` is 16 bytes (128-bit security; what is Shamir-shared, one
polynomial per seed); HKDF-SHA256 expands it into the 32-byte AES key of its mask. The pairwise
secrets are agreed once per job (:mod:`aggregation.secagg.ratchet`), not here.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_BYTES = 32
#: Bytes of the secrets that are Shamir-shared (self-mask seeds): 128-bit security, one Shamir
#: polynomial each.
SHARED_SECRET_BYTES = 16


def expand(seed: bytes, purpose: bytes) -> bytes:
    """A 32-byte key derived from a shared-secret seed (HKDF-SHA256), bound to ``purpose``."""
    return HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None,
                info=b"fedsilo-secagg/" + purpose).derive(seed)
