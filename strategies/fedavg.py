"""FedAvg on Flower's Message API, hardened for cross-silo use.

Server half only: plain FedAvg needs nothing from the client beyond local training.
Differences from ``flwr.serverapp.strategy.FedAvg``:

* every reply is validated on its own (:mod:`strategies.validation`); a malformed or
  failed reply is dropped with a logged reason and the round goes on;
* replies are aggregated in a fixed site order, so the same seed gives the same model;
* federated evaluation pools the sites' confusion counts into exact pooled metrics;
* per round it keeps who was sampled, who replied and who was rejected (``participation``);
* with a :class:`~aggregation.secagg.server.SecureAggregator` the training phase runs the
  secure aggregation protocol: the server receives only masked vectors and learns only the
  weighted sum of the updates and the total weight (``aggregation=secagg``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from strategies import robust
from strategies.robust import Robustness
from aggregation.secagg.protocol import SecAggAbort
from aggregation.secagg.server import SecureAggregator
from aggregation.secagg.vector import Layout

from strategies.validation import (
    WEIGHT_KEY,
    check_evaluate_reply,
    check_train_reply,
    site_label,
    site_order,
    site_record,
)
from tasks.metrics import pool_site_summaries

if TYPE_CHECKING:  # phe (GPL) is an optional extra: imported only when Paillier is used
    from aggregation.paillier.server import EncryptedAggregator

EVAL_KEYS = ("tp", "fp", "tn", "fn", "loss", "auc", "auc_weight")


def pooled_evaluate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Aggregate federated-evaluation replies: summed confusion counts, weighted loss/AUC."""
    summaries = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(s[weighted_by_key]) for s in summaries]
    pooled = pool_site_summaries(summaries, weights)  # type: ignore[arg-type]
    return MetricRecord({k: float(v) for k, v in pooled.items() if np.isfinite(v)})


def _stragglers(replies: Iterable[Message]) -> list[str]:
    """Labels of the sites whose reply says they finished only part of their work."""
    return [site_label(m) for m in replies if bool((site_record(m) or {}).get("straggler", False))]


def _secagg_rejections(secagg_log: dict[str, Any], label: Callable[[int], str]) -> list[dict[str, str]]:
    """A secure round's dropped sites in the participation format (``label`` names a node)."""
    return [{"site": label(r["node"]), "reason": f"{r['stage']}: {r['reason']}"} for r in secagg_log.get("rejected", [])]


def _privacy_records(replies: Iterable[Message]) -> dict[str, dict[str, Any]]:
    """Each site's DP-SGD spending as its reply reports it (``privacy=dpsgd``)."""
    from privacy.dpsgd import REPLY_KEY

    return {site_label(m): dict(m.content.config_records[REPLY_KEY]) for m in replies
            if not m.has_error() and REPLY_KEY in m.content.config_records}


class FedAvg(FlowerFedAvg):
    """Weighted federated averaging over ``num_sites`` sites.

    Parameters
    ----------
    num_sites : int
        Sites in the federation; sampling waits until all of them are connected.
    fraction_train, fraction_evaluate : float
        Share of sites sampled per round for training / federated evaluation.
    secure : SecureAggregator, optional
        Aggregate the training replies by secure aggregation instead of in the clear.
    encrypted : EncryptedAggregator, optional
        Paillier: the sites send encrypted weighted models, the server adds ciphertexts.
    robust : Robustness, optional
        A Byzantine-robust rule and/or a norm bound on updates (:mod:`strategies.robust`).
    """

    def __init__(self, num_sites: int, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 secure: SecureAggregator | None = None, encrypted: EncryptedAggregator | None = None,
                 robust: Robustness | None = None) -> None:
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
        self.reference: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self.participation: dict[int, dict[str, Any]] = {}
        self.secure = secure
        self.encrypted = encrypted
        self.robust = robust or Robustness()
        self._global: ArrayRecord | None = None
        #: Nodes that said their privacy budget is spent: never sampled again.
        self.exhausted: dict[int, str] = {}
        #: node id -> site name, learned from replies (for logs about nodes that left).
        self.node_names: dict[int, str] = {}
        self._connected: set[int] | None = None
        self._sent: list[Message] = []  # this round's training instructions (their ids are set when pushed)

    # ---- training ----------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample sites and send them the global model; remember its array layout."""
        encrypted = "ct" in arrays and "rows" in arrays  # Paillier: the encrypted aggregate
        if self.encrypted is not None and not encrypted:  # round 1: the public initial model
            self.encrypted.set_size(Layout.of({k: v.numpy() for k, v in arrays.items()}).size)
        if not encrypted:
            self.reference = {k: (tuple(v.shape), np.dtype(v.numpy().dtype)) for k, v in arrays.items()}
        self._track_nodes(server_round, grid)
        messages = self._without_exhausted(server_round, super().configure_train(server_round, arrays, config, grid))
        # The first round waits for every site; later rounds go on with the sites still connected.
        self.min_available_nodes = self.min_train_nodes
        self._entry(server_round)["train"] = {"sampled": len(messages)}
        if not encrypted:
            self._global = arrays
        if self.secure is None:
            self._sent = messages
            return messages
        size = Layout.of({k: v.numpy() for k, v in arrays.items()}).size
        try:
            self._sent = list(self.secure.open(server_round, messages, grid, size))
            return self._sent
        except SecAggAbort as err:
            self._abort(server_round, err)
            return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop bad replies (logged), then average the rest in site order."""
        replies = list(replies)
        self._learn_names(replies)
        self._note_privacy(server_round, replies)
        if self.secure is not None:
            return self._aggregate_secure(server_round, replies)
        if self.encrypted is not None:
            return self._aggregate_encrypted(server_round, replies)
        good = self._screen(
            server_round, "train", replies, lambda m: check_train_reply(m, self.reference, server_round)
        )
        if not good:
            log(WARNING, "round %s: no usable training reply; the global model is unchanged", server_round)
            return None, None
        if not self.robust.active:
            return super().aggregate_train(server_round, good)
        return self._aggregate_robust(server_round, good)

    def _aggregate_robust(
        self, server_round: int, good: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``strategy.norm_bound`` on each update, then ``strategy.robust``'s rule (or the weighted mean)."""
        r, entry = self.robust, self._entry(server_round)["train"]
        if r.norm_bound > 0:
            assert self._global is not None
            bounded = [site_label(m) for m in good if robust.bound_reply(m, self._global, r.norm_bound)]
            entry["norm_bounded"] = bounded
            if bounded:
                log(INFO, "round %s: update norm bounded to %g for %s", server_round, r.norm_bound, ", ".join(bounded))
        if r.rule == "none":
            return super().aggregate_train(server_round, good)
        arrays, used = robust.aggregate(r.rule, good, r.assumed_byzantine)
        f = robust.byzantine_count(r.rule, len(good), r.assumed_byzantine)
        entry["robust"] = {"rule": r.rule, "f": f, "used": [site_label(good[i]) for i in used]}
        if len(used) < len(good):
            log(INFO, "round %s: %s (f=%s) used %s of %s updates: %s", server_round, r.rule, f, len(used),
                len(good), ", ".join(site_label(good[i]) for i in used))
        metrics = self.train_metrics_aggr_fn([m.content for m in good], self.weighted_by_key)
        return arrays, metrics

    def _aggregate_secure(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the survivors' sum; the new model is the global one plus their mean update."""
        assert self.secure is not None
        entry = self._entry(server_round)
        if self._global is None or "aborted" in entry.get("secagg", {}):
            return None, None
        replies = list(replies)
        stragglers = _stragglers(replies)
        try:
            agg = self.secure.close(replies)
        except SecAggAbort as err:
            self._abort(server_round, err)
            return None, None
        entry["secagg"] = self.secure.log[server_round]
        base = {k: v.numpy() for k, v in self._global.items()}
        layout = Layout.of(base)
        step, bounded = robust.bound_norm(agg.mean_update, self.robust.norm_bound)
        if bounded:  # the sites clip their own updates; this bounds what any attacker adds too
            log(INFO, "round %s: mean update norm %.4g bounded to %g", server_round,
                float(np.linalg.norm(agg.mean_update)), self.robust.norm_bound)
            self._entry(server_round)["train"]["norm_bounded"] = ["aggregate"]
        new = layout.unflatten(layout.flatten(base) + step)
        log_ = self.secure.log[server_round]
        entry["train"].update({"replied": log_.get("survivors", 0), "stragglers": stragglers,
                               "rejected": _secagg_rejections(log_, self._node_label)})
        metrics = MetricRecord({WEIGHT_KEY: agg.total_weight, "train_loss": agg.mean_loss,
                                "clipped_values": agg.clipped})
        return ArrayRecord(OrderedDict((k, Array(v)) for k, v in new.items())), metrics

    def _aggregate_encrypted(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Multiply the accepted ciphertexts; the encrypted sum becomes the next global record."""
        from aggregation.paillier.server import screen as paillier_screen

        assert self.encrypted is not None
        replies = sorted(replies, key=site_order)
        good, rejected, sites = paillier_screen(self.encrypted, server_round, replies, self._label)
        entry = self._entry(server_round)["train"]
        entry.update({"replied": len(good), "rejected": rejected, "sites": sites, "stragglers": _stragglers(replies)})
        if not good:
            log(WARNING, "round %s: no usable encrypted reply; the global model is unchanged", server_round)
            return None, None
        return self.encrypted.aggregate(good)

    def _abort(self, server_round: int, err: Exception) -> None:
        assert self.secure is not None
        entry = self._entry(server_round)
        entry["secagg"] = self.secure.log.setdefault(server_round, {"rejected": [], "stages": {}})
        entry["secagg"]["aborted"] = str(err)
        entry["train"].update({"replied": 0, "rejected": _secagg_rejections(entry["secagg"], self._node_label)})
        log(WARNING, "round %s: secure aggregation aborted (%s); the global model is unchanged", server_round, err)

    # ---- sites joining and leaving -----------------------------------------------------
    def _track_nodes(self, server_round: int, grid: Grid) -> None:
        """Log (and record in ``participation``) the sites that left or joined since the last round."""
        now = set(grid.get_node_ids())
        if self._connected is not None:
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            for node in sorted(self._connected - now):
                site = self.node_names.get(node, f"node {node}")  # the name alone: participation also records the node
                log(WARNING, "round %s: site %s (node %s) left the federation (not connected at %s); "
                    "continuing with %s site(s)", server_round, site, node, stamp, len(now))
                self._entry(server_round).setdefault("left", []).append({"site": site, "node": node, "noticed": stamp})
            for node in sorted(now - self._connected):
                log(INFO, "round %s: node %s joined the federation", server_round, node)
                self._entry(server_round).setdefault("joined", []).append({"node": node, "noticed": stamp})
        self._connected = now

    def _node_label(self, node: int) -> str:
        """``site-name (node N)`` once a reply has told us the node's site, else ``node N``."""
        return f"{self.node_names[node]} (node {node})" if node in self.node_names else f"node {node}"

    def _label(self, msg: Message) -> str:
        """:func:`site_label`, naming the site of an error reply too when an earlier reply told us.

        An error the SuperLink generated for an unreachable node comes from the SuperLink
        (node 1); the instruction it answers names the node."""
        if not msg.has_error():
            return site_label(msg)
        node = msg.metadata.src_node_id
        if node == SUPERLINK_NODE_ID:
            node = next((m.metadata.dst_node_id for m in self._sent
                         if m.metadata.message_id == msg.metadata.reply_to_message_id), node)
        return self._node_label(node)

    def _learn_names(self, replies: Iterable[Message]) -> None:
        for m in replies:
            rec = site_record(m)
            if rec is not None:
                self.node_names[m.metadata.src_node_id] = str(rec.get("name", "?"))

    # ---- privacy budgets (privacy=dpsgd) ----------------------------------------------
    def _note_privacy(self, server_round: int, replies: list[Message]) -> None:
        """Record each site's reported epsilon; remember the sites whose budget is spent."""
        from privacy.dpsgd import BUDGET_EXHAUSTED_CODE

        spent = _privacy_records(replies)
        if spent:
            self._entry(server_round)["privacy"] = spent
        for m in replies:
            if m.has_error() and m.error.code == BUDGET_EXHAUSTED_CODE:
                self.exhausted[m.metadata.src_node_id] = m.error.reason
                log(WARNING, "round %s: %s stops training: %s", server_round, self._label(m), m.error.reason)

    def _without_exhausted(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        keep = [m for m in messages if m.metadata.dst_node_id not in self.exhausted]
        if len(keep) < len(messages):
            self._entry(server_round)["budget_exhausted"] = len(messages) - len(keep)
            log(INFO, "round %s: %s sampled site(s) have spent their privacy budget and are skipped",
                server_round, len(messages) - len(keep))
        if messages and not keep:
            log(WARNING, "round %s: every sampled site has spent its privacy budget; no training this round "
                "(the global model stays as it is)", server_round)
        return keep

    # ---- federated evaluation -------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._entry(server_round)["evaluate"] = {"sampled": len(messages)}
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = self._screen(server_round, "evaluate", replies, lambda m: check_evaluate_reply(m, EVAL_KEYS))
        return super().aggregate_evaluate(server_round, good) if good else None

    # ---- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this strategy (JSON-serialisable)."""
        return {
            "participation": {str(r): e for r, e in self.participation.items()},
            "node_names": {str(n): name for n, name in self.node_names.items()},
            "reference": {k: [list(shape), str(dtype)] for k, (shape, dtype) in self.reference.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (resume). Budget-exhausted nodes are not restored:
        node ids change between runs, and a site whose budget is spent refuses again by itself."""
        self.participation = {int(r): e for r, e in state["participation"].items()}
        self.node_names = {int(n): name for n, name in state["node_names"].items()}
        self.reference = {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in state["reference"].items()}
        if self.encrypted is not None:  # the model is a ciphertext now: its plaintext size comes from the reference
            self.encrypted.set_size(int(sum(np.prod(shape, dtype=np.int64) for shape, _ in self.reference.values())))
        self.min_available_nodes = self.min_train_nodes  # as after round 1: go on with the connected sites

    # ---- helpers ---------------------------------------------------------------------
    def _entry(self, server_round: int) -> dict[str, Any]:
        return self.participation.setdefault(server_round, {})

    def _screen(self, server_round: int, phase: str, replies: Iterable[Message], check: Any) -> list[Message]:
        good: list[Message] = []
        rejected: list[dict[str, str]] = []
        for msg in replies:
            reason = check(msg)
            if reason is None:
                good.append(msg)
            else:
                label = self._label(msg)
                rejected.append({"site": label, "reason": reason})
                log(WARNING, "round %s %s: rejected reply from %s: %s", server_round, phase, label, reason)
        good.sort(key=site_order)
        entry = self._entry(server_round).setdefault(phase, {})
        entry["replied"] = len(good)
        entry["rejected"] = rejected
        entry["sites"] = [site_label(m) for m in good]
        entry["stragglers"] = _stragglers(good)
        log(INFO, "round %s %s: %s usable replies, %s rejected", server_round, phase, len(good), len(rejected))
        return good
