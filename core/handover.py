"""What an aggregation option's coordinator half hands to the strategy it wraps.

Plain aggregation gives the strategy every reply (``Strategy.aggregate_train``). A protected
option (secure aggregation, Paillier) receives the replies itself, runs its protocol and
hands over a :class:`ProtectedAggregate`: either the unmasked *mean update* (the coordinator
holds a plaintext model and the strategy decides the step) or an *encrypted sum* (the
coordinator holds no plaintext model and passes it on). A fedsilo strategy takes it through
``aggregate_protected(server_round, replies, aggregate)``; any other Flower strategy is
handed the aggregate as one reply (:func:`aggregation.base.hand_over`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, MetricRecord


@dataclass(frozen=True)
class ProtectedAggregate:
    """A round's aggregate as a protected option's coordinator half learned it.

    Exactly one of ``mean_update`` (the row-weighted mean of the sites' updates, flattened in
    the global model's layout) and ``arrays`` (an encrypted sum, the next global record) is set.
    ``metrics`` are the round's aggregated training metrics (``num-examples`` = total weight).
    """

    metrics: MetricRecord
    mean_update: np.ndarray | None = None
    arrays: ArrayRecord | None = None

    def __post_init__(self) -> None:
        if (self.mean_update is None) == (self.arrays is None):
            raise ValueError("a ProtectedAggregate holds either a mean update or an encrypted sum")
