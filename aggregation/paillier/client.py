"""The site's half of Paillier aggregation: decrypt the global model, encrypt its own.

A site finds its key pair in its node config (``paillier-keypair=PATH``, a deployment) or
in ``aggregation.keypair`` (simulation); the server is never given that path. The global
model arrives either as the public initial model (round 1, plaintext) or as the encrypted
aggregate the server returned (``ct``, ``rows``, ``sites``): the site decrypts it and
decodes FedAvg's weighted average (:class:`~aggregation.paillier.vector.ModelCodec`). After
local training it encrypts ``(rows / weight_unit) * w`` and ``rows`` with the CRT shortcut,
using obfuscators it made ahead (during federated evaluation) when it has them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from phe import paillier

from aggregation.paillier.config import NODE_CONFIG_KEY
from aggregation.paillier.crypto import Encryptor, decrypt_all, many_obfuscators
from aggregation.paillier.keys import PaillierKeyError, fingerprint, load_private
from aggregation.paillier.packing import Packer
from aggregation.paillier.server import ENCRYPTED_KEY, META_KEY, ct_width, from_array, is_encrypted, to_array
from aggregation.paillier.split import is_opened, open_slices, slice_key
from aggregation.paillier.vector import ModelCodec
from core import recordview
from core.layout import Layout


@lru_cache(maxsize=4)
def _load(path: str, obfuscators: str = "full") -> tuple[paillier.PaillierPrivateKey, Encryptor]:
    private = load_private(path)  # type: ignore[arg-type]
    return private, Encryptor(private, obfuscators)


def site_key(context: Context, configured: str | None, obfuscators: str = "full"
             ) -> tuple[paillier.PaillierPrivateKey, Encryptor]:
    """The site's key pair: node config first, then the config; a clear error if neither."""
    path = str(context.node_config.get(NODE_CONFIG_KEY, "") or configured or "")
    if not path:
        raise PaillierKeyError(f"aggregation=paillier: this site has no key pair; give the SuperNode "
                               f"--node-config '{NODE_CONFIG_KEY}=PATH' (or aggregation.keypair=PATH in simulation)")
    return _load(path, obfuscators)


DECRYPTED_KEY = "paillier-global"  # context.state: the last aggregate this site decrypted (its own view)
DIGEST_KEY = "paillier-global-digest"


def _digest(arrays: ArrayRecord) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode() + arrays[name].numpy().tobytes())
    return h.hexdigest()


def global_state(arrays: ArrayRecord, template: dict[str, torch.Tensor], codec_for: ModelCodecFactory,
                 private: paillier.PaillierPrivateKey, workers: int = 1,
                 context: Context | None = None, min_round: int = 0) -> dict[str, torch.Tensor]:
    """The global model as a state dict: plaintext as sent, or decrypted and decoded.

    With ``context`` the decrypted model is kept in ``context.state``: the aggregate a site
    evaluates after round r is the one it trains on in round r+1, and is decrypted once.
    Under ``decryption=split`` the aggregate arrives as sealed plaintext slices
    (:mod:`aggregation.paillier.split`): opened with the key pair's slice key, no decryption.
    """
    opened = is_opened(arrays)
    if not opened and not is_encrypted(arrays):
        return arrays.to_torch_state_dict()
    digest = _digest(arrays)
    if context is not None and (cached := recordview.arrays(context.state, DECRYPTED_KEY)) is not None:
        seen = recordview.config(context.state, DIGEST_KEY)
        if seen is not None and seen["sha256"] == digest:
            return cached.to_torch_state_dict()
    layout = Layout.of({k: v.numpy() for k, v in template.items()})
    codec = codec_for(layout.size)
    if opened:
        *sums, rows = open_slices(arrays, slice_key(private.p, private.q), private.public_key.n,
                                  context.run_id if context is not None else 0, min_round)
    else:
        sums = decrypt_all(private, from_array(arrays["ct"].numpy()), workers)
        rows = private.raw_decrypt(from_array(arrays["rows"].numpy())[0])
    sites = int(arrays["sites"].numpy()[0])
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in layout.unflatten(codec.decode(sums, rows, sites)).items()}
    if context is not None:
        context.state[DECRYPTED_KEY] = ArrayRecord(state)
        context.state[DIGEST_KEY] = ConfigRecord({"sha256": digest})
    return state


OBFUSCATORS_KEY = "paillier-obfuscators"  # context.state: obfuscators made ahead, each used once


def precompute_obfuscators(context: Context, private: paillier.PaillierPrivateKey, count: int, workers: int = 1,
                           kind: str = "full") -> None:
    """Make the next round's ``count`` obfuscators now (off the training round's critical path)."""
    width = ct_width(private.public_key)
    context.state[OBFUSCATORS_KEY] = ConfigRecord(
        {"obf": [o.to_bytes(width, "big") for o in many_obfuscators(private, count, workers, kind)]})


def prepare_next_round(context: Context, template: dict[str, torch.Tensor], codec_for: ModelCodecFactory,
                       private: paillier.PaillierPrivateKey, workers: int = 1, kind: str = "full") -> None:
    """Obfuscators for the next training reply: one per model ciphertext and one for the rows."""
    size = Layout.of({k: v.detach().numpy() for k, v in template.items()}).size
    precompute_obfuscators(context, private, codec_for(size).ciphertexts + 1, workers, kind)


def _take_obfuscators(context: Context, count: int) -> list[int | None]:
    """The precomputed obfuscators (removed from the state: never reused), or None each."""
    record = recordview.config(context.state, OBFUSCATORS_KEY)
    if record is None:
        return [None] * count
    del context.state[OBFUSCATORS_KEY]
    stored = [int.from_bytes(b, "big") for b in record["obf"]]  # type: ignore[union-attr]
    return (stored + [None] * count)[:count]


def encrypt_model(state: dict[str, torch.Tensor], rows: int, codec_for: ModelCodecFactory,
                  encryptor: Encryptor, private: paillier.PaillierPrivateKey,
                  context: Context | None = None, workers: int = 1) -> tuple[ArrayRecord, int]:
    """The reply record ``ENCRYPTED_KEY`` for this site's model and rows; and the clipped count.

    Uses the obfuscators precomputed in ``context.state`` when there are any.
    """
    arrays = {k: v.detach().cpu().numpy() for k, v in state.items()}
    layout = Layout.of(arrays)
    plain, clipped = codec_for(layout.size).encode(layout.flatten(arrays), rows)
    obf = _take_obfuscators(context, len(plain) + 1) if context is not None else []
    if not obf or obf[0] is None:
        obf = many_obfuscators(private, len(plain) + 1, workers, encryptor.kind)  # type: ignore[assignment]
    width = ct_width(private.public_key)
    record = ArrayRecord(OrderedDict([
        ("ct", Array(to_array([encryptor.encrypt(m, o) for m, o in zip(plain, obf)], width))),
        ("rows", Array(to_array([encryptor.encrypt(rows, obf[-1])], width))),
    ]))
    return record, clipped


def reply_records(state: dict[str, torch.Tensor], rows: int, codec_for: ModelCodecFactory, encryptor: Encryptor,
                  private: paillier.PaillierPrivateKey, context: Context, workers: int = 1) -> dict:
    """What a training reply carries: the encrypted model and rows, and the key's fingerprint."""
    record, _ = encrypt_model(state, rows, codec_for, encryptor, private, context, workers)
    return {ENCRYPTED_KEY: record, META_KEY: ConfigRecord({"fingerprint": fingerprint(private.public_key.n)})}


class ModelCodecFactory:
    """``codec_for(size)``: the :class:`ModelCodec` for a model of ``size`` values."""

    def __init__(self, packer: Packer, weight_unit: float) -> None:
        self.packer, self.weight_unit = packer, weight_unit

    def __call__(self, size: int) -> ModelCodec:
        """The codec of a model of ``size`` values."""
        return ModelCodec(self.packer, self.weight_unit, size)


__all__ = ["ENCRYPTED_KEY", "META_KEY", "OBFUSCATORS_KEY", "precompute_obfuscators", "prepare_next_round",
           "reply_records", "NODE_CONFIG_KEY", "ModelCodecFactory", "encrypt_model", "global_state", "site_key"]
