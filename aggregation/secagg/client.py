"""The site's half of secure aggregation, carried in Flower messages.

======================  =======================================  ======================================
message type            site receives                            site replies
======================  =======================================  ======================================
``query.secagg_keys``   the key epoch                            a fresh X25519 key, signed (identity)
``train.secagg``        global model, its neighbours of the      masked update, its threshold, sealed
                        round (+ the epoch's signed keys, once)  shares of its self-mask seed
``query.secagg_unmask`` survivors and dropped of its             its shares of the survivors' seeds,
                        neighbourhood, the shares sent to it     the round seeds with the dropped
======================  =======================================  ======================================

The secure sums of statistics and test metrics use the same two last stages on their own
channel (``channel: sum``; their own epoch, chains and numbering), in the sum's message type.

What a site keeps between messages (:class:`~aggregation.secagg.protocol.SiteState`: chain keys,
the open round) lives in ``context.state`` and, at a deployed site, also in a 0600 file of its
state folder (``<state-dir>/secagg/<site>/run-<run>-<channel>.state``, written atomically), so that
a site restarted mid-run resumes its chains. Every check of :mod:`aggregation.secagg.protocol`
runs before any secret is used; a refusal is an error reply naming the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from aggregation.base import SiteEnv
from aggregation.secagg import wire
from aggregation.secagg.codec import FieldCodec
from aggregation.secagg.protocol import SIGNATURE_BYTES, MaskingSite, NoKeys, Refused, SecAggAbort, SiteState
from aggregation.secagg.vector import FIELD_BITS, WeightedUpdateCodec, pack_field
from core import recordview
from core.identity import IdentityError
from core.replies import ReplyError

WIRE_KEY = "secagg"
MASKED_KEY = "masked"
PROTOCOL_ERROR = int(ReplyError.PROTOCOL_ERROR)  # a refused (out-of-order, replayed, forged) stage message
NO_KEYS = int(ReplyError.NO_KEYS)  # no keys of the round's epoch: the coordinator opens a new one
STAGES = ("keys", "masked_input", "unmask")
TRAIN_CHANNEL = "train"
#: The secure sums of federated statistics and test metrics: their own epoch, chains and numbering.
SUM_CHANNEL = "sum"
SEAL_OVERHEAD = 12 + 16  # nonce + GCM tag



def channel_of(w: ConfigRecord) -> str:
    return SUM_CHANNEL if str(w.get("channel", "")) == SUM_CHANNEL else TRAIN_CHANNEL


def field_codec(clip: float, value_bits: int, field_bits: int = FIELD_BITS) -> FieldCodec:
    """The field ``Z_(2^field_bits)`` all masks live in (shared by :class:`WeightedUpdateCodec`)."""
    return FieldCodec(clip, value_bits, max_sites=1 << (field_bits - value_bits))


# ---- where the state lives -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateStore:
    """A site's :class:`SiteState` of one channel: in ``context.state``, and in a file if ``folder``."""

    context: Context
    channel: str
    folder: Path | None

    @classmethod
    def of(cls, context: Context, channel: str, env: SiteEnv, name: str) -> StateStore:
        """The store of ``channel`` for this run at the site ``name`` (a 0600 file in the state folder, if it has one)."""
        folder = None
        if env.state_dir is not None:
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "site"
            folder = Path(env.state_dir) / "secagg" / safe
        return cls(context, channel, folder)

    @property
    def key(self) -> str:
        """The ``context.state`` record that holds the channel's state."""
        return f"secagg-{self.channel}"

    @property
    def path(self) -> Path | None:
        """The state file in the site's state folder (None without one)."""
        return None if self.folder is None else self.folder / f"run-{self.context.run_id}-{self.channel}.state"

    def load(self) -> SiteState:
        """The channel's state: from ``context.state``, else from the state file (a restarted site), else fresh."""
        rec = recordview.config(self.context.state, self.key)
        if rec is not None and isinstance(rec.get("state"), bytes):
            return SiteState.from_bytes(rec["state"])  # type: ignore[arg-type]
        if self.path is not None and self.path.is_file():  # a site restarted mid-run: its chains, from its folder
            from core.secret_files import SecretFileError, read_private

            try:
                return SiteState.from_bytes(read_private(self.path, "secure-aggregation state"))
            except SecretFileError as err:
                raise Refused(str(err)) from None
        return SiteState()

    def save(self, state: SiteState) -> None:
        """Keep ``state`` in ``context.state`` and, atomically and 0600, in the state file."""
        data = state.to_bytes()
        if self.path is not None:
            from core.secret_files import write_private

            write_private(self.path, data)  # atomically (a temporary file renamed over it), 0600
        self.context.state[self.key] = ConfigRecord({"state": data})


def _wire(msg: Message) -> ConfigRecord:
    rec = recordview.config(msg.content, WIRE_KEY)
    if rec is None:
        raise Refused(f"message has no {WIRE_KEY!r} record")
    return rec


def _reply(msg: Message, record: dict, extra: RecordDict | None = None) -> Message:
    content = extra if extra is not None else RecordDict()
    content[WIRE_KEY] = ConfigRecord(record)
    return Message(content, reply_to=msg)


def refuse(msg: Message, err: Exception) -> Message:
    """The error reply for a stage this site will not (or cannot) complete."""
    code = NO_KEYS if isinstance(err, NoKeys) else PROTOCOL_ERROR
    return Message(Error(code=code, reason=f"secagg: {err}"), reply_to=msg)


def _names(value: object, what: str) -> list[str]:
    try:
        return wire.split_names(value, what)
    except ValueError as err:
        raise Refused(str(err)) from None


def _site(context: Context, w: ConfigRecord, env: SiteEnv) -> tuple[MaskingSite, StateStore]:
    try:
        identity = env.identity()
    except IdentityError as err:
        raise Refused(f"this site cannot take part in secure aggregation: {err}") from None
    channel = channel_of(w)
    store = StateStore.of(context, channel, env, identity.name)
    return MaskingSite(identity, int(context.run_id), channel, store.load(), env.masking), store


# ---- the three stages ------------------------------------------------------------------------------------
def advertise_keys(msg: Message, context: Context, env: SiteEnv) -> Message:
    """A new key epoch: a fresh X25519 key, signed by this site's identity."""
    w = _wire(msg)
    site, store = _site(context, w, env)
    public, signature = site.advertise(int(w["epoch"]))  # type: ignore[call-overload]
    store.save(site.state)
    return _reply(msg, {"round": int(w["round"]), "id": int(w["id"]), "name": site.name,  # type: ignore[call-overload]
                        "pk": public, "sig": signature})


def masked_input(msg: Message, context: Context, env: SiteEnv, encode: Callable[[WeightedUpdateCodec], np.ndarray],
                 extra: RecordDict) -> Message:
    """The site's masked vector of round ``round`` (after agreeing the epoch's keys if the message
    carries them and this site has not yet), its threshold and its sealed shares.

    ``encode`` turns this site's result into its field vector for the given codec
    (:meth:`WeightedUpdateCodec.encode`); ``extra`` holds what else the reply carries.
    """
    w = _wire(msg)
    site, store = _site(context, w, env)
    index, epoch = int(w["round"]), int(w["epoch"])  # type: ignore[call-overload]
    if site.state.epoch != epoch:
        if site.state.epoch > epoch:
            raise Refused(f"a message of key epoch {epoch}, but this site is in epoch {site.state.epoch} (stale)")
        if "epoch-names" not in w:
            raise NoKeys(f"a message of key epoch {epoch}, but this site has not agreed that epoch's keys and the "
                         "message does not carry them")
        names = _names(w["epoch-names"], "epoch-names")
        holders = _names(w["epoch-of"], "epoch-of")
        try:
            publics = wire.split_keys(w["epoch-pks"], len(holders), "epoch keys")  # type: ignore[arg-type]
            sigs = wire.split_fixed(w["epoch-sigs"], len(holders), SIGNATURE_BYTES, "epoch signatures")  # type: ignore[arg-type]
        except ValueError as err:
            raise Refused(str(err)) from None
        site.agree(epoch, names, dict(zip(holders, zip(publics, sigs, strict=True), strict=True)),
                   int(w["graph-k"]))  # type: ignore[call-overload]
    neighbours = _names(w["neighbours"], "neighbours")
    fb = int(w.get("field-bits", FIELD_BITS))  # type: ignore[call-overload]
    codec = WeightedUpdateCodec(float(w["clip"]), int(w["value-bits"]), int(w["size"]), fb)  # type: ignore[arg-type,call-overload]
    vector = encode(codec)
    y, t, sealed = site.mask(index, neighbours, vector, codec.field, float(w["threshold"]))  # type: ignore[arg-type]
    store.save(site.state)
    extra[MASKED_KEY] = ArrayRecord({"y": pack_field(y, fb)})  # field-wide bits each, no padding
    to = sorted(sealed)
    return _reply(msg, {"round": index, "id": int(w["id"]), "threshold": t, "to": wire.join_names(to),  # type: ignore[call-overload]
                        "shares": wire.join([sealed[j] for j in to])}, extra)


def unmask(msg: Message, context: Context, env: SiteEnv) -> Message:
    """Shares of the survivors' self-mask seeds and the round seeds with the dropped: never both for one peer."""
    w = _wire(msg)
    site, store = _site(context, w, env)
    senders = _names(w["from"], "from")
    try:
        cts = wire.split(w["shares"], "shares")  # type: ignore[arg-type]
    except ValueError as err:
        raise Refused(str(err)) from None
    if len(cts) != len(senders):
        raise Refused(f"{len(cts)} shares for {len(senders)} senders")
    b_shares, seeds = site.unmask(int(w["round"]), _names(w["survivors"], "survivors"),  # type: ignore[call-overload]
                                  _names(w["dropped"], "dropped"), dict(zip(senders, cts, strict=True)))
    store.save(site.state)
    owners, peers = sorted(b_shares), sorted(seeds)
    return _reply(msg, {"round": int(w["round"]), "id": int(w["id"]), "b-of": wire.join_names(owners),  # type: ignore[call-overload]
                        "b-shares": wire.join([b_shares[o] for o in owners]), "seed-of": wire.join_names(peers),
                        "seeds": b"".join(seeds[p] for p in peers)})


__all__ = ["MASKED_KEY", "NO_KEYS", "PROTOCOL_ERROR", "STAGES", "SUM_CHANNEL", "TRAIN_CHANNEL", "WIRE_KEY", "NoKeys",
           "Refused", "SecAggAbort", "StateStore", "advertise_keys", "field_codec", "masked_input",
           "refuse", "unmask"]
