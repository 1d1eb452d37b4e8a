"""Secure aggregation against a coordinator that deviates, as transport-independent state machines.

SecAgg (Bonawitz et al., CCS 2017) with SecAgg+'s sparse neighbourhoods (Bell et al., CCS 2020),
pairwise secrets agreed once per job and ratcheted per round (:mod:`aggregation.secagg.ratchet`).
Sites are named; a name is trusted only through the roster (:mod:`core.identity`).

**Key epoch** (once per job; again only for sites that were not there, or every
``aggregation.rekey_every`` rounds): each site makes a fresh X25519 key, signs it with its
identity (bound to the run, channel, epoch and its name) and publishes it. With the epoch's list
of signed keys each site verifies every signature against its roster, agrees one root with each
of its graph neighbours (:func:`neighbourhood`: a ring the site computes itself from the run, the
epoch and the list, so the coordinator cannot choose a site's neighbours), and erases its X25519
private key.

**Round** ``r`` (two message exchanges):

1. *masked input*: the coordinator names the site's neighbours taking part in ``r`` (a subset of
   its graph neighbours). The site checks them against its policy (:class:`Limits`: enough
   neighbours; its own threshold ``t`` from the neighbourhood it was given), draws a fresh
   self-mask seed ``b``, sends ``y = x + PRG(b) + sum_(me<j) PRG(m_j) - sum_(j<me) PRG(m_j)``
   (``m_j``: round ``r``'s mask seed of the pair's chain) and Shamir shares of ``b`` (threshold
   ``t``), one sealed for each neighbour under round ``r``'s share key of the pair;
2. *unmask*: the coordinator says which of the site's neighbourhood survived (sent ``y``) and
   which dropped, and delivers the survivors' sealed shares. The site checks that the two lists
   partition exactly the neighbourhood it masked with, that it is a survivor, and that at least
   ``t`` survived; it then returns its shares of ``b`` of the survivors and, for each dropped
   neighbour, the pair's round-``r`` mask seed: never both for one peer, never a chain key, once.
   Then it erases the round.

The coordinator removes the survivors' self-masks (``t`` shares each) and the masks between the
survivors and the dropped (the revealed round seeds): it learns the sum of the survivors' inputs.

Why ``t >= floor((n + c + 1) / 2) + 1`` with ``n`` the neighbourhood (the site itself included)
and ``c`` the colluding sites the site's policy allows for (the analysis is in
docs/secure-aggregation.md): to read site ``j``'s input alone the coordinator needs ``b_j`` (``t``
shares) and every mask seed of ``j``'s pairs; an honest neighbour gives either its share of
``b_j`` (told ``j`` survived) or the pair's seed (told ``j`` dropped), and ``j`` reveals seeds only
for the at most ``n - t`` it is told dropped. Counting what the coordinator can collect from the
honest sites and ``c`` of its own gives the bound.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from aggregation.base import MaskingLimits as Limits
from aggregation.secagg import keys, prg, ratchet, wire
from aggregation.secagg.codec import FieldCodec
from aggregation.secagg.graph import graph_seed, neighbourhood
from aggregation.secagg.shamir import combine_shares, create_shares
from core.identity import IdentityError, SiteIdentity

SEED_BYTES = keys.SHARED_SECRET_BYTES  # self-mask seeds (Shamir-shared): 128 bits
NONCE_BYTES = 12
SIGNATURE_BYTES = 64


class SecAggAbort(RuntimeError):
    """Too few sites remain to finish the round securely; nothing is revealed."""


class Refused(RuntimeError):
    """A message a site refuses: it breaks the protocol's state or the site's policy. The reason names
    fields and counts, never a secret."""


class NoKeys(Refused):
    """The site holds no keys of the message's key epoch and cannot agree them (it lost its state, or
    missed the epoch's key stage): the coordinator should open a new epoch."""


# ---- the site's own parameters -------------------------------------------------------------------------
def site_threshold(n: int, fraction: float, limits: Limits) -> int:
    """The threshold a site uses for a neighbourhood of ``n`` sites (itself included): the larger of the
    coordinator's and the policy's share of ``n`` and of ``floor((n + c + 1) / 2) + 1``, at least 2."""
    share = max(fraction, limits.threshold)
    return max(2, math.ceil(share * n - 1e-9), (n + limits.colluders + 1) // 2 + 1)


def key_statement(run: int, channel: str, epoch: int, name: str, public: bytes) -> bytes:
    """What a site signs when it publishes an epoch key."""
    return f"fedsilo-secagg-v2|epoch-key|{run}|{channel}|{epoch}|{name}|".encode() + bytes(public)


def _aad(run: int, channel: str, index: int, sender: str, recipient: str) -> bytes:
    return f"fedsilo-secagg-v2|share|{run}|{channel}|{index}|{sender}->{recipient}".encode()


def seal(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """``blob`` encrypted and authenticated (AES-256-GCM, fresh random 96-bit nonce in front)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, blob, aad)


def open_sealed(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """The blob of :func:`seal`; ``InvalidTag`` if it was not sealed under ``key`` for ``aad``, or altered."""
    if len(ciphertext) < NONCE_BYTES + 16:
        raise InvalidTag()
    return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad)


def sign_of(name: str, me: str) -> int:
    """+1 if ``me`` adds the pair's mask, -1 if it subtracts it (the smaller name adds)."""
    return 1 if me < name else -1


# ---- the site's state ----------------------------------------------------------------------------------
@dataclass
class Pending:
    """A round masked and not yet unmasked: what the unmasking may reveal, and nothing else."""

    index: int
    neighbours: list[str]
    threshold: int
    seeds: dict[str, bytes]        # round mask seed per neighbour (revealed only if it dropped)
    share_keys: dict[str, bytes]   # round share key per neighbour (to open its share of its b)
    own_share: bytes               # this site's share of its own b


@dataclass
class SiteState:
    """One site's state of one protocol channel, everything it keeps between messages."""

    epoch: int = 0                                          # the epoch of its chains (0: none yet)
    secret: bytes = b""                                     # X25519 key advertised, not yet used
    secret_epoch: int = 0
    allowed: list[str] = field(default_factory=list)        # its graph neighbours in this epoch
    chains: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # peer -> (next index, chain key)
    last: int = 0                                           # the last index it masked an input for
    pending: Pending | None = None

    def to_bytes(self) -> bytes:
        """The state as one byte string (:mod:`aggregation.secagg.wire`'s lists; integers as 8 bytes)."""
        peers = sorted(self.chains)
        fields = [_VERSION, _ints(self.epoch, self.secret_epoch, self.last), self.secret,
                  wire.join_names(self.allowed).encode(), wire.join_names(peers).encode(),
                  _ints(*(self.chains[p][0] for p in peers)), b"".join(self.chains[p][1] for p in peers)]
        p = self.pending
        if p is not None:
            fields += [_ints(p.index, p.threshold), wire.join_names(p.neighbours).encode(),
                       b"".join(p.seeds[n] for n in p.neighbours), b"".join(p.share_keys[n] for n in p.neighbours),
                       p.own_share]
        return wire.join(fields)

    @classmethod
    def from_bytes(cls, data: bytes) -> SiteState:
        """The state :meth:`to_bytes` wrote; ValueError for anything else."""
        try:
            f = wire.split(bytes(data), "secure-aggregation state")
            if not f or f[0] != _VERSION or len(f) not in (7, 12):
                raise ValueError("not a state of this version")
            epoch, secret_epoch, last = _ints_of(f[1], 3)
            allowed, peers = _names_of(f[3]), _names_of(f[4])
            chains = dict(zip(peers, zip(_ints_of(f[5], len(peers)),
                                         wire.split_fixed(f[6], len(peers), ratchet.KEY_BYTES), strict=True), strict=True))
            pending = None
            if len(f) == 12:
                index, threshold = _ints_of(f[7], 2)
                hood = _names_of(f[8])
                pending = Pending(index, hood, threshold,
                                  dict(zip(hood, wire.split_fixed(f[9], len(hood), ratchet.KEY_BYTES), strict=True)),
                                  dict(zip(hood, wire.split_fixed(f[10], len(hood), ratchet.KEY_BYTES), strict=True)),
                                  f[11])
            return cls(epoch, f[2], secret_epoch, allowed, chains, last, pending)
        except (ValueError, UnicodeDecodeError) as err:
            raise Refused(f"this site's secure-aggregation state is damaged ({err})") from None


_VERSION = b"fedsilo-secagg-state-v2"


def _names_of(data: bytes) -> list[str]:  # the site's own state: names written by wire.join_names
    return data.decode().split("\n") if data else []


def _ints(*values: int) -> bytes:
    return b"".join(int(v).to_bytes(8, "little") for v in values)


def _ints_of(data: bytes, count: int) -> list[int]:
    if len(data) != 8 * count:
        raise ValueError(f"{len(data)} bytes for {count} integers")
    return [int.from_bytes(data[8 * k: 8 * k + 8], "little") for k in range(count)]


# ---- the site's half -----------------------------------------------------------------------------------
@dataclass
class MaskingSite:
    """One site's half of one channel: ``state`` is what it keeps; ``run`` is its own run id."""

    identity: SiteIdentity
    run: int
    channel: str
    state: SiteState
    limits: Limits = Limits()

    @property
    def name(self) -> str:
        """The site's name on the roster."""
        return self.identity.name

    def advertise(self, epoch: int) -> tuple[bytes, bytes]:
        """A fresh X25519 key for ``epoch`` and its signature: (public key, signature)."""
        if epoch <= self.state.epoch:
            raise Refused(f"keys for epoch {epoch}, but this site already holds the keys of epoch {self.state.epoch} "
                          "(replayed or stale message)")
        secret = X25519PrivateKey.generate()
        self.state.secret = secret.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self.state.secret_epoch = epoch
        public = secret.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return public, self.identity.sign(key_statement(self.run, self.channel, epoch, self.name, public))

    def agree(self, epoch: int, names: list[str], keys: dict[str, tuple[bytes, bytes]], k: int) -> None:
        """The epoch's sites (``names``) and its graph neighbours' signed keys (``keys``: name -> (X25519
        key, signature)): every name must be on the roster and every neighbour's signature verify; then a
        root with each neighbour, and the X25519 key erased. Refused before any agreement otherwise."""
        if self.state.secret_epoch != epoch or not self.state.secret:
            raise NoKeys(f"the key list of epoch {epoch}, but this site holds no unused key of that epoch")
        if len(set(names)) != len(names) or self.name not in names:
            raise Refused("the epoch's site list repeats a name or leaves out this site")
        strangers = [n for n in names if not self.identity.knows(n)]
        if strangers:
            raise Refused(f"{len(strangers)} of the epoch's {len(names)} sites are not on this site's roster "
                          f"(e.g. {strangers[0]!r})")
        graph = neighbourhood(graph_seed(self.run, self.channel, epoch), sorted(names), k)[self.name]
        missing = sorted(graph - set(keys))
        if missing:
            raise Refused(f"the keys of {len(missing)} of this site's {len(graph)} neighbours are missing "
                          f"(e.g. {missing[0]!r})")
        secret = X25519PrivateKey.from_private_bytes(self.state.secret)
        own = secret.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        if self.name not in keys or bytes(keys[self.name][0]) != own:
            raise Refused(f"the epoch's key list does not carry this site's ({self.name}) own key")
        if len({bytes(keys[p][0]) for p in graph | {self.name}}) != len(graph) + 1:
            raise Refused("the epoch's key list repeats a public key")
        for peer in sorted(graph):
            public, sig = keys[peer]
            try:
                self.identity.verify(peer, key_statement(self.run, self.channel, epoch, peer, public), sig)
            except IdentityError as err:
                raise Refused(str(err)) from None
        chains = {}
        for peer in sorted(graph):
            try:
                chains[peer] = (0, ratchet.root(secret, keys[peer][0], self.run, self.channel, epoch, self.name, peer))
            except ValueError as err:
                raise Refused(f"{peer}'s epoch key: {err}") from None
        self.state = SiteState(epoch=epoch, allowed=sorted(graph), chains=chains, last=self.state.last)

    def mask(self, index: int, neighbours: list[str], encoded: np.ndarray, codec: FieldCodec, fraction: float
             ) -> tuple[np.ndarray, int, dict[str, bytes]]:
        """Round ``index``: (masked vector, threshold, sealed share of ``b`` per neighbour)."""
        st = self.state
        if index <= st.last:
            raise Refused(f"round {index}, but this site has masked its input for round {st.last} and its keys "
                          "have moved past it (replayed or stale message)")
        if len(set(neighbours)) != len(neighbours) or self.name in neighbours:
            raise Refused("the neighbour list repeats a name or names this site itself")
        removed = sorted(n for n in neighbours if not self.identity.knows(n))
        if removed:
            raise Refused(f"{len(removed)} of the neighbours named are no longer on this site's roster "
                          f"(e.g. {removed[0]!r})")
        unknown = sorted(set(neighbours) - set(st.chains))
        if unknown:
            raise Refused(f"{len(unknown)} of the {len(neighbours)} neighbours named are not this site's neighbours "
                          f"in epoch {st.epoch} (e.g. {unknown[0]!r}): a neighbourhood the coordinator made up")
        if len(neighbours) < self.limits.min_neighbours:
            raise Refused(f"{len(neighbours)} neighbours in this round; this site's policy masks with at least "
                          f"{self.limits.min_neighbours} (secure_aggregation.min_neighbours)")
        n = len(neighbours) + 1
        t = site_threshold(n, fraction, self.limits)
        if t > n:
            raise Refused(f"a neighbourhood of {n} sites cannot hold a threshold of {t} (the policy allows for "
                          f"{self.limits.colluders} colluding sites)")
        seeds, share_keys = {}, {}
        y = encoded.astype(np.uint64)  # a copy; masks added as 64-bit words (wrapping), reduced once
        for peer in sorted(neighbours):
            at, chain = st.chains[peer]
            try:
                key = ratchet.advance(chain, at, index)
            except ValueError as err:
                raise Refused(f"the chain with {peer}: {err}") from None
            seeds[peer], share_keys[peer], nxt = ratchet.round_keys(key, index)
            st.chains[peer] = (index + 1, nxt)
            (np.add if sign_of(peer, self.name) > 0 else np.subtract)(y, prg.words(seeds[peer], y.size), out=y)
        b = os.urandom(SEED_BYTES)
        np.add(y, prg.words(keys.expand(b, b"self-mask"), y.size), out=y)
        holders = sorted([*neighbours, self.name])
        shares = dict(zip(holders, create_shares(b, t, n), strict=True))
        sealed = {peer: seal(share_keys[peer], shares[peer], _aad(self.run, self.channel, index, self.name, peer))
                  for peer in neighbours}
        st.last = index
        st.pending = Pending(index, sorted(neighbours), t, seeds, share_keys, shares[self.name])
        return codec.reduce(y), t, sealed

    def unmask(self, index: int, survivors: list[str], dropped: list[str], inbox: dict[str, bytes]
               ) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """Round ``index``'s unmasking: (share of ``b`` per survivor, round mask seed per dropped neighbour)."""
        p = self.state.pending
        if p is None or p.index != index:
            raise Refused(f"unmasking for round {index}, but this site has no masked round {index} open "
                          "(replayed, stale or out-of-order message)")
        surv, drop = set(survivors), set(dropped)
        if len(surv) != len(survivors) or len(drop) != len(dropped) or surv & drop:
            raise Refused("the survivor and dropped lists repeat a name or share one")
        if surv | drop != {*p.neighbours, self.name}:
            raise Refused("the survivor and dropped lists are not this site's neighbourhood of the round "
                          f"({len(surv | drop)} names given, {len(p.neighbours) + 1} in it)")
        if self.name not in surv:
            raise Refused("the survivor list leaves out this site, which sent its masked input")
        if len(surv) < p.threshold:
            raise Refused(f"{len(surv)} survivors in this site's neighbourhood; it reveals nothing for fewer than "
                          f"its threshold of {p.threshold}")
        if not set(inbox) <= surv - {self.name}:
            raise Refused("a share delivered from a site that is not a surviving neighbour")
        b_shares = {self.name: p.own_share}
        for peer, ct in inbox.items():
            try:
                b_shares[peer] = open_sealed(p.share_keys[peer], ct, _aad(self.run, self.channel, index, peer, self.name))
            except InvalidTag:
                raise Refused(f"the share from {peer} failed authentication (altered, misrouted or replayed)") from None
        seeds = {peer: p.seeds[peer] for peer in sorted(drop)}
        self.state.pending = None  # revealed what it may: the round is erased
        return b_shares, seeds


# ---- the coordinator's half ----------------------------------------------------------------------------
@dataclass
class Masked:
    """A survivor's masked input as the coordinator holds it."""

    y: np.ndarray
    threshold: int
    shares: dict[str, bytes]  # recipient -> sealed share of the sender's b


@dataclass
class MaskingServer:
    """The coordinator's half of one round: who masked with whom, the sum, the unmasking."""

    codec: FieldCodec
    length: int
    neighbours: dict[str, list[str]]  # each participant's neighbours in this round
    masked: dict[str, Masked] = field(default_factory=dict)

    def requests(self) -> dict[str, tuple[list[str], list[str], dict[str, bytes]]]:
        """Per survivor: (survivors and dropped of its neighbourhood, the shares addressed to it)."""
        out = {}
        for me in sorted(self.masked):
            hood = [me, *self.neighbours[me]]
            survivors = sorted(n for n in hood if n in self.masked)
            dropped = sorted(n for n in hood if n not in self.masked)
            inbox = {s: self.masked[s].shares[me] for s in survivors if s != me and me in self.masked[s].shares}
            out[me] = (survivors, dropped, inbox)
        return out

    def unmask(self, replies: dict[str, tuple[dict[str, bytes], dict[str, bytes]]]) -> np.ndarray:
        """The field sum of the survivors' inputs from the unmasking replies; :class:`SecAggAbort` if a
        self-mask has fewer shares than its threshold, or a dropped site's mask with a survivor that did
        not unmask cannot be removed."""
        total = np.zeros(self.length, dtype=np.uint64)
        for m in self.masked.values():  # as 64-bit words, wrapping; reduced once at the end
            np.add(total, m.y, out=total)
        for owner, m in sorted(self.masked.items()):
            shares = [r[0][owner] for r in replies.values() if owner in r[0]]
            if len(shares) < m.threshold:
                raise SecAggAbort(f"{len(shares)} shares of {owner}'s self-mask, threshold is {m.threshold}")
            b = combine_shares(shares[: m.threshold])
            np.subtract(total, prg.words(keys.expand(b, b"self-mask"), self.length), out=total)
        for survivor in sorted(self.masked):
            for peer in self.neighbours[survivor]:
                if peer in self.masked:
                    continue  # both masked: the pair's masks cancel in the sum
                seed = replies.get(survivor, ({}, {}))[1].get(peer)
                if seed is None:
                    raise SecAggAbort(f"{survivor} did not reveal its mask with {peer}, which dropped: the mask "
                                      "cannot be removed")
                (np.subtract if sign_of(peer, survivor) > 0 else np.add)(total, prg.words(seed, self.length), out=total)
        return self.codec.reduce(total)
