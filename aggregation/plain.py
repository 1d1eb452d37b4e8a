"""``aggregation=plain``: each site sends its trained model in the clear.

Coordinator half: none of its own; the strategy receives every reply, screens it and
combines (weighted mean, robust rules, norm bounds). Site half: the model's arrays and the
training metrics, weighted by the site's training rows. With ``aggregation.compress`` the site
sends its compressed update instead, and :class:`~aggregation.compression.Decompress` turns it
back into a model before the strategy sees it (every method: :mod:`aggregation.compression`).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from typing_extensions import override

from aggregation.base import (
    AggregationConfig,
    AggregationOption,
    Capabilities,
    LocalResult,
    SiteEnv,
    SiteHalf,
)
from aggregation.compression import METHODS, Compression, Decompress, SiteCompressor
from core.records import RunRecord
from core.sites import WEIGHT_KEY


class PlainSite(SiteHalf):
    """Reply with the trained model and ``num-examples`` = the site's training rows."""

    def __init__(self, compression: Compression | None = None) -> None:
        self.compressor = SiteCompressor(compression) if compression is not None and compression.active else None

    @override
    def reply(self, msg: Message, context: Context, result: LocalResult, env: SiteEnv) -> Message:
        if self.compressor is None:
            update: dict = {"arrays": ArrayRecord(result.state)}  # type: ignore[arg-type]
        else:  # the update relative to the global model it started from, compressed (aggregation.compress)
            glob = {k: v.numpy() for k, v in msg.content["arrays"].items()}  # type: ignore[union-attr]
            local = {k: v.detach().cpu().numpy() for k, v in result.state.items()}
            update = self.compressor.records(glob, local, context, result.store, env.seed, env.index,
                                             result.server_round, msg.content["config"],  # type: ignore[arg-type]
                                             dense=result.buffers)
        content = RecordDict({
            **update,
            "metrics": MetricRecord({WEIGHT_KEY: env.rows, **result.stats}),
            **result.records,
        })
        return Message(content, reply_to=msg)


class Plain(AggregationOption):
    """``aggregation=plain``: each site's model in the clear; the coordinator combines them."""

    name = "plain"
    schema = AggregationConfig
    capabilities = Capabilities(sees_individual_updates=True, holds_plaintext_model=True)
    sees = "each sampled site's full model update, its number of training rows and its training loss"

    compressions = METHODS

    @override
    def server(self, strategy: Strategy, cfg: Any, initial: ArrayRecord, record: RunRecord) -> Strategy:
        return Decompress(strategy, initial) if Compression.of(cfg).active else strategy

    @override
    def site(self, cfg: Any) -> SiteHalf:
        return PlainSite(Compression.of(cfg))
