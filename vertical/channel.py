"""End-to-end sealed messages between two parties, relayed by a coordinator that cannot read them.

Each party makes an X25519 key pair for the run and publishes the public half through the
coordinator; a pair of parties derives one AES-256-GCM key from their Diffie-Hellman secret with
HKDF-SHA256 (bound to the run and both names). Everything a party addresses to another party
(the aligned row positions after the intersection, split-learning embeddings and gradients,
partial scores) is sealed with that key: the coordinator relays ciphertext and learns sizes only.

Against a coordinator that deviates, the run's keys are authenticated: each deployed party holds
a long-term Ed25519 identity (node config ``party-key``, a 0600 file) and the other parties'
identities, pinned (node config ``peer-keys``: a JSON file of name -> public key, exchanged out
of band, as a consortium exchanges certificates). A party signs its run key (with the run and its
name) and accepts a peer's run key only with a valid signature by that peer's pinned identity,
so a coordinator that substitutes keys (a man in the middle) is refused. Simulated parties (one
process, one operator) need no identities. The run keys stay fresh per run (forward secrecy: a
later theft of an identity key does not open an earlier run's traffic).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from core import identity

NONCE = 12

new_identity, identity_public, key_fingerprint = identity.new_identity, identity.identity_public, identity.key_fingerprint


class ChannelError(ValueError):
    """A sealed message does not open: altered, misaddressed or under another key."""


def new_secret() -> bytes:
    """A fresh X25519 private key (raw 32 bytes) for the run."""
    return X25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                      serialization.NoEncryption())


def public_of(secret: bytes) -> bytes:
    """The X25519 public key of ``secret``."""
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ---- long-term identities: a party's run key signed, and verified against the pinned key -------------
def _signed(run: str, name: str, run_key: bytes) -> bytes:
    return b"fedsilo-vertical-run-key-v1|" + f"{run}|{name}|".encode() + run_key


def sign_run_key(identity: bytes, run: str, name: str, run_key: bytes) -> bytes:
    """The party's signature of its run key, bound to the run and its name."""
    return Ed25519PrivateKey.from_private_bytes(identity).sign(_signed(run, name, run_key))


def verify_run_key(pinned: bytes, run: str, name: str, run_key: bytes, signature: bytes) -> None:
    """:class:`ChannelError` unless ``signature`` is ``name``'s signature of ``run_key`` for ``run``."""
    from cryptography.exceptions import InvalidSignature

    try:
        Ed25519PublicKey.from_public_bytes(pinned).verify(signature, _signed(run, name, run_key))
    except (InvalidSignature, ValueError) as err:
        raise ChannelError(f"party {name}'s run key is not signed by its pinned identity "
                           f"({key_fingerprint(pinned)}): substituted in transit, or the wrong peer-keys file") from err


def load_identity(path: str | os.PathLike[str]) -> bytes:
    """A party's identity key file (0600, hex): :func:`core.identity.load_identity`."""
    try:
        return identity.load_identity(path, "party identity key")
    except identity.IdentityError as err:
        raise ChannelError(str(err)) from None


def load_pinned(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """The peers' identities a party pins: JSON ``{"parties": {name: public key hex}}``."""
    try:
        return identity.load_roster(path, "parties")
    except identity.IdentityError as err:
        raise ChannelError(f"peer-keys file {path}: {err}") from None


def provision(out: str | os.PathLike[str], parties: list[str]) -> dict[str, tuple[str, str]]:
    """Each party's identity (``<out>/<name>/party.key``, 0600) and the others' public keys
    (``<out>/<name>/peer-keys.json``): for a demo or a local deployment, where one operator plays
    every party. In a consortium each party makes its own key and the public halves are exchanged
    out of band. Returns name -> (party-key path, peer-keys path)."""
    import json
    from pathlib import Path

    root = Path(out)
    public = {p: identity.write_identity(root / p / "party.key") for p in parties}
    paths = {}
    for p in parties:
        peers = root / p / "peer-keys.json"
        peers.write_text(json.dumps({"parties": {q: public[q].hex() for q in parties if q != p}}, indent=1) + "\n")
        paths[p] = (str((root / p / "party.key").resolve()), str(peers.resolve()))
    return paths


@dataclass(frozen=True)
class Channel:
    """The sealed channel between ``me`` and ``peer`` (the same key on both sides)."""

    key: bytes
    me: str
    peer: str

    @classmethod
    def between(cls, secret: bytes, peer_public: bytes, me: str, peer: str, run: str) -> Channel:
        """The channel between party ``me`` and ``peer`` in run ``run``, from ``me``'s secret and ``peer``'s public key."""
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
        """``data`` sealed for the peer (AES-GCM, bound to ``label`` and the direction)."""
        nonce = os.urandom(NONCE)
        return nonce + AESGCM(self.key).encrypt(nonce, data, f"{label}|{self.me}->{self.peer}".encode())

    def open(self, sealed: bytes, label: str) -> bytes:
        """The data the peer sealed under ``label``; ChannelError if it was not, or was altered."""
        try:
            return AESGCM(self.key).decrypt(sealed[:NONCE], sealed[NONCE:],
                                            f"{label}|{self.peer}->{self.me}".encode())
        except (InvalidTag, ValueError) as err:
            raise ChannelError(f"a sealed {label!r} message from {self.peer} to {self.me} does not open "
                               "(altered in transit, or keys of another run)") from err
