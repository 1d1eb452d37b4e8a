"""Encrypted sums outside the training rounds: the task's statistics and test metrics.

Each site encrypts its values (fixed point, :mod:`core.fixedpoint`), ``slots`` of them per
plaintext with room for the sum over ``max_sites`` sites (:class:`IntPacker`); the
coordinator multiplies the ciphertexts (adds the plaintexts) and never holds a key, so it
learns **nothing** of the totals. The encrypted totals travel back to the sites in later
messages' configs, and each site decrypts them (:meth:`PaillierSite.open_total`).

Test metrics must reach the report, so :meth:`PaillierSum.reveal` asks one key-holding
site (``query.paillier_reveal``) to decrypt the *totals* and send them back: the
coordinator then learns the pooled metrics, never a site's own counts (the site that
decrypts sees only the totals too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from aggregation.base import SUM_REQUEST, SumCoordinator, SumResult, request_encoding, screen_sum_replies
from core import fixedpoint

REPLY_KEY = "fedsilo-sum-ct"
REVEAL_MESSAGE = "query.paillier_reveal"
REVEAL_KEY = "fedsilo-reveal"


@dataclass(frozen=True)
class IntPacker:
    """``slots`` values below ``2^enc.bits`` per plaintext, each slot with ``guard`` carry bits."""

    plaintext_bits: int
    max_sites: int
    enc: fixedpoint.Encoding = fixedpoint.STATS

    @property
    def slot_bits(self) -> int:
        return self.enc.bits + max(1, math.ceil(math.log2(max(2, self.max_sites))))

    @property
    def slots(self) -> int:
        return self.plaintext_bits // self.slot_bits

    def pack(self, values: list[int]) -> list[int]:
        out = []
        for i in range(0, len(values), self.slots):
            p = 0
            for j, v in enumerate(values[i: i + self.slots]):
                p |= int(v) << (self.slot_bits * j)
            out.append(p)
        return out

    def unpack(self, plaintexts: list[int], length: int) -> list[int]:
        mask = (1 << self.slot_bits) - 1
        values = [(p >> (self.slot_bits * j)) & mask for p in plaintexts for j in range(self.slots)]
        return [v % self.enc.modulus for v in values[:length]]


def to_bytes(cts: list[int], width: int) -> list[bytes]:
    return [c.to_bytes(width, "big") for c in cts]


def from_bytes(blobs: list[Any]) -> list[int]:
    return [int.from_bytes(bytes(b), "big") for b in blobs]


class PaillierSum(SumCoordinator):
    """Homomorphic sums under the sites' key: the coordinator learns nothing of them."""

    learns = "nothing (Paillier: the totals stay encrypted; the sites decrypt them, and one reveals the test metrics)"

    def __init__(self, message_type: str, cfg: Any, timeout: float) -> None:
        super().__init__(message_type, timeout)
        from aggregation.paillier.keys import load_public
        from aggregation.paillier.server import ct_width

        self.public = load_public(cfg.public_key)
        self.width = ct_width(self.public)
        self.key_bits, self.max_sites = self.public.n.bit_length() - 1, cfg.max_sites

    def collect(self, grid: Grid, nodes: list[int], content: RecordDict, length: int, sum_id: int) -> SumResult:
        from aggregation.paillier.crypto import add_ciphertexts, check_ciphertexts

        enc = request_encoding(content)
        count = -(-length // IntPacker(self.key_bits, self.max_sites, enc).slots)
        cts: dict[int, list[int]] = {}

        def check(msg: Message) -> str | None:
            rec = msg.content.config_records.get(REPLY_KEY)
            if rec is None or "ct" not in rec:
                return f"reply has no {REPLY_KEY!r} record"
            values = from_bytes(list(rec["ct"]))  # type: ignore[arg-type]
            reason = check_ciphertexts(self.public, values, count)
            if reason is None:
                cts[msg.metadata.src_node_id] = values
            return reason

        good, rejected = screen_sum_replies(self.send(grid, nodes, content), nodes, check)
        if not good:
            return SumResult(0, None, None, rejected)
        total = add_ciphertexts(self.public, [cts[n] for n in sorted(good)])
        result = SumResult(len(good), None, to_bytes(total, self.width), rejected, length)
        result.encoding = enc
        return result

    def reveal(self, grid: Grid, nodes: list[int], result: SumResult) -> np.ndarray:
        """Ask the key holders, one at a time, to decrypt the totals (never a single site's vector)."""
        length = int(result.length)
        for node in nodes:
            request = RecordDict({REVEAL_KEY: ConfigRecord({"ct": list(result.sealed or []), "length": length,
                                                            **result.encoding.to_record()})})
            replies = self.send(grid, [node], request, REVEAL_MESSAGE)
            for msg in replies:
                rec = None if msg.has_error() else msg.content.config_records.get(REVEAL_KEY)
                if rec is not None and "values" in rec and len(rec["values"]) == length:  # type: ignore[arg-type]
                    return np.asarray(rec["values"], dtype=np.float64)
                log(WARNING, "fedsilo: site %s did not decrypt the totals: %s", node,
                    msg.error.reason if msg.has_error() else "malformed reply")
        raise RuntimeError("no site decrypted the encrypted totals")


def site_encrypt(values: np.ndarray, packer: IntPacker, encryptor: Any, width: int) -> list[bytes]:
    plaintexts = packer.pack(packer.enc.encode(values))
    return to_bytes([encryptor.encrypt(p) for p in plaintexts], width)


def site_decrypt(blobs: list[Any], length: int, packer: IntPacker, private: Any) -> np.ndarray:
    plaintexts = [private.raw_decrypt(c) for c in from_bytes(blobs)]
    return packer.enc.decode(packer.unpack(plaintexts, length))


__all__ = ["REPLY_KEY", "REVEAL_KEY", "REVEAL_MESSAGE", "SUM_REQUEST", "IntPacker", "PaillierSum", "site_decrypt",
           "site_encrypt"]
