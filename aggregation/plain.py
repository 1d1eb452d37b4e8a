"""``aggregation=plain``: each site sends its trained model in the clear.

Coordinator half: none of its own; the strategy receives every reply, screens it and
combines (weighted mean, robust rules, norm bounds). Site half: the model's arrays and the
training metrics, weighted by the site's training rows.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from aggregation.base import (
    AggregationConfig,
    AggregationOption,
    Capabilities,
    LocalResult,
    SiteEnv,
    SiteHalf,
)
from core.records import RunRecord
from core.sites import WEIGHT_KEY


class PlainSite(SiteHalf):
    """Reply with the trained model and ``num-examples`` = the site's training rows."""

    def reply(self, msg: Message, context: Context, result: LocalResult, env: SiteEnv) -> Message:
        content = RecordDict({
            "arrays": ArrayRecord(result.state),  # type: ignore[arg-type]
            "metrics": MetricRecord({WEIGHT_KEY: env.rows, **result.stats}),
            **result.records,
        })
        return Message(content, reply_to=msg)


class Plain(AggregationOption):
    name = "plain"
    schema = AggregationConfig
    capabilities = Capabilities(sees_individual_updates=True, holds_plaintext_model=True)
    sees = "each sampled site's full model update, its number of training rows and its training loss"

    def server(self, strategy: Strategy, cfg: Any, initial: ArrayRecord, record: RunRecord) -> Strategy:
        return strategy

    def site(self, cfg: Any) -> SiteHalf:
        return PlainSite()
