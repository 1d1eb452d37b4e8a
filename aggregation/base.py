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

Every option also sums small vectors for the task, outside the training rounds, with the
same protection (:class:`SumCoordinator` and :meth:`SiteHalf.sum_reply`): the federated
preprocessing statistics and the pooled test metrics of ``task=tabular``
(:mod:`core.fixedpoint` makes every option's total the same, bit for bit).

Each option declares its :class:`Capabilities`; the config rules (which strategy settings
and privacy mechanisms it allows) are derived from them by the composition root, never
from option names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from typing_extensions import override

from core import fixedpoint
from core.handover import ProtectedAggregate
from core.identity import SiteIdentity
from core.records import RunRecord
from core.state import SiteStore

#: The ConfigRecord of a sum request: {"id": the sum's number in the run, "what": what to sum, "length": values}.
SUM_REQUEST = "fedsilo-sum"
#: The ArrayRecord of a plain sum reply: the site's fixed-point values as uint64 limbs.
SUM_REPLY = "fedsilo-sum-limbs"


@dataclass
class AggregationConfig:
    """Schema of the ``aggregation`` group (each option extends it)."""

    name: str = "plain"
    # Update compression (aggregation/compression/); each option takes the methods in its ``compressions``.
    compress: str = "none"        # none | fp16 | int8 | int4 | topk | randk
    keep: float = 0.01            # topk/randk: the share of the update's values that is sent
    keep_bits: int = 8            # topk/randk: bits per sent value: 8 (stochastic int8), 16 (fp16) or 32
    error_feedback: bool = True   # add what compression left out to the site's next update (site state)


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
        """The capabilities among ``needs`` this option lacks (ValueError for a name that is no capability)."""
        names = {f.name for f in fields(self)}
        unknown = set(needs) - names
        if unknown:
            raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {sorted(names)}")
        return [n for n in needs if not getattr(self, n)]


@dataclass(frozen=True)
class MaskingLimits:
    """What a site's policy bounds in every secure-aggregation round (``secure_aggregation.*``)."""

    min_neighbours: int = 2    # the fewest neighbours it masks with (itself not counted)
    colluders: int = 0         # sites of its neighbourhood that may work with the coordinator
    threshold: float = 0.5     # the least share of its neighbourhood its self-mask's threshold may be


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
    min_sites: int = 2         # the site's policy: the fewest distinct sites any sum it opens may combine
    masking: MaskingLimits = field(default_factory=lambda: MaskingLimits())  # the policy's secure_aggregation.*
    identity: Callable[[], SiteIdentity] = field(default=lambda: SiteIdentity.simulated("site"))  # name, key, roster
    state_dir: str | None = None  # a deployed site's state folder (None: simulation, state in context.state)


@dataclass
class LocalResult:
    """A site's training result for one round, as its site half receives it."""

    state: dict[str, torch.Tensor]       # the trained model's state dict
    stats: dict[str, float]              # training metrics (train_loss, local_steps, ...)
    records: dict[str, ConfigRecord]     # what every reply carries besides the update (site, privacy)
    server_round: int
    store: SiteStore | None = None       # the site's state folder for this job (error feedback's residual)
    buffers: frozenset[str] = frozenset()  # the state's non-trainable entries (BatchNorm's running statistics)
    start: dict[str, torch.Tensor] | None = None  # the global model this round started from (as the message carried it)


class SiteHalf(ABC):
    """An option's site half. Stateless between messages: what must survive lives in ``context.state``."""

    #: fault-injection stage of the training message (``faults.drop_stage``); None = any stage
    train_stage: ClassVar[str | None] = None

    def global_state(self, msg: Message, context: Context, template: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        """The global model the message carries, as a state dict (plain: as sent)."""
        arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
        return self.open_model(context, arrays, template)

    def open_model(self, context: Context, arrays: ArrayRecord, template: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
        """A global model as the coordinator holds it, as a state dict (Paillier: decrypted here)."""
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

    def sum_reply(self, msg: Message, context: Context, values: np.ndarray, env: SiteEnv) -> Message:
        """The site's share of a sum (:class:`SumCoordinator`); plain: its values, as limbs, in the clear."""
        enc = request_encoding(msg.content)
        limbs = enc.limbs(enc.encode(values))
        return Message(RecordDict({SUM_REPLY: ArrayRecord({"limbs": Array(limbs)})}), reply_to=msg)

    def open_total(self, context: Context, record: ConfigRecord, key: str) -> np.ndarray:
        """The totals a :class:`SumResult` sent to the sites under ``key`` (Paillier: decrypted here)."""
        return np.asarray(record[key], dtype=np.float64)


class RevealFailed(RuntimeError):
    """A total the coordinator may learn could not be revealed (each key holder refused, with its reason)."""


@dataclass
class SumResult:
    """The outcome of one protected sum."""

    sites: int                                    # how many sites' vectors the total holds
    values: np.ndarray | None                     # the totals, if the coordinator may know them
    sealed: list[bytes] | None = None             # the totals only the sites can open (Paillier)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (node, reason) of the sites left out
    length: int = 0                               # values in the total
    encoding: fixedpoint.Encoding = fixedpoint.STATS  # how the values were encoded (Paillier: to decrypt them)
    contributions: dict[str, Any] | None = None  # Paillier: each site's authenticated contribution, for a reveal

    def put(self, record: ConfigRecord, key: str) -> None:
        """Write the totals into ``record`` for the sites (:meth:`SiteHalf.open_total` reads them)."""
        if self.values is not None:
            record[key] = [float(v) for v in self.values]
        else:
            record[key + "-ct"] = list(self.sealed or [])
            record[key + "-n"] = self.length


class SumCoordinator(ABC):
    """The coordinator half of an option's sums: each site's vector in, the total out."""

    #: what the coordinator learns from a sum, in plain words (docs, reports)
    learns: ClassVar[str] = "every site's vector"

    def __init__(self, message_type: str, timeout: float) -> None:
        self.message_type, self.timeout = message_type, timeout

    @abstractmethod
    def collect(self, grid: Grid, nodes: list[int], content: RecordDict, length: int, sum_id: int) -> SumResult:
        """Send ``content`` (with its :data:`SUM_REQUEST`) to ``nodes``; sum the ``length`` values they return."""

    def reveal(self, grid: Grid, nodes: list[int], result: SumResult) -> np.ndarray:
        """The totals in the clear (the coordinator's own where it may know them; Paillier asks a key holder)."""
        assert result.values is not None
        return result.values

    def decide(self, grid: Grid, nodes: list[int], result: SumResult, content: RecordDict) -> np.ndarray:
        """A program's decision of a total the coordinator may not read (:attr:`core.programs.Ask.decide`),
        computed by a site that verifies the total; only an option that seals totals overrides it."""
        raise RevealFailed(f"{type(self).__name__} seals no total: the coordinator decides itself")

    def send(self, grid: Grid, nodes: list[int], content: RecordDict, message_type: str | None = None
             ) -> list[Message]:
        """Send ``content`` to each of ``nodes`` (as ``message_type``) and wait up to the timeout for their replies."""
        msgs = [Message(RecordDict(dict(content.items())), dst_node_id=n, message_type=message_type or self.message_type)
                for n in nodes]
        return list(grid.send_and_receive(msgs, timeout=self.timeout))


def request_encoding(content: RecordDict) -> fixedpoint.Encoding:
    """The fixed-point encoding a sum request asks for (:mod:`core.fixedpoint`)."""
    rec = content.config_records.get(SUM_REQUEST)
    return fixedpoint.Encoding.from_record(rec if rec is not None else {})


def screen_sum_replies(replies: list[Message], nodes: list[int], check: Callable[[Message], str | None]
                       ) -> tuple[dict[int, Message], list[tuple[int, str]]]:
    """The well-formed replies by node, and (node, reason) for every other node."""
    good: dict[int, Message] = {}
    rejected: list[tuple[int, str]] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if node not in nodes or node in good:
            rejected.append((node, "unexpected or duplicate reply"))
        elif msg.has_error():
            rejected.append((node, str(msg.error.reason)))
        else:
            reason = check(msg)
            if reason is None:
                good[node] = msg
            else:
                rejected.append((node, reason))
    answered = set(good) | {n for n, _ in rejected}
    rejected += [(n, "no reply in time") for n in nodes if n not in answered]
    return good, rejected


class PlainSum(SumCoordinator):
    """Each site's limbs in the clear; the coordinator adds them (it sees every site's vector)."""

    @override
    def collect(self, grid: Grid, nodes: list[int], content: RecordDict, length: int, sum_id: int) -> SumResult:
        enc = request_encoding(content)
        size = length * enc.limbs_per_value

        def check(msg: Message) -> str | None:
            rec = msg.content.array_records.get(SUM_REPLY)
            if rec is None or "limbs" not in rec:
                return f"reply has no {SUM_REPLY!r} record"
            y = rec["limbs"].numpy()
            if y.shape != (size,) or y.dtype != np.uint64 or (y.size and int(y.max()) >> fixedpoint.LIMB_BITS):
                return f"limbs of shape {y.shape} and dtype {y.dtype}, expected ({size},) uint64 below 2^20"
            return None

        good, rejected = screen_sum_replies(self.send(grid, nodes, content), nodes, check)
        if not good:
            return SumResult(0, None, None, rejected)
        total = np.asarray(np.sum([m.content.array_records[SUM_REPLY]["limbs"].numpy() for m in good.values()], axis=0,
                                  dtype=np.uint64))
        return SumResult(len(good), enc.decode(enc.join(total)), None, rejected, length)


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
    #: the message a site answers with its share of a sum (:meth:`SiteHalf.sum_reply`)
    sum_message: ClassVar[str] = "query.fedsilo_sum"
    #: ``aggregation.compress`` methods this option takes (:mod:`aggregation.compression`), and for
    #: every other method why not (error messages)
    compressions: ClassVar[tuple[str, ...]] = ("none",)
    compression_refusals: ClassVar[dict[str, str]] = {}

    def keeps_site_state(self, cfg: Any) -> bool:
        """Whether the site half keeps state across rounds in the site's state folder (error feedback's
        residual): the composition root then gives the run a job id."""
        return str(getattr(cfg, "compress", "none")) != "none" and bool(getattr(cfg, "error_feedback", True))

    def summer(self, cfg: Any, timeout: float) -> SumCoordinator:
        """The coordinator half of this option's sums (plain: the sites' vectors in the clear)."""
        return PlainSum(self.sum_message, timeout)

    def validate(self, cfg: Any, num_sites: int) -> None:
        """Range checks of this option's keys (raise :class:`core.config.ConfigError`)."""

    def preflight(self, cfg: Any) -> None:
        """Checks before any Flower process starts (key files, extras); raise ValueError with the fix."""

    def node_config(self, cfg: Any) -> dict[str, str]:
        """What a deployed SuperNode's node config needs for this option (e.g. a key-pair path)."""
        return {}

    def site_setup(self, cfg: Any, out_dir: Path, names: list[str]) -> dict[str, dict[str, str]]:
        """Per site, the node-config entries a local deployment (one operator playing every site) makes for
        this option under ``out_dir`` (e.g. identity keys and a roster); empty when it needs none."""
        return {}

    def simulation_setup(self, cfg: Any, out_dir: Path) -> tuple[list[str], str]:
        """A simulated run's missing pieces this option can make for itself (overrides to add, and
        what was made, in a sentence); a deployment never calls this."""
        return [], ""

    def site_check(self, cfg: Any, node_config: dict[str, Any]) -> list[str]:
        """Problems a site can find before it joins (``fedsilo site``): what this option needs in the
        site's node config, one line each with the fix; empty when the site is ready."""
        return []

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

    @override
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    @override
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    @override
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    @override
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    @override
    def summary(self) -> None:
        self.strategy.summary()

    def observe(self, server_round: int, replies: list[Message]) -> None:
        """Show a round's raw replies to the wrapped strategy (site names, reply observers such as
        DP-SGD's ledger) before this layer aggregates them; a strategy without the hook is skipped."""
        observe = getattr(self.strategy, "observe", None)
        if callable(observe):
            observe(server_round, replies)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped strategy's state for a checkpoint (empty if it keeps none)."""
        inner = getattr(self.strategy, "state_dict", None)
        return dict(inner()) if callable(inner) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the wrapped strategy's state from a checkpoint (if it keeps any)."""
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
