"""X25519 key agreement for pairwise masks and share encryption.

Each site holds two X25519 key pairs per round (SecAgg: one for mask agreement, one for
encrypting the Shamir shares it sends). Two sites derive the same 32-byte secret from
their own private key and the peer's public key; HKDF-SHA256 with a purpose label
separates the secrets used for different purposes.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

SECRET_BYTES = 32


def generate() -> tuple[bytes, bytes]:
    """A fresh key pair as raw bytes: (private key, public key), 32 bytes each."""
    private = X25519PrivateKey.generate()
    return (
        private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
    )


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw public key of a private key object."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private(private_key: bytes) -> X25519PrivateKey:
    """The key object of a raw private key (building it costs as much as one exchange: a site
    that agrees with many peers builds it once)."""
    return X25519PrivateKey.from_private_bytes(private_key)


def agree(private_key: bytes | X25519PrivateKey, peer_public_key: bytes, purpose: bytes) -> bytes:
    """The 32-byte secret shared with the peer, bound to ``purpose`` (e.g. b"mask").

    Raises ``ValueError`` for a malformed peer key (wrong length, or the all-zero
    shared secret a low-order point would produce).
    """
    if len(peer_public_key) != 32:
        raise ValueError(f"X25519 public key must be 32 bytes, got {len(peer_public_key)}")
    key = private(private_key) if isinstance(private_key, bytes) else private_key
    shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    return HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None, info=b"fedsilo-secagg/" + purpose).derive(shared)


#: Bytes of the secrets that are Shamir-shared (self-mask seeds, mask-key seeds): 128-bit
#: security, one Shamir polynomial each, half the sharing work of a 32-byte secret.
SHARED_SECRET_BYTES = 16


def expand(seed: bytes, purpose: bytes) -> bytes:
    """A 32-byte key derived from a shared-secret seed (HKDF-SHA256), bound to ``purpose``."""
    return HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None,
                info=b"fedsilo-secagg/" + purpose).derive(seed)


def from_seed(seed: bytes) -> tuple[bytes, bytes]:
    """The X25519 key pair derived from ``seed``: whoever reconstructs the seed has the key."""
    private = X25519PrivateKey.from_private_bytes(expand(seed, b"mask-key"))
    return (private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
