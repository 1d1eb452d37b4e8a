"""Pairwise secrets agreed once per job, and the one-way ratchet that derives each round's from them.

Two neighbours agree a **root** once per key epoch (normally once per job): X25519 between the
epoch keys each signed with its long-term identity (:mod:`core.identity`), HKDF-SHA256 bound to
the run, the protocol channel, the epoch and both names. The root is the pair's **chain key** at
index 0. For the round (or secure sum) numbered ``r`` the chain key ``CK_r`` derives, with one
HKDF-Expand labelled with ``r`` (96 bytes, in this order),

* the pair's **mask seed** of that round (both add the same AES-CTR mask, with opposite signs), and
* the pair's **share key** of that round (AES-256-GCM for the Shamir shares they send each other),

and the next chain key ``CK_(r+1)``. A site keeps only the chain key of the next index it may use;
the keys before it are overwritten (the Signal protocol's symmetric ratchet). Inverting HKDF is
needed to go back, so a site's state read after round ``T`` yields nothing of round ``T`` or
earlier. Skipping rounds (a site that missed some) is ratcheting forward several steps.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

KEY_BYTES = 32
_LABEL = b"fedsilo-secagg-v2|"
#: the most steps a chain may be ratcheted in one go (a round number beyond any run's; refuses a
#: message that would make a site hash for minutes)
MAX_STEPS = 1 << 20


def root(secret: X25519PrivateKey, peer_public: bytes, run: int, channel: str, epoch: int, me: str, peer: str) -> bytes:
    """The pair's chain key at index 0 for ``channel`` (``ValueError`` for a malformed peer key)."""
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"X25519 public key must be {KEY_BYTES} bytes, got {len(peer_public)}")
    shared = secret.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    names = "|".join(sorted((me, peer)))
    info = _LABEL + f"root|{run}|{channel}|{epoch}|{names}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _step(key: bytes, index: int) -> bytes:
    """One HKDF-Expand of the chain key at ``index``: 96 bytes, the mask seed, the share key and the next
    chain key (HKDF's output blocks are independent pseudo-random values)."""
    return HKDFExpand(algorithm=hashes.SHA256(), length=3 * KEY_BYTES,
                      info=_LABEL + f"round|{index}".encode()).derive(key)


def advance(key: bytes, index: int, to: int) -> bytes:
    """The chain key at index ``to`` from the one at ``index`` (``ValueError`` if ``to < index``:
    a chain never goes back)."""
    if to < index:
        raise ValueError(f"the chain is at index {index}; index {to} has been erased (it never goes back)")
    if to - index > MAX_STEPS:
        raise ValueError(f"index {to} is more than {MAX_STEPS} steps ahead of the chain ({index})")
    for i in range(index, to):
        key = _step(key, i)[2 * KEY_BYTES:]
    return key


def round_keys(key: bytes, index: int) -> tuple[bytes, bytes, bytes]:
    """(mask seed, share key, next chain key) of the chain key at ``index``."""
    out = _step(key, index)
    return out[:KEY_BYTES], out[KEY_BYTES: 2 * KEY_BYTES], out[2 * KEY_BYTES:]
