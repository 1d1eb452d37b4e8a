"""Encrypted sums outside the training rounds: the task's statistics and test metrics.

Each site encrypts its values (fixed point, :mod:`core.fixedpoint`), ``slots`` of them per
plaintext with room for the sum over ``max_sites`` sites (:class:`IntPacker`); the
coordinator multiplies the ciphertexts (adds the plaintexts) and never holds a key, so it
learns **nothing** of the totals. The encrypted totals travel back to the sites in later
messages' configs, and each site decrypts them (:meth:`PaillierSite.open_total`).

Test metrics must reach the report, so :meth:`PaillierSum.reveal` asks one key-holding
site (``query.paillier_reveal``) to decrypt the *total* and send it back. A key holder that
decrypted whatever it is sent would be a decryption oracle for a coordinator that deviates
(one site's training ciphertexts, or its statistics vector, sent to be "revealed"), so the
revealing site decrypts only an aggregate it recomputes itself (issue #33):

- every site's contribution carries a MAC (HMAC-SHA256 under a key all key holders derive from
  the private key, :func:`contribution_key`; the coordinator has no key and cannot forge one) over
  the run, the sum's id, what is summed and the digest of the request, the site's node, the list
  of participants the request named, and the ciphertexts;
- the revealing site checks every MAC, that the contributions are exactly the listed
  participants, each once, at least its policy's ``aggregation.min_sites`` (and 2) of them, that
  the sum is of test metrics (``evaluate``: statistics totals are never revealed), and that it has
  not revealed this sum before; then it adds the ciphertexts itself and decrypts that total;
- a site contributes to a request's content once per run (the model, what, bins, encoding): the
  same content asked again under another sum id, e.g. with one site fewer to difference the two
  totals, is refused.

A listed site that does not answer therefore costs that sum its reveal (the round's pooled test
metrics are reported missing, with the reason); training is not affected.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from typing_extensions import override

from aggregation.base import (
    SUM_REQUEST,
    RevealFailed,
    SumCoordinator,
    SumResult,
    request_encoding,
    screen_sum_replies,
)
from core import fixedpoint

REPLY_KEY = "fedsilo-sum-ct"
PARTICIPANTS = "participants"
REVEAL_MESSAGE = "query.paillier_reveal"
REVEAL_KEY = "fedsilo-reveal"
#: a decision's reveal request carries the sum request's entries under this prefix
REQUEST_PREFIX = "request."


@dataclass(frozen=True)
class IntPacker:
    """``slots`` values below ``2^enc.bits`` per plaintext, each slot with ``guard`` carry bits."""

    plaintext_bits: int
    max_sites: int
    enc: fixedpoint.Encoding = fixedpoint.STATS

    @property
    def slot_bits(self) -> int:
        """Bits per packed value: the encoding's bits and room for the sum of ``max_sites`` values."""
        return self.enc.bits + max(1, math.ceil(math.log2(max(2, self.max_sites))))

    @property
    def slots(self) -> int:
        """Values packed per plaintext."""
        return self.plaintext_bits // self.slot_bits

    def pack(self, values: list[int]) -> list[int]:
        """The plaintexts holding ``values``, :attr:`slots` per plaintext."""
        out = []
        for i in range(0, len(values), self.slots):
            p = 0
            for j, v in enumerate(values[i: i + self.slots]):
                p |= int(v) << (self.slot_bits * j)
            out.append(p)
        return out

    def unpack(self, plaintexts: list[int], length: int) -> list[int]:
        """The first ``length`` values packed in ``plaintexts`` (sums wrap modulo the encoding's modulus)."""
        mask = (1 << self.slot_bits) - 1
        values = [(p >> (self.slot_bits * j)) & mask for p in plaintexts for j in range(self.slots)]
        return [v % self.enc.modulus for v in values[:length]]


def to_bytes(cts: list[int], width: int) -> list[bytes]:
    return [c.to_bytes(width, "big") for c in cts]


def from_bytes(blobs: list[Any]) -> list[int]:
    return [int.from_bytes(bytes(b), "big") for b in blobs]


# ---- authenticated contributions (module docstring) -----------------------------------------------
def contribution_key(p: int, q: int) -> bytes:
    """The MAC key every holder of the key pair derives from it, and nobody else can."""
    from aggregation.paillier.crypto import key_from_pair

    return key_from_pair(p, q, b"fedsilo paillier sum contributions v1")


def request_digest(content: RecordDict) -> str:
    """SHA-256 of what a sum request asks for, without its id and participants: what, length, bins,
    encoding, schema and preprocessing keys, and the bytes of the model it carries (evaluate)."""
    rec = content.config_records[SUM_REQUEST]
    h = hashlib.sha256()
    for key in sorted(rec):
        if key not in ("id", PARTICIPANTS):
            h.update(f"{key}={rec[key]!r};".encode())
    if "arrays" in content:
        arrays = content["arrays"]
        for name in sorted(arrays):  # type: ignore[call-overload]
            h.update(name.encode() + bytes(arrays[name].data))  # type: ignore[index]
    return h.hexdigest()


def contribution_mac(key: bytes, run: int, sum_id: int, what: str, length: int, digest: str, node: int,
                     participants: list[int], cts: list[bytes]) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    h.update(f"fedsilo-sum-v1|{run}|{sum_id}|{what}|{length}|{digest}|{node}|{sorted(participants)}|".encode())
    for c in cts:
        h.update(len(c).to_bytes(4, "big") + c)
    return h.digest()


class SumRefused(ValueError):
    """A sum request or a reveal a site will not answer (see the module docstring); names why, never data."""


def decided_request(rec: ConfigRecord) -> ConfigRecord | None:
    """The sum request a decision's reveal request carries (None: a plain reveal)."""
    entries = {k[len(REQUEST_PREFIX):]: v for k, v in rec.items() if k.startswith(REQUEST_PREFIX)}
    return ConfigRecord(entries) if entries else None  # type: ignore[arg-type]


def check_reveal(rec: ConfigRecord, key: bytes, run: int, min_sites: int, revealed: list[int],
                 decisions: frozenset[str] = frozenset()) -> tuple[list[list[int]], int]:
    """The contributions of a reveal request, each verified (module docstring); (their ciphertexts, the sum id).

    ``decisions``: the steps whose totals this request may have decided (the program's, when the request
    carries its sum request, checked against the digest the contributions' MACs cover)."""
    try:
        sum_id, what, length, digest = int(rec["sum"]), str(rec["what"]), int(rec["length"]), str(rec["digest"])
        participants = [int(v) for v in rec[PARTICIPANTS]]  # type: ignore[union-attr]
        nodes = [int(v) for v in rec["nodes"]]  # type: ignore[union-attr]
        macs = [bytes(v) for v in rec["macs"]]  # type: ignore[union-attr]
        parts = [bytes(v) for v in rec["parts"]]  # type: ignore[union-attr]
        count = int(rec["count"])
    except (KeyError, TypeError, ValueError) as err:
        raise SumRefused(f"a malformed reveal request ({type(err).__name__}: {err})") from None
    request = decided_request(rec)
    if request is not None:
        if what not in decisions or str(request.get("what")) != what or int(request.get("id", -1)) != sum_id:  # type: ignore[call-overload]
            raise SumRefused(f"a decision of a {what!r} sum its program does not decide")
        if request_digest(RecordDict({SUM_REQUEST: request})) != digest:
            raise SumRefused(f"the sum request sent with the decision of sum {sum_id} is not the one its "
                             "contributions were made for")
    elif what != "evaluate":
        raise SumRefused(f"a reveal of a {what!r} sum: only pooled test metrics are ever decrypted for the coordinator")
    if sum_id in revealed:
        raise SumRefused(f"sum {sum_id} was revealed by this site already; it decrypts each sum once")
    if len(set(participants)) != len(participants) or sorted(nodes) != sorted(participants):
        raise SumRefused(f"the reveal holds contributions of {len(nodes)} nodes for the {len(participants)} the sum "
                         "listed; it must hold each listed participant's, once")
    if len(nodes) < max(2, min_sites):
        raise SumRefused(f"a total of {len(nodes)} site(s): this site's policy decrypts only sums of at least "
                         f"{max(2, min_sites)} distinct sites (aggregation.min_sites)")
    if count < 1 or len(parts) != count * len(nodes) or len(macs) != len(nodes):
        raise SumRefused("the reveal's ciphertexts and MACs do not match its participants")
    columns = []
    for i, node in enumerate(nodes):
        cts = parts[i * count:(i + 1) * count]
        expected = contribution_mac(key, run, sum_id, what, length, digest, node, participants, cts)
        if not hmac.compare_digest(expected, macs[i]):
            raise SumRefused(f"node {node}'s contribution to sum {sum_id} is not authenticated by a key holder "
                             "(not that site's, of another sum, or altered)")
        columns.append(from_bytes(cts))
    return columns, sum_id


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

    @override
    def collect(self, grid: Grid, nodes: list[int], content: RecordDict, length: int, sum_id: int) -> SumResult:
        from aggregation.paillier.crypto import add_ciphertexts, check_ciphertexts

        enc = request_encoding(content)
        count = -(-length // IntPacker(self.key_bits, self.max_sites, enc).slots)
        cts: dict[int, list[int]] = {}
        macs: dict[int, bytes] = {}
        request = content.config_records[SUM_REQUEST]
        request[PARTICIPANTS] = [int(n) for n in nodes]

        def check(msg: Message) -> str | None:
            rec = msg.content.config_records.get(REPLY_KEY)
            if rec is None or "ct" not in rec:
                return f"reply has no {REPLY_KEY!r} record"
            blobs = rec["ct"]
            if not isinstance(blobs, list) or len(blobs) != count or not all(isinstance(b, bytes) for b in blobs):
                return f"reply holds no list of {count} ciphertexts"
            if any(len(b) > self.width for b in blobs):  # type: ignore[arg-type]
                return f"a ciphertext longer than {self.width} bytes"
            mac = rec.get("mac")
            if not isinstance(mac, bytes) or len(mac) != 32:
                return "reply has no 32-byte MAC of its contribution"
            values = from_bytes(list(blobs))
            reason = check_ciphertexts(self.public, values, count)
            if reason is None:
                cts[msg.metadata.src_node_id] = values
                macs[msg.metadata.src_node_id] = mac
            return reason

        good, rejected = screen_sum_replies(self.send(grid, nodes, content), nodes, check)
        if not good:
            return SumResult(0, None, None, rejected)
        order = sorted(good)
        total = add_ciphertexts(self.public, [cts[n] for n in order])
        result = SumResult(len(good), None, to_bytes(total, self.width), rejected, length)
        result.encoding = enc
        # what a key holder needs to recompute the total itself before it reveals it (module docstring)
        result.contributions = {"sum": int(request["id"]), "what": str(request["what"]), "length": length,  # type: ignore[call-overload]
                                "digest": request_digest(content), PARTICIPANTS: [int(n) for n in nodes],
                                "nodes": order, "macs": [macs[n] for n in order], "count": count,
                                "parts": [b for n in order for b in to_bytes(cts[n], self.width)]}
        return result

    def reveal(self, grid: Grid, nodes: list[int], result: SumResult) -> np.ndarray:
        """Ask the key holders, one at a time, to recompute and decrypt the total from the authenticated
        contributions (never a single site's vector; module docstring)."""
        return self._ask_key_holders(grid, nodes, result, {}, int(result.length))

    @override
    def decide(self, grid: Grid, nodes: list[int], result: SumResult, content: RecordDict) -> np.ndarray:
        """Ask the key holders, one at a time, for the program's decision of the total: the reveal request
        carries the sum request itself, which the key holder checks against the digest every contribution's
        MAC covers, so the decision is computed with the parameters that were summed for."""
        if "arrays" in content:
            raise RevealFailed("a decision of a sum whose request carried a model")
        request = {REQUEST_PREFIX + k: v for k, v in content.config_records[SUM_REQUEST].items() if k != PARTICIPANTS}
        return self._ask_key_holders(grid, nodes, result, request, None)

    def _ask_key_holders(self, grid: Grid, nodes: list[int], result: SumResult, extra: dict[str, Any],
                         length: int | None) -> np.ndarray:
        for node in nodes:
            request = RecordDict({REVEAL_KEY: ConfigRecord({**(result.contributions or {}),
                                                            **result.encoding.to_record(), **extra})})
            replies = self.send(grid, [node], request, REVEAL_MESSAGE)
            for msg in replies:
                rec = None if msg.has_error() else msg.content.config_records.get(REVEAL_KEY)
                if rec is not None and "values" in rec and (length is None or len(rec["values"]) == length):  # type: ignore[arg-type]
                    return np.asarray(rec["values"], dtype=np.float64)
                log(WARNING, "fedsilo: site %s did not decrypt the totals: %s", node,
                    msg.error.reason if msg.has_error() else "malformed reply")
        raise RevealFailed("no site decrypted the encrypted totals")


def site_encrypt(values: np.ndarray, packer: IntPacker, encryptor: Any, width: int) -> list[bytes]:
    """``values`` fixed-point encoded, packed and encrypted, as ciphertexts of ``width`` bytes."""
    plaintexts = packer.pack(packer.enc.encode(values))
    return to_bytes([encryptor.encrypt(p) for p in plaintexts], width)


def site_decrypt(blobs: list[Any], length: int, packer: IntPacker, private: Any) -> np.ndarray:
    """The ``length`` values of the ciphertexts ``blobs``, decrypted with ``private`` and decoded."""
    return decrypt_values(from_bytes(blobs), length, packer, private)


def decrypt_values(cts: list[int], length: int, packer: IntPacker, private: Any) -> np.ndarray:
    """The ``length`` values packed in ciphertexts ``cts``, decrypted and decoded."""
    return packer.enc.decode(packer.unpack([private.raw_decrypt(c) for c in cts], length))


__all__ = ["REPLY_KEY", "REVEAL_KEY", "REVEAL_MESSAGE", "SUM_REQUEST", "IntPacker", "PaillierSum", "site_decrypt",
           "site_encrypt"]
