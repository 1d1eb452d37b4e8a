"""Which values a sparse update sends: the largest in magnitude (``topk``, per array) or positions drawn
from a seed the round's sites and the coordinator share (``randk``: no positions are sent)."""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import ArrayRecord

from aggregation.compression.policy import Compression


def positions_root(initial: ArrayRecord) -> int:
    """The root of every ``randk`` positions seed of a run: a digest of the public initial model
    (itself drawn from the run seed), so coordinator halves of any option derive the same seeds."""
    digest = hashlib.sha256(b"".join(bytes(a.data) for a in initial.values())).digest()
    return int.from_bytes(digest[:8], "little")


def random_positions(seed: int, n: int, k: int) -> np.ndarray:
    """The ``k`` positions of ``randk`` drawn from ``seed``: the coordinator sends one seed with
    each global model (:data:`SEED_KEY`), so every site starting from it (and the coordinator)
    uses the same positions."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=k, replace=False))


def per_array(idx: np.ndarray, segments: tuple[int, ...]) -> tuple[int, ...]:
    """How many of the sorted positions ``idx`` fall in each array (``segments``: the arrays' sizes)."""
    if not segments:
        return ()
    bounds = np.cumsum((0, *segments))
    return tuple(int(c) for c in np.diff(np.searchsorted(idx, bounds)) if c > 0)


def topk_positions(comp: Compression, u: np.ndarray, segments: tuple[int, ...]) -> np.ndarray:
    """``topk``'s positions: in every array (``segments``: the arrays' sizes, in order) the ``keep``
    share of its values largest in magnitude, at least one (layer-wise, as in Lin et al. 2018's
    deep gradient compression: a layer of small updates is never starved by one of large ones)."""
    out, start = [], 0
    for size in segments or (u.size,):
        part = np.abs(u[start:start + size])
        k = comp.kept(size)
        out.append(start + (np.argpartition(part, size - k)[size - k:] if k < size else np.arange(size)))
        start += size
    return np.sort(np.concatenate(out))


def topk_count(comp: Compression, n: int, segments: tuple[int, ...]) -> int:
    """How many values a sparse method sends of an update of ``n`` values (per array of ``segments``)."""
    return sum(comp.kept(size) for size in segments or (n,))
