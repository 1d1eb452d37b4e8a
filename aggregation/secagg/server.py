"""The server's half of secure aggregation: runs the protocol stages as Flower messages.

:class:`SecureAggregator` is the protocol driver of
:class:`~aggregation.secagg.strategy.SecAggStrategy`, which wraps any strategy:

* ``open`` (from ``configure_train``): sends ``query.secagg_keys`` and
  ``query.secagg_share`` to the sampled sites and turns the strategy's training messages
  into ``train.secagg`` messages that carry each site's encrypted shares;
* ``close`` (from ``aggregate_train``): screens the masked replies, sends
  ``query.secagg_unmask`` and returns the decoded :class:`~aggregation.secagg.vector.Aggregate`.

A site that fails to answer a stage (timeout, error reply, malformed or misaddressed
reply) is logged with the reason and counts as dropped from then on. With fewer than
``t`` sites left at any stage the round is aborted: :class:`SecAggAbort` is raised, the
strategy keeps the global model as it was. The server only ever holds public keys,
ciphertexts of shares, masked vectors and the final sum.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from aggregation.secagg import wire
from aggregation.secagg.client import MASKED_KEY, WIRE_KEY, field_codec
from aggregation.secagg.graph import auto_neighbours, ring
from aggregation.secagg.protocol import SecAggAbort, SecAggServer
from aggregation.secagg.shamir import VALUE_BYTES
from aggregation.secagg.vector import FIELD_BITS, Aggregate, WeightedUpdateCodec, unpack_field
from core import recordview


def _key_list(public: dict[int, tuple[bytes, bytes]], members: frozenset[int], prefix: str) -> dict[str, Any]:
    """The public keys of one neighbourhood, as sent to one of its members."""
    ids = sorted(members & set(public))
    return {f"{prefix}ids": ids, f"{prefix}c-pks": wire.join_keys([public[j][0] for j in ids]),
            f"{prefix}s-pks": wire.join_keys([public[j][1] for j in ids])}


def threshold_for(fraction: float, sites: int) -> int:
    """Shamir threshold for a round with ``sites`` sites: ``max(2, ceil(fraction * sites))``."""
    return min(sites, max(2, math.ceil(fraction * sites - 1e-9)))


# ---- what each stage's reply must hold (type, length, range), checked before any use ---------------------
MAX_SHARE_BYTES = 4 + VALUE_BYTES * 64  # a Shamir share of a seed or key (aggregation/secagg/shamir.py): 2 chunks in practice


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_key(v: Any) -> bool:
    return isinstance(v, bytes) and len(v) == wire.KEY_BYTES


def _int_list(v: Any, limit: int) -> bool:
    return isinstance(v, list) and len(v) <= limit and all(_is_int(x) and 0 <= x <= 1 << 31 for x in v)


def _shares_reason(r: ConfigRecord, to_key: str, shares_key: str, sites: int) -> str | None:
    to, blob = r.get(to_key), r.get(shares_key)
    if not _int_list(to, sites) or not isinstance(blob, bytes):
        return f"'{to_key}' is not a list of at most {sites} site ids, or '{shares_key}' is not bytes"
    try:
        items = wire.split(blob)
    except ValueError as err:
        return str(err)
    if len(items) != len(to) or len(set(to)) != len(to):  # type: ignore[arg-type]
        return f"{len(items)} shares for {len(to)} recipients"  # type: ignore[arg-type]
    if any(len(c) > 4 * MAX_SHARE_BYTES for c in items):
        return "an encrypted share is longer than a share can be"
    return None


def _check_keys(r: ConfigRecord, agg: SecureAggregator) -> str | None:
    if not _is_key(r.get("c-pk")) or not _is_key(r.get("s-pk")):
        return f"its public keys are not two {wire.KEY_BYTES}-byte keys"
    return None


def _check_share(r: ConfigRecord, agg: SecureAggregator) -> str | None:
    return _shares_reason(r, "to", "shares", len(agg._ids))


def _check_unmask(r: ConfigRecord, agg: SecureAggregator) -> str | None:
    owners, kinds, blob = r.get("owners"), r.get("kinds"), r.get("shares")
    if not _int_list(owners, len(agg._ids)) or not isinstance(kinds, list) or not isinstance(blob, bytes):
        return "'owners', 'kinds' and 'shares' are not a list of site ids, a list of kinds and bytes"
    if len(kinds) != len(owners) or any(k not in ("b", "sk") for k in kinds):  # type: ignore[arg-type]
        return "'kinds' must name 'b' or 'sk' for each owner"
    try:
        items = wire.split(blob)
    except ValueError as err:
        return str(err)
    if len(items) != len(owners):  # type: ignore[arg-type]
        return f"{len(items)} shares for {len(owners)} owners"  # type: ignore[arg-type]
    if any(len(s) < 4 + VALUE_BYTES or (len(s) - 4) % VALUE_BYTES or len(s) > MAX_SHARE_BYTES or s[:4] == b"\0\0\0\0"
           for s in items):
        return "a share is not a Shamir share (4-byte index > 0, then 17-byte chunks)"
    known = set(agg._nodes)
    if any(o not in known for o in owners):  # type: ignore[union-attr]
        return "a share of a site that is not in this round"
    return None


class SecureAggregator:
    """Orchestrates one secure round at a time.

    Parameters
    ----------
    clip, value_bits : the quantisation (see :mod:`aggregation.secagg.vector`).
    threshold : Shamir threshold as a share of a site's neighbourhood (itself included).
    stage_timeout : seconds to wait for the replies of each stage.
    neighbours : neighbours per site in the SecAgg+ graph (:mod:`aggregation.secagg.graph`);
        0 = automatic (complete graph up to 20 sites).
    """

    def __init__(self, clip: float, value_bits: int, threshold: float, stage_timeout: float,
                 neighbours: int = 0, channel: str = "", field_bits: int = FIELD_BITS) -> None:
        self.clip, self.value_bits, self.neighbours = clip, value_bits, neighbours
        self.field_bits = field_bits  # the masks' field Z_(2^field_bits); each masked element's bits on the wire
        self.channel = channel  # "" = the training rounds; "sum" = the task's sums (own state at the sites)
        self.threshold, self.stage_timeout = threshold, stage_timeout
        self._grid: Grid | None = None
        self._round = 0
        self._ids: dict[int, int] = {}  # node id -> protocol id
        self._nodes: dict[int, int] = {}  # protocol id -> node id
        self._server: SecAggServer | None = None
        self._codec: WeightedUpdateCodec | None = None
        self._next: dict[str, Any] | None = None  # the next round's keys and shares, collected ahead
        self._trained: set[int] = set()
        self._out: list[Message] = []
        self._t_masked = 0.0
        self.log: dict[int, dict[str, Any]] = {}  # per round: stage counts, rejections, timings

    # ---- helpers ------------------------------------------------------------------------
    def _entry(self) -> dict[str, Any]:
        return self.log.setdefault(self._round, {"rejected": [], "stages": {}})

    def _reject(self, node: int, stage: str, reason: str) -> None:
        self._entry()["rejected"].append({"node": node, "stage": stage, "reason": reason})
        log(WARNING, "round %s secagg %s: node %s dropped: %s", self._round, stage, node, reason)

    def _exchange(self, stage: str, message_type: str, records: dict[int, dict[str, Any]]) -> dict[int, ConfigRecord]:
        """Send one ConfigRecord per node, return the well-formed replies by protocol id (every field of a
        reply checked for type, length and range by :data:`CHECKS`; a reply that fails drops its site)."""
        assert self._grid is not None
        t0 = time.monotonic()
        msgs = []
        for node, rec in records.items():
            content = RecordDict({WIRE_KEY: ConfigRecord({"round": self._round, **self._tag(), **rec})})
            msgs.append(Message(content, dst_node_id=node, message_type=message_type))
        replies = list(self._grid.send_and_receive(msgs, timeout=self.stage_timeout))
        good = self._screen(stage, replies, set(records), msgs)
        for node in list(good):
            reason = CHECKS[stage](good[node].content[WIRE_KEY], self) if stage in CHECKS else None  # type: ignore[arg-type]
            if reason is not None:
                self._reject(node, stage, reason)
                del good[node]
        self._entry()["stages"][stage] = {"sent": len(records), "ok": len(good),
                                          "seconds": round(time.monotonic() - t0, 4)}
        return {self._ids[node]: msg.content[WIRE_KEY] for node, msg in good.items()}  # type: ignore[misc]  # screened

    def _screen(self, stage: str, replies: Iterable[Message], expected: set[int],
                sent: Iterable[Message] = ()) -> dict[int, Message]:
        """The replies that answer this stage correctly, by node; the others are logged. An error the
        SuperLink made for a node it cannot reach (from node 1) is the node's, found by the message it answers."""
        good: dict[int, Message] = {}
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        for msg in replies:
            node = msg.metadata.src_node_id
            if node == SUPERLINK_NODE_ID and msg.has_error():
                node = by_id.get(msg.metadata.reply_to_message_id, node)
            if node not in expected or node in good:
                self._reject(node, stage, "unexpected or duplicate reply")
                continue
            if msg.has_error():
                self._reject(node, stage, f"error reply: {msg.error.reason}")
                continue
            rec = recordview.config(msg.content, WIRE_KEY)
            if rec is None or not _is_int(rec.get("round")) or not _is_int(rec.get("id")):
                self._reject(node, stage, f"reply has no well-formed {WIRE_KEY!r} record (integer 'round' and 'id')")
            elif rec["round"] != self._round or rec["id"] != self._ids[node]:
                self._reject(node, stage, f"reply is for round {rec['round']} / id {rec['id']}, expected round "
                                          f"{self._round} / id {self._ids[node]} (replayed or misaddressed)")
            else:
                good[node] = msg
        for node in sorted(expected - set(good) - {r["node"] for r in self._entry()["rejected"] if r["stage"] == stage}):
            self._reject(node, stage, f"no reply within {self.stage_timeout:g} s")
        return good

    def _tag(self) -> dict[str, str]:
        return {"channel": self.channel} if self.channel else {}

    def _masked_vectors(self, good: dict[int, Message]) -> dict[int, np.ndarray]:
        """Stage 2's well-formed masked vectors by protocol id; a reply without one is rejected with its reason."""
        assert self._server is not None
        masked: dict[int, np.ndarray] = {}
        for node, msg in good.items():
            record = recordview.arrays(msg.content, MASKED_KEY)
            y: np.ndarray | None = None
            reason: str | None = "reply has no masked vector"
            if record is not None and "y" in record:
                try:
                    y = unpack_field(record["y"], self.field_bits)
                    reason = self._server.check_masked(y)
                except ValueError as err:
                    reason = str(err)
            if reason is not None:
                self._reject(node, "masked_input", reason)
                continue
            masked[self._ids[node]] = y  # type: ignore[assignment]  # not None: checked above
        return masked

    def _unmask(self, shares: dict[int, ConfigRecord]) -> np.ndarray:
        """Stage 3: the survivors' field sum from the unmasking shares (each reply checked by :data:`CHECKS`).
        Shares that are well-formed yet do not combine end the round (:class:`SecAggAbort`), never the run."""
        assert self._server is not None
        try:
            return self._server.unmask({i: {int(o): (str(k), v)
                                            for o, k, v in zip(r["owners"], r["kinds"], wire.split(r["shares"]))}  # type: ignore[arg-type]
                                        for i, r in shares.items()})
        except (ValueError, TypeError, KeyError) as err:
            raise SecAggAbort(f"the unmasking shares do not combine ({err})") from None

    def _node_of(self, pid: int) -> int:
        return self._nodes[pid]

    def _set_ids(self, ids: dict[int, int]) -> None:
        """This round's protocol ids by node, and the inverse map."""
        self._ids, self._nodes = ids, {p: n for n, p in ids.items()}

    # ---- the round -------------------------------------------------------------------------
    def open(self, server_round: int, messages: list[Message], grid: Grid, size: int) -> list[Message]:
        """Stages 0 and 1; returns the ``train.secagg`` messages for the sites still in.

        ``messages`` are the strategy's training messages (one per sampled site), ``size``
        the number of model values. If the previous round already collected this round's
        keys and shares (pipelining) and every sampled site took part in that, stages 0 and
        1 cost no message; otherwise they run here.
        """
        self._grid, self._round = grid, server_round
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        if len(nodes) < 2:
            raise SecAggAbort(f"{len(nodes)} site sampled: secure aggregation needs at least 2")
        nxt, self._next = self._next, None
        codec = WeightedUpdateCodec(self.clip, self.value_bits, size, self.field_bits)
        ready = {n for n, i in nxt["ids"].items() if i in nxt["server"].sharers} if nxt is not None else set()
        if nxt is not None and nxt["round"] == server_round and nxt["length"] == codec.length \
                and set(nodes) <= ready and len(nodes) >= nxt["server"].threshold:
            self._set_ids(nxt["ids"])
            self._server, inbox = nxt["server"], nxt["inbox"]
            self._codec = codec
            self._entry().update({"sites": len(nodes), "threshold": self._server.threshold,
                                  "neighbours": nxt["neighbours"], "pipelined": True})
            self._entry()["stages"].update(nxt["stages"])
            inbox = {i: cts for i, cts in inbox.items() if self._node_of(i) in nodes}
        else:
            if nxt is not None:
                log(INFO, "round %s secagg: the keys shared in advance do not cover the sampled sites; "
                    "running the key stages", server_round)
            inbox = self._handshake(server_round, nodes, codec)
        out = []
        by_node = {m.metadata.dst_node_id: m for m in messages}
        for i in sorted(inbox):
            node = self._node_of(i)
            content = RecordDict(dict(by_node[node].content.items()))
            senders = sorted(inbox[i])
            content[WIRE_KEY] = ConfigRecord({"round": server_round, "id": i, "size": size, "pipeline": True,
                                              "from": senders, "shares": wire.join([inbox[i][j] for j in senders])})
            out.append(Message(content, dst_node_id=node, message_type="train.secagg"))
        self._trained = {m.metadata.dst_node_id for m in out}
        self._out = out
        self._t_masked = time.monotonic()
        return out

    def _handshake(self, server_round: int, nodes: list[int], codec: WeightedUpdateCodec) -> dict[int, dict[int, bytes]]:
        """Stages 0 and 1 as two message exchanges; the shares to deliver, by recipient."""
        self._set_ids({node: k + 1 for k, node in enumerate(nodes)})
        k = self.neighbours or auto_neighbours(len(nodes))
        t = threshold_for(self.threshold, min(k + 1, len(nodes)))
        self._codec = codec
        self._server = SecAggServer(t, field_codec(self.clip, self.value_bits, self.field_bits), codec.length)
        self._entry().update({"sites": len(nodes), "threshold": t, "neighbours": min(k, len(nodes) - 1),
                              "pipelined": False})
        keys = self._exchange("keys", "query.secagg_keys", {
            n: {"id": self._ids[n], "threshold": t, "clip": self.clip, "value-bits": self.value_bits,
                "field-bits": self.field_bits} for n in nodes})
        public = self._server.collect_keys({i: (bytes(r["c-pk"]), bytes(r["s-pk"])) for i, r in keys.items()})  # type: ignore[arg-type]
        graph = self._server.graph = ring(sorted(public), k)
        shared = self._exchange("share", "query.secagg_share", {
            self._node_of(i): {"id": i, **_key_list(public, graph[i], "")} for i in sorted(public)})
        return self._server.route_shares({i: dict(zip((int(j) for j in r["to"]), wire.split(r["shares"])))  # type: ignore[arg-type]
                                          for i, r in shared.items()})

    def close(self, replies: Iterable[Message]) -> Aggregate:
        """Stages 2 (collect) and 3 (unmask); the survivors' decoded aggregate.

        The unmask messages also carry the next round's key list (advertised with the
        masked inputs), so that the sites' replies hold the next round's shares.
        """
        assert self._server is not None and self._codec is not None
        t0 = time.monotonic()
        good = self._screen("masked_input", replies, self._trained, self._out)
        masked = self._masked_vectors(good)
        next_keys: dict[int, tuple[bytes, bytes]] = {}
        for node, msg in good.items():
            w = msg.content[WIRE_KEY]  # screened: a ConfigRecord
            if self._ids[node] in masked and _is_key(w.get("next-c-pk")) and _is_key(w.get("next-s-pk")):  # type: ignore[union-attr]
                next_keys[node] = (bytes(w["next-c-pk"]), bytes(w["next-s-pk"]))  # type: ignore[arg-type]
        self._entry()["stages"]["masked_input"] = {"sent": len(self._trained), "ok": len(masked),
                                                   "seconds": round(t0 - self._t_masked, 4)}
        survivors, dropped = self._server.collect_masked(masked)
        next_ids = {node: k + 1 for k, node in enumerate(sorted(next_keys))}
        next_public = {next_ids[n]: pk for n, pk in next_keys.items()}
        next_k = self.neighbours or auto_neighbours(len(next_ids))
        next_t = threshold_for(self.threshold, min(next_k + 1, len(next_ids))) if len(next_ids) >= 2 else 0
        next_graph = ring(sorted(next_public), next_k) if next_t else {}

        def request(i: int) -> dict[str, Any]:
            node = self._node_of(i)
            ahead = {}
            if next_t and node in next_ids:
                ahead = {"next-id": next_ids[node], "next-threshold": next_t,
                         **_key_list(next_public, next_graph[next_ids[node]], "next-")}
            return {"id": i, "survivors": survivors, "dropped": dropped, **ahead}

        shares = self._exchange("unmask", "query.secagg_unmask", {self._node_of(i): request(i) for i in survivors})
        t1 = time.monotonic()
        total = self._unmask(shares)
        aggregate = self._codec.decode(total)
        self._entry().update({"survivors": len(survivors), "dropped": len(dropped),
                              "unmask_seconds": round(time.monotonic() - t1, 4), "clipped": aggregate.clipped})
        log(INFO, "round %s secagg: sum of %s sites unmasked (%s dropped, threshold %s)",
            self._round, len(survivors), len(dropped), self._server.threshold)
        if aggregate.clipped:
            log(WARNING, "round %s secagg: %s update values exceeded aggregation.clip=%g and were clipped; "
                "raise aggregation.clip to keep the aggregate exact", self._round, aggregate.clipped, self.clip)
        if next_t:
            self._prepare_next(next_ids, next_keys, next_t, next_graph, min(next_k, len(next_ids) - 1), shares)
        return aggregate

    def secure_sum(self, grid: Grid, nodes: list[int], content: RecordDict, message_type: str, length: int,
                   sum_round: int) -> tuple[np.ndarray, list[int]]:
        """One secure sum outside the training rounds: every stage, no pipelining.

        ``content`` goes to each node with its shares in a ``message_type`` message; each
        site replies with its masked vector of ``length`` field elements. Returns the
        survivors' field sum and their node ids; :class:`SecAggAbort` below the threshold.
        """
        self._grid, self._round = grid, sum_round
        if len(nodes) < 2:
            raise SecAggAbort(f"{len(nodes)} site connected: a secure sum needs at least 2")

        @dataclass(frozen=True)
        class _Length:
            length: int

        inbox = self._handshake(sum_round, sorted(nodes), _Length(length))  # type: ignore[arg-type]
        msgs = []
        for i in sorted(inbox):
            node = self._node_of(i)
            body = RecordDict(dict(content.items()))
            senders = sorted(inbox[i])
            body[WIRE_KEY] = ConfigRecord({"round": sum_round, **self._tag(), "id": i, "size": length,
                                           "pipeline": False, "from": senders,
                                           "shares": wire.join([inbox[i][j] for j in senders])})
            msgs.append(Message(body, dst_node_id=node, message_type=message_type))
        self._trained = {m.metadata.dst_node_id for m in msgs}
        assert self._server is not None
        good = self._screen("masked_input", self._grid.send_and_receive(msgs, timeout=self.stage_timeout),
                            self._trained, msgs)
        masked = self._masked_vectors(good)
        survivors, dropped = self._server.collect_masked(masked)
        shares = self._exchange("unmask", "query.secagg_unmask", {
            self._node_of(i): {"id": i, "survivors": survivors, "dropped": dropped} for i in survivors})
        total = self._unmask(shares)
        self._entry().update({"survivors": len(survivors), "dropped": len(dropped)})
        return total, [self._node_of(i) for i in survivors]

    def _prepare_next(self, ids: dict[int, int], public: dict[int, tuple[bytes, bytes]], t: int,
                      graph: dict[int, frozenset[int]], k: int, replies: dict[int, ConfigRecord]) -> None:
        """Keep the next round's keys and routed shares, if enough sites shared them."""
        server = SecAggServer(t, field_codec(self.clip, self.value_bits, self.field_bits),
                              self._codec.length,  # type: ignore[union-attr]
                              graph=graph)
        shared = {}
        for pid, r in replies.items():
            node = self._nodes[pid]
            if "next-to" in r and node in ids and _shares_reason(r, "next-to", "next-shares", len(ids)) is None:
                shared[ids[node]] = dict(zip((int(j) for j in r["next-to"]), wire.split(r["next-shares"])))  # type: ignore[arg-type]
        try:
            server.collect_keys({ids[n]: pk for n, pk in public.items()})
            inbox = server.route_shares(shared)
        except SecAggAbort as err:
            log(INFO, "round %s secagg: keys for round %s not prepared in advance (%s)", self._round, self._round + 1, err)
            return
        self._next = {"round": self._round + 1, "ids": ids, "server": server, "inbox": inbox, "neighbours": k,
                      "length": self._codec.length,  # type: ignore[union-attr]
                      "stages": {"keys": {"sent": 0, "ok": len(public), "seconds": 0.0, "with": "masked_input"},
                                 "share": {"sent": 0, "ok": len(shared), "seconds": 0.0, "with": "unmask"}}}


#: The reply checks of each stage (the masked vectors are checked by :meth:`SecureAggregator._masked_vectors`).
CHECKS = {"keys": _check_keys, "share": _check_share, "unmask": _check_unmask}
