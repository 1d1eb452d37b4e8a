"""What every reply must pass before it may touch the global model, and why one is refused.

Flower's FedAvg ends the whole ServerApp when one reply is inconsistent. Here each reply
is checked on its own; a bad one is dropped with a logged reason naming the site, and the
round aggregates the rest. :class:`ReplyError` lists every error code a fedsilo site sends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import IntEnum

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict

from core.sites import WEIGHT_KEY, site_record


class ReplyError(IntEnum):
    """Error codes of the replies a site sends instead of a result (``Message(Error(code, reason))``)."""

    CLIENT_EXCEPTION = 1       #: the ClientApp raised (Flower's ``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``)
    MALFORMED = 400            #: the coordinator could not read the reply (e.g. a compressed update that does not decode)
    MISSED_DEADLINE = 408      #: a straggler dropped under ``strategy.straggler_policy=drop``
    POLICY = 403               #: the site's own policy refuses the run or the message (app/site_policy.py)
    PROTOCOL_ERROR = 409       #: a secure-aggregation stage refused (out of order, replayed, forged)
    NO_KEYS = 412              #: secure aggregation: the site holds no keys of the round's key epoch (state lost)
    BAD_DATA = 422             #: the site's own data or schema do not fit the federation (task=tabular)
    BUDGET_EXHAUSTED = 429     #: DP-SGD: this round would take the site past its target epsilon
    DROPPED = 503              #: fault injection: the site drops out (``faults.drop_rate``)


class SiteRefusal(Exception):
    """Raised by a site-side layer that will not produce a result this round; the ClientApp
    replies with ``Error(code, reason)`` and the coordinator logs it as the reply's rejection."""

    def __init__(self, code: ReplyError, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason

    def reply(self, msg: Message, site_name: str | None = None) -> Message:
        """The error reply to ``msg``, its reason prefixed by the site's name."""
        reason = f"{site_name}: {self.reason}" if site_name else self.reason
        return Message(Error(code=int(self.code), reason=reason), reply_to=msg)


#: Most bytes a reply may carry besides the model's arrays (metrics, site and privacy records).
MAX_RECORD_BYTES = 256 * 1024


def record_bytes(content: RecordDict) -> int:
    """Approximate size of a message's metric and config records (keys, numbers at 8 bytes, strings, bytes)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            continue
        for key, value in record.items():
            total += len(key)
            if isinstance(value, (str, bytes)):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in value)
            else:
                total += 8
    return total


def check_size(msg: Message) -> str | None:
    """Why ``msg``'s records are too large, or None."""
    n = record_bytes(msg.content)
    if n > MAX_RECORD_BYTES:
        return f"oversized reply: {n} bytes of metrics and config records (limit {MAX_RECORD_BYTES})"
    return None


def values(array: Array) -> np.ndarray:
    """An ``Array``'s values, read straight from its ``.npy`` payload when its header is the
    plain C-order one and agrees with the Array's dtype and shape (``Array.numpy()`` parses the
    header with ``ast`` on every call: a cost per reply at hundreds of sites). Exactly what
    ``Array.numpy()`` returns; anything unusual goes through ``Array.numpy()`` itself."""
    data = array.data
    try:
        dtype = np.dtype(array.dtype)
        shape = tuple(int(d) for d in array.shape)
        count = int(np.prod(shape, dtype=np.int64))
        if array.stype == "numpy.ndarray" and data[:6] == b"\x93NUMPY" and dtype.kind in "biuf":
            size = 2 if data[6] == 1 else 4
            start = 8 + size + int.from_bytes(data[8:8 + size], "little")
            head = data[:start]
            if (len(data) == start + count * dtype.itemsize and b"'fortran_order': False" in head
                    and f"'descr': '{dtype.str}'".encode() in head and f"'shape': {shape!r}".encode() in head):
                return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)
    except (TypeError, ValueError, IndexError):
        pass
    return array.numpy()


def _check_metrics(msg: Message, required: tuple[str, ...]) -> str | None:
    metrics = msg.content.metric_records
    if len(metrics) != 1:
        return f"expected one MetricRecord, found {len(metrics)}"
    record = next(iter(metrics.values()))
    for key in required:
        if key not in record:
            return f"metric {key!r} missing"
        value = record[key]
        if isinstance(value, list) or not math.isfinite(float(value)):
            return f"metric {key!r} is not a finite number: {value!r}"
    if float(record[WEIGHT_KEY]) <= 0:  # type: ignore[arg-type]
        return f"{WEIGHT_KEY} must be > 0, got {record[WEIGHT_KEY]!r}"
    return None


Reference = Mapping[str, tuple[tuple[int, ...], np.dtype]]


def check_train_reply(msg: Message, reference: Reference, server_round: int) -> str | None:
    """Return why a train reply must be rejected, or None if it is usable.

    ``reference`` maps each array name of the global model to its (shape, dtype).
    """
    if msg.has_error():
        return f"error reply: {msg.error.reason}"
    oversized = check_size(msg)
    if oversized:
        return oversized
    site = site_record(msg)
    if site is not None and "round" in site and int(site["round"]) != server_round:  # type: ignore[call-overload]
        return f"reply is for round {site['round']}, not round {server_round}"
    arrays = msg.content.array_records
    if len(arrays) != 1:
        return f"expected one ArrayRecord, found {len(arrays)}"
    record: ArrayRecord = next(iter(arrays.values()))
    if set(record.keys()) != set(reference):
        missing = sorted(set(reference) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(reference))
        return f"array names differ from the model's (missing {missing}, unexpected {extra})"
    for name, (shape, dtype) in reference.items():
        arr = values(record[name])
        if tuple(arr.shape) != tuple(record[name].shape) or str(arr.dtype) != str(np.dtype(record[name].dtype)):
            return (f"array {name!r} is inconsistent: its payload holds {arr.dtype}{list(arr.shape)}, its metadata "
                    f"says {record[name].dtype}{list(record[name].shape)}")
        if tuple(arr.shape) != shape:
            return f"array {name!r} has shape {tuple(arr.shape)}, expected {shape}"
        if arr.dtype != dtype:
            return f"array {name!r} has dtype {arr.dtype}, expected {dtype}"
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            return f"array {name!r} contains NaN or Inf"
    return _check_metrics(msg, (WEIGHT_KEY,))


def check_evaluate_reply(msg: Message, required: tuple[str, ...]) -> str | None:
    """Return why a federated-evaluation reply must be rejected, or None."""
    if msg.has_error():
        return f"error reply: {msg.error.reason}"
    oversized = check_size(msg)
    if oversized:
        return oversized
    return _check_metrics(msg, (WEIGHT_KEY, *required))
