"""The coordinator's half of secure aggregation: runs the protocol as Flower messages.

:class:`SecureAggregator` is the protocol driver of
:class:`~aggregation.secagg.strategy.SecAggStrategy`, which wraps any strategy, and of the secure
sums (:mod:`aggregation.secagg.sums`):

* a **key epoch** (``query.secagg_keys``) when the round has a site without keys of the current
  epoch (the first round; a site that joins or returns after missing an epoch) or every
  ``aggregation.rekey_every`` rounds: each site publishes a signed X25519 key; each site's first
  message of the epoch carries the names of the epoch's sites and its graph neighbours' signed keys;
* ``open`` (from ``configure_train``): the strategy's training messages become ``train.secagg``
  messages naming each site's neighbours of the round;
* ``close`` (from ``aggregate_train``): screens the masked replies, sends ``query.secagg_unmask``
  with each survivor's neighbourhood split into survivors and dropped and the shares sent to it,
  and returns the decoded :class:`~aggregation.secagg.vector.Aggregate`.

So a round costs two message exchanges, plus one in a round that opens a key epoch. A site that
fails to answer a stage (timeout, error reply, malformed or misaddressed reply) is logged with the
reason and counts as dropped from then on. A round that cannot finish (too few sites, a self-mask
with too few shares, a dropped site's mask with a survivor that did not unmask) is aborted:
:class:`SecAggAbort`, and the strategy keeps the global model as it was. The coordinator only ever
holds public keys and signatures, sealed shares, masked vectors, the seeds of pairs with a dropped
site, and the sum.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from aggregation.base import MaskingLimits
from aggregation.secagg import wire
from aggregation.secagg.client import MASKED_KEY, NO_KEYS, SEAL_OVERHEAD, SUM_CHANNEL, TRAIN_CHANNEL, WIRE_KEY, field_codec
from aggregation.secagg.graph import auto_neighbours, graph_seed, neighbourhood
from aggregation.secagg.protocol import SIGNATURE_BYTES, Masked, MaskingServer, SecAggAbort, site_threshold
from aggregation.secagg.ratchet import KEY_BYTES
from aggregation.secagg.shamir import VALUE_BYTES
from aggregation.secagg.vector import FIELD_BITS, Aggregate, WeightedUpdateCodec, unpack_field
from core import recordview

MAX_SHARE_BYTES = 4 + VALUE_BYTES * 64  # a Shamir share of a seed (aggregation/secagg/shamir.py): 1 chunk in practice


def threshold_for(fraction: float, sites: int) -> int:
    """The threshold a site with the default policy uses for a neighbourhood of ``sites`` sites (itself in)."""
    return min(sites, site_threshold(sites, fraction, MaskingLimits()))


# ---- what each stage's reply must hold (type, length, range), checked before any use ---------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _names(v: Any, allowed: Iterable[str]) -> list[str] | None:
    """The site names a reply lists, if they are a subset of ``allowed``; else None."""
    try:
        names = wire.split_names(v)
    except ValueError:
        return None
    return names if set(names) <= set(allowed) else None


def _is_share(s: bytes) -> bool:
    return 4 + VALUE_BYTES <= len(s) <= MAX_SHARE_BYTES and (len(s) - 4) % VALUE_BYTES == 0 and s[:4] != b"\0\0\0\0"


class SecureAggregator:
    """Orchestrates one secure round (or sum) at a time, and the key epochs of its channel.

    Parameters
    ----------
    clip, value_bits : the quantisation (see :mod:`aggregation.secagg.vector`).
    threshold : the coordinator's share of a neighbourhood for the thresholds (a site may use more).
    stage_timeout : seconds to wait for the replies of each protocol-only stage.
    neighbours : neighbours per site in the SecAgg+ graph; 0 = automatic (complete graph up to 20 sites).
    channel : "" = the training rounds; "sum" = the task's sums (their own keys and state at the sites).
    rekey_every : a new key epoch every this many rounds (0: once per job, and when a site joins).
    """

    def __init__(self, clip: float, value_bits: int, threshold: float, stage_timeout: float,
                 neighbours: int = 0, channel: str = "", field_bits: int = FIELD_BITS, rekey_every: int = 0) -> None:
        self.clip, self.value_bits, self.neighbours = clip, value_bits, neighbours
        self.field_bits = field_bits  # the masks' field Z_(2^field_bits); each masked element's bits on the wire
        self.channel = channel
        self.threshold, self.stage_timeout, self.rekey_every = threshold, stage_timeout, rekey_every
        self._grid: Grid | None = None
        self._round = 0
        self._ids: dict[int, int] = {}  # node id -> protocol id of this round's messages
        # the current key epoch
        self.epoch = 0
        self._epoch_round = 0
        self._keys: dict[str, tuple[bytes, bytes]] = {}  # name -> (X25519 key, signature)
        self._name: dict[int, str] = {}
        self._node: dict[str, int] = {}
        self._graph: dict[str, frozenset[str]] = {}
        self._k = 0
        self._agreed: set[str] = set()
        self._lost: set[int] = set()  # nodes that said they hold no keys of the epoch
        # the open round
        self._server: MaskingServer | None = None
        self._codec: WeightedUpdateCodec | None = None
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

    def _tag(self) -> dict[str, str]:
        return {"channel": SUM_CHANNEL} if self.channel == SUM_CHANNEL else {}

    def _exchange(self, stage: str, message_type: str, records: dict[int, dict[str, Any]]) -> dict[int, ConfigRecord]:
        """Send one ConfigRecord per node; the well-formed replies by node."""
        assert self._grid is not None
        t0 = time.monotonic()
        msgs = []
        for node, rec in records.items():
            content = RecordDict({WIRE_KEY: ConfigRecord({"round": self._round, "id": self._ids[node], **self._tag(),
                                                          **rec})})
            msgs.append(Message(content, dst_node_id=node, message_type=message_type))
        replies = list(self._grid.send_and_receive(msgs, timeout=self.stage_timeout))
        good = self._screen(stage, replies, set(records), msgs)
        self._entry()["stages"][stage] = {"sent": len(records), "ok": len(good), "seconds": round(time.monotonic() - t0, 4)}
        return {node: msg.content[WIRE_KEY] for node, msg in good.items()}  # type: ignore[misc]  # screened

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
                if msg.error.code == NO_KEYS:  # it lost its keys (a restart without its state): new epoch next time
                    self._lost.add(node)
                continue
            rec = recordview.config(msg.content, WIRE_KEY)
            if rec is None or not _is_int(rec.get("round")) or not _is_int(rec.get("id")):
                self._reject(node, stage, f"reply has no well-formed {WIRE_KEY!r} record (integer 'round' and 'id')")
            elif rec["round"] != self._round or rec["id"] != self._ids[node]:
                self._reject(node, stage, f"reply is for round {rec['round']} / id {rec['id']}, expected round "
                                          f"{self._round} / id {self._ids[node]} (replayed or misaddressed)")
            elif (reason := CHECKS[stage](rec, self, node) if stage in CHECKS else None) is not None:
                self._reject(node, stage, reason)
            else:
                good[node] = msg
        for node in sorted(expected - set(good) - {r["node"] for r in self._entry()["rejected"] if r["stage"] == stage}):
            self._reject(node, stage, f"no reply within {self.stage_timeout:g} s")
        return good

    # ---- key epochs -----------------------------------------------------------------------
    def _ensure_epoch(self, nodes: list[int]) -> bool:
        """Open a new key epoch if a node has no key of the current one (or a rekey is due); True if one ran."""
        due = self.rekey_every > 0 and self._round - self._epoch_round >= self.rekey_every
        if self.epoch and not due and all(n in self._name for n in nodes):
            return False
        assert self._grid is not None
        targets = sorted(set(nodes) | (set(self._grid.get_node_ids()) if self.channel != SUM_CHANNEL else set()))
        self.epoch += 1
        self._epoch_round = self._round
        self._ids = {node: k + 1 for k, node in enumerate(targets)}
        replies = self._exchange("keys", "query.secagg_keys", {n: {"epoch": self.epoch} for n in targets})
        self._keys, self._name, self._node, self._agreed = {}, {}, {}, set()
        for node, r in sorted(replies.items()):
            name = str(r["name"])
            if name in self._keys:
                self._reject(node, "keys", f"site name {name!r} is already taken in this epoch")
                continue
            self._keys[name] = (bytes(r["pk"]), bytes(r["sig"]))  # type: ignore[arg-type]
            self._name[node], self._node[name] = name, node
        members = sorted(self._keys)
        self._k = self.neighbours or auto_neighbours(len(members))
        run = int(self._grid.run.run_id)
        self._graph = neighbourhood(graph_seed(run, self._channel(), self.epoch), members, self._k) if members else {}
        log(INFO, "round %s secagg: key epoch %s opened by %s sites", self._round, self.epoch, len(members))
        return True

    def _channel(self) -> str:
        return SUM_CHANNEL if self.channel == SUM_CHANNEL else TRAIN_CHANNEL

    def _epoch_record(self, name: str) -> dict[str, Any]:
        """What a site needs to agree the epoch's keys: every name (for the graph) and its neighbours' signed keys."""
        holders = sorted(self._graph[name] | {name})
        return {"graph-k": self._k, "epoch-names": wire.join_names(sorted(self._keys)), "epoch-of": wire.join_names(holders),
                "epoch-pks": wire.join_keys([self._keys[h][0] for h in holders]),
                "epoch-sigs": b"".join(self._keys[h][1] for h in holders)}

    # ---- the round -------------------------------------------------------------------------
    def _masking(self, index: int, nodes: list[int], size: int, length: int | None = None) -> dict[int, dict[str, Any]]:
        """Open round ``index`` for ``nodes``: the wire record each participant's masked-input message carries.
        ``size`` model values (a training round: the masked vector is the weighted update's, longer), or
        ``length`` field elements (a secure sum)."""
        if len(nodes) < 2:
            raise SecAggAbort(f"{len(nodes)} site sampled: secure aggregation needs at least 2")
        for node in self._lost:  # without keys of the epoch: it takes part again after a new one
            self._node.pop(self._name.pop(node, ""), None)
        self._lost = set()
        keyed = self._ensure_epoch(nodes)
        participants = [n for n in nodes if n in self._name]
        if len(participants) < 2:
            raise SecAggAbort(f"{len(participants)} sites published keys: secure aggregation needs at least 2")
        names = {self._name[n] for n in participants}
        hoods = {self._name[n]: sorted(self._graph[self._name[n]] & names) for n in participants}
        self._codec = WeightedUpdateCodec(self.clip, self.value_bits, size, self.field_bits)
        self._server = MaskingServer(field_codec(self.clip, self.value_bits, self.field_bits),
                                     self._codec.length if length is None else length, hoods)
        self._ids = {node: k + 1 for k, node in enumerate(sorted(participants))}
        k = min(self._k, len(participants) - 1)
        self._entry().update({"sites": len(nodes), "epoch": self.epoch, "key_exchange": keyed, "neighbours": k,
                              "threshold": threshold_for(self.threshold, k + 1)})
        out = {}
        for node in participants:
            name = self._name[node]
            rec = {"round": index, "id": self._ids[node], **self._tag(), "epoch": self.epoch, "size": size,
                   "clip": self.clip, "value-bits": self.value_bits, "field-bits": self.field_bits,
                   "threshold": self.threshold, "neighbours": wire.join_names(hoods[name])}
            if name not in self._agreed:
                rec.update(self._epoch_record(name))
            out[node] = rec
        return out

    def open(self, server_round: int, messages: list[Message], grid: Grid, size: int) -> list[Message]:
        """The ``train.secagg`` messages for the sites with keys (after a key epoch, if one is needed).

        ``messages`` are the strategy's training messages (one per sampled site), ``size`` the number of
        model values."""
        self._grid, self._round = grid, server_round
        records = self._masking(server_round, sorted(m.metadata.dst_node_id for m in messages), size)
        out = []
        for m in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            node = m.metadata.dst_node_id
            if node not in records:  # it failed the key stage (rejected there, with its reason): not in the round
                continue
            content = RecordDict(dict(m.content.items()))
            content[WIRE_KEY] = ConfigRecord(records[node])
            out.append(Message(content, dst_node_id=node, message_type="train.secagg"))
        self._trained = {m.metadata.dst_node_id for m in out}
        self._out = out
        self._t_masked = time.monotonic()
        return out

    def _masked(self, good: dict[int, Message]) -> None:
        """Stage 2's well-formed masked inputs into the round's server; a reply without one is rejected."""
        assert self._server is not None
        for node, msg in good.items():
            record = recordview.arrays(msg.content, MASKED_KEY)
            reason: str | None = "reply has no masked vector"
            if record is not None and "y" in record:
                try:
                    y = unpack_field(record["y"], self.field_bits)
                    reason = self._check_vector(y)
                except ValueError as err:
                    reason = str(err)
            if reason is not None:
                self._reject(node, "masked_input", reason)
                continue
            w = msg.content[WIRE_KEY]
            name = self._name[node]
            self._server.masked[name] = Masked(y, int(w["threshold"]),  # type: ignore[call-overload]
                                               dict(zip(wire.split_names(w["to"]), wire.split(w["shares"]), strict=True)))  # type: ignore[arg-type]
            self._agreed.add(name)

    def _check_vector(self, y: np.ndarray) -> str | None:
        assert self._server is not None
        if y.shape != (self._server.length,):
            return f"masked vector has shape {y.shape}, expected ({self._server.length},)"
        codec = self._server.codec
        if codec.bits < 64 and y.size and int(y.max()) >= codec.modulus:
            return f"masked vector has values outside Z_2^{codec.bits}"
        return None

    def _unmask(self) -> tuple[np.ndarray, list[int], list[int]]:
        """The unmasking exchange; (the survivors' field sum, survivors' nodes, dropped nodes)."""
        assert self._server is not None
        survivors = sorted(self._server.masked)
        dropped = sorted(set(self._server.neighbours) - set(survivors))
        if len(survivors) < 2:
            raise SecAggAbort(f"{len(survivors)} masked inputs: secure aggregation needs at least 2")
        requests = self._server.requests()
        for name, (surv, _, _) in requests.items():  # each site reveals nothing below its threshold: do not ask
            if len(surv) < self._server.masked[name].threshold:
                raise SecAggAbort(f"{len(surv)} survivors in {name}'s neighbourhood, its threshold is "
                                  f"{self._server.masked[name].threshold}")
        self._ids = {self._node[s]: k + 1 for k, s in enumerate(survivors)}
        records = {}
        for name, (surv, drop, inbox) in requests.items():
            senders = sorted(inbox)
            records[self._node[name]] = {"epoch": self.epoch, "survivors": wire.join_names(surv),
                                         "dropped": wire.join_names(drop), "from": wire.join_names(senders),
                                         "shares": wire.join([inbox[s] for s in senders])}
        replies = self._exchange("unmask", "query.secagg_unmask", records)
        opened = {}
        for node, r in replies.items():
            b_of, seed_of = wire.split_names(r["b-of"]), wire.split_names(r["seed-of"])
            seeds = wire.split_fixed(r["seeds"], len(seed_of), KEY_BYTES)  # type: ignore[arg-type]
            opened[self._name[node]] = (dict(zip(b_of, wire.split(r["b-shares"]), strict=True)),  # type: ignore[arg-type]
                                        dict(zip(seed_of, seeds, strict=True)))
        try:
            total = self._server.unmask(opened)
        except (ValueError, TypeError, KeyError) as err:
            raise SecAggAbort(f"the unmasking shares do not combine ({err})") from None
        thresholds = [m.threshold for m in self._server.masked.values()]
        self._entry().update({"survivors": len(survivors), "dropped": len(dropped),
                              "threshold": max(thresholds)})
        return total, [self._node[s] for s in survivors], [self._node[d] for d in dropped]

    def close(self, replies: Iterable[Message]) -> Aggregate:
        """Collect the masked inputs, unmask; the survivors' decoded aggregate."""
        assert self._server is not None and self._codec is not None
        t0 = time.monotonic()
        good = self._screen("masked_input", replies, self._trained, self._out)
        self._masked(good)
        self._entry()["stages"]["masked_input"] = {"sent": len(self._trained), "ok": len(self._server.masked),
                                                   "seconds": round(t0 - self._t_masked, 4)}
        t1 = time.monotonic()
        total, survivors, dropped = self._unmask()
        aggregate = self._codec.decode(total)
        self._entry().update({"unmask_seconds": round(time.monotonic() - t1, 4), "clipped": aggregate.clipped})
        log(INFO, "round %s secagg: sum of %s sites unmasked (%s dropped, key epoch %s)",
            self._round, len(survivors), len(dropped), self.epoch)
        if aggregate.clipped:
            log(WARNING, "round %s secagg: %s update values exceeded aggregation.clip=%g and were clipped; "
                "raise aggregation.clip to keep the aggregate exact", self._round, aggregate.clipped, self.clip)
        return aggregate

    def secure_sum(self, grid: Grid, nodes: list[int], content: RecordDict, message_type: str, length: int,
                   sum_round: int) -> tuple[np.ndarray, list[int]]:
        """One secure sum outside the training rounds (a key epoch first if needed).

        ``content`` goes to each node in a ``message_type`` message; each site replies with its masked
        vector of ``length`` field elements. Returns the survivors' field sum and their node ids."""
        self._grid, self._round = grid, sum_round
        records = self._masking(sum_round, sorted(nodes), length, length)
        msgs = []
        for node, rec in records.items():
            body = RecordDict(dict(content.items()))
            body[WIRE_KEY] = ConfigRecord(rec)
            msgs.append(Message(body, dst_node_id=node, message_type=message_type))
        self._trained = set(records)
        t0 = time.monotonic()
        good = self._screen("masked_input", self._grid.send_and_receive(msgs, timeout=self.stage_timeout),
                            self._trained, msgs)
        self._masked(good)
        assert self._server is not None
        self._entry()["stages"]["masked_input"] = {"sent": len(msgs), "ok": len(self._server.masked),
                                                   "seconds": round(time.monotonic() - t0, 4)}
        total, survivors, _ = self._unmask()
        return total, survivors


def _check_keys(r: ConfigRecord, agg: SecureAggregator, node: int) -> str | None:
    name, pk, sig = r.get("name"), r.get("pk"), r.get("sig")
    if not wire.is_name(name):
        return f"its name is not a printable string of 1..{wire.MAX_NAME} characters"
    if not isinstance(pk, bytes) or len(pk) != KEY_BYTES or not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
        return f"its key and signature are not {KEY_BYTES} and {SIGNATURE_BYTES} bytes"
    return None


def _check_masked(r: ConfigRecord, agg: SecureAggregator, node: int) -> str | None:
    assert agg._server is not None
    name = agg._name[node]
    hood = agg._server.neighbours[name]
    t, blob = r.get("threshold"), r.get("shares")
    if not _is_int(t) or not 2 <= t <= len(hood) + 1:  # type: ignore[operator]
        return f"its threshold is not an integer in 2..{len(hood) + 1} (its neighbourhood)"
    to = _names(r.get("to"), hood)
    if to is None or not isinstance(blob, bytes):
        return "'to' is not a list of its neighbours, or 'shares' is not bytes"
    try:
        items = wire.split(blob)
    except ValueError as err:
        return str(err)
    if len(items) != len(to):
        return f"{len(items)} shares for {len(to)} recipients"
    if any(len(c) > MAX_SHARE_BYTES + SEAL_OVERHEAD for c in items):
        return "a sealed share is longer than a share can be"
    return None


def _check_unmask(r: ConfigRecord, agg: SecureAggregator, node: int) -> str | None:
    assert agg._server is not None
    name = agg._name[node]
    hood = [name, *agg._server.neighbours[name]]
    b_of, seed_of = _names(r.get("b-of"), hood), _names(r.get("seed-of"), hood)
    blob, seeds = r.get("b-shares"), r.get("seeds")
    if b_of is None or seed_of is None or not isinstance(blob, bytes) or not isinstance(seeds, bytes):
        return "'b-of' and 'seed-of' are not lists of its neighbourhood, or the shares and seeds are not bytes"
    if set(b_of) & set(seed_of):
        return "it revealed both kinds of secret for one site"
    if set(seed_of) & set(agg._server.masked):
        return "it revealed a round seed with a site that survived"
    try:
        items = wire.split(blob)
    except ValueError as err:
        return str(err)
    if len(items) != len(b_of) or not all(_is_share(s) for s in items):
        return "'b-shares' are not one Shamir share (4-byte index > 0, then 17-byte chunks) per site of 'b-of'"
    if len(seeds) != KEY_BYTES * len(seed_of):
        return f"'seeds' are not {KEY_BYTES} bytes per site of 'seed-of'"
    return None


#: The reply checks of each stage (the masked vectors themselves are checked by :meth:`SecureAggregator._masked`).
CHECKS = {"keys": _check_keys, "masked_input": _check_masked, "unmask": _check_unmask}
