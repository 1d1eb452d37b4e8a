"""The site half of ``aggregation=paillier``: decrypt the global model, encrypt the weighted one.

The primitives are in :mod:`aggregation.paillier.client`; this class adapts them to the
ClientApp's :class:`~aggregation.base.SiteHalf` interface. After federated evaluation the
site makes the next round's obfuscators ahead, off the training round's critical path.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from phe import paillier

from aggregation.base import LocalResult, SiteEnv, SiteHalf
from aggregation.paillier import client as pai
from aggregation.paillier.config import PaillierConfig, packer_for
from aggregation.paillier.crypto import Encryptor


class PaillierSite(SiteHalf):
    """A site's key pair comes from its node config (``paillier-keypair``) or ``aggregation.keypair``."""

    def __init__(self, cfg: PaillierConfig) -> None:
        self.cfg = cfg

    def _keys(self, context: Context) -> tuple[pai.ModelCodecFactory, paillier.PaillierPrivateKey, Encryptor]:
        private, encryptor = pai.site_key(context, self.cfg.keypair)
        codec = pai.ModelCodecFactory(packer_for(self.cfg, private.public_key.n.bit_length()), self.cfg.weight_unit)
        return codec, private, encryptor

    def global_state(self, msg: Message, context: Context, template: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        """The public initial model as sent, or the encrypted aggregate decrypted (once per aggregate)."""
        codec, private, _ = self._keys(context)
        arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
        return pai.global_state(arrays, template, codec, private, self.cfg.workers, context)

    def reply(self, msg: Message, context: Context, result: LocalResult, env: SiteEnv) -> Message:
        """The encrypted weighted model and rows, and the key's fingerprint; nothing in the clear."""
        codec, private, encryptor = self._keys(context)
        records = pai.reply_records(result.state, env.rows, codec, encryptor, private, context, self.cfg.workers)
        return Message(RecordDict({**records, **result.records}), reply_to=msg)

    def after_evaluate(self, context: Context, model: torch.nn.Module) -> None:
        codec, private, _ = self._keys(context)
        pai.prepare_next_round(context, model.state_dict(), codec, private, self.cfg.workers)
