"""LEB128 varints: the gaps between a sparse update's positions, one to a few bytes each."""

from __future__ import annotations

import numpy as np


def varint_encode(values: np.ndarray) -> bytes:
    """Non-negative integers as LEB128 varints (7 bits a byte, high bit = more follow)."""
    g = np.asarray(values, dtype=np.uint64)
    width = np.ones(g.size, dtype=np.int64)
    for t in (7, 14, 21, 28, 35):
        width += g >= np.uint64(1 << t)
    out = np.zeros(int(width.sum()), dtype=np.uint8)
    starts = np.cumsum(width) - width
    for j in range(int(width.max(initial=0))):
        m = width > j
        byte = ((g[m] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        out[starts[m] + j] = byte | ((width[m] > j + 1).astype(np.uint8) << 7)
    return out.tobytes()


def varint_decode(data: bytes, count: int) -> np.ndarray:
    """``count`` integers from :func:`varint_encode`'s bytes."""
    b = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(b < 128)
    if ends.size != count or (count and ends[-1] != b.size - 1):
        raise ValueError(f"position list holds {ends.size} numbers in {b.size} bytes, expected {count}")
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    out = np.zeros(count, dtype=np.uint64)
    for j in range(int((ends - starts).max(initial=-1)) + 1):
        m = starts + j <= ends
        out[m] |= (b[starts[m] + j] & np.uint8(0x7F)).astype(np.uint64) << np.uint64(7 * j)
    return out
