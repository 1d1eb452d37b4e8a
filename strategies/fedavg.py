"""FedAvg on Flower's Message API, hardened for cross-silo use.

A strategy decides *what* is aggregated and with which weights; *how* the replies reach the
coordinator (in the clear, masked, encrypted) is the aggregation option's, which wraps this
strategy (:mod:`aggregation`). Differences from ``flwr.serverapp.strategy.FedAvg``:

* every reply is validated on its own (:mod:`core.replies`); a malformed or failed reply is
  dropped with a logged reason and the round goes on;
* replies are aggregated in a fixed site order, so the same seed gives the same model;
* the combine step is a stack of layers (:mod:`strategies.combine`: weighted mean, robust
  rules, norm bounding);
* federated evaluation pools the sites' confusion counts into exact pooled metrics;
* every round is recorded in a typed :class:`~core.records.RunRecord` (who was sampled,
  who replied, who was rejected and why, who left or joined).

Public hooks for the layers around it (aggregation options, central DP, privacy ledgers):

``observe(rnd, replies)``           learn site names; run the reply observers (e.g. DP-SGD's ledger)
``screen_train(rnd, replies)``      the usable replies, in site order; rejections recorded
``combine_train(rnd, good)``        the combine step over screened replies
``finish_train(rnd, arrays, m)``    the strategy's own step after aggregation (FedNova rescales, SCAFFOLD
                                    updates its control variate, FedProx adapts ``mu``), then the
                                    server optimizer (:mod:`strategies.server_opt`)
``aggregate_protected(rnd, replies, aggregate)``  a protected option's aggregate (:mod:`core.handover`)
``exclude(node, reason)``           never send this node training work again
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from logging import INFO, WARNING
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from typing_extensions import override

from core.handover import ProtectedAggregate
from core.layout import Layout
from core.records import Arrival, Departure, PhaseRecord, Rejection, RunRecord
from core.replies import Reference, check_evaluate_reply, check_train_reply
from core.sites import WEIGHT_KEY, site_label, site_order, stragglers
from core.state import JOB_KEY
from strategies.combine import Aggregated, Combine, CombineContext, WeightedMean
from strategies.server_opt import ServerOptimizer
from tasks.metrics import SUMMARY_KEYS, pool_site_summaries

EVAL_KEYS = SUMMARY_KEYS["binary"]


def check_summary(msg: Message) -> str | None:
    """A federated-evaluation reply must carry every key of one label kind's summary (binary first)."""
    reasons = [check_evaluate_reply(msg, keys) for keys in SUMMARY_KEYS.values()]
    return None if any(r is None for r in reasons) else reasons[0]


def pooled_evaluate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Aggregate federated-evaluation replies: summed confusion counts, weighted loss/AUC."""
    summaries = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(s[weighted_by_key]) for s in summaries]  # type: ignore[arg-type]
    pooled = pool_site_summaries(summaries, weights)  # type: ignore[arg-type]
    return MetricRecord({k: float(v) for k, v in pooled.items() if np.isfinite(v)})


class ReplyObserver(Protocol):
    """Something that reads every training reply before aggregation (e.g. a privacy ledger)."""

    def observe(self, server_round: int, replies: list[Message], strategy: FedAvg) -> None:
        """Learn from a round's replies (e.g. a privacy ledger); ``strategy`` may exclude sites."""


#: The fewest sites a federated round goes on with when some never connected.
MIN_SITES = 2


class FedAvg(FlowerFedAvg):
    """Weighted federated averaging over ``num_sites`` sites.

    Parameters
    ----------
    num_sites : int
        Sites in the federation; the first round waits until all of them are connected.
    fraction_train, fraction_evaluate : float, default 1.0
        Share of sites sampled per round for training / federated evaluation.
    combine : Combine, optional
        The combine step (default: the row-weighted mean); see :mod:`strategies.combine`.
    record : RunRecord, optional
        Where the rounds are recorded (shared with the layers around the strategy).
    observers : list of ReplyObserver, optional
        Called with every round's training replies before aggregation.
    server_opt : ServerOptimizer, optional
        Turns each round's aggregate into the step taken (FedAdam, FedYogi, FedAdagrad, FedAvgM).
    job : str, optional
        The job id sent with every instruction (``fedsilo-job``) when the sites keep state of
        their own (:mod:`core.state`); kept in the checkpoint so a resumed run finds it.
    personalizes : bool
        The sites keep personal models (:mod:`strategies.personal`): after the last round the
        ServerApp asks each to score the final global model beside its own.
    """

    def __init__(self, num_sites: int, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 combine: Combine | None = None, record: RunRecord | None = None,
                 observers: list[ReplyObserver] | None = None, server_opt: ServerOptimizer | None = None,
                 job: str | None = None, personalizes: bool = False) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=num_sites,
            weighted_by_key=WEIGHT_KEY,
            evaluate_metrics_aggr_fn=pooled_evaluate_metrics,
        )
        self.num_sites = num_sites
        self.combine = combine or WeightedMean()
        self.record = record or RunRecord()
        self.observers: list[ReplyObserver] = list(observers or [])
        self.reference: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self.current: ArrayRecord | None = None  # the global model of the round being trained
        #: Nodes never sent training work again (node -> reason), e.g. their privacy budget is spent.
        self.excluded: dict[int, str] = {}
        self._connected: set[int] | None = None
        self._sent: list[Message] = []  # this round's training instructions (their ids are set when pushed)
        self.server_opt = server_opt
        self.job = job
        #: whether the sites keep personal models, scored beside the global one after the last round
        self.personalizes = personalizes
        #: buffered asynchronous rounds: puts each reply on the current model, weighted by its staleness
        self.rebase: Callable[[list[Message]], list[Message]] | None = None
        #: seconds the first round waits for every site; then it goes on with those connected (at least
        #: :data:`MIN_SITES`), or the run fails with the reason
        self.join_timeout = 600.0

    # ---- training ----------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample sites and send them the global model; remember its array layout."""
        if self.job is not None:
            config[JOB_KEY] = self.job
        self.reference = {k: (tuple(v.shape), np.dtype(v.numpy().dtype)) for k, v in arrays.items()}
        self.current = arrays
        self._wait_for_sites(server_round, grid)
        self._track_nodes(server_round, grid)
        messages = self._admit(server_round, super().configure_train(server_round, arrays, config, grid))
        # The first round waits for every site; later rounds go on with the sites still connected.
        self.min_available_nodes = self.min_train_nodes
        self.record.round(server_round).train = PhaseRecord(sampled=len(messages))
        self._sent = messages
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Aggregated:
        """Drop bad replies (logged), combine the rest in site order, then the strategy's own step."""
        replies = list(replies)
        self.observe(server_round, replies)
        if self.rebase is not None:  # buffered asynchronous rounds (strategies/buffered.py)
            replies = self.rebase(replies)
        good = self.screen_train(server_round, replies)
        if not good:
            log(WARNING, "round %s: no usable training reply; the global model is unchanged", server_round)
            return None, None
        return self.finish_train(server_round, *self.combine_train(server_round, good))

    def observe(self, server_round: int, replies: list[Message]) -> None:
        """Learn the sites' names from ``replies`` and show them to every reply observer."""
        self.record.sites.learn(replies)
        for observer in self.observers:
            observer.observe(server_round, replies, self)

    def screen_train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The usable training replies in site order; each rejection is logged and recorded."""
        ref: Reference = self.reference
        return self._screen(server_round, "train", replies, lambda m: check_train_reply(m, ref, server_round))

    def combine_train(self, server_round: int, good: list[Message]) -> Aggregated:
        """The combine step (:attr:`combine`) over screened replies."""
        return self.combine(good, self._combine_context(server_round))

    def finish_train(self, server_round: int, arrays: ArrayRecord | None,
                     metrics: MetricRecord | None) -> Aggregated:
        """The strategy's own step after the aggregate is known: the server optimizer's, if any.
        Subclasses transform the aggregate first, then call this."""
        if self.server_opt is not None and arrays is not None and self.current is not None:
            arrays = self.server_opt.step(self.current, arrays)
        return arrays, metrics

    def aggregate_protected(self, server_round: int, replies: list[Message],
                            aggregate: ProtectedAggregate) -> Aggregated:
        """A protected option's aggregate: a mean update is bounded by the combine step and
        added to the global model; an encrypted sum is passed on as it is. The option's
        coordinator half has already called :meth:`observe` with the round's replies."""
        arrays = aggregate.arrays
        if aggregate.mean_update is not None:
            assert self.current is not None
            base = {k: v.numpy() for k, v in self.current.items()}
            layout = Layout.of(base)
            step = self.combine.bound_mean_update(aggregate.mean_update, self._combine_context(server_round))
            new = layout.unflatten(layout.flatten(base) + step)
            arrays = ArrayRecord(OrderedDict((k, Array(v)) for k, v in new.items()))
        return self.finish_train(server_round, arrays, aggregate.metrics)

    def weighted_mean(self, replies: list[Message]) -> Aggregated:
        """Flower's row-weighted mean of ``replies`` and their weighted metrics."""
        return super().aggregate_train(0, replies)

    def _combine_context(self, server_round: int) -> CombineContext:
        return CombineContext(
            server_round, self.current, self.weighted_mean,
            lambda good: self.train_metrics_aggr_fn([m.content for m in good], self.weighted_by_key),
            self.record.round(server_round).phase("train"))

    @property
    def participation(self) -> dict[int, dict[str, Any]]:
        """The rounds as ``results.json`` stores them (``history[].participation``); read-only view."""
        return self.record.to_dict()

    # ---- sites joining, leaving, excluded ----------------------------------------------
    def exclude(self, node: int, reason: str) -> None:
        """Send ``node`` no training work from now on (it is still evaluated)."""
        self.excluded[node] = reason

    def _admit(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        keep = [m for m in messages if m.metadata.dst_node_id not in self.excluded]
        if len(keep) < len(messages):
            self.record.round(server_round).budget_exhausted = len(messages) - len(keep)
            log(INFO, "round %s: %s sampled site(s) have spent their privacy budget and are skipped",
                server_round, len(messages) - len(keep))
        if messages and not keep:
            log(WARNING, "round %s: every sampled site has spent its privacy budget; no training this round "
                "(the global model stays as it is)", server_round)
        return keep

    def _wait_for_sites(self, server_round: int, grid: Grid) -> None:
        """The first round waits for every site, at most :attr:`join_timeout` seconds; then it goes on with
        the sites connected if they are at least :data:`MIN_SITES` (a site lost before round 1 does not stall
        the run), else the run fails, naming how many came (Flower's own sampling would wait for ever)."""
        if self.min_available_nodes <= self.min_train_nodes:
            return
        t0 = time.monotonic()
        while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() - t0 > self.join_timeout:
                if len(nodes) < MIN_SITES:
                    raise RuntimeError(f"round {server_round}: {len(nodes)} of {self.num_sites} sites connected within "
                                       f"{self.join_timeout:g} s (strategy.round_timeout); a federated round needs at "
                                       f"least {MIN_SITES}")
                log(WARNING, "round %s: %s of %s sites connected within %g s (strategy.round_timeout); going on "
                    "with them", server_round, len(nodes), self.num_sites, self.join_timeout)
                self.min_available_nodes = len(nodes)
                return
            time.sleep(0.5)

    def _track_nodes(self, server_round: int, grid: Grid) -> None:
        """Log (and record) the sites that left or joined since the last round."""
        now = set(grid.get_node_ids())
        if self._connected is not None:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            rec = self.record.round(server_round)
            for node in sorted(self._connected - now):
                site = self.record.sites.names.get(node, f"node {node}")  # the name alone: the node is recorded too
                log(WARNING, "round %s: site %s (node %s) left the federation (not connected at %s); "
                    "continuing with %s site(s)", server_round, site, node, stamp, len(now))
                rec.left.append(Departure(site, node, stamp))
            for node in sorted(now - self._connected):
                log(INFO, "round %s: node %s joined the federation", server_round, node)
                rec.joined.append(Arrival(node, stamp))
        self._connected = now

    def label(self, msg: Message) -> str:
        """The reply's site label, naming the site of an error reply too when an earlier reply told us.

        An error the SuperLink generated for an unreachable node comes from the SuperLink
        (node 1); the instruction it answers names the node."""
        if not msg.has_error():
            return site_label(msg)
        node = msg.metadata.src_node_id
        if node == SUPERLINK_NODE_ID:
            node = next((m.metadata.dst_node_id for m in self._sent
                         if m.metadata.message_id == msg.metadata.reply_to_message_id), node)
        return self.record.sites.label(node)

    # ---- federated evaluation -------------------------------------------------------
    @override
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.record.round(server_round).evaluate = PhaseRecord(sampled=len(messages))
        return messages

    @override
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = self._screen(server_round, "evaluate", replies, check_summary)
        return super().aggregate_evaluate(server_round, good) if good else None

    # ---- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this strategy (JSON-serialisable)."""
        return {
            "participation": {str(r): e for r, e in self.record.to_dict().items()},
            "node_names": {str(n): name for n, name in self.record.sites.names.items()},
            "reference": {k: [list(shape), str(dtype)] for k, (shape, dtype) in self.reference.items()},
            "server_opt": None if self.server_opt is None else self.server_opt.state_dict(),
            "job": self.job,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (resume). Excluded nodes are not restored: node
        ids change between runs, and a site whose budget is spent refuses again by itself."""
        self.record.load(state["participation"], state["node_names"])
        self.reference = {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in state["reference"].items()}
        self.min_available_nodes = self.min_train_nodes  # as after round 1: go on with the connected sites
        if self.server_opt is not None and state.get("server_opt") is not None:
            self.server_opt.load_state_dict(state["server_opt"])
        if self.job is not None and state.get("job"):
            self.job = str(state["job"])  # the sites' state of the first run is filed under it

    # ---- helpers ---------------------------------------------------------------------
    def _screen(self, server_round: int, phase: str, replies: Iterable[Message], check: Any) -> list[Message]:
        good: list[Message] = []
        rejected: list[Rejection] = []
        for msg in replies:
            reason = check(msg)
            if reason is None:
                good.append(msg)
            else:
                label = self.label(msg)
                rejected.append(Rejection(label, reason))
                log(WARNING, "round %s %s: rejected reply from %s: %s", server_round, phase, label, reason)
        good.sort(key=site_order)
        self.record.round(server_round).phase(phase).screened([site_label(m) for m in good], rejected,
                                                               stragglers(good))
        log(INFO, "round %s %s: %s usable replies, %s rejected", server_round, phase, len(good), len(rejected))
        return good
