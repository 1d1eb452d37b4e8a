"""Who masks with whom: the SecAgg+ neighbour graph (Bell et al., CCS 2020).

In SecAgg every pair of sites agrees a mask and every site Shamir-shares its secrets with
every other: O(n^2) work per round. SecAgg+ replaces the complete graph by a sparse one
in which each site has ``k = O(log n)`` neighbours; masks and shares stay within a site's
neighbourhood, so a site's cost is O(k) and the server's O(n k). As in Flower's SecAgg+
workflow the graph is a ring over a fresh random permutation of the round's sites (each
site's neighbours are the ``k/2`` on either side), drawn by the server each round.
"""

from __future__ import annotations

import math
import secrets


def auto_neighbours(n: int) -> int:
    """Default neighbours per site: the complete graph up to 20 sites, then ``2*ceil(2*log2 n)``."""
    return n - 1 if n <= 20 else min(n - 1, 2 * math.ceil(2 * math.log2(n)))


def ring(ids: list[int], k: int) -> dict[int, frozenset[int]]:
    """Each id's neighbourhood (itself and ``k`` neighbours; all ids when ``k >= n - 1``)."""
    n = len(ids)
    if k >= n - 1:
        everyone = frozenset(ids)
        return {i: everyone for i in ids}
    order = list(ids)
    for pos in range(n - 1, 0, -1):  # Fisher-Yates with a CSPRNG
        swap = secrets.randbelow(pos + 1)
        order[pos], order[swap] = order[swap], order[pos]
    half = max(1, k // 2)
    return {order[p]: frozenset(order[(p + o) % n] for o in range(-half, half + 1)) for p in range(n)}
