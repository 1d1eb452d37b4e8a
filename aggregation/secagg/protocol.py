"""The SecAgg protocol (Bonawitz et al., CCS 2017) as transport-independent state machines.

Four stages per round, for the sites sampled in that round (ids ``1..n`` in the protocol;
the caller maps them to nodes):

0. **advertise keys**: each site makes two X25519 key pairs (``c``: share encryption,
   ``s``: mask agreement) and sends the public halves; the server broadcasts them.
1. **share keys**: each site draws a self-mask seed ``b``, Shamir-shares ``b`` and the
   seed its mask private key ``s_sk`` is derived from (16 bytes each, expanded by HKDF)
   with threshold ``t`` among its neighbourhood, and sends each share
   encrypted for its recipient (AES-256-GCM keyed by the pair's ``c`` agreement); the server
   only routes ciphertexts.
2. **masked input**: each site sends ``y_i = x_i + PRG(b_i) + sum_{j>i} PRG(s_ij) -
   sum_{j<i} PRG(s_ij)`` in Z_(2^bits), where ``s_ij`` is agreed from the ``s`` keys.
3. **unmask**: the server names the survivors (sent ``y``) and the dropped (shared keys,
   sent no ``y``); each responding site returns its shares of ``b`` for survivors and of
   ``s_sk`` for the dropped, never both for one site. With ``t`` shares the server removes
   the survivors' self-masks and the dropped sites' pairwise masks: it learns only the sum
   of the survivors' inputs. Fewer than ``t`` survivors or responders abort the round.

Threat model: honest-but-curious server; sites follow the protocol. The server sees public
keys, encrypted shares, masked vectors and the final sum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aggregation.secagg import keys, prg
from aggregation.secagg.codec import FieldCodec
from aggregation.secagg.shamir import combine_shares, create_shares

SEED_BYTES = keys.SHARED_SECRET_BYTES


class SecAggAbort(RuntimeError):
    """Too few sites remain to finish the round securely; nothing is revealed."""


#: Authenticated data of every share ciphertext (binds it to its purpose).
_SHARE_AAD = b"fedsilo-secagg/share"
NONCE_BYTES = 12


def seal(key: bytes, blob: bytes) -> bytes:
    """``blob`` encrypted and authenticated for the peer that agreed ``key``: AES-256-GCM
    (``cryptography``) under a fresh random 96-bit nonce, sent in front of the ciphertext."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, blob, _SHARE_AAD)


def open_sealed(key: bytes, ciphertext: bytes) -> bytes:
    """The blob of :func:`seal`; ``InvalidTag`` if it was not sealed under ``key`` or was altered."""
    if len(ciphertext) < NONCE_BYTES + 16:
        raise InvalidTag()
    return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], _SHARE_AAD)


def _pack(i: int, j: int, share_b: bytes, share_sk: bytes) -> bytes:
    return i.to_bytes(4, "little") + j.to_bytes(4, "little") + len(share_b).to_bytes(4, "little") + share_b + share_sk


def _unpack(blob: bytes) -> tuple[int, int, bytes, bytes]:
    i, j, nb = (int.from_bytes(blob[k : k + 4], "little") for k in (0, 4, 8))
    return i, j, blob[12 : 12 + nb], blob[12 + nb :]


@dataclass
class SecAggClient:
    """One site's half of one round. ``site`` is its protocol id (1..n)."""

    site: int
    threshold: int
    codec: FieldCodec
    c_sk: bytes = b""
    s_sk: bytes = b""
    s_seed: bytes = b""  # s_sk is derived from it; the seed is what gets Shamir-shared
    b_seed: bytes = b""
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # id -> (c_pk, s_pk)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # from id -> (share_b, share_sk)
    #: id -> the share-encryption key agreed with that peer in stage 1, reused to decrypt its
    #: share in stage 2 (one X25519 exchange per pair and round, not two)
    share_keys_by_peer: dict[int, bytes] = field(default_factory=dict)
    _key_objects: dict[str, X25519PrivateKey] = field(default_factory=dict, repr=False, compare=False)

    def _share_key(self, peer: int) -> bytes:
        key = self.share_keys_by_peer.get(peer)
        if key is None:
            key = keys.agree(self.key_object("c"), self.peers[peer][0], b"shares")
            self.share_keys_by_peer[peer] = key
        return key

    def key_object(self, which: str) -> X25519PrivateKey:
        """This round's private key object (``c``: share encryption, ``s``: masks), built once."""
        if which not in self._key_objects:
            self._key_objects[which] = keys.private(self.c_sk if which == "c" else self.s_sk)
        return self._key_objects[which]

    def advertise(self) -> tuple[bytes, bytes]:
        """Stage 0: public keys (c_pk, s_pk)."""
        self.c_sk, c_pk = keys.generate()
        self._key_objects.clear()
        self.share_keys_by_peer.clear()
        self.s_seed = os.urandom(SEED_BYTES)
        self.s_sk, s_pk = keys.from_seed(self.s_seed)
        return c_pk, s_pk

    def share_keys(self, public_keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 1: encrypted shares of ``b`` and ``s_sk``, one per other site."""
        if len(public_keys) < self.threshold:
            raise SecAggAbort(f"{len(public_keys)} sites advertised keys, threshold is {self.threshold}")
        if len({pk for pair in public_keys.values() for pk in pair}) != 2 * len(public_keys):
            raise SecAggAbort("duplicate public keys: refusing to share")
        self.peers = dict(public_keys)
        self.b_seed = os.urandom(SEED_BYTES)
        ids = sorted(public_keys)
        shares_b = create_shares(self.b_seed, self.threshold, len(ids))
        shares_sk = create_shares(self.s_seed, self.threshold, len(ids))
        out = {}
        for k, j in enumerate(ids):
            blob = _pack(self.site, j, shares_b[k], shares_sk[k])
            if j == self.site:
                self.held[self.site] = (shares_b[k], shares_sk[k])
                continue
            out[j] = seal(self._share_key(j), blob)
        return out

    def masked_input(self, ciphertexts: dict[int, bytes], encoded: np.ndarray) -> np.ndarray:
        """Stage 2: store the shares sent to this site; return its masked, encoded input.

        ``ciphertexts`` holds one share from every other site that completed stage 1.
        """
        for i, ct in ciphertexts.items():
            key = self._share_key(i)
            try:
                src, dst, share_b, share_sk = _unpack(open_sealed(key, ct))
            except InvalidTag:
                raise SecAggAbort(f"the share from site {i} failed authentication") from None
            if (src, dst) != (i, self.site):
                raise SecAggAbort(f"share from {i} is addressed {src}->{dst}")
            self.held[i] = (share_b, share_sk)
        # mask only with the sites that shared keys (they sent this site a share): the others
        # dropped before stage 1 and their pairwise masks could never be removed
        sharers = set(ciphertexts) | {self.site}
        if len(sharers) < self.threshold:
            raise SecAggAbort(f"{len(sharers)} sites shared keys, threshold is {self.threshold}")
        # every mask added or subtracted as raw 64-bit words (wrapping), reduced once at the end
        y = encoded.astype(np.uint64)  # a copy
        np.add(y, prg.words(keys.expand(self.b_seed, b"self-mask"), encoded.size), out=y)
        s_key = self.key_object("s")
        for j, (_, s_pk) in self.peers.items():
            if j == self.site or j not in sharers:
                continue
            m = prg.words(keys.agree(s_key, s_pk, b"mask"), encoded.size)
            (np.add if j > self.site else np.subtract)(y, m, out=y)
        return self.codec.reduce(y)

    def forget_keys(self) -> None:
        """After stage 2 only the shares this site holds are still needed: erase its private keys,
        seeds, its peers' keys and the share keys it agreed (a site's state read after it masked its
        input reveals none of its masks)."""
        self.c_sk = self.s_sk = self.s_seed = self.b_seed = b""
        self.peers.clear()
        self.share_keys_by_peer.clear()
        self._key_objects.clear()

    def unmask(self, survivors: list[int], dropped: list[int]) -> dict[int, tuple[str, bytes]]:
        """Stage 3: shares of ``b`` for survivors and of ``s_sk`` for dropped sites."""
        if set(survivors) & set(dropped):
            raise SecAggAbort("a site cannot be both a survivor and dropped")
        if len(survivors) < self.threshold:
            raise SecAggAbort(f"{len(survivors)} survivors, threshold is {self.threshold}")
        out: dict[int, tuple[str, bytes]] = {}
        for i in survivors:
            if i in self.held:
                out[i] = ("b", self.held[i][0])
        for j in dropped:
            if j in self.held:
                out[j] = ("sk", self.held[j][1])
        return out


@dataclass
class SecAggServer:
    """The server's half of one round: routes, sums and unmasks; sees only the sum."""

    threshold: int
    codec: FieldCodec
    length: int
    graph: dict[int, frozenset[int]] | None = None  # neighbourhoods (SecAgg+); None = complete graph
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    sharers: set[int] = field(default_factory=set)
    masked: dict[int, np.ndarray] = field(default_factory=dict)

    def collect_keys(self, replies: dict[int, tuple[bytes, bytes]]) -> dict[int, tuple[bytes, bytes]]:
        """Stage 0 -> 1: the keys to broadcast (sites that replied)."""
        if len(replies) < self.threshold:
            raise SecAggAbort(f"{len(replies)} sites advertised keys, threshold is {self.threshold}")
        self.public_keys = dict(replies)
        return self.public_keys

    def route_shares(self, replies: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Stage 1 -> 2: ciphertexts regrouped by recipient (only among sites that shared)."""
        self.sharers = set(replies)
        if len(self.sharers) < self.threshold:
            raise SecAggAbort(f"{len(self.sharers)} sites shared keys, threshold is {self.threshold}")
        inbox: dict[int, dict[int, bytes]] = {j: {} for j in self.sharers}
        for i, cts in replies.items():
            for j, ct in cts.items():
                if j in inbox:
                    inbox[j][i] = ct
        return inbox

    def check_masked(self, y: np.ndarray) -> str | None:
        """Why a masked input is malformed, or None: wrong shape/dtype or not in the field."""
        if y.shape != (self.length,):
            return f"masked vector has shape {y.shape}, expected ({self.length},)"
        if y.dtype != np.uint64:
            return f"masked vector has dtype {y.dtype}, expected uint64"
        if self.codec.bits < 64 and y.size and int(y.max()) >= self.codec.modulus:
            return f"masked vector has values outside Z_2^{self.codec.bits}"
        return None

    def collect_masked(self, replies: dict[int, np.ndarray]) -> tuple[list[int], list[int]]:
        """Stage 2 -> 3: (survivors, dropped) to announce.

        Only sites that shared keys count; a malformed vector (see :meth:`check_masked`)
        is the caller's to reject beforehand: here it aborts the round.
        """
        self.masked = {i: y for i, y in replies.items() if i in self.sharers}
        for i, y in self.masked.items():
            if (reason := self.check_masked(y)) is not None:
                raise SecAggAbort(f"site {i}: {reason}")
        survivors = sorted(self.masked)
        if len(survivors) < self.threshold:
            raise SecAggAbort(f"{len(survivors)} masked inputs, threshold is {self.threshold}")
        return survivors, sorted(self.sharers - set(survivors))

    def unmask(self, replies: dict[int, dict[int, tuple[str, bytes]]]) -> np.ndarray:
        """Stage 3: the field sum of the survivors' encoded inputs (the caller decodes it)."""
        if len(replies) < self.threshold:
            raise SecAggAbort(f"{len(replies)} sites sent unmasking shares, threshold is {self.threshold}")
        survivors = sorted(self.masked)
        dropped = sorted(self.sharers - set(survivors))
        total = np.zeros(self.length, dtype=np.uint64)
        for y in self.masked.values():  # as 64-bit words, wrapping; reduced once at the end
            np.add(total, y, out=total)
        for i in survivors:
            b_seed = self._reconstruct(replies, i, "b")
            np.subtract(total, prg.words(keys.expand(b_seed, b"self-mask"), self.length), out=total)
        for j in dropped:
            s_sk_j = keys.private(keys.from_seed(self._reconstruct(replies, j, "sk"))[0])
            for i in survivors:
                if self.graph is not None and i not in self.graph[j]:
                    continue  # i and j are not neighbours: no mask between them
                m = prg.words(keys.agree(s_sk_j, self.public_keys[i][1], b"mask"), self.length)
                # survivor i added +m if j > i, subtracted it if j < i: undo that
                (np.subtract if j > i else np.add)(total, m, out=total)
        return self.codec.reduce(total)

    def _reconstruct(self, replies: dict[int, dict[int, tuple[str, bytes]]], owner: int, kind: str) -> bytes:
        shares = [r[owner][1] for r in replies.values() if owner in r and r[owner][0] == kind]
        if len(shares) < self.threshold:
            raise SecAggAbort(f"{len(shares)} shares of site {owner}'s {kind}, threshold is {self.threshold}")
        return combine_shares(shares[: self.threshold])
