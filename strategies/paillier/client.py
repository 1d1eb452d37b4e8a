"""The site's half of Paillier aggregation: decrypt the global model, encrypt its own.

A site finds its key pair in its node config (``paillier-keypair=PATH``, a deployment) or
in ``aggregation.keypair`` (simulation); the server is never given that path. The global
model arrives either as the public initial model (round 1, plaintext) or as the encrypted
aggregate the server returned (``ct``, ``rows``, ``sites``): the site decrypts it and
decodes FedAvg's weighted average (:class:`~strategies.paillier.vector.ModelCodec`). After
local training it encrypts ``(rows / weight_unit) * w`` and ``rows`` with the CRT shortcut,
using obfuscators it made ahead (during federated evaluation) when it has them.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from phe import paillier

from strategies.paillier.crypto import Encryptor, decrypt_all, many_obfuscators
from strategies.paillier.keys import PaillierKeyError, load_private
from strategies.paillier.packing import Packer
from strategies.paillier.server import ENCRYPTED_KEY, META_KEY, ct_width, from_array, is_encrypted, to_array
from strategies.paillier.vector import ModelCodec
from strategies.secagg.vector import Layout

NODE_CONFIG_KEY = "paillier-keypair"


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[paillier.PaillierPrivateKey, Encryptor]:
    private = load_private(path)  # type: ignore[arg-type]
    return private, Encryptor(private)


def site_key(context: Context, configured: str | None) -> tuple[paillier.PaillierPrivateKey, Encryptor]:
    """This site's key pair: node config first, then the config; a clear error if neither."""
    path = str(context.node_config.get(NODE_CONFIG_KEY, "") or configured or "")
    if not path:
        raise PaillierKeyError(f"aggregation=paillier: this site has no key pair; give the SuperNode "
                               f"--node-config '{NODE_CONFIG_KEY}=PATH' (or aggregation.keypair=PATH in simulation)")
    return _load(path)


def global_state(arrays: ArrayRecord, template: dict[str, torch.Tensor], codec_for: ModelCodecFactory,
                 private: paillier.PaillierPrivateKey, workers: int = 1) -> dict[str, torch.Tensor]:
    """The global model as a state dict: plaintext as sent, or decrypted and decoded."""
    if not is_encrypted(arrays):
        return arrays.to_torch_state_dict()
    layout = Layout.of({k: v.numpy() for k, v in template.items()})
    codec = codec_for(layout.size)
    sums = decrypt_all(private, from_array(arrays["ct"].numpy()), workers)
    rows = private.raw_decrypt(from_array(arrays["rows"].numpy())[0])
    sites = int(arrays["sites"].numpy()[0])
    flat = codec.decode(sums, rows, sites)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in layout.unflatten(flat).items()}


OBFUSCATORS_KEY = "paillier-obfuscators"  # context.state: obfuscators made ahead, each used once


def precompute_obfuscators(context: Context, private: paillier.PaillierPrivateKey, count: int, workers: int = 1) -> None:
    """Make the next round's ``count`` obfuscators now (off the training round's critical path)."""
    width = ct_width(private.public_key)
    context.state[OBFUSCATORS_KEY] = ConfigRecord(
        {"obf": [o.to_bytes(width, "big") for o in many_obfuscators(private, count, workers)]})


def _take_obfuscators(context: Context, count: int) -> list[int | None]:
    """The precomputed obfuscators (removed from the state: never reused), or None each."""
    record = context.state.config_records.get(OBFUSCATORS_KEY)
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
        obf = many_obfuscators(private, len(plain) + 1, workers)
    width = ct_width(private.public_key)
    record = ArrayRecord(OrderedDict([
        ("ct", Array(to_array([encryptor.encrypt(m, o) for m, o in zip(plain, obf)], width))),
        ("rows", Array(to_array([encryptor.encrypt(rows, obf[-1])], width))),
    ]))
    return record, clipped


class ModelCodecFactory:
    """``codec_for(size)``: the :class:`ModelCodec` for a model of ``size`` values."""

    def __init__(self, packer: Packer, weight_unit: float) -> None:
        self.packer, self.weight_unit = packer, weight_unit

    def __call__(self, size: int) -> ModelCodec:
        return ModelCodec(self.packer, self.weight_unit, size)


__all__ = ["ENCRYPTED_KEY", "META_KEY", "OBFUSCATORS_KEY", "precompute_obfuscators", "NODE_CONFIG_KEY", "ModelCodecFactory", "encrypt_model", "global_state", "site_key"]
