"""One update in and out of its payload (raw ``Array`` bytes, no ``.npy`` header, so traffic records count
what is sent), for every method."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array

from aggregation.compression.policy import METHODS, STYPE, Compression
from aggregation.compression.quantiser import dequantise, quantise
from aggregation.compression.sparse import per_array, random_positions, topk_count, topk_positions
from aggregation.compression.varint import varint_decode, varint_encode
from core.layout import Layout


def raw_array(data: bytes) -> Array:
    """``data`` as one raw ``Array`` (stype :data:`STYPE`: no ``.npy`` header, so traffic counts the payload)."""
    return Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)


def _values(comp: Compression, v: np.ndarray, rng: np.random.Generator, segments: tuple[int, ...] = ()
            ) -> dict[str, bytes]:
    if comp.keep_bits == 32:
        return {"values": v.astype("<f4").tobytes()}
    if comp.keep_bits == 16:
        return {"values": v.astype("<f2").tobytes()}
    codes, scales = quantise(v, 8, rng, segments)
    return {"values": codes, "scales": scales}


def _read_values(comp: Compression, parts: dict[str, bytes], k: int, segments: tuple[int, ...] = ()
                 ) -> np.ndarray:
    if comp.keep_bits == 32:
        return np.frombuffer(parts["values"], dtype="<f4", count=k).astype(np.float64)
    if comp.keep_bits == 16:
        return np.frombuffer(parts["values"], dtype="<f2", count=k).astype(np.float64)
    return dequantise(parts["values"], parts["scales"], 8, k, segments)


def encode(comp: Compression, u: np.ndarray, rng: np.random.Generator, seed: int, segments: tuple[int, ...] = ()
           ) -> tuple[dict[str, bytes], np.ndarray]:
    """(the payload parts, what the coordinator will decode) of the update ``u`` (``segments``: the
    sizes of the arrays ``u`` is made of, for ``topk``)."""
    n = u.size
    if comp.method == "fp16":
        parts = {"values": u.astype("<f2").tobytes()}
    elif comp.method in ("int8", "int4"):
        codes, scales = quantise(u, 8 if comp.method == "int8" else 4, rng, segments)
        parts = {"values": codes, "scales": scales}
    elif comp.method == "topk":
        idx = topk_positions(comp, u, segments)
        gaps = np.diff(np.concatenate([[-1], idx])) - 1
        parts = {"positions": varint_encode(gaps), **_values(comp, u[idx], rng, per_array(idx, segments))}
    elif comp.method == "randk":
        k = comp.kept(n)
        idx = random_positions(seed, n, k)
        scale = 1.0 if comp.error_feedback else n / k
        parts = _values(comp, u[idx] * scale, rng, per_array(idx, segments))
    else:
        raise ValueError(f"aggregation.compress={comp.method!r} is not one of {list(METHODS)}")
    return parts, decode(comp, parts, n, seed, segments)


def decode(comp: Compression, parts: dict[str, bytes], n: int, seed: int, segments: tuple[int, ...] = ()
           ) -> np.ndarray:
    """The update (float64, ``n`` values) a payload holds; ValueError if it is malformed."""
    if comp.method == "fp16":
        raw = parts["values"]
        if len(raw) != 2 * n:
            raise ValueError(f"{len(raw)} bytes of fp16 values, expected {2 * n}")
        return np.frombuffer(raw, dtype="<f2").astype(np.float64)
    if comp.method in ("int8", "int4"):
        return dequantise(parts["values"], parts["scales"], 8 if comp.method == "int8" else 4, n, segments)
    k = topk_count(comp, n, segments) if comp.method == "topk" else comp.kept(n)
    out = np.zeros(n, dtype=np.float64)
    if comp.method == "topk":
        idx = np.cumsum(varint_decode(parts["positions"], k).astype(np.int64) + 1) - 1
        if k and (idx[-1] >= n):
            raise ValueError(f"position {idx[-1]} beyond the model's {n} values")
    else:
        idx = random_positions(seed, n, k)
    out[idx] = _read_values(comp, parts, k, per_array(idx, segments))
    return out


def segments(layout: Layout) -> tuple[int, ...]:
    """The sizes of a layout's arrays, in order."""
    return tuple(int(np.prod(shape)) for shape in layout.shapes)


def float_keys(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays an update is computed over: the floating-point ones."""
    return OrderedDict((k, v) for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating))
