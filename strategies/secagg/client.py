"""The site's half of secure aggregation, carried in Flower messages.

The ClientApp registers one handler per protocol stage (``app/client_app.py``):

=====================  ============================  ==================================
message type           site receives                 site replies
=====================  ============================  ==================================
``query.secagg_keys``  its protocol id, threshold    its two X25519 public keys
``query.secagg_share`` every site's public keys      encrypted Shamir shares, per peer
``train.secagg``       global model + its shares     masked weighted update (uint64)
``query.secagg_unmask`` survivors and dropped ids    its shares of b (survivors) / s_sk
=====================  ============================  ==================================

Between stages the site's secrets (private keys, self-mask seed, shares it holds) live in
``context.state`` under :data:`STATE_KEY`, so the protocol survives the ClientApp being a
fresh process per message (as in Flower's deployment and simulation runtimes). Each
stage checks that the message belongs to the round the state was opened for and comes
in protocol order: a replayed or out-of-order message is refused with a clear error, and
never makes the site reveal both shares of one peer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from strategies.secagg.codec import FieldCodec
from strategies.secagg.protocol import SecAggAbort, SecAggClient
from strategies.secagg.vector import FIELD_BITS, WeightedUpdateCodec

WIRE_KEY = "secagg"
STATE_KEY = "secagg-state"
MASKED_KEY = "masked"
PROTOCOL_ERROR = 409  # Error code of a refused (out-of-order, replayed, forged) stage message

STAGES = ("keys", "share", "masked_input", "unmask")


class ProtocolError(RuntimeError):
    """A stage message the site must refuse."""


def field_codec(clip: float, value_bits: int) -> FieldCodec:
    """The field all masks live in (shared by :class:`WeightedUpdateCodec`)."""
    return FieldCodec(clip, value_bits, max_sites=1 << (FIELD_BITS - value_bits))


# ---- state (de)serialisation --------------------------------------------------------------
def _save(context: Context, client: SecAggClient, server_round: int, stage: str, clip: float, value_bits: int) -> None:
    peers = sorted(client.peers)
    held = sorted(client.held)
    context.state[STATE_KEY] = ConfigRecord({
        "round": server_round, "stage": stage, "site": client.site, "threshold": client.threshold,
        "clip": clip, "value-bits": value_bits,
        "c-sk": client.c_sk, "s-sk": client.s_sk, "b-seed": client.b_seed,
        "peer-ids": peers, "peer-c": [client.peers[i][0] for i in peers],
        "peer-s": [client.peers[i][1] for i in peers],
        "held-ids": held, "held-b": [client.held[i][0] for i in held],
        "held-sk": [client.held[i][1] for i in held],
    })


def _load(context: Context, server_round: int, expected: str) -> tuple[SecAggClient, ConfigRecord]:
    if STATE_KEY not in context.state.config_records:
        raise ProtocolError(f"secagg stage {expected!r} of round {server_round} before any key advertisement")
    st = context.state.config_records[STATE_KEY]
    if int(st["round"]) != server_round:
        raise ProtocolError(f"secagg message for round {server_round}, but this site is in round {st['round']} "
                            "(replayed or stale message)")
    prev = STAGES[STAGES.index(expected) - 1]
    if st["stage"] != prev:
        raise ProtocolError(f"secagg stage {expected!r} must follow {prev!r}, but this site's last stage was "
                            f"{st['stage']!r} (replayed or out-of-order message)")
    client = SecAggClient(int(st["site"]), int(st["threshold"]), field_codec(float(st["clip"]), int(st["value-bits"])),
                          c_sk=st["c-sk"], s_sk=st["s-sk"], b_seed=st["b-seed"])  # type: ignore[arg-type]
    ids = list(st["peer-ids"])  # type: ignore[arg-type]
    client.peers = {int(i): (c, s) for i, c, s in zip(ids, st["peer-c"], st["peer-s"])}  # type: ignore[arg-type]
    held = list(st["held-ids"])  # type: ignore[arg-type]
    client.held = {int(i): (b, k) for i, b, k in zip(held, st["held-b"], st["held-sk"])}  # type: ignore[arg-type]
    return client, st


def _wire(msg: Message) -> ConfigRecord:
    if WIRE_KEY not in msg.content.config_records:
        raise ProtocolError(f"message has no {WIRE_KEY!r} record")
    return msg.content.config_records[WIRE_KEY]


def _reply(msg: Message, record: dict, extra: RecordDict | None = None) -> Message:
    content = extra if extra is not None else RecordDict()
    content[WIRE_KEY] = ConfigRecord(record)
    return Message(content, reply_to=msg)


def refuse(msg: Message, err: Exception) -> Message:
    """The error reply for a stage this site will not (or cannot) complete."""
    return Message(Error(code=PROTOCOL_ERROR, reason=f"secagg: {err}"), reply_to=msg)


# ---- the four stages ----------------------------------------------------------------------
def advertise_keys(msg: Message, context: Context) -> Message:
    """Stage 0: open this round's state and publish two fresh public keys."""
    w = _wire(msg)
    server_round = int(w["round"])
    old = context.state.config_records.get(STATE_KEY)
    if old is not None and int(old["round"]) >= server_round:
        raise ProtocolError(f"key advertisement for round {server_round} after round {old['round']} "
                            "(replayed message)")
    client = SecAggClient(int(w["id"]), int(w["threshold"]), field_codec(float(w["clip"]), int(w["value-bits"])))
    c_pk, s_pk = client.advertise()
    _save(context, client, server_round, "keys", float(w["clip"]), int(w["value-bits"]))
    return _reply(msg, {"round": server_round, "id": client.site, "c-pk": c_pk, "s-pk": s_pk})


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 1: Shamir-share the self-mask seed and mask key, encrypted per recipient."""
    w = _wire(msg)
    server_round = int(w["round"])
    client, st = _load(context, server_round, "share")
    ids = [int(i) for i in w["ids"]]  # type: ignore[union-attr]
    public = {i: (c, s) for i, c, s in zip(ids, w["c-pks"], w["s-pks"])}  # type: ignore[arg-type]
    if client.site not in public:
        raise ProtocolError(f"this site (id {client.site}) is missing from the broadcast key list")
    if tuple(public[client.site]) != _own_public(client):
        raise ProtocolError("the broadcast key list carries a different public key for this site (tampered)")
    shares = client.share_keys(public)
    _save(context, client, server_round, "share", float(st["clip"]), int(st["value-bits"]))
    to = sorted(shares)
    return _reply(msg, {"round": server_round, "id": client.site, "to": to, "shares": [shares[j] for j in to]})


def _own_public(client: SecAggClient) -> tuple[bytes, bytes]:
    from strategies.secagg.keys import public_of

    return public_of(client.c_sk), public_of(client.s_sk)


def masked_input(msg: Message, context: Context, encode: Callable[[WeightedUpdateCodec], np.ndarray],
                 extra: RecordDict) -> Message:
    """Stage 2: store the shares addressed to this site, reply with its masked vector.

    ``encode`` turns this site's training result into its field vector for the given codec
    (:meth:`WeightedUpdateCodec.encode`); ``extra`` holds what else the reply carries.
    """
    w = _wire(msg)
    server_round = int(w["round"])
    client, st = _load(context, server_round, "masked_input")
    inbox = {int(i): ct for i, ct in zip(w["from"], w["shares"])}  # type: ignore[arg-type]
    vector = encode(WeightedUpdateCodec(float(st["clip"]), int(st["value-bits"]), int(w["size"])))
    y = client.masked_input(inbox, vector)
    _save(context, client, server_round, "masked_input", float(st["clip"]), int(st["value-bits"]))
    extra[MASKED_KEY] = ArrayRecord({"y": Array(y)})
    return _reply(msg, {"round": server_round, "id": client.site}, extra)


def unmask(msg: Message, context: Context) -> Message:
    """Stage 3: shares of ``b`` for the survivors and of ``s_sk`` for the dropped, never both."""
    w = _wire(msg)
    server_round = int(w["round"])
    client, st = _load(context, server_round, "unmask")
    out = client.unmask([int(i) for i in w["survivors"]], [int(i) for i in w["dropped"]])  # type: ignore[union-attr]
    _save(context, client, server_round, "unmask", float(st["clip"]), int(st["value-bits"]))
    owners = sorted(out)
    return _reply(msg, {"round": server_round, "id": client.site, "owners": owners,
                        "kinds": [out[o][0] for o in owners], "shares": [out[o][1] for o in owners]})


__all__ = ["MASKED_KEY", "PROTOCOL_ERROR", "STAGES", "STATE_KEY", "WIRE_KEY", "ProtocolError", "SecAggAbort",
           "advertise_keys", "field_codec", "masked_input", "refuse", "share_keys", "unmask"]
