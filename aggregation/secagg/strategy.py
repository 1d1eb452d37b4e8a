"""The coordinator half of ``aggregation=secagg`` as a Flower Strategy wrapping any strategy.

:class:`SecAggStrategy` takes the wrapped strategy's training instructions and runs the
protocol around them (:class:`~aggregation.secagg.server.SecureAggregator`: key
advertisement and sharing, ``train.secagg`` messages, unmasking); what the coordinator
learns is the sum of the survivors' weighted updates, their total weight and mean loss. It
hands the *mean update* to the wrapped strategy (:func:`aggregation.base.hand_over`): a
fedsilo strategy applies its combine step's norm bound and its own step to it. A round
that cannot finish securely (fewer than the threshold of sites at any stage) is aborted
and the global model stays as it was. Federated evaluation passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from aggregation.base import StrategyWrapper, hand_over
from aggregation.compression import SEED_KEY, Compression, positions_root, random_positions
from aggregation.secagg.protocol import SecAggAbort
from aggregation.secagg.server import SecureAggregator
from core.handover import ProtectedAggregate
from core.layout import Layout
from core.records import Rejection, RunRecord
from core.seeding import seed_for
from core.sites import WEIGHT_KEY, stragglers

#: Where each round's protocol log goes in the run record (``history[].participation.secagg``).
LOG_KEY = "secagg"


class SecAggStrategy(StrategyWrapper):
    """Secure aggregation of the training replies of ``strategy``.

    Parameters
    ----------
    strategy : Strategy
        Any Message-API strategy; fedsilo's take the mean update through ``aggregate_protected``.
    protocol : SecureAggregator
        The protocol driver (clip, value bits, threshold, neighbours, stage timeout).
    record : RunRecord
        The run's record: this half writes each round's ``secagg`` log and the training
        phase's replies, rejections and stragglers.
    """

    def __init__(self, strategy: Strategy, protocol: SecureAggregator, record: RunRecord,
                 compression: Compression | None = None, initial: ArrayRecord | None = None) -> None:
        super().__init__(strategy)
        self.protocol, self.record = protocol, record
        self.compression = compression or Compression()
        self._current: ArrayRecord | None = None
        self._positions: np.ndarray | None = None
        self._size = 0
        self._seed = positions_root(initial or ArrayRecord())  # randk's positions

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        """The wrapped strategy's instructions, turned into ``train.secagg`` messages (after the key stages)."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        # What the sites received: the model, plus any side values the strategy sends with it
        # (SCAFFOLD's control variate, FedNova's normalizer), summed inside the same masked vector.
        self._current = messages[0].content["arrays"] if messages else arrays  # type: ignore[assignment]
        size = Layout.of({k: v.numpy() for k, v in self._current.items()}).size  # type: ignore[union-attr]
        self._positions = None
        if self.compression.method == "randk":  # every site masks the same positions: the masks still cancel
            seed = seed_for(self._seed, server_round, 0x5A4D)
            self._positions = random_positions(seed, size, self.compression.kept(size))
            self._size = size
            for m in messages:
                m.content.config_records["config"][SEED_KEY] = seed
            size = self._positions.size
        try:
            return list(self.protocol.open(server_round, messages, grid, size))
        except SecAggAbort as err:
            self._abort(server_round, err)
            return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the survivors' sum and hand the mean update to the wrapped strategy."""
        replies = list(replies)
        self.observe(server_round, replies)
        rec = self.record.round(server_round)
        if self._current is None or "aborted" in rec.protocol.get(LOG_KEY, {}):
            return None, None
        self.record.sites.learn(replies)
        late = stragglers(replies)
        try:
            agg = self.protocol.close(replies)
        except SecAggAbort as err:
            self._abort(server_round, err)
            return None, None
        log_ = rec.protocol[LOG_KEY] = self.protocol.log[server_round]
        phase = rec.phase("train")
        phase.replied, phase.stragglers, phase.rejected = log_.get("survivors", 0), late, self._rejections(log_)
        metrics = MetricRecord({WEIGHT_KEY: agg.total_weight, "train_loss": agg.mean_loss,
                                "clipped_values": agg.clipped})
        mean = agg.mean_update
        if self._positions is not None:  # randk: the mean of the shared positions, zero elsewhere
            mean = np.zeros(self._size)
            mean[self._positions] = agg.mean_update
        return hand_over(self.strategy, server_round, replies, ProtectedAggregate(metrics, mean_update=mean),
                         self._current)

    def _rejections(self, log_: dict) -> list[Rejection]:  # type: ignore[type-arg]
        """A secure round's dropped sites, named once a reply has told us their names."""
        return [Rejection(self.record.sites.label(r["node"]), f"{r['stage']}: {r['reason']}")
                for r in log_.get("rejected", [])]

    def _abort(self, server_round: int, err: Exception) -> None:
        rec = self.record.round(server_round)
        log_ = rec.protocol[LOG_KEY] = self.protocol.log.setdefault(server_round, {"rejected": [], "stages": {}})
        log_["aborted"] = str(err)
        phase = rec.phase("train")
        phase.replied, phase.rejected = 0, self._rejections(log_)
        log(WARNING, "round %s: secure aggregation aborted (%s); the global model is unchanged", server_round, err)
