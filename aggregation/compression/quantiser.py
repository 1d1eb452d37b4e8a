"""Stochastic rounding of an update to 8 or 4 bits per value (unbiased), one float32 scale per block of
:data:`BLOCK` values that never spans two arrays."""

from __future__ import annotations

import numpy as np

BLOCK = 256


def blocks_of(n: int, segments: tuple[int, ...] = ()) -> tuple[np.ndarray, int]:
    """(each value's block, the number of blocks): blocks of :data:`BLOCK` values that never span two
    arrays (``segments``: the arrays' sizes), so one array's large values (FedNova's step count) never
    coarsen another's."""
    ids, offset = [], 0
    for size in segments or (n,):
        ids.append(offset + np.arange(size) // BLOCK)
        offset += -(-size // BLOCK)
    out = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    if out.size != n:
        raise ValueError(f"arrays of {sum(segments)} values for an update of {n}")
    return out, offset


def quantise(x: np.ndarray, bits: int, rng: np.random.Generator, segments: tuple[int, ...] = ()
             ) -> tuple[bytes, bytes]:
    """(codes, scales): ``x`` stochastically rounded to ``bits`` (8 or 4) per value over
    ``[-s, s]`` per block (:func:`blocks_of`; ``s`` the block's largest magnitude, float32).
    Unbiased: ``E[dequantise(quantise(x))] = x``; each value's error is below ``2s/(2^bits-1)``."""
    block, count = blocks_of(x.size, segments)
    scale = np.zeros(count, dtype=np.float64)
    np.maximum.at(scale, block, np.abs(x))
    scale = scale.astype(np.float32)
    s = scale.astype(np.float64)[block]
    top = (1 << bits) - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(s > 0, (x + s) / (2 * s) * top, top / 2)
    floor = np.floor(y)
    q = np.minimum(floor + (rng.random(y.shape) < (y - floor)), top).astype(np.uint8)
    if bits == 4:
        q = np.concatenate([q, np.zeros(q.size % 2, np.uint8)])
        q = (q[0::2] | (q[1::2] << 4)).astype(np.uint8)
    return q.tobytes(), scale.tobytes()


def dequantise(codes: bytes, scales: bytes, bits: int, n: int, segments: tuple[int, ...] = ()) -> np.ndarray:
    """The values :func:`quantise` encoded (float64)."""
    q = np.frombuffer(codes, dtype=np.uint8)
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=1).ravel()
    scale = np.frombuffer(scales, dtype=np.float32).astype(np.float64)
    block, count = blocks_of(n, segments)
    if q.size < n or scale.size != count:
        raise ValueError(f"{q.size} codes and {scale.size} scales for {n} values (expected {count} scales)")
    s = scale[block]
    top = (1 << bits) - 1
    return q[:n].astype(np.float64) / top * (2 * s) - s
