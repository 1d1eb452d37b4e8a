"""The coordinator half: :class:`Decompress` turns compressed replies back into full models
(``global + update``) before the strategy screens and combines them, so robust rules, norm bounds and
central DP see ordinary models."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from typing_extensions import override

from aggregation.base import StrategyWrapper
from aggregation.compression.codec import decode, float_keys, segments
from aggregation.compression.policy import BASE_KEY, KEEP_BITS, META_KEY, METHODS, SEED_KEY, UPDATE_KEY, Compression
from aggregation.compression.sparse import positions_root
from core.layout import Layout
from core.replies import ReplyError
from core.seeding import seed_for


def decode_reply(msg: Message, glob: dict[str, np.ndarray], positions: int) -> dict[str, np.ndarray]:
    """The full model a compressed reply stands for: ``global + update`` (ValueError if malformed)."""
    meta = msg.content.config_records[META_KEY]
    comp = Compression(str(meta["method"]), float(meta["keep"]), int(meta["bits"]),  # type: ignore[arg-type]
                       bool(meta["ef"]))
    if comp.method not in METHODS[1:] or comp.keep_bits not in KEEP_BITS:
        raise ValueError(f"unknown compression {comp.method!r} at {comp.keep_bits} bits")
    rest = msg.content.array_records.get("arrays", ArrayRecord())
    keys = [k for k in float_keys(glob) if k not in rest]  # the float arrays not sent whole
    layout = Layout.of(OrderedDict((k, glob[k]) for k in keys))
    if int(meta["size"]) != layout.size:  # type: ignore[arg-type]
        raise ValueError(f"compressed update of {meta['size']!r} values, the global model has {layout.size}")
    parts = {k: bytes(a.data) for k, a in msg.content.array_records[UPDATE_KEY].items()}
    update = decode(comp, parts, layout.size, positions, segments(layout))
    if not np.all(np.isfinite(update)):
        raise ValueError("compressed update holds values that are not finite")
    base = layout.flatten({k: glob[k] for k in keys})
    out = OrderedDict(layout.unflatten(base + update))
    out.update({k: a.numpy() for k, a in rest.items()})
    return OrderedDict((k, out[k]) for k in glob if k in out) | out


class Decompress(StrategyWrapper):
    """Coordinator half: remembers the global models it sent (by a number in the train config,
    :data:`BASE_KEY`) and turns each compressed reply back into a full model before the wrapped
    strategy sees it. A reply that does not decode is turned into an error reply with the reason
    (the strategy logs and records it as any rejected reply); the round goes on."""

    MAX_BASES = 64

    def __init__(self, strategy: Strategy, initial: ArrayRecord) -> None:
        super().__init__(strategy)
        self.seed = positions_root(initial)
        self._bases: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._last: tuple[ArrayRecord, int] | None = None
        self._next = 0

    def _base(self, arrays: ArrayRecord) -> int:
        if self._last is not None and self._last[0] is arrays and self._last[1] in self._bases:
            return self._last[1]
        self._next += 1
        self._last = (arrays, self._next)
        self._bases[self._next] = {k: v.numpy() for k, v in arrays.items()}
        while len(self._bases) > self.MAX_BASES:
            self._bases.popitem(last=False)
        return self._next

    def positions_seed(self, base: int) -> int:
        """The ``randk`` positions' seed of the round whose global model is ``base`` (shared by sites and coordinator)."""
        return seed_for(self.seed, base, 0x5A4D)

    @override
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        msgs = list(self.strategy.configure_train(server_round, arrays, config, grid))
        for m in msgs:
            if "config" in m.content.config_records:
                # what the site received: the model plus any side values the strategy sends with it
                # (SCAFFOLD's control variate); the update is relative to all of it
                sent = m.content.array_records.get("arrays", arrays)
                base = self._base(sent)
                m.content.config_records["config"][BASE_KEY] = base
                m.content.config_records["config"][SEED_KEY] = self.positions_seed(base)
        return msgs

    def expand(self, replies: Iterable[Message]) -> list[Message]:
        """The replies with every compressed update turned back into a full model."""
        out = []
        for msg in replies:
            if msg.has_error() or META_KEY not in msg.content.config_records:
                out.append(msg)
                continue
            try:
                base = int(msg.content.config_records[META_KEY]["base"])  # type: ignore[arg-type]
                if base not in self._bases:
                    raise ValueError(f"compressed relative to global model #{base}, which the coordinator no longer has")
                model = decode_reply(msg, self._bases[base], self.positions_seed(base))
            except (KeyError, TypeError, ValueError) as err:
                # the reply becomes an error reply in place (same sender): screened and recorded as rejected
                msg.__dict__["_content"] = None
                msg.error = Error(code=int(ReplyError.MALFORMED), reason=f"compressed update rejected: {err}")
                out.append(msg)
                continue
            content = RecordDict({k: v for k, v in msg.content.items() if k not in (UPDATE_KEY, META_KEY, "arrays")})
            content["arrays"] = ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in model.items()))
            msg.content = content
            out.append(msg)
        return out

    @override
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, self.expand(replies))
