"""Poisson sampling: each row drawn independently with probability ``q`` at every step (what the accountant assumes)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

#: Uniform draws per block of Poisson batches drawn at once (rows x steps <= this).
POISSON_BLOCK = 1 << 20


def poisson_batches(rows: int, rate: float, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of ``steps`` Poisson batches: row ``i`` is in a batch when its uniform draw
    is below ``rate``, independently for every row and step. The draws for a block of steps
    are made in one call when the block starts (one call per block instead of one per step:
    the per-call cost, not the draws, dominated a small model's step)."""
    block = max(1, POISSON_BLOCK // max(1, rows))
    done = 0
    while done < steps:
        k = min(block, steps - done)
        # positions in the flattened (steps x rows) draw: one 1-D scan (a 2-D np.nonzero costs 4x)
        flat = np.flatnonzero(torch.rand(k, rows, generator=generator).numpy() < rate)
        bounds = np.searchsorted(flat, np.arange(k + 1) * rows).tolist()
        for s in range(k):
            yield torch.from_numpy(flat[bounds[s] : bounds[s + 1]] - s * rows)
        done += k
