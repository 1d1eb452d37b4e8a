"""Private set intersection of customer ids: Diffie-Hellman PSI on P-256 (as FATE's ECDH PSI).

Why not ``openmined-psi``: its 2.0.6 wheel pins ``protobuf==6.30.2`` exactly, so installing it
makes pip downgrade the protobuf and ``grpcio-health-checking`` that Flower runs on (and Flower
then warns in every process); the protocol below uses only OpenSSL's P-256 through
``cryptography``, already installed with Flower, and its result is exact (no Bloom-filter false
positives).

Protocol (``A`` the active party, ``B`` each passive party; ``H`` hashes an id to a curve point,
``a`` and ``b`` are the parties' secret scalars for this run, fresh each run):

1. *setup*: A sends ``a·H(x)`` for its ids, B sends ``b·H(y)`` for its ids, each in a random order.
2. *cross*: B returns ``b·(a·H(x))`` for A's list, in A's order.
3. *align*: A computes ``a·(b·H(y))`` for B's list; equal points are the common ids. A puts the
   common ids in an order neither party's file fixes (by a hash of the run's seed and the id, so
   that runs reproduce) and sends each B the positions in B's list, sealed to B
   (:mod:`vertical.channel`).
4. *accept*: B opens the positions and both confirm the same list (a keyed digest).

Who learns what: each party learns the intersection (its own rows that are in it) and the size
of the other's set; A also learns, with several passive parties, its intersection with each.
Neither learns the other's ids outside the intersection: they reach it only as points blinded by
the other's secret scalar (decisional Diffie-Hellman). The coordinator relays blinded points and
sealed positions: it learns the set sizes and the size of the intersection, never an id.
Only the x-coordinate of a point travels (``k·P`` and ``k·(-P)`` share it, so blinding commutes).
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

CURVE = ec.SECP256R1()
ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
WIDTH = 32  # bytes per blinded point (its x-coordinate)


class PSIError(ValueError):
    """A malformed PSI message, or an intersection the federation cannot use."""


def new_scalar() -> int:
    """A party's secret blinding scalar for the run."""
    return int(ec.generate_private_key(CURVE).private_numbers().private_value)


def _point(x: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, b"\x02" + x)


def hash_to_point(item: str, domain: bytes) -> ec.EllipticCurvePublicKey:
    """``H(item)``: try-and-increment onto P-256 (about two SHA-256 calls per id on average)."""
    data = item.encode("utf-8")
    for counter in range(256):
        x = hashlib.sha256(domain + counter.to_bytes(1, "big") + data).digest()
        try:
            return _point(x)
        except ValueError:
            continue
    raise PSIError(f"id {item!r} does not hash onto the curve")  # probability 2^-256


def _blind(scalar: int, points: list[ec.EllipticCurvePublicKey]) -> bytes:
    key = ec.derive_private_key(scalar, CURVE)
    return b"".join(key.exchange(ec.ECDH(), p) for p in points)


def blind_ids(ids: list[str], scalar: int, domain: bytes) -> bytes:
    """``scalar·H(id)`` for each id, concatenated x-coordinates."""
    return _blind(scalar, [hash_to_point(i, domain) for i in ids])


def reblind(blob: bytes, scalar: int, what: str) -> bytes:
    """``scalar·P`` for each point of another party's list (its order kept)."""
    if len(blob) % WIDTH:
        raise PSIError(f"{what}: {len(blob)} bytes is not a whole number of {WIDTH}-byte points")
    points = []
    for k in range(0, len(blob), WIDTH):
        try:
            points.append(_point(blob[k:k + WIDTH]))
        except ValueError:
            raise PSIError(f"{what}: item {k // WIDTH} is not a point of P-256") from None
    return _blind(scalar, points)


def split(blob: bytes) -> list[bytes]:
    """The fixed-width points of a concatenated ``blob``."""
    return [blob[k:k + WIDTH] for k in range(0, len(blob), WIDTH)]


def intersect(pairs: list[tuple[bytes, bytes]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The common items, in the agreed order.

    ``pairs``: per passive party, (the active party's list blinded by both, in the active party's
    order; the passive party's list blinded by both, in its order). Returns the positions in the
    active party's list of the items every passive party has and, per passive party, the
    positions in its list, all in one order (sorted by the first pair's double-blinded point).
    """
    if not pairs:
        raise PSIError("no passive party to intersect with")
    maps, keys = [], None
    for own_blob, peer_blob in pairs:
        own = split(own_blob)
        peer = {p: k for k, p in enumerate(split(peer_blob))}
        keys = keys or own
        maps.append({a: peer[p] for a, p in enumerate(own) if p in peer})
    common = set(maps[0]).intersection(*maps[1:])
    assert keys is not None
    order = sorted(common, key=lambda a: keys[a])
    return np.array(order, dtype=np.int64), [np.array([m[a] for a in order], dtype=np.int64) for m in maps]


def digest(key: bytes, ids: np.ndarray) -> str:
    """A keyed digest of the aligned ids (both parties compute it; the coordinator compares)."""
    return hmac.new(key, "\n".join(map(str, ids)).encode(), hashlib.sha256).hexdigest()[:32]
