"""Buffered asynchronous rounds (FedBuff; Nguyen et al., AISTATS 2022): no waiting for the slowest site.

``strategy.buffer=K`` (K >= 1) replaces synchronous rounds. The coordinator keeps
``strategy.concurrency`` sites training at once (0 = every site), each from the global model
current when it was sent work. Replies are taken as they arrive (Flower's ``Grid.push_messages``
and ``pull_messages``); a site that replies is sent new work at once. When ``K`` usable updates
are buffered the global model moves, and that is one round (``num_rounds`` counts these model
versions). An update that started ``tau`` versions ago is *stale*; it counts with weight
``(1 + tau) ** -strategy.staleness_exponent`` (FedBuff's ``1/sqrt(1 + tau)`` by default) and is
discarded beyond ``strategy.max_staleness`` (0 = never):

    new = current + sum_i n_i * s(tau_i) * (w_i - start_i) / sum_i n_i

(``n_i`` the site's rows, ``w_i`` its trained model, ``start_i`` the model it started from). The
strategy's own aggregation does this: each reply is re-based on the current model,
``current + s(tau_i) * (w_i - start_i)``, before the strategy screens and combines it, so robust
rules, norm bounds, FedProx's term and the server optimizers apply unchanged.

Every dispatch has its own round number at the site, ``(version + 1) * DISPATCH + j`` (the
``j``-th dispatch from that version): seeds, the DP-SGD ledger and the error-feedback residual
are per dispatch. The numbers follow from the model version alone, so a coordinator resumed from
a checkpoint sends the same numbers with the same model: a site that already trained one replays
it (the DP-SGD ledger does not charge it twice).

The arrival order depends on the sites' speed, so asynchronous runs are *not* bit-for-bit
reproducible (each round's record keeps who was buffered and how stale); synchronous rounds
remain so. Needs a coordinator that sees individual updates (``aggregation=plain``): a masked
or encrypted sum exists only for one cohort starting from one model.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from core.records import PhaseRecord
from core.sites import SITE_KEY
from strategies.fedavg import FedAvg
from strategies.loop import AfterRound, EvaluateFn, score

#: dispatch round numbers: ``(version + 1) * DISPATCH + j``; keeps them apart from model versions
DISPATCH = 10_000
POLL = 0.01
LOG_KEY = "buffered"


@dataclass
class Outstanding:
    """Work sent and not yet answered."""

    node: int
    version: int
    dispatch: int
    sent_at: float


class BufferedRounds:
    """The FedBuff driver: what :func:`strategies.loop.run_rounds` is for synchronous rounds.

    Parameters
    ----------
    strategy : the outermost strategy (any compression layer around the fedsilo strategy).
    inner : the fedsilo strategy itself (its record, its ``current`` model, its re-basing hook).
    buffer, concurrency, exponent, max_staleness : ``strategy.buffer``, ``concurrency``,
        ``staleness_exponent``, ``max_staleness``.
    """

    def __init__(self, strategy: Strategy, inner: FedAvg, buffer: int, concurrency: int, exponent: float,
                 max_staleness: int) -> None:
        self.strategy, self.inner = strategy, inner
        self.buffer, self.concurrency = buffer, concurrency
        self.exponent, self.max_staleness = exponent, max_staleness

    def weight(self, staleness: int) -> float:
        """FedBuff's staleness weight ``(1 + tau) ** -exponent``."""
        return float((1.0 + staleness) ** -self.exponent)

    def run(self, grid: Grid, arrays: ArrayRecord, num_rounds: int, timeout: float, first_round: int = 1,
            result: Result | None = None, train_config: ConfigRecord | None = None,
            evaluate_fn: EvaluateFn | None = None, after_round: AfterRound | None = None) -> Result:
        """Run model versions ``first_round..num_rounds`` (same contract as ``run_rounds``)."""
        train_config = ConfigRecord() if train_config is None else train_config
        result = Result() if result is None else result
        if first_round == 1:  # the initial model is version 0
            score(0, arrays, result, evaluate_fn)
        version = first_round - 1
        models: dict[int, ArrayRecord] = {version: arrays}
        counts: dict[int, int] = {}
        outstanding: dict[str, Outstanding] = {}
        buffered: list[tuple[Message, Outstanding]] = []
        t_start = last = time.monotonic()
        while version < num_rounds:
            self._dispatch(grid, version, models[version], train_config, outstanding, counts)
            if not outstanding:
                log(WARNING, "buffered rounds: no site can be sent work (all excluded); stopping at version %s",
                    version)
                break
            replies = list(grid.pull_messages(list(outstanding)))
            if not replies:
                if time.monotonic() - last > timeout:
                    log(WARNING, "buffered rounds: no reply for %.0f s (strategy.round_timeout); %s site(s) "
                        "written off", timeout, len(outstanding))
                    outstanding.clear()
                    last = time.monotonic()
                time.sleep(POLL)
                continue
            last = time.monotonic()
            for msg in replies:
                out = outstanding.pop(msg.metadata.reply_to_message_id, None)
                if out is not None:
                    buffered.append((msg, out))
            while version < num_rounds and sum(not m.has_error() for m, _ in buffered) >= self.buffer:
                # exactly ``buffer`` usable replies (and the error replies among them), in arrival order
                usable, cut = 0, 0
                while usable < self.buffer:
                    usable += not buffered[cut][0].has_error()
                    cut += 1
                batch, buffered = buffered[:cut], buffered[cut:]
                version += 1
                arrays, metrics = self._flush(version, models, batch)
                models[version] = result.arrays = arrays
                if metrics is not None:
                    result.train_metrics_clientapp[version] = metrics
                in_use = {o.version for o in outstanding.values()} | {o.version for _, o in buffered} | {version}
                for old in [v for v in models if v not in in_use]:
                    del models[old]
                score(version, arrays, result, evaluate_fn, after_round)
        log(INFO, "Buffered rounds %s..%s finished in %.2fs", first_round, num_rounds, time.monotonic() - t_start)
        return result

    # ---- one dispatch, one flush --------------------------------------------------------
    def _dispatch(self, grid: Grid, version: int, arrays: ArrayRecord, config: ConfigRecord,
                  outstanding: dict[str, Outstanding], counts: dict[int, int]) -> None:
        """Send work from model ``version`` to idle sites, up to ``concurrency`` busy ones."""
        busy = {o.node for o in outstanding.values()}
        limit = self.concurrency or self.inner.num_sites
        if len(busy) >= limit:
            return
        j = counts.get(version, 0)
        dispatch = (version + 1) * DISPATCH + j
        if j >= DISPATCH:
            raise RuntimeError(f"more than {DISPATCH} dispatches from model version {version}")
        messages = list(self.strategy.configure_train(dispatch, arrays, ConfigRecord(dict(config.items())), grid))
        self.inner.record.rounds.pop(dispatch, None)  # the version's round record is written at the flush
        idle = sorted((m for m in messages if m.metadata.dst_node_id not in busy), key=lambda m: m.metadata.dst_node_id)
        # idle sites take turns: the one that has waited longest since its last dispatch first
        chosen = idle[: limit - len(busy)]
        if not chosen:
            return
        for k, m in enumerate(chosen):  # each its own dispatch number (seeds, ledgers), in its own config
            config_k = ConfigRecord(dict(m.content.config_records["config"].items()))
            config_k["server-round"] = dispatch + k
            m.content = RecordDict({**{key: rec for key, rec in m.content.items() if key != "config"},
                                    "config": config_k})
        ids = list(grid.push_messages(chosen))
        now = time.monotonic()
        for k, (mid, m) in enumerate(zip(ids, chosen, strict=True)):
            outstanding[mid] = Outstanding(m.metadata.dst_node_id, version, dispatch + k, now)
        counts[version] = j + len(chosen)

    def _flush(self, version: int, models: dict[int, ArrayRecord], buffered: list[tuple[Message, Outstanding]]
               ) -> tuple[ArrayRecord, MetricRecord | None]:
        """Apply the buffer: re-base every update on the current model, then the strategy's aggregation."""
        current = models[version - 1]
        staleness = [version - 1 - o.version for _, o in buffered]
        kept: list[tuple[Message, Outstanding, int]] = []
        for (msg, out), tau in zip(buffered, staleness, strict=True):
            if self.max_staleness and tau > self.max_staleness and not msg.has_error():
                log(INFO, "version %s: a reply %s versions old is discarded (strategy.max_staleness=%s)",
                    version, tau, self.max_staleness)
                continue
            kept.append((msg, out, tau))
        rec = self.inner.record.round(version)
        rec.train = PhaseRecord(sampled=len(kept))
        rec.protocol[LOG_KEY] = {"staleness": [t for _, _, t in kept],
                                 "weights": [round(self.weight(t), 6) for _, _, t in kept],
                                 "dispatches": [o.dispatch for _, o, _ in kept],
                                 "site_rounds": [_site_round(m) for m, _, _ in kept]}
        starts = {o.version: models[o.version] for _, o, _ in kept}

        def rebase(replies: list[Message]) -> list[Message]:
            by_id = {id(m): (o, tau) for m, o, tau in kept}
            out = []
            for msg in replies:
                if msg.has_error() or id(msg) not in by_id:
                    out.append(msg)
                    continue
                o, tau = by_id[id(msg)]
                out.append(_rebased(msg, starts[o.version], current, self.weight(tau), version))
            return out

        self.inner.current = current
        self.inner.rebase = rebase
        try:
            new, metrics = self.strategy.aggregate_train(version, [m for m, _, _ in kept])
        finally:
            self.inner.rebase = None
        return (new if new is not None else current), metrics


def _rebased(msg: Message, start: ArrayRecord, current: ArrayRecord, weight: float, version: int) -> Message:
    """``msg`` with its model ``current + weight * (model - start)`` and its round set to ``version``."""
    arrays = msg.content.array_records.get("arrays")
    if arrays is not None:
        new: OrderedDict[str, Any] = OrderedDict()
        for k, a in arrays.items():
            w = a.numpy()
            if k in start and k in current and np.issubdtype(w.dtype, np.floating) \
                    and start[k].numpy().shape == w.shape == current[k].numpy().shape:
                s, c = start[k].numpy().astype(np.float64), current[k].numpy().astype(np.float64)
                w = (c + weight * (w.astype(np.float64) - s)).astype(a.numpy().dtype)
            new[k] = Array(np.ascontiguousarray(w))
        msg.content["arrays"] = ArrayRecord(new)
    site = msg.content.config_records.get(SITE_KEY)
    if site is not None and "round" in site:
        site["dispatch"] = int(site["round"])  # type: ignore[arg-type]
        site["round"] = version
    return msg


def _site_round(msg: Message) -> int:
    """The round number a reply's site says it trained under (-1 for an error reply)."""
    if msg.has_error() or SITE_KEY not in msg.content.config_records:
        return -1
    return int(msg.content.config_records[SITE_KEY].get("round", -1))  # type: ignore[arg-type]
