"""The aggregation axis: *how* a round's weighted sum reaches the coordinator.

An option (``aggregation=plain|secagg|paillier``) is one :class:`AggregationOption`, which
pairs, like Flower's DP wrappers with their client mods:

* a **coordinator half**: a Flower ``Strategy`` that wraps *any* strategy
  (:meth:`AggregationOption.server`). It turns the strategy's instructions into the
  option's messages and the sites' replies into an aggregate it hands back to the
  strategy (:func:`hand_over`, :mod:`core.handover`);
* a **site half** (:class:`SiteHalf`): what a site does with the global model it receives
  (decrypt) and with its update before it leaves (clip, quantise, mask, encrypt), plus the
  protocol messages it answers. The ClientApp calls it through this interface only.

Each option declares its :class:`Capabilities`; the config rules (which strategy settings
and privacy mechanisms it allows) are derived from them by the composition root, never
from option names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from core.handover import ProtectedAggregate
from core.records import RunRecord


@dataclass
class AggregationConfig:
    """Schema of the ``aggregation`` group (each option extends it)."""

    name: str = "plain"


@dataclass(frozen=True)
class Capabilities:
    """What the coordinator can do under an option; the config rules are derived from these."""

    #: the coordinator sees each site's update (robust rules, central DP need this)
    sees_individual_updates: bool
    #: the coordinator holds the global model in plaintext (server-side evaluation, norm bounds)
    holds_plaintext_model: bool
    #: the aggregate is weighted by each site's rows
    weights_by_rows: bool = True

    #: why a capability is missing, for error messages
    WHY_NOT: ClassVar[dict[str, str]] = {
        "sees_individual_updates": "the server cannot see single updates there",
        "holds_plaintext_model": "the server holds only ciphertexts there",
        "weights_by_rows": "the aggregate is not weighted by rows there",
    }

    def missing(self, needs: Iterable[str]) -> list[str]:
        names = {f.name for f in fields(self)}
        unknown = set(needs) - names
        if unknown:
            raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {sorted(names)}")
        return [n for n in needs if not getattr(self, n)]


@dataclass(frozen=True)
class SiteEnv:
    """What the ClientApp tells a site half about this site (built per message)."""

    index: int                 # the site's id in the federation
    name: str
    seed: int                  # the run seed
    rows: int                  # training rows (the site's weight)
    norm_bound: float          # L2 bound the site applies to its own update where the option asks (0 = none)
    drops: Callable[[int, str | None], bool]           # fault injection: drop at (round, stage)?
    dropped_reply: Callable[[Message, str | None], Message]  # the error reply of a site that drops
    attacker: bool = False     # fault injection: this site corrupts what it sends (faults.byzantine_fraction)


@dataclass
class LocalResult:
    """A site's training result for one round, as its site half receives it."""

    state: dict[str, torch.Tensor]       # the trained model's state dict
    stats: dict[str, float]              # training metrics (train_loss, local_steps, ...)
    records: dict[str, ConfigRecord]     # what every reply carries besides the update (site, privacy)
    server_round: int


class SiteHalf(ABC):
    """An option's site half. Stateless between messages: what must survive lives in ``context.state``."""

    #: fault-injection stage of the training message (``faults.drop_stage``); None = any stage
    train_stage: ClassVar[str | None] = None

    def global_state(self, msg: Message, context: Context, template: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        """The global model the message carries, as a state dict (plain: as sent)."""
        arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
        return arrays.to_torch_state_dict()

    @abstractmethod
    def reply(self, msg: Message, context: Context, result: LocalResult, env: SiteEnv) -> Message:
        """The training reply: the update in this option's form, plus ``result.records``."""

    def query(self, msg: Message, context: Context, env: SiteEnv) -> Message:
        """Answer one of the option's protocol messages (:attr:`AggregationOption.queries`); a
        message of another option is refused with a clear error reply."""
        from flwr.app import Error

        from core.replies import ReplyError

        return Message(Error(code=int(ReplyError.PROTOCOL_ERROR),
                             reason=f"{env.name}: {type(self).__name__} answers no {msg.metadata.message_type!r} "
                                    "message (the site's aggregation option differs from the coordinator's)"),
                       reply_to=msg)

    def after_evaluate(self, context: Context, model: torch.nn.Module) -> None:
        """Work to do after federated evaluation, ahead of the next training round."""


class AggregationOption(ABC):
    """One value of ``aggregation``: schema, capabilities, coordinator half, site half."""

    name: ClassVar[str]
    schema: ClassVar[type[AggregationConfig]]
    capabilities: ClassVar[Capabilities]
    #: what the coordinator sees of the training, in plain words (reports)
    sees: ClassVar[str]
    #: names of the ``train.<name>`` messages the site half answers (besides plain ``train``)
    train_names: ClassVar[tuple[str, ...]] = ()
    #: names of the ``query.<name>`` protocol messages the site half answers
    queries: ClassVar[tuple[str, ...]] = ()

    def validate(self, cfg: Any, num_sites: int) -> None:
        """Range checks of this option's keys (raise :class:`core.config.ConfigError`)."""

    def preflight(self, cfg: Any) -> None:
        """Checks before any Flower process starts (key files, extras); raise ValueError with the fix."""

    def node_config(self, cfg: Any) -> dict[str, str]:
        """What a deployed SuperNode's node config needs for this option (e.g. a key-pair path)."""
        return {}

    @abstractmethod
    def server(self, strategy: Strategy, cfg: Any, initial: ArrayRecord, record: RunRecord) -> Strategy:
        """The coordinator half wrapping ``strategy`` (``initial``: the public initial model)."""

    @abstractmethod
    def site(self, cfg: Any) -> SiteHalf:
        """The site half for ``cfg`` (this option's config section)."""


class StrategyWrapper(Strategy):
    """A Strategy that forwards everything to the one it wraps (subclasses override what they change)."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def observe(self, server_round: int, replies: list[Message]) -> None:
        """Show a round's raw replies to the wrapped strategy (site names, reply observers such as
        DP-SGD's ledger) before this layer aggregates them; a strategy without the hook is skipped."""
        observe = getattr(self.strategy, "observe", None)
        if callable(observe):
            observe(server_round, replies)

    def state_dict(self) -> dict[str, Any]:
        inner = getattr(self.strategy, "state_dict", None)
        return dict(inner()) if callable(inner) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        inner = getattr(self.strategy, "load_state_dict", None)
        if callable(inner):
            inner(state)


def hand_over(strategy: Strategy, server_round: int, replies: list[Message], aggregate: ProtectedAggregate,
              current: ArrayRecord | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Give a protected aggregate to the wrapped strategy.

    A fedsilo strategy takes it whole (``aggregate_protected``). Any other Flower strategy
    is handed the new global model as one reply weighted by the round's total weight, so its
    own ``aggregate_train`` (a weighted mean of one reply is that reply) and metric
    aggregation run unchanged; an encrypted sum is returned as it is.
    """
    protected = getattr(strategy, "aggregate_protected", None)
    if callable(protected):
        return protected(server_round, replies, aggregate)  # type: ignore[no-any-return]
    if aggregate.mean_update is None:
        return aggregate.arrays, aggregate.metrics
    from collections import OrderedDict

    from flwr.app import Array

    from core.layout import Layout

    assert current is not None
    base = {k: v.numpy() for k, v in current.items()}
    layout = Layout.of(base)
    new = layout.unflatten(layout.flatten(base) + aggregate.mean_update)
    content = RecordDict({"arrays": ArrayRecord(OrderedDict((k, Array(v)) for k, v in new.items())),
                          "metrics": aggregate.metrics})
    reply = Message(content, dst_node_id=0, message_type="train")
    return strategy.aggregate_train(server_round, [reply])
