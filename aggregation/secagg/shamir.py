"""Shamir secret sharing of the protocol's 32-byte secrets (mask keys and self-mask seeds).

The arithmetic is pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir`` (GF(2^128), one
polynomial per 16-byte chunk), the primitive Flower's
``flwr.common.secure_aggregation.crypto.shamir`` wraps, with Flower's share layout
(``<4-byte index><16-byte share per chunk>``). Two differences, both for speed: secrets
must be a whole number of 16-byte blocks and are not padded (Flower pads a 32-byte secret
to 48 bytes, a third more polynomials), and no thread pool is started per call (Flower's
costs ~5 ms a call, 80 % of the share stage at 10 sites).
"""

from __future__ import annotations

from Crypto.Protocol.SecretSharing import Shamir

BLOCK = 16


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` shares of ``secret``; any ``threshold`` of them reconstruct it."""
    if not secret or len(secret) % BLOCK:
        raise ValueError(f"secret must be a non-empty multiple of {BLOCK} bytes, got {len(secret)}")
    shares = [bytearray(i.to_bytes(4, "little")) for i in range(1, num + 1)]
    for start in range(0, len(secret), BLOCK):
        for idx, share in Shamir.split(threshold, num, secret[start : start + BLOCK], ssss=False):
            shares[idx - 1] += share
    return [bytes(s) for s in shares]


def combine_shares(shares: list[bytes]) -> bytes:
    """The secret from ``threshold`` shares (fewer give an unrelated value, not an error)."""
    chunks = (len(shares[0]) - 4) // BLOCK
    if chunks < 1 or any(len(s) != 4 + BLOCK * chunks for s in shares):
        raise ValueError("malformed shares: lengths differ or are not 4 + 16k bytes")
    if len({s[:4] for s in shares}) != len(shares):
        raise ValueError("duplicate share indices")
    return b"".join(
        Shamir.combine([(int.from_bytes(s[:4], "little"), s[4 + BLOCK * c : 4 + BLOCK * (c + 1)]) for s in shares],
                       ssss=False)
        for c in range(chunks)
    )
