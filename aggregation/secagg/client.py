"""The site's half of secure aggregation, carried in Flower messages.

The ClientApp registers one handler per protocol stage (``app/client_app.py``):

======================  ============================  ==================================
message type            site receives                 site replies
======================  ============================  ==================================
``query.secagg_keys``   its protocol id, threshold    its two X25519 public keys
``query.secagg_share``  every site's public keys      encrypted Shamir shares, per peer
``train.secagg``        global model + its shares     masked weighted update (uint64)
``query.secagg_unmask`` survivors and dropped ids     its shares of b (survivors) / s_sk
======================  ============================  ==================================

Pipelining: the ``train.secagg`` reply also advertises fresh keys for the *next* round,
and the ``query.secagg_unmask`` message carries the next round's key list, so its reply
also holds the next round's encrypted shares. From round 2 on, a round then costs two
message exchanges instead of four (the server falls back to the full four when the sites
sampled differ from those that shared ahead).

Between stages the site's secrets (private keys, self-mask seed, shares it holds) live in
``context.state`` under :data:`STATE_KEY` (and :data:`NEXT_KEY` for the next round's
keys), so the protocol survives the ClientApp being a fresh process per message (as in
Flower's deployment and simulation runtimes). Each stage checks that the message belongs
to the round the state was opened for and comes in protocol order; keys for a round are
refused once the site has sent its masked input for it, and a round is unmasked once: a
replayed or out-of-order message is refused with a clear error, and never makes the site
reveal both shares of one peer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from aggregation.secagg import wire
from aggregation.secagg.codec import FieldCodec
from aggregation.secagg.protocol import SecAggAbort, SecAggClient
from aggregation.secagg.vector import FIELD_BITS, WeightedUpdateCodec, pack_field
from core import recordview
from core.replies import ReplyError

WIRE_KEY = "secagg"
STATE_KEY = "secagg-state"
NEXT_KEY = "secagg-next"    # the next round's keys, advertised early (pipelining)
GUARD_KEY = "secagg-guard"  # the last round this site masked an input for
MASKED_KEY = "masked"
PROTOCOL_ERROR = int(ReplyError.PROTOCOL_ERROR)  # a refused (out-of-order, replayed, forged) stage message

STAGES = ("keys", "share", "masked_input", "unmask")
#: A protocol instance outside the training rounds (``channel`` in the wire record): the sums of
#: federated statistics and test metrics number their own rounds and keep their own state.
SUM_CHANNEL = "sum"


def _state_keys(w: ConfigRecord) -> tuple[str, str]:
    """(state key, replay-guard key) of the protocol instance a message belongs to."""
    if str(w.get("channel", "")) == SUM_CHANNEL:
        return STATE_KEY + "-sum", GUARD_KEY + "-sum"
    return STATE_KEY, GUARD_KEY


class ProtocolError(RuntimeError):
    """A stage message the site must refuse."""


def field_codec(clip: float, value_bits: int, field_bits: int = FIELD_BITS) -> FieldCodec:
    """The field ``Z_(2^field_bits)`` all masks live in (shared by :class:`WeightedUpdateCodec`)."""
    return FieldCodec(clip, value_bits, max_sites=1 << (field_bits - value_bits))


def _fb(record: ConfigRecord) -> int:
    """The field's bits a stage message or the site's state names (53 when it names none)."""
    return int(record.get("field-bits", FIELD_BITS))  # type: ignore[arg-type]


# ---- state (de)serialisation --------------------------------------------------------------
def _ids_bytes(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype="<u4").tobytes()


def _ids_of(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<u4").tolist()  # type: ignore[no-any-return]


def _save(context: Context, client: SecAggClient, server_round: int, stage: str, clip: float, value_bits: int,
          key: str = STATE_KEY, field_bits: int = FIELD_BITS) -> None:
    """The site's state of this protocol instance: a few scalars and one ``secrets`` value that
    holds its keys, seeds, its peers' public keys, the shares it holds and the share keys it agreed
    (:mod:`aggregation.secagg.wire`; one value instead of a dozen lists, which Flower checks item by item)."""
    peers = sorted(client.peers)
    held = sorted(client.held)
    agreed = sorted(client.share_keys_by_peer)
    blob = wire.join([
        client.c_sk, client.s_sk, client.s_seed, client.b_seed,
        _ids_bytes(peers), wire.join_keys([client.peers[i][0] for i in peers]),
        wire.join_keys([client.peers[i][1] for i in peers]),
        _ids_bytes(held), wire.join([client.held[i][0] for i in held]), wire.join([client.held[i][1] for i in held]),
        _ids_bytes(agreed), wire.join_keys([client.share_keys_by_peer[i] for i in agreed]),
    ])
    context.state[key] = ConfigRecord({
        "round": server_round, "stage": stage, "site": client.site, "threshold": client.threshold,
        "clip": clip, "value-bits": value_bits, "field-bits": field_bits, "secrets": blob,
    })


def _load(context: Context, server_round: int, expected: str,
          key: str = STATE_KEY) -> tuple[SecAggClient, ConfigRecord]:
    st = recordview.config(context.state, key)
    if st is None:
        raise ProtocolError(f"secagg stage {expected!r} of round {server_round} before any key advertisement")
    if int(st["round"]) != server_round:
        raise ProtocolError(f"secagg message for round {server_round}, but this site is in round {st['round']} "
                            "(replayed or stale message)")
    prev = STAGES[STAGES.index(expected) - 1]
    if st["stage"] != prev:
        raise ProtocolError(f"secagg stage {expected!r} must follow {prev!r}, but this site's last stage was "
                            f"{st['stage']!r} (replayed or out-of-order message)")
    try:
        (c_sk, s_sk, s_seed, b_seed, peer_ids, peer_c, peer_s, held_ids, held_b, held_sk, agreed_ids,
         agreed) = wire.split(st["secrets"], "secagg state")  # type: ignore[arg-type]
    except (KeyError, ValueError) as err:
        raise ProtocolError(f"this site's secagg state is damaged ({err})") from err
    client = SecAggClient(int(st["site"]), int(st["threshold"]), field_codec(float(st["clip"]), int(st["value-bits"]), _fb(st)),
                          c_sk=c_sk, s_sk=s_sk, s_seed=s_seed, b_seed=b_seed)
    ids = _ids_of(peer_ids)
    client.peers = dict(zip(ids, zip(wire.split_keys(peer_c, len(ids)), wire.split_keys(peer_s, len(ids)))))
    client.held = dict(zip(_ids_of(held_ids), zip(wire.split(held_b), wire.split(held_sk))))
    with_keys = _ids_of(agreed_ids)
    client.share_keys_by_peer = dict(zip(with_keys, wire.split_keys(agreed, len(with_keys))))
    return client, st


def _wire(msg: Message) -> ConfigRecord:
    rec = recordview.config(msg.content, WIRE_KEY)
    if rec is None:
        raise ProtocolError(f"message has no {WIRE_KEY!r} record")
    return rec


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
    state, guard = _state_keys(w)
    _check_fresh(context, server_round, guard)
    client = SecAggClient(int(w["id"]), int(w["threshold"]), field_codec(float(w["clip"]), int(w["value-bits"]), _fb(w)))
    c_pk, s_pk = client.advertise()
    _save(context, client, server_round, "keys", float(w["clip"]), int(w["value-bits"]), key=state, field_bits=_fb(w))
    return _reply(msg, {"round": server_round, "id": client.site, "c-pk": c_pk, "s-pk": s_pk})


def _check_fresh(context: Context, server_round: int, key: str = GUARD_KEY) -> None:
    """Keys may be (re)made for a round until this site has masked its input for it."""
    guard = recordview.config(context.state, key)
    if guard is not None and int(guard["masked-round"]) >= server_round:
        raise ProtocolError(f"key advertisement for round {server_round}, but this site already sent its masked "
                            f"input for round {guard['masked-round']} (replayed message)")


def _share(client: SecAggClient, ids: list[int], c_pks: bytes, s_pks: bytes) -> dict[int, bytes]:
    public = dict(zip(ids, zip(wire.split_keys(c_pks, len(ids)), wire.split_keys(s_pks, len(ids)))))
    if client.site not in public:
        raise ProtocolError(f"this site (id {client.site}) is missing from the broadcast key list")
    if tuple(public[client.site]) != _own_public(client):
        raise ProtocolError("the broadcast key list carries a different public key for this site (tampered)")
    return client.share_keys(public)


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 1: Shamir-share the self-mask seed and mask key, encrypted per recipient."""
    w = _wire(msg)
    server_round = int(w["round"])
    state, _ = _state_keys(w)
    client, st = _load(context, server_round, "share", key=state)
    shares = _share(client, [int(i) for i in w["ids"]], w["c-pks"], w["s-pks"])  # type: ignore[arg-type]
    _save(context, client, server_round, "share", float(st["clip"]), int(st["value-bits"]), key=state, field_bits=_fb(st))
    to = sorted(shares)
    return _reply(msg, {"round": server_round, "id": client.site, "to": to, "shares": wire.join([shares[j] for j in to])})


def _own_public(client: SecAggClient) -> tuple[bytes, bytes]:
    from aggregation.secagg.keys import public_bytes

    return public_bytes(client.key_object("c")), public_bytes(client.key_object("s"))


def masked_input(msg: Message, context: Context, encode: Callable[[WeightedUpdateCodec], np.ndarray],
                 extra: RecordDict, advertise_next: bool = True) -> Message:
    """Stage 2: store the shares addressed to this site, reply with its masked vector.

    ``encode`` turns this site's training result into its field vector for the given codec
    (:meth:`WeightedUpdateCodec.encode`); ``extra`` holds what else the reply carries.
    When the server pipelines, the reply also advertises fresh keys for the next round
    (unless ``advertise_next`` is False: fault injection).
    """
    w = _wire(msg)
    server_round = int(w["round"])
    state, guard = _state_keys(w)
    client, st = _load(context, server_round, "masked_input", key=state)
    inbox = {int(i): ct for i, ct in zip(w["from"], wire.split(w["shares"], "shares"), strict=True)}  # type: ignore[arg-type, call-overload]
    vector = encode(WeightedUpdateCodec(float(st["clip"]), int(st["value-bits"]), int(w["size"]), _fb(st)))
    y = client.masked_input(inbox, vector)
    client.forget_keys()
    _save(context, client, server_round, "masked_input", float(st["clip"]), int(st["value-bits"]), key=state, field_bits=_fb(st))
    context.state[guard] = ConfigRecord({"masked-round": server_round})
    extra[MASKED_KEY] = ArrayRecord({"y": pack_field(y, client.codec.bits)})  # field-wide bits each, no padding
    record: dict = {"round": server_round, "id": client.site}
    if bool(w.get("pipeline", False)) and advertise_next:
        nxt = SecAggClient(0, 0, client.codec)
        record["next-c-pk"], record["next-s-pk"] = nxt.advertise()
        _save(context, nxt, server_round + 1, "keys", float(st["clip"]), int(st["value-bits"]), key=NEXT_KEY, field_bits=_fb(st))
    return _reply(msg, record, extra)


def unmask(msg: Message, context: Context, share_next: bool = True) -> Message:
    """Stage 3: shares of ``b`` for the survivors and of ``s_sk`` for the dropped, never both.

    When the server pipelines, the message also carries the next round's key list and this
    site's next id; the reply then holds this site's encrypted shares for the next round
    (stage 1 of round r+1, done here to save a round trip; not if ``share_next`` is False).
    """
    w = _wire(msg)
    server_round = int(w["round"])
    state, _ = _state_keys(w)
    client, st = _load(context, server_round, "unmask", key=state)
    out = client.unmask([int(i) for i in w["survivors"]], [int(i) for i in w["dropped"]])  # type: ignore[union-attr]
    client.held.clear()  # revealed what it may; the stage check refuses a second unmask
    _save(context, client, server_round, "unmask", float(st["clip"]), int(st["value-bits"]), key=state, field_bits=_fb(st))
    owners = sorted(out)
    record: dict = {"round": server_round, "id": client.site, "owners": owners,
                    "kinds": [out[o][0] for o in owners], "shares": wire.join([out[o][1] for o in owners])}
    if "next-ids" in w and share_next and recordview.config(context.state, NEXT_KEY) is not None and state == STATE_KEY:
        nxt, nst = _load(context, server_round + 1, "share", key=NEXT_KEY)
        nxt.site, nxt.threshold = int(w["next-id"]), int(w["next-threshold"])
        shares = _share(nxt, [int(i) for i in w["next-ids"]], w["next-c-pks"], w["next-s-pks"])  # type: ignore[arg-type]
        _save(context, nxt, server_round + 1, "share", float(nst["clip"]), int(nst["value-bits"]), field_bits=_fb(nst))
        record["next-to"] = sorted(shares)
        record["next-shares"] = wire.join([shares[j] for j in record["next-to"]])
    if recordview.config(context.state, NEXT_KEY) is not None and state == STATE_KEY:
        del context.state[NEXT_KEY]
    return _reply(msg, record)


__all__ = ["GUARD_KEY", "NEXT_KEY", "MASKED_KEY", "PROTOCOL_ERROR", "STAGES", "STATE_KEY", "SUM_CHANNEL", "WIRE_KEY",
           "ProtocolError", "SecAggAbort", "advertise_keys", "field_codec", "masked_input", "refuse", "share_keys", "unmask"]
