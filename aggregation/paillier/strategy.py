"""The coordinator half of ``aggregation=paillier`` as a Flower Strategy wrapping any strategy.

:class:`PaillierStrategy` lets the wrapped strategy sample and configure as usual, giving it
the public initial model as the model's layout; from round 2 on it sends the encrypted
aggregate in the model's place. It checks every encrypted reply (same key, count, range),
multiplies the accepted ciphertexts (adds the plaintexts) and hands the *encrypted sum* to
the wrapped strategy as the next global record: the coordinator never holds a trained model.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from typing_extensions import override

from aggregation.base import StrategyWrapper, hand_over
from aggregation.paillier.server import EncryptedAggregator, is_encrypted, screen
from aggregation.paillier.split import SplitDecryption
from core.handover import ProtectedAggregate
from core.layout import Layout
from core.records import Rejection, RunRecord
from core.sites import site_label, site_order, stragglers


class PaillierStrategy(StrategyWrapper):
    """Paillier-encrypted aggregation of the training replies of ``strategy``.

    Parameters
    ----------
    strategy : Strategy
        Any Message-API strategy; it sees the public initial model's layout, never a ciphertext.
    aggregator : EncryptedAggregator
        Checks and adds ciphertexts under the sites' public key.
    template : ArrayRecord
        The public initial model (round 1 is sent in the clear; its layout sizes the ciphertexts).
    record : RunRecord
        The run's record: this half writes the training phase's replies, rejections and sites.
    split : SplitDecryption, optional
        ``aggregation.decryption=split``: before an encrypted aggregate goes out, the sites about
        to receive it each decrypt one slice and the messages carry the sealed slices instead
        (:mod:`aggregation.paillier.split`); None: every site decrypts the whole aggregate.
    """

    def __init__(self, strategy: Strategy, aggregator: EncryptedAggregator, template: ArrayRecord,
                 record: RunRecord, split: SplitDecryption | None = None) -> None:
        super().__init__(strategy)
        self.aggregator, self.template, self.record, self.split = aggregator, template, record, split
        aggregator.set_size(Layout.of({k: v.numpy() for k, v in template.items()}).size)

    def outgoing(self, server_round: int, arrays: ArrayRecord, nodes: list[int], grid: Grid) -> ArrayRecord:
        """The global record as ``nodes`` receive it: under ``decryption=split`` an encrypted
        aggregate goes out as sealed plaintext slices those sites decrypted (one exchange per
        aggregate, kept for its later messages); otherwise as it is."""
        if self.split is None or not nodes or not is_encrypted(arrays):
            return arrays
        opened, exchange = self.split.opened(arrays, nodes, grid, server_round)
        if exchange is not None:
            self.record.round(server_round).protocol["paillier_decryption"] = exchange
        return opened or arrays

    def _send(self, messages: Iterable[Message], arrays: ArrayRecord, grid: Grid, server_round: int
              ) -> list[Message]:
        out = list(messages)
        if is_encrypted(arrays) and out:
            content = self.outgoing(server_round, arrays, [m.metadata.dst_node_id for m in out], grid)
            for m in out:
                m.content["arrays"] = content
        return out

    @override
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        layout = self.template if is_encrypted(arrays) else arrays
        return self._send(self.strategy.configure_train(server_round, layout, config, grid), arrays, grid,
                          server_round)

    @override
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        layout = self.template if is_encrypted(arrays) else arrays
        return self._send(self.strategy.configure_evaluate(server_round, layout, config, grid), arrays, grid,
                          server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the encrypted replies, add the accepted ones, hand the sum on."""
        replies = list(replies)
        self.observe(server_round, replies)
        self.record.sites.learn(replies)
        replies = sorted(replies, key=site_order)
        label = getattr(self.strategy, "label", site_label)
        good, rejected, sites = screen(self.aggregator, server_round, replies, label)
        phase = self.record.round(server_round).phase("train")
        phase.replied, phase.sites, phase.stragglers = len(good), sites, stragglers(replies)
        phase.rejected = [Rejection(r["site"], r["reason"]) for r in rejected]
        if not good:
            log(WARNING, "round %s: no usable encrypted reply; the global model is unchanged", server_round)
            return None, None
        arrays, metrics = self.aggregator.aggregate(good)
        return hand_over(self.strategy, server_round, replies, ProtectedAggregate(metrics, arrays=arrays), None)
