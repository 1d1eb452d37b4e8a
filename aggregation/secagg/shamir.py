"""Shamir secret sharing of the protocol's 16-byte secrets (mask-key seeds, self-mask seeds).

Shamir's scheme (1979) over the prime field GF(p), ``p = 2^130 - 5`` (the prime of Poly1305),
one polynomial of degree ``threshold - 1`` per 16-byte chunk of the secret (a 128-bit integer,
below ``p``), its other coefficients uniform in GF(p) from :mod:`secrets` (the OS CSPRNG). A
share is ``<4-byte index x><17-byte P(x) per chunk>``, little-endian, ``x = 1..num``.

Security is information-theoretic and does not depend on the field: any ``threshold - 1``
shares are independent of the secret. The arithmetic is CPython's exact integers
(``pow(d, -1, p)`` for inverses); nothing here is a computational assumption.

Why not pycryptodome's GF(2^128) Shamir (what this module wrapped until #21, in Flower's
layout): its field multiplication is pure Python, bit by bit with masks built from strings,
about 20 us each, so sharing one secret among 25 neighbours took 7 ms and reconstructing it
21 ms; at 50 sites that was about 1.8 s of a 2 s secure round. Here both take tens of
microseconds. Not constant-time: Python integers are not (neither were pycryptodome's); a
site's secrets never leave its process unshared, and the server combines shares it may see.
"""

from __future__ import annotations

import secrets
from functools import lru_cache

BLOCK = 16                 # bytes of secret per polynomial
PRIME = (1 << 130) - 5     # a prime above 2^128
VALUE_BYTES = 17           # bytes of one share value (< 2^130)


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` shares of ``secret``; any ``threshold`` of them reconstruct it, fewer reveal nothing."""
    if not secret or len(secret) % BLOCK:
        raise ValueError(f"secret must be a non-empty multiple of {BLOCK} bytes, got {len(secret)}")
    if not 1 <= threshold <= num:
        raise ValueError(f"threshold must be in 1..num={num}, got {threshold}")
    shares = [bytearray(x.to_bytes(4, "little")) for x in range(1, num + 1)]
    for start in range(0, len(secret), BLOCK):
        # P(x) = s + c_1 x + ... + c_(t-1) x^(t-1), evaluated by Horner's rule from the top
        coeffs = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
        coeffs.reverse()
        coeffs.append(int.from_bytes(secret[start : start + BLOCK], "little"))
        for x, share in enumerate(shares, start=1):
            y = 0
            for c in coeffs:
                y = (y * x + c) % PRIME
            share += y.to_bytes(VALUE_BYTES, "little")
    return [bytes(s) for s in shares]


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """``l_j(0) = prod_(m != j) x_m / (x_m - x_j)`` mod p for each ``x_j`` (cached: the
    same responders' indices recur for every secret of a round)."""
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def combine_shares(shares: list[bytes]) -> bytes:
    """The secret from ``threshold`` shares (fewer give an unrelated value or a ValueError,
    never the secret)."""
    if not shares:
        raise ValueError("no shares to combine")
    chunks = (len(shares[0]) - 4) // VALUE_BYTES
    if chunks < 1 or any(len(s) != 4 + VALUE_BYTES * chunks for s in shares):
        raise ValueError(f"malformed shares: lengths differ or are not 4 + {VALUE_BYTES}k bytes")
    xs = tuple(int.from_bytes(s[:4], "little") for s in shares)
    if len(set(xs)) != len(xs):
        raise ValueError("duplicate share indices")
    if 0 in xs:
        raise ValueError("share index 0 (the secret's own position) is not a share")
    weights = _lagrange_at_zero(xs)
    out = bytearray()
    for c in range(chunks):
        lo = 4 + VALUE_BYTES * c
        ys = [int.from_bytes(s[lo : lo + VALUE_BYTES], "little") for s in shares]
        if any(y >= PRIME for y in ys):
            raise ValueError("malformed share: value outside the field")
        value = sum(w * y for w, y in zip(weights, ys, strict=True)) % PRIME
        if value >> (8 * BLOCK):
            raise ValueError("the shares do not reconstruct a 16-byte secret (too few, or inconsistent)")
        out += value.to_bytes(BLOCK, "little")
    return bytes(out)
