"""The site half of ``aggregation=secagg``: the protocol stages and the masked training reply.

The stage functions themselves (state in ``context.state``, checks against replay and
out-of-order messages) are in :mod:`aggregation.secagg.client`; this class adapts them to
the ClientApp's :class:`~aggregation.base.SiteHalf` interface and applies fault injection
(``faults.drop_stage``) at each stage.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from typing_extensions import override

from aggregation.base import LocalResult, SiteEnv, SiteHalf, request_encoding
from aggregation.compression import SEED_KEY, Compression, SiteCompressor
from aggregation.secagg import client
from aggregation.secagg.vector import WeightedUpdateCodec
from core import recordview
from core.clipping import bound_norm
from core.layout import Layout
from core.seeding import seed_for

#: query message type -> protocol stage
STAGE_OF = {"query.secagg_keys": "keys", "query.secagg_unmask": "unmask"}


class SecAggSite(SiteHalf):
    """Masks the site's weighted update ``n_k * (w_local - w_global)`` (:mod:`aggregation.secagg.vector`);
    its row count and update never leave the site in the clear."""

    train_stage = "masked_input"

    def __init__(self, compression: Compression | None = None) -> None:
        self.compressor = SiteCompressor(compression) if compression is not None and compression.active else None

    @override
    def reply(self, msg: Message, context: Context, result: LocalResult, env: SiteEnv) -> Message:
        glob: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
        start = result.start
        if start is not None and all(k in start for k in glob):  # already read from the message: not again
            base = {k: start[k].detach().cpu().numpy() for k in glob}
        else:
            base = {k: v.numpy() for k, v in glob.items()}
        layout = Layout.of(base)
        local = {k: v.detach().cpu().numpy() for k, v in result.state.items()}
        update = layout.flatten(local) - layout.flatten(base)
        if env.norm_bound > 0:  # honest sites bound their own updates (strategy.norm_bound)
            update, _ = bound_norm(update, env.norm_bound)
        if self.compressor is not None:  # randk: only the round's shared positions are masked and sent
            config = msg.content["config"]
            update = self.compressor.select(update, context, result.store, result.server_round,
                                            int(config[SEED_KEY]))  # type: ignore[index,call-overload]
        rng = np.random.default_rng(seed_for(env.seed, result.server_round, env.index, 0x5EC))

        def encode(codec: WeightedUpdateCodec) -> np.ndarray:
            return codec.encode(update, env.rows, float(result.stats["train_loss"]), rng)

        extra = RecordDict(dict(result.records))
        try:
            return client.masked_input(msg, context, env, encode, extra)
        except (client.Refused, KeyError, TypeError, ValueError) as err:
            return client.refuse(msg, err)

    def sum_reply(self, msg: Message, context: Context, values: np.ndarray, env: SiteEnv) -> Message:
        """The masked limbs of this site's values (:mod:`aggregation.secagg.sums`); never in the clear."""
        enc = request_encoding(msg.content)
        limbs = enc.limbs(enc.encode(values))
        try:
            return client.masked_input(msg, context, env, lambda codec: limbs, RecordDict())
        except (client.Refused, KeyError, TypeError, ValueError) as err:
            return client.refuse(msg, err)

    def query(self, msg: Message, context: Context, env: SiteEnv) -> Message:
        """A key epoch (``keys``) or a round's unmasking (``unmask``)."""
        stage = STAGE_OF.get(msg.metadata.message_type)
        if stage is None:
            return super().query(msg, context, env)
        wire = recordview.config(msg.content, client.WIRE_KEY)
        server_round = int(wire["round"]) if wire is not None and "round" in wire else 0  # type: ignore[call-overload]
        if env.drops(server_round, stage):
            return env.dropped_reply(msg, stage)
        try:
            if stage == "keys":
                return client.advertise_keys(msg, context, env)
            return client.unmask(msg, context, env)
        except client.Refused as err:
            return client.refuse(msg, err)
        except (KeyError, TypeError, ValueError) as err:  # a field missing or of the wrong type
            return client.refuse(msg, client.Refused(f"malformed {stage!r} stage message ({err!r})"))
