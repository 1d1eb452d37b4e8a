"""L2 norm bounding of a flat update vector (used by norm-bound layers on both halves)."""

from __future__ import annotations

import numpy as np


def bound_norm(update: np.ndarray, bound: float) -> tuple[np.ndarray, bool]:
    """``update`` scaled down to L2 norm ``bound`` if it is longer; (result, whether it was)."""
    norm = float(np.linalg.norm(update))
    if bound <= 0 or norm <= bound:
        return update, False
    return update * (bound / norm), True
