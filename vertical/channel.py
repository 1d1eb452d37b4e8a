"""End-to-end sealed messages between two parties, relayed by a coordinator that cannot read them.

Each party makes an X25519 key pair for the run and publishes the public half through the
coordinator; a pair of parties derives one AES-256-GCM key from their Diffie-Hellman secret with
HKDF-SHA256 (bound to the run and both names). Everything a party addresses to another party
(the aligned row positions after the intersection, split-learning embeddings and gradients,
partial scores) is sealed with that key: the coordinator relays ciphertext and learns sizes only.

Threat model: honest-but-curious coordinator. The public keys are relayed unauthenticated, so a
coordinator that actively substitutes keys could read the sealed traffic (a man in the middle);
parties that need protection against an active coordinator compare the key fingerprints
(:meth:`Channel.fingerprint`, logged by both sides) out of band.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE = 12


class ChannelError(ValueError):
    """A sealed message does not open: altered, misaddressed or under another key."""


def new_secret() -> bytes:
    """A fresh X25519 private key (raw 32 bytes) for the run."""
    return X25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                      serialization.NoEncryption())


def public_of(secret: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Channel:
    """The sealed channel between ``me`` and ``peer`` (the same key on both sides)."""

    key: bytes
    me: str
    peer: str

    @classmethod
    def between(cls, secret: bytes, peer_public: bytes, me: str, peer: str, run: str) -> Channel:
        if len(peer_public) != 32:
            raise ChannelError(f"party {peer}'s channel key has {len(peer_public)} bytes, expected 32")
        shared = X25519PrivateKey.from_private_bytes(secret).exchange(X25519PublicKey.from_public_bytes(peer_public))
        names = "|".join(sorted((me, peer)))
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=f"fedsilo-vertical-v1|{run}|{names}".encode()).derive(shared)
        return cls(key, me, peer)

    def fingerprint(self) -> str:
        """A short digest of the pair's key: equal at both parties unless a key was substituted."""
        return hashlib.sha256(b"fingerprint|" + self.key).hexdigest()[:16]

    def seal(self, data: bytes, label: str) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + AESGCM(self.key).encrypt(nonce, data, f"{label}|{self.me}->{self.peer}".encode())

    def open(self, sealed: bytes, label: str) -> bytes:
        try:
            return AESGCM(self.key).decrypt(sealed[:NONCE], sealed[NONCE:],
                                            f"{label}|{self.peer}->{self.me}".encode())
        except (InvalidTag, ValueError) as err:
            raise ChannelError(f"a sealed {label!r} message from {self.peer} to {self.me} does not open "
                               "(altered in transit, or keys of another run)") from err
