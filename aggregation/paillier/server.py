"""The server's half of Paillier aggregation: it adds ciphertexts it cannot read.

Used by :class:`~aggregation.paillier.strategy.PaillierStrategy` (``aggregation=paillier``). Each
site replies with ``ENCRYPTED_KEY``: its weighted model as ``ct`` (ciphertexts, fixed width,
big-endian, one row each), its row count as ``rows``, and (ConfigRecord) the fingerprint of the
key it encrypted under. The server checks every reply (same key pair, count, range, unit mod
n^2; a bad one is rejected with the reason and the round goes on), multiplies the ciphertexts
(adds the plaintexts) and returns the encrypted aggregate as the next global "model": ``ct``,
``rows`` and the plaintext number of sites summed. The only plaintext model the server ever
holds is the random initialisation, derived from the public seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common import log
from phe import paillier

from aggregation.paillier.crypto import add_ciphertexts, check_ciphertexts
from aggregation.paillier.keys import fingerprint
from aggregation.paillier.packing import Packer
from core.replies import check_size

ENCRYPTED_KEY = "encrypted"
META_KEY = "encrypted-meta"  # ConfigRecord: the fingerprint of the key the site encrypted under


def ct_width(public: paillier.PaillierPublicKey) -> int:
    """Bytes of one ciphertext under ``public`` (``n^2``'s length)."""
    return (public.nsquare.bit_length() + 7) // 8


def to_array(cts: list[int], width: int) -> np.ndarray:
    """Ciphertexts as a (count, width) uint8 matrix."""
    return np.frombuffer(b"".join(c.to_bytes(width, "big") for c in cts), dtype=np.uint8).reshape(len(cts), width)


def from_array(arr: np.ndarray) -> list[int]:
    """The ciphertexts of a (count, width) uint8 matrix (:func:`to_array`'s inverse); ValueError for another shape."""
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise ValueError(f"ciphertexts must be a 2-D uint8 array, got {arr.dtype} {arr.shape}")
    return [int.from_bytes(row.tobytes(), "big") for row in arr]


def is_encrypted(arrays: ArrayRecord) -> bool:
    """Whether ``arrays`` holds an encrypted aggregate (ciphertexts and rows) rather than a model."""
    return "ct" in arrays and "rows" in arrays


class EncryptedAggregator:
    """Adds the sites' ciphertext vectors; :meth:`set_size` gives the model size."""

    def __init__(self, public: paillier.PaillierPublicKey, packer: Packer) -> None:
        self.public, self.packer = public, packer
        self.width = ct_width(public)
        self.fingerprint = fingerprint(public.n)
        self.ciphertexts = 0

    def set_size(self, size: int) -> None:
        """Expect ``packer.count(size)`` model ciphertexts per site."""
        self.ciphertexts = self.packer.count(size)

    def check(self, msg: Message) -> tuple[str | None, list[int], list[int]]:
        """(why the reply is rejected or None, its model ciphertexts, its rows ciphertext)."""
        if msg.has_error():
            return f"error reply: {msg.error.reason}", [], []
        meta = msg.content.config_records.get(META_KEY)
        if meta is None or meta.get("fingerprint") != self.fingerprint:
            theirs = meta.get("fingerprint") if meta is not None else None
            return (f"the site encrypts under key {str(theirs)[:12]!r}, the server's public key is "
                    f"{self.fingerprint[:12]!r}: not one key pair"), [], []
        record = msg.content.array_records.get(ENCRYPTED_KEY)
        if record is None or "ct" not in record or "rows" not in record:
            return f"reply has no {ENCRYPTED_KEY!r} record with 'ct' and 'rows'", [], []
        for what, count in (("ct", self.ciphertexts), ("rows", 1)):  # the announced model size bounds the work
            arr = record[what]
            if list(arr.shape) != [count, self.width] or arr.dtype != "uint8":
                return (f"'{what}' holds {arr.dtype} {list(arr.shape)}, expected uint8 [{count}, {self.width}] "
                        f"(the model's ciphertexts)"), [], []
        try:
            cts, rows = from_array(record["ct"].numpy()), from_array(record["rows"].numpy())
        except ValueError as err:
            return f"malformed ciphertexts: {err}", [], []
        for what, values, count in (("model", cts, self.ciphertexts), ("rows", rows, 1)):
            reason = check_ciphertexts(self.public, values, count)
            if reason is not None:
                return f"{what}: {reason}", [], []
        return None, cts, rows

    def aggregate(self, good: list[tuple[list[int], list[int]]]) -> tuple[ArrayRecord, MetricRecord]:
        """The encrypted sum of the accepted replies, as the next round's global record."""
        total = add_ciphertexts(self.public, [c for c, _ in good])
        rows = add_ciphertexts(self.public, [r for _, r in good])
        record = ArrayRecord({"ct": Array(to_array(total, self.width)), "rows": Array(to_array(rows, self.width)),
                              "sites": Array(np.array([len(good)], dtype=np.int64))})
        return record, MetricRecord({"sites": len(good), "ciphertexts": len(total)})


def screen(aggregator: EncryptedAggregator, server_round: int, replies: Iterable[Message],
           label: Any) -> tuple[list[tuple[list[int], list[int]]], list[dict[str, str]], list[str]]:
    """Accepted (cts, rows) in reply order, the rejections with reasons, the accepted sites."""
    good, rejected, sites = [], [], []
    for msg in replies:
        oversized = None if msg.has_error() else check_size(msg)
        reason, cts, rows = (oversized, [], []) if oversized else aggregator.check(msg)
        if reason is None:
            good.append((cts, rows))
            sites.append(label(msg))
        else:
            rejected.append({"site": label(msg), "reason": reason})
            log(WARNING, "round %s paillier: rejected reply from %s: %s", server_round, label(msg), reason)
    log(INFO, "round %s paillier: adding %s encrypted models, %s rejected", server_round, len(good), len(rejected))
    return good, rejected, sites
