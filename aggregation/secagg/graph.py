"""Who masks with whom: the SecAgg+ neighbour graph (Bell et al., CCS 2020), computed by every site.

In SecAgg every pair of sites agrees a mask and every site Shamir-shares its secrets with every
other: O(n^2) work per round. SecAgg+ replaces the complete graph by a sparse one in which each
site has ``k = O(log n)`` neighbours; masks and shares stay within a site's neighbourhood, so a
site's cost is O(k) and the coordinator's O(n k). The graph here is a ring (each site's neighbours
are the ``k/2`` on either side) over the key epoch's sites in the order of ``SHA-256(seed | name)``,
the seed a hash of the run, the channel and the epoch: every site computes its own neighbours from
public values and the coordinator cannot choose them (what it can still choose, and its limit, is in
docs/secure-aggregation.md). It is fixed for the key epoch, because the pairs agree their secrets
once per epoch; a round's neighbourhood is a site's graph neighbours that take part in the round.
"""

from __future__ import annotations

import hashlib
import math


def auto_neighbours(n: int) -> int:
    """Default neighbours per site: the complete graph up to 20 sites, then ``2*ceil(2*log2 n)``."""
    return n - 1 if n <= 20 else min(n - 1, 2 * math.ceil(2 * math.log2(n)))


def graph_seed(run: int, channel: str, epoch: int) -> bytes:
    """The public seed of the neighbour graph of a run's channel in key epoch ``epoch``."""
    return hashlib.sha256(f"fedsilo-secagg-v2|graph|{run}|{channel}|{epoch}".encode()).digest()


def neighbourhood(seed: bytes, members: list[str], k: int) -> dict[str, frozenset[str]]:
    """Each member's graph neighbours (itself excluded): the complete graph when ``k >= n - 1``,
    otherwise a ring of ``k`` (``k/2`` either side) over the members in the order of
    ``SHA-256(seed | name)``: computed alike by every site and the coordinator from public values."""
    n = len(members)
    if k >= n - 1:
        everyone = frozenset(members)
        return {m: everyone - {m} for m in members}
    order = sorted(members, key=lambda m: hashlib.sha256(seed + b"|" + m.encode()).digest())
    half = max(1, k // 2)
    return {order[p]: frozenset(order[(p + o) % n] for o in range(-half, half + 1) if o) for p in range(n)}
