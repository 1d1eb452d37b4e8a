"""The site half of ``aggregation=paillier``: decrypt the global model, encrypt the weighted one.

The primitives are in :mod:`aggregation.paillier.client`; this class adapts them to the
ClientApp's :class:`~aggregation.base.SiteHalf` interface. After federated evaluation the
site makes the next round's obfuscators ahead, off the training round's critical path.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from phe import paillier
from typing_extensions import override

from aggregation.base import LocalResult, SiteEnv, SiteHalf, request_encoding
from aggregation.paillier import client as pai
from aggregation.paillier.config import PaillierConfig, packer_for
from aggregation.paillier.crypto import Encryptor, decrypt_all
from aggregation.paillier.split import DECRYPT_MESSAGE, REQUEST_KEY, decrypt_slice, slice_key
from aggregation.paillier.sums import (
    PARTICIPANTS,
    REPLY_KEY,
    REVEAL_KEY,
    REVEAL_MESSAGE,
    SUM_REQUEST,
    IntPacker,
    SumRefused,
    check_reveal,
    contribution_key,
    contribution_mac,
    decided_request,
    decrypt_values,
    request_digest,
    site_decrypt,
    site_encrypt,
)
from core import programs
from core.fixedpoint import STATS, Encoding
from core.programs import ProgramError

_OPENED: dict[str, np.ndarray] = {}
_SUMS = "paillier-sums"  # context.state: the sum contents this site contributed to and the sums it revealed


def _ledger(context: Context) -> ConfigRecord:
    if _SUMS not in context.state:
        context.state[_SUMS] = ConfigRecord()
    return context.state[_SUMS]  # type: ignore[return-value]


class PaillierSite(SiteHalf):
    """A site's key pair comes from its node config (``paillier-keypair``) or ``aggregation.keypair``."""

    def __init__(self, cfg: PaillierConfig) -> None:
        self.cfg = cfg

    def _keys(self, context: Context) -> tuple[pai.ModelCodecFactory, paillier.PaillierPrivateKey, Encryptor]:
        private, encryptor = pai.site_key(context, self.cfg.keypair, self.cfg.obfuscators)
        codec = pai.ModelCodecFactory(packer_for(self.cfg, private.public_key.n.bit_length()), self.cfg.weight_unit)
        return codec, private, encryptor

    def global_state(self, msg: Message, context: Context, template: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        """The public initial model as sent, or the encrypted aggregate decrypted (once per aggregate)."""
        arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
        config = msg.content.config_records.get("config")
        server_round = int(config.get("server-round", 0)) if config is not None else 0  # type: ignore[call-overload]
        # a sealed aggregate opens only for this round or the one before (evaluated after round r, trained in r+1)
        return self.open_model(context, arrays, template, max(0, server_round - 1))

    @override
    def open_model(self, context: Context, arrays: ArrayRecord, template: dict[str, torch.Tensor],
                   min_round: int = 0) -> dict[str, torch.Tensor]:
        codec, private, _ = self._keys(context)
        return pai.global_state(arrays, template, codec, private, self.cfg.workers, context, min_round)

    def reply(self, msg: Message, context: Context, result: LocalResult, env: SiteEnv) -> Message:
        """The encrypted weighted model and rows, and the key's fingerprint; nothing in the clear."""
        codec, private, encryptor = self._keys(context)
        records = pai.reply_records(result.state, env.rows, codec, encryptor, private, context, self.cfg.workers)
        return Message(RecordDict({**records, **result.records}), reply_to=msg)

    def _sum_packer(self, private: paillier.PaillierPrivateKey, enc: Encoding = STATS) -> IntPacker:
        return IntPacker(private.public_key.n.bit_length() - 1, self.cfg.max_sites, enc)

    def sum_reply(self, msg: Message, context: Context, values: np.ndarray, env: SiteEnv) -> Message:
        """The site's values, encrypted, with the MAC that lets a key holder recompute the total
        (:mod:`aggregation.paillier.sums`); nothing in the clear. A request whose content this site
        contributed to under another sum id is refused."""
        from flwr.app import Error

        from aggregation.paillier.server import ct_width
        from core.replies import ReplyError

        private, encryptor = pai.site_key(context, self.cfg.keypair, self.cfg.obfuscators)
        rec = msg.content.config_records[SUM_REQUEST]
        sum_id, what, length = int(rec.get("id", 0)), str(rec.get("what", "")), int(rec.get("length", len(values)))  # type: ignore[call-overload]
        participants = [int(v) for v in rec.get(PARTICIPANTS, [])]  # type: ignore[union-attr]
        if context.node_id not in participants:
            return Message(Error(code=int(ReplyError.POLICY), reason=f"{env.name}: a sum request that does not list "
                                 "this site among its participants"), reply_to=msg)
        digest = request_digest(msg.content)
        seen = _ledger(context)
        earlier = seen.get(f"content:{digest}")
        if earlier is not None and int(earlier) != sum_id:  # type: ignore[call-overload]
            return Message(Error(code=int(ReplyError.POLICY), reason=f"{env.name}: contributed to the same request "
                                 f"already (sum {earlier}); it does not contribute to one content twice"), reply_to=msg)
        seen[f"content:{digest}"] = sum_id
        packer = self._sum_packer(private, request_encoding(msg.content))
        cts = site_encrypt(values, packer, encryptor, ct_width(private.public_key))
        mac = contribution_mac(contribution_key(private.p, private.q), context.run_id, sum_id, what, length, digest,
                               context.node_id, participants, cts)
        return Message(RecordDict({REPLY_KEY: ConfigRecord({"ct": cts, "mac": mac})}), reply_to=msg)

    def open_total(self, context: Context, record: ConfigRecord, key: str) -> np.ndarray:
        """Encrypted totals (``<key>-ct``), decrypted with this site's key (once per process and total)."""
        if key in record:
            return super().open_total(context, record, key)
        blobs = list(record[key + "-ct"])  # type: ignore[arg-type]
        digest = hashlib.sha256(b"".join(bytes(b) for b in blobs)).hexdigest()  # type: ignore[call-overload]
        if digest not in _OPENED:
            private, _ = pai.site_key(context, self.cfg.keypair, self.cfg.obfuscators)
            length = int(record[key + "-n"])  # type: ignore[arg-type]
            _OPENED[digest] = site_decrypt(blobs, length, self._sum_packer(private), private)
        return _OPENED[digest]

    def query(self, msg: Message, context: Context, env: SiteEnv) -> Message:
        """``query.paillier_reveal``: recompute a total from its authenticated contributions and decrypt it
        (:mod:`aggregation.paillier.sums`);
        ``query.paillier_decrypt``: decrypt one slice of an aggregate and return it sealed."""
        if msg.metadata.message_type == DECRYPT_MESSAGE and REQUEST_KEY in msg.content.config_records:
            return self._decrypt_slice(msg, context, env)
        if msg.metadata.message_type != REVEAL_MESSAGE or REVEAL_KEY not in msg.content.config_records:
            return super().query(msg, context, env)
        from flwr.app import Error

        from aggregation.paillier.crypto import add_ciphertexts
        from core.replies import ReplyError

        rec = msg.content.config_records[REVEAL_KEY]
        private, _ = pai.site_key(context, self.cfg.keypair, self.cfg.obfuscators)
        seen = _ledger(context)
        revealed = [int(v) for v in seen.get("revealed", [])]  # type: ignore[union-attr]
        request = decided_request(rec)
        try:
            program = None if request is None else programs.get(str(request.get("program", "")))
            columns, sum_id = check_reveal(rec, contribution_key(private.p, private.q), context.run_id,
                                           env.min_sites, revealed, frozenset() if program is None else program.decisions)
        except (SumRefused, ProgramError) as err:
            return Message(Error(code=int(ReplyError.POLICY), reason=f"{env.name}: {err}"), reply_to=msg)
        seen["revealed"] = [*revealed, sum_id]
        packer = self._sum_packer(private, Encoding.from_record(rec))
        total = add_ciphertexts(private.public_key, columns)  # the total this site recomputed itself
        values = decrypt_values([int(c) for c in total], int(rec["length"]), packer, private)  # type: ignore[call-overload]
        if program is not None and request is not None:  # only the program's decision of the verified total leaves
            try:
                values = np.asarray(program.decision(str(request["what"]), values, dict(request.items())), dtype=np.float64)
            except (ProgramError, ValueError, KeyError) as err:
                return Message(Error(code=int(ReplyError.POLICY), reason=f"{env.name}: no decision: {err}"),
                               reply_to=msg)
        return Message(RecordDict({REVEAL_KEY: ConfigRecord({"values": [float(v) for v in values]})}), reply_to=msg)

    def _decrypt_slice(self, msg: Message, context: Context, env: SiteEnv) -> Message:
        from flwr.app import Error

        from aggregation.paillier.server import ct_width
        from core.replies import ReplyError

        rec = msg.content.config_records[REQUEST_KEY]
        private, _ = pai.site_key(context, self.cfg.keypair, self.cfg.obfuscators)
        try:
            sealed = decrypt_slice(bytes(rec["ct"]), int(rec["start"]), int(rec["total"]),  # type: ignore[arg-type,call-overload]
                                   ct_width(private.public_key), lambda cts: decrypt_all(private, cts, self.cfg.workers),
                                   slice_key(private.p, private.q), private.public_key, context.run_id,
                                   int(rec.get("round", 0)))
        except (KeyError, TypeError, ValueError) as err:
            return Message(Error(code=int(ReplyError.PROTOCOL_ERROR), reason=f"{env.name}: malformed decryption "
                                 f"request: {err}"), reply_to=msg)
        return Message(RecordDict({REQUEST_KEY: ConfigRecord({"sealed": sealed, "index": int(rec["index"])})}),  # type: ignore[arg-type]
                       reply_to=msg)

    @override
    def after_evaluate(self, context: Context, model: torch.nn.Module) -> None:
        codec, private, _ = self._keys(context)
        pai.prepare_next_round(context, model.state_dict(), codec, private, self.cfg.workers, self.cfg.obfuscators)
