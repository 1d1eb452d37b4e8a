"""``aggregation.decryption=split``: the sites share the decryption of each aggregate.

With ``decryption=each`` every site decrypts the whole encrypted aggregate itself: ``K``
sites do ``K`` times the work of one decryption, and decryption is most of a round's
Paillier cost once obfuscators are cheap. With ``split`` the coordinator cuts the
aggregate's ciphertexts (the model's and the rows') into one contiguous slice per site it
is about to message and asks each site to decrypt its slice (``query.paillier_decrypt``);
the site returns the slice's plaintexts **sealed** with AES-256-GCM under a key all key
holders derive from the private key (HKDF-SHA256, :func:`slice_key`), never in the clear.
The coordinator sends the sealed slices in the model's place; each site opens them (one AES
pass, no modular exponentiation) and decodes the model as before.

What the coordinator learns: nothing more than with ``each`` (AES-GCM ciphertexts of
values it already holds encrypted under Paillier, of known length). A site learns only the
aggregate, which it could decrypt anyway. Each sealed slice is bound (GCM's associated
data) to its position and to the hash of the ciphertexts it decrypts, so the coordinator
cannot move slices between positions or aggregates unnoticed. As with the shared key pair
itself, the sites trust each other: a site could seal wrong plaintexts (docs/paillier.md).

A site that does not answer, answers with an error or with a sealed slice of the wrong
size has its slice reassigned to the sites that did answer (one more exchange); if that
fails too the coordinator sends the ciphertexts and every site decrypts them all, so a
round never loses its model to a missing decryption.

Coordinator half: :class:`SplitDecryption`. Site half: :func:`decrypt_slice` (answers the
query) and :func:`open_slices` (opens the sealed model).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from phe import paillier

from aggregation.paillier.config import DECRYPTIONS
from aggregation.paillier.crypto import check_ciphertexts, key_from_pair
from aggregation.paillier.server import from_array
from core import recordview

DECRYPT_MESSAGE = "query.paillier_decrypt"
REQUEST_KEY = "fedsilo-decrypt"
NONCE_BYTES, TAG_BYTES = 12, 16


def slice_key(p: int, q: int) -> bytes:
    """The AES-256 key every holder of the key pair derives, and nobody else can."""
    return key_from_pair(p, q, b"fedsilo paillier decryption slices v1")


def plaintext_width(n: int) -> int:
    """Bytes of one plaintext (below ``n``)."""
    return (n.bit_length() + 7) // 8


def _aad(start: int, total: int, digest: bytes, run: int = 0, rnd: int = 0) -> bytes:
    """What a sealed slice is bound to: its first position, the aggregate's length, the SHA-256 of
    the ciphertexts it decrypts, and the run and round it was decrypted for. The run is each site's
    own (its context), and a site opens a slice only for the round it is in or the one before
    (:func:`open_slices`): an old slice does not open in a later aggregate (issue #33)."""
    return (b"fedsilo-paillier-slice-v2" + start.to_bytes(8, "big") + total.to_bytes(8, "big") + digest
            + (int(run) % 2**64).to_bytes(8, "big") + (int(rnd) % 2**64).to_bytes(8, "big"))  # Flower's run ids: uint64


def sealed_size(count: int, n: int) -> int:
    """Bytes of the sealed plaintexts of ``count`` ciphertexts."""
    return NONCE_BYTES + count * plaintext_width(n) + TAG_BYTES


def bounds(total: int, parts: int) -> list[int]:
    """``parts + 1`` offsets cutting ``total`` ciphertexts into contiguous, near-equal slices."""
    return [total * k // parts for k in range(parts + 1)]


# --------------------------------------------------------------------------------------- site


def decrypt_slice(ct_bytes: bytes, start: int, total: int, width: int, decrypt: Any, key: bytes,
                  public: paillier.PaillierPublicKey, run: int = 0, rnd: int = 0) -> bytes:
    """A site's answer: the plaintexts of the fixed-width ciphertexts ``ct_bytes`` (positions
    ``start ..`` of ``total``), sealed under the key pair's slice key.

    ``decrypt`` maps a list of ciphertexts to their plaintexts. Raises ``ValueError`` for a
    request that cannot be a slice of an aggregate (size not a multiple of ``width``, empty,
    positions past ``total``, a value that is not a ciphertext under ``public``:
    :func:`~aggregation.paillier.crypto.check_ciphertexts`).
    """
    if not ct_bytes or len(ct_bytes) % width:
        raise ValueError(f"the slice holds {len(ct_bytes)} bytes, not a positive multiple of {width}-byte ciphertexts")
    count = len(ct_bytes) // width
    if start < 0 or start + count > total:
        raise ValueError(f"slice positions {start}..{start + count} lie outside the aggregate's {total} ciphertexts")
    cts = from_array(np.frombuffer(ct_bytes, dtype=np.uint8).reshape(count, width))
    reason = check_ciphertexts(public, cts, count)
    if reason is not None:
        raise ValueError(f"slice from position {start}: {reason}")
    return seal_plaintexts(decrypt(cts), start, total, ct_bytes, key, public.n, run, rnd)


def seal_plaintexts(plaintexts: list[int], start: int, total: int, ct_bytes: bytes, key: bytes, n: int,
                    run: int = 0, rnd: int = 0) -> bytes:
    """The plaintexts of the ciphertexts ``ct_bytes`` sealed under ``key`` (AES-256-GCM, fresh
    nonce), bound to their position and to the ciphertexts."""
    pw = plaintext_width(n)
    plain = b"".join(m.to_bytes(pw, "big") for m in plaintexts)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plain, _aad(start, total, hashlib.sha256(ct_bytes).digest(), run, rnd))


def is_opened(arrays: ArrayRecord) -> bool:
    """Whether a global record is a split-decrypted aggregate (sealed plaintext slices)."""
    return "sealed" in arrays and "offsets" in arrays


def open_slices(arrays: ArrayRecord, key: bytes, n: int, run: int = 0, min_round: int = 0) -> list[int]:
    """The aggregate's plaintexts from its sealed slices; ``ValueError`` naming the slice that
    does not open (altered, moved, sealed under another key pair, for another run, or for a round
    before ``min_round``)."""
    rnd = int(arrays["round"].numpy()[0]) if "round" in arrays else 0
    if rnd < min_round:
        raise ValueError(f"aggregation=paillier: the aggregate's slices were decrypted for round {rnd}; this site "
                         f"opens none older than round {min_round}")
    sealed = arrays["sealed"].numpy().tobytes()
    offsets = arrays["offsets"].numpy().tolist()
    starts = arrays["starts"].numpy().tolist()
    digests = arrays["digests"].numpy()
    total, pw = starts[-1], plaintext_width(n)
    out: list[int] = []
    aes = AESGCM(key)
    for k in range(len(offsets) - 1):
        blob = sealed[offsets[k] : offsets[k + 1]]
        try:
            plain = aes.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(int(starts[k]), int(total),
                                                                             digests[k].tobytes(), run, rnd))
        except InvalidTag:
            raise ValueError(f"aggregation=paillier: sealed slice {k} of the aggregate does not open under this "
                             "site's key pair (altered, moved between positions, or sealed under another key)") from None
        count = starts[k + 1] - starts[k]
        if len(plain) != count * pw:
            raise ValueError(f"sealed slice {k} holds {len(plain)} bytes, expected {count} plaintexts")
        out.extend(int.from_bytes(plain[i : i + pw], "big") for i in range(0, len(plain), pw))
    return out


# -------------------------------------------------------------------------------- coordinator


def sealed_record(blobs: list[bytes], cuts: list[int], ct_slices: list[bytes], sites: Array, rnd: int = 0
                  ) -> ArrayRecord:
    """What the sites receive in the model's place: the sealed slices ``blobs`` (slice ``k``
    decrypts ``ct_slices[k]``, positions ``cuts[k]..cuts[k+1]``), the number of sites summed and
    the round the slices were decrypted for."""
    return ArrayRecord({
        "round": Array(np.asarray([rnd], dtype=np.int64)),
        "sealed": Array(np.frombuffer(b"".join(blobs), dtype=np.uint8)),
        "offsets": Array(np.cumsum([0, *map(len, blobs)]).astype(np.int64)),
        "starts": Array(np.asarray(cuts, dtype=np.int64)),
        "digests": Array(np.frombuffer(b"".join(hashlib.sha256(c).digest() for c in ct_slices), dtype=np.uint8)
                         .reshape(len(ct_slices), 32)),
        "sites": sites,
    })


@dataclass
class SplitDecryption:
    """The coordinator half: one exchange per aggregate (kept for its later messages).

    ``width`` is the ciphertext width in bytes, ``n`` the public modulus, ``timeout`` the
    seconds to wait for each exchange. :attr:`log` keeps, per aggregate, the slices, who
    decrypted them, the reassigned ones and whether the exchange fell back to ``each``.
    """

    width: int
    n: int
    timeout: float
    log: list[dict[str, Any]] = field(default_factory=list)
    _cache: tuple[bytes, ArrayRecord | None] | None = None

    def opened(self, encrypted: ArrayRecord, nodes: list[int], grid: Grid, server_round: int
               ) -> tuple[ArrayRecord | None, dict[str, Any] | None]:
        """``(record, entry)``: the sealed-plaintext record of ``encrypted`` (``ct``, ``rows``,
        ``sites``) decrypted by ``nodes``, or None (fewer than two nodes, or the exchange failed:
        send the ciphertexts); and the log entry of the exchange this call ran, or None (an
        aggregate already opened is served from the cache, without one)."""
        cts = encrypted["ct"].numpy().tobytes() + encrypted["rows"].numpy().tobytes()
        digest = hashlib.sha256(cts).digest()
        if self._cache is not None and self._cache[0] == digest:
            return self._cache[1], None
        nodes = sorted(set(nodes))
        if len(nodes) < 2:
            return None, None
        total = len(cts) // self.width
        cuts = bounds(total, min(len(nodes), total))
        slices = {k: cts[cuts[k] * self.width : cuts[k + 1] * self.width] for k in range(len(cuts) - 1)}
        entry: dict[str, Any] = {"round": server_round, "slices": len(slices), "reassigned": [], "rejected": [],
                                 "fallback": False}
        self.log.append(entry)
        assignment = {k: nodes[k] for k in slices}
        sealed = self._exchange(slices, cuts, total, assignment, grid, entry, server_round)
        missing = [k for k in slices if k not in sealed]
        helpers = sorted({assignment[k] for k in sealed})
        if missing and helpers:
            again = {k: helpers[i % len(helpers)] for i, k in enumerate(missing)}
            entry["reassigned"] = missing
            sealed.update(self._exchange({k: slices[k] for k in missing}, cuts, total, again, grid, entry, server_round))
        if len(sealed) < len(slices):
            entry["fallback"] = True
            log(WARNING, "round %s paillier: %s of %s decryption slices missing; every site decrypts the whole "
                "aggregate this time", server_round, len(slices) - len(sealed), len(slices))
            self._cache = (digest, None)
            return None, entry
        record = sealed_record([sealed[k] for k in range(len(slices))], cuts,
                               [slices[k] for k in range(len(slices))], encrypted["sites"], server_round)
        log(INFO, "round %s paillier: %s sites decrypted one slice each of %s ciphertexts", server_round,
            len(slices), total)
        self._cache = (digest, record)
        return record, entry

    def _exchange(self, slices: dict[int, bytes], cuts: list[int], total: int, assignment: dict[int, int],
                  grid: Grid, entry: dict[str, Any], server_round: int = 0) -> dict[int, bytes]:
        """Ask each assigned node for its slices; the well-formed sealed slices by index."""
        msgs, asked = [], {}
        for k, node in assignment.items():
            rec = ConfigRecord({"ct": slices[k], "start": cuts[k], "total": total, "index": k, "round": server_round})
            msg = Message(RecordDict({REQUEST_KEY: rec}), dst_node_id=node, message_type=DECRYPT_MESSAGE)
            msgs.append(msg)
            asked[k] = node
        got: dict[int, bytes] = {}
        replies = list(grid.send_and_receive(msgs, timeout=self.timeout))
        for msg in replies:
            node = msg.metadata.src_node_id
            reason, k, blob = self._check(msg, slices, cuts)
            if reason is None and asked.get(k) == node:
                got[k] = blob
            else:
                reason = reason or f"answered for slice {k}, which it was not asked for"
                entry["rejected"].append({"node": node, "reason": reason})
                log(WARNING, "paillier decryption: rejected the slice from node %s: %s", node, reason)
        for k, node in asked.items():
            if k not in got and not any(r["node"] == node for r in entry["rejected"]):
                entry["rejected"].append({"node": node, "reason": f"no reply within {self.timeout:g} s"})
        return got

    def _check(self, msg: Message, slices: dict[int, bytes], cuts: list[int]) -> tuple[str | None, int, bytes]:
        """(why the reply is rejected or None, its slice index, its sealed slice)."""
        if msg.has_error():
            return f"error reply: {msg.error.reason}", -1, b""
        rec = recordview.config(msg.content, REQUEST_KEY)
        if rec is None or "sealed" not in rec or "index" not in rec:
            return f"reply has no {REQUEST_KEY!r} record with 'sealed' and 'index'", -1, b""
        k, blob = rec["index"], rec["sealed"]
        if not isinstance(k, int) or k not in slices:
            return f"slice index {k!r} is not one of the request's", -1, b""
        if not isinstance(blob, bytes) or len(blob) != sealed_size(cuts[k + 1] - cuts[k], self.n):
            size = len(blob) if isinstance(blob, bytes) else type(blob).__name__
            return (f"sealed slice {k} has {size} bytes, expected {sealed_size(cuts[k + 1] - cuts[k], self.n)}", k, b"")
        return None, k, blob


__all__ = ["DECRYPTIONS", "DECRYPT_MESSAGE", "REQUEST_KEY", "SplitDecryption", "bounds", "decrypt_slice",
           "is_opened", "open_slices", "plaintext_width", "seal_plaintexts", "sealed_record",
           "sealed_size", "slice_key"]
