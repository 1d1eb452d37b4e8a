"""Update compression: the last step of a site's reply, and its inverse at the coordinator.

``aggregation.compress`` picks how a site's *update* (its trained model minus the global
model it started from, over the model's floating-point arrays) is written before it leaves:

=========  ====================================================================  =============
method     what is sent                                                          bytes/value
=========  ====================================================================  =============
``none``   the trained model's arrays as float32 (Flower's own ``.npy`` arrays)   4
``fp16``   the update in IEEE half precision                                     2
``int8``   the update stochastically rounded to 8 bits per value (unbiased),     1 + 4/256
           one float32 scale per block of 256 values
``int4``   the same at 4 bits (two values per byte)                              0.5 + 4/256
``topk``   the ``keep`` share of values largest in magnitude: their positions     ~keep x (1 to 2
           (gaps, LEB128 varints) and values (``keep_bits``: 8 = int8 as above,   + keep_bits/8)
           16 = fp16, 32 = float32)
``randk``  the ``keep`` share of values at positions drawn from a seed the        keep x keep_bits/8
           round's sites share (the coordinator derives them too: no positions
           are sent)
=========  ====================================================================  =============

**Error feedback** (``aggregation.error_feedback``, on by default; Seide et al. 2014, Karimireddy
et al. 2019): what compression left out of a site's update is added to its next update. The
residual is site state: it is kept in the site's state folder under the coordinator's job id
(:class:`core.state.SiteStore`, ``residual-<round>.pt``), so it survives a site restart and a
coordinator resume (a resumed round reads the residual left *before* it). Without a state folder
(a strategy that keeps no job id, e.g. Flower's own) it lives in ``context.state``. Without error
feedback ``randk`` scales its values by ``1/keep`` (unbiased) and ``topk`` is biased.

Payloads are raw ``Array`` bytes (``stype`` :data:`STYPE`): no ``.npy`` header, so the traffic
records in ``results.json`` count what is really sent. Arrays that are not floating point (a
BatchNorm layer's step counter), the model's other non-trainable buffers (BatchNorm's running
statistics: replaced each round, not stepped, and a few values) and arrays the global model does
not have are sent unchanged.

Both halves are here: :class:`SiteCompressor` (called by an option's site half after any norm
bound and before masking or sending) and :class:`Decompress` (the coordinator half: a strategy
wrapper that turns compressed replies back into full models, ``global + update``, before the
strategy screens and combines them, so robust rules, norm bounds and central DP see ordinary
models). Which option takes which method, and why, is each option's ``compressions``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from aggregation.base import AggregationOption, StrategyWrapper
from core import recordview
from core.config import check as check_key
from core.layout import Layout
from core.replies import ReplyError
from core.seeding import seed_for
from core.state import SiteStore

METHODS = ("none", "fp16", "int8", "int4", "topk", "randk")
KEEP_BITS = (8, 16, 32)
BLOCK = 256
#: the reply's compressed update (raw arrays) and its description
UPDATE_KEY = "fedsilo-update"
META_KEY = "fedsilo-compression"
#: the train config key naming the global model a compressed update is relative to
BASE_KEY = "compress-base"
#: the train config key carrying the ``randk`` positions' seed for that global model
SEED_KEY = "compress-seed"
STYPE = "fedsilo.raw"
RESIDUAL = "residual"


@dataclass(frozen=True)
class Compression:
    """One compression setting (from ``aggregation.compress``, ``keep``, ``keep_bits``, ``error_feedback``)."""

    method: str = "none"
    keep: float = 0.01
    keep_bits: int = 8
    error_feedback: bool = True

    @classmethod
    def of(cls, cfg: Any) -> Compression:
        return cls(str(getattr(cfg, "compress", "none")), float(getattr(cfg, "keep", 0.01)),
                   int(getattr(cfg, "keep_bits", 8)), bool(getattr(cfg, "error_feedback", True)))

    @property
    def active(self) -> bool:
        return self.method != "none"

    def kept(self, n: int) -> int:
        """Values a sparse method sends out of ``n``."""
        return max(1, min(n, int(round(self.keep * n))))

    def to_record(self) -> dict[str, Any]:
        return {"method": self.method, "keep": self.keep, "bits": self.keep_bits, "ef": self.error_feedback}


def check(option: AggregationOption, cfg: Any) -> None:
    """Range checks of the compression keys, and whether ``option`` takes ``cfg.compress``
    (its ``compressions``; the reason it refuses the others is in the error)."""
    method = str(getattr(cfg, "compress", "none"))
    check_key(method in METHODS, "aggregation.compress", method, f"one of {list(METHODS)}")
    why = option.compression_refusals.get(method, "")
    check_key(method in option.compressions, "aggregation.compress", method,
              f"one of {list(option.compressions)} with aggregation={option.name}" + (f" ({why})" if why else ""))
    check_key(0 < float(getattr(cfg, "keep", 0.01)) <= 1, "aggregation.keep", getattr(cfg, "keep", None),
              "a share 0 < keep <= 1 of the update's values")
    check_key(int(getattr(cfg, "keep_bits", 8)) in KEEP_BITS, "aggregation.keep_bits", getattr(cfg, "keep_bits", None),
              f"one of {list(KEEP_BITS)}")


# ---- value codecs --------------------------------------------------------------------------


def blocks_of(n: int, segments: tuple[int, ...] = ()) -> tuple[np.ndarray, int]:
    """(each value's block, the number of blocks): blocks of :data:`BLOCK` values that never span two
    arrays (``segments``: the arrays' sizes), so one array's large values (FedNova's step count) never
    coarsen another's."""
    ids, offset = [], 0
    for size in segments or (n,):
        ids.append(offset + np.arange(size) // BLOCK)
        offset += -(-size // BLOCK)
    out = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    if out.size != n:
        raise ValueError(f"arrays of {sum(segments)} values for an update of {n}")
    return out, offset


def quantise(x: np.ndarray, bits: int, rng: np.random.Generator, segments: tuple[int, ...] = ()
             ) -> tuple[bytes, bytes]:
    """(codes, scales): ``x`` stochastically rounded to ``bits`` (8 or 4) per value over
    ``[-s, s]`` per block (:func:`blocks_of`; ``s`` the block's largest magnitude, float32).
    Unbiased: ``E[dequantise(quantise(x))] = x``; each value's error is below ``2s/(2^bits-1)``."""
    block, count = blocks_of(x.size, segments)
    scale = np.zeros(count, dtype=np.float64)
    np.maximum.at(scale, block, np.abs(x))
    scale = scale.astype(np.float32)
    s = scale.astype(np.float64)[block]
    top = (1 << bits) - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(s > 0, (x + s) / (2 * s) * top, top / 2)
    floor = np.floor(y)
    q = np.minimum(floor + (rng.random(y.shape) < (y - floor)), top).astype(np.uint8)
    if bits == 4:
        q = np.concatenate([q, np.zeros(q.size % 2, np.uint8)])
        q = (q[0::2] | (q[1::2] << 4)).astype(np.uint8)
    return q.tobytes(), scale.tobytes()


def dequantise(codes: bytes, scales: bytes, bits: int, n: int, segments: tuple[int, ...] = ()) -> np.ndarray:
    """The values :func:`quantise` encoded (float64)."""
    q = np.frombuffer(codes, dtype=np.uint8)
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=1).ravel()
    scale = np.frombuffer(scales, dtype=np.float32).astype(np.float64)
    block, count = blocks_of(n, segments)
    if q.size < n or scale.size != count:
        raise ValueError(f"{q.size} codes and {scale.size} scales for {n} values (expected {count} scales)")
    s = scale[block]
    top = (1 << bits) - 1
    return q[:n].astype(np.float64) / top * (2 * s) - s


def varint_encode(values: np.ndarray) -> bytes:
    """Non-negative integers as LEB128 varints (7 bits a byte, high bit = more follow)."""
    g = np.asarray(values, dtype=np.uint64)
    width = np.ones(g.size, dtype=np.int64)
    for t in (7, 14, 21, 28, 35):
        width += g >= np.uint64(1 << t)
    out = np.zeros(int(width.sum()), dtype=np.uint8)
    starts = np.cumsum(width) - width
    for j in range(int(width.max(initial=0))):
        m = width > j
        byte = ((g[m] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        out[starts[m] + j] = byte | ((width[m] > j + 1).astype(np.uint8) << 7)
    return out.tobytes()


def varint_decode(data: bytes, count: int) -> np.ndarray:
    """``count`` integers from :func:`varint_encode`'s bytes."""
    b = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(b < 128)
    if ends.size != count or (count and ends[-1] != b.size - 1):
        raise ValueError(f"position list holds {ends.size} numbers in {b.size} bytes, expected {count}")
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    out = np.zeros(count, dtype=np.uint64)
    for j in range(int((ends - starts).max(initial=-1)) + 1):
        m = starts + j <= ends
        out[m] |= (b[starts[m] + j] & np.uint8(0x7F)).astype(np.uint64) << np.uint64(7 * j)
    return out


def positions_root(initial: ArrayRecord) -> int:
    """The root of every ``randk`` positions seed of a run: a digest of the public initial model
    (itself drawn from the run seed), so coordinator halves of any option derive the same seeds."""
    digest = hashlib.sha256(b"".join(bytes(a.data) for a in initial.values())).digest()
    return int.from_bytes(digest[:8], "little")


def random_positions(seed: int, n: int, k: int) -> np.ndarray:
    """The ``k`` positions of ``randk`` drawn from ``seed``: the coordinator sends one seed with
    each global model (:data:`SEED_KEY`), so every site starting from it (and the coordinator)
    uses the same positions."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=k, replace=False))


# ---- one update -------------------------------------------------------------------------


def _raw(data: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)


def per_array(idx: np.ndarray, segments: tuple[int, ...]) -> tuple[int, ...]:
    """How many of the sorted positions ``idx`` fall in each array (``segments``: the arrays' sizes)."""
    if not segments:
        return ()
    bounds = np.cumsum((0, *segments))
    return tuple(int(c) for c in np.diff(np.searchsorted(idx, bounds)) if c > 0)


def _values(comp: Compression, v: np.ndarray, rng: np.random.Generator, segments: tuple[int, ...] = ()
            ) -> dict[str, bytes]:
    if comp.keep_bits == 32:
        return {"values": v.astype("<f4").tobytes()}
    if comp.keep_bits == 16:
        return {"values": v.astype("<f2").tobytes()}
    codes, scales = quantise(v, 8, rng, segments)
    return {"values": codes, "scales": scales}


def _read_values(comp: Compression, parts: dict[str, bytes], k: int, segments: tuple[int, ...] = ()
                 ) -> np.ndarray:
    if comp.keep_bits == 32:
        return np.frombuffer(parts["values"], dtype="<f4", count=k).astype(np.float64)
    if comp.keep_bits == 16:
        return np.frombuffer(parts["values"], dtype="<f2", count=k).astype(np.float64)
    return dequantise(parts["values"], parts["scales"], 8, k, segments)


def topk_positions(comp: Compression, u: np.ndarray, segments: tuple[int, ...]) -> np.ndarray:
    """``topk``'s positions: in every array (``segments``: the arrays' sizes, in order) the ``keep``
    share of its values largest in magnitude, at least one (layer-wise, as in Lin et al. 2018's
    deep gradient compression: a layer of small updates is never starved by one of large ones)."""
    out, start = [], 0
    for size in segments or (u.size,):
        part = np.abs(u[start:start + size])
        k = comp.kept(size)
        out.append(start + (np.argpartition(part, size - k)[size - k:] if k < size else np.arange(size)))
        start += size
    return np.sort(np.concatenate(out))


def topk_count(comp: Compression, n: int, segments: tuple[int, ...]) -> int:
    return sum(comp.kept(size) for size in segments or (n,))


def encode(comp: Compression, u: np.ndarray, rng: np.random.Generator, seed: int, segments: tuple[int, ...] = ()
           ) -> tuple[dict[str, bytes], np.ndarray]:
    """(the payload parts, what the coordinator will decode) of the update ``u`` (``segments``: the
    sizes of the arrays ``u`` is made of, for ``topk``)."""
    n = u.size
    if comp.method == "fp16":
        parts = {"values": u.astype("<f2").tobytes()}
    elif comp.method in ("int8", "int4"):
        codes, scales = quantise(u, 8 if comp.method == "int8" else 4, rng, segments)
        parts = {"values": codes, "scales": scales}
    elif comp.method == "topk":
        idx = topk_positions(comp, u, segments)
        gaps = np.diff(np.concatenate([[-1], idx])) - 1
        parts = {"positions": varint_encode(gaps), **_values(comp, u[idx], rng, per_array(idx, segments))}
    elif comp.method == "randk":
        k = comp.kept(n)
        idx = random_positions(seed, n, k)
        scale = 1.0 if comp.error_feedback else n / k
        parts = _values(comp, u[idx] * scale, rng, per_array(idx, segments))
    else:
        raise ValueError(f"aggregation.compress={comp.method!r} is not one of {list(METHODS)}")
    return parts, decode(comp, parts, n, seed, segments)


def decode(comp: Compression, parts: dict[str, bytes], n: int, seed: int, segments: tuple[int, ...] = ()
           ) -> np.ndarray:
    """The update (float64, ``n`` values) a payload holds; ValueError if it is malformed."""
    if comp.method == "fp16":
        raw = parts["values"]
        if len(raw) != 2 * n:
            raise ValueError(f"{len(raw)} bytes of fp16 values, expected {2 * n}")
        return np.frombuffer(raw, dtype="<f2").astype(np.float64)
    if comp.method in ("int8", "int4"):
        return dequantise(parts["values"], parts["scales"], 8 if comp.method == "int8" else 4, n, segments)
    k = topk_count(comp, n, segments) if comp.method == "topk" else comp.kept(n)
    out = np.zeros(n, dtype=np.float64)
    if comp.method == "topk":
        idx = np.cumsum(varint_decode(parts["positions"], k).astype(np.int64) + 1) - 1
        if k and (idx[-1] >= n):
            raise ValueError(f"position {idx[-1]} beyond the model's {n} values")
    else:
        idx = random_positions(seed, n, k)
    out[idx] = _read_values(comp, parts, k, per_array(idx, segments))
    return out


def segments(layout: Layout) -> tuple[int, ...]:
    """The sizes of a layout's arrays, in order."""
    return tuple(int(np.prod(shape)) for shape in layout.shapes)


def float_keys(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays an update is computed over: the floating-point ones."""
    return OrderedDict((k, v) for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating))


# ---- site half ---------------------------------------------------------------------------


class SiteCompressor:
    """A site's compression step: update in, payload out, residual kept (error feedback)."""

    def __init__(self, comp: Compression) -> None:
        self.comp = comp

    def residual(self, store: SiteStore | None, context: Context, server_round: int, n: int) -> np.ndarray:
        if not self.comp.error_feedback:
            return np.zeros(n)
        if store is not None:
            saved = store.load(RESIDUAL, server_round)
            e = None if saved is None else saved["e"].numpy().astype(np.float64)
        else:
            rec = recordview.arrays(context.state, RESIDUAL)
            e = None if rec is None else rec["e"].numpy().astype(np.float64)
        return e if e is not None and e.shape == (n,) else np.zeros(n)

    def keep_residual(self, store: SiteStore | None, context: Context, server_round: int, e: np.ndarray) -> None:
        if not self.comp.error_feedback:
            return
        if store is not None:
            store.save(RESIDUAL, server_round, {"e": torch.from_numpy(e.astype(np.float32))})
        else:
            context.state[RESIDUAL] = ArrayRecord({"e": Array(e.astype(np.float32))})

    def compress(self, update: np.ndarray, context: Context, store: SiteStore | None, seed: int, site: int,
                 server_round: int, positions: int, segments: tuple[int, ...] = ()
                 ) -> tuple[dict[str, bytes], np.ndarray]:
        """(payload, the update the coordinator will decode) for ``update``; the residual moves on.
        ``seed``: the run seed (stochastic rounding); ``positions``: the round's ``randk`` seed."""
        u = update + self.residual(store, context, server_round, update.size)
        rng = np.random.default_rng(seed_for(seed, server_round, site, 0xC0))
        parts, sent = encode(self.comp, u, rng, positions, segments)
        self.keep_residual(store, context, server_round, u - sent)
        return parts, sent

    def select(self, update: np.ndarray, context: Context, store: SiteStore | None, server_round: int,
               positions: int) -> np.ndarray:
        """``randk`` for a protection that encodes the values itself (secure aggregation): the ``keep``
        share of ``update`` (plus the residual) at the round's shared positions; the residual moves on."""
        n = update.size
        u = update + self.residual(store, context, server_round, n)
        k = self.comp.kept(n)
        idx = random_positions(positions, n, k)
        values = u[idx] * (1.0 if self.comp.error_feedback else n / k)
        sent = np.zeros(n)
        sent[idx] = values
        self.keep_residual(store, context, server_round, u - sent)
        return values

    def records(self, glob: dict[str, np.ndarray], local: dict[str, np.ndarray], context: Context,
                store: SiteStore | None, seed: int, site: int, server_round: int, config: ConfigRecord,
                dense: frozenset[str] = frozenset()) -> dict[str, ArrayRecord | ConfigRecord]:
        """The reply's records for a plain reply: the compressed update of the float arrays the
        global model has, the other arrays unchanged (``arrays``: also ``dense``, the model's
        non-trainable statistics such as BatchNorm's running means, which are replaced, not
        stepped, and are a few values), and the description."""
        floats = float_keys({k: v for k, v in glob.items()
                             if k in local and local[k].shape == v.shape and k not in dense})
        layout = Layout.of(floats)
        update = layout.flatten(local) - layout.flatten(floats)
        base, positions = int(config.get(BASE_KEY, 0)), int(config.get(SEED_KEY, 0))  # type: ignore[arg-type]
        parts, _ = self.compress(update, context, store, seed, site, server_round, positions, segments(layout))
        rest = OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in local.items() if k not in floats)
        meta = {**self.comp.to_record(), "base": base, "size": layout.size}
        return {UPDATE_KEY: ArrayRecord(OrderedDict((k, _raw(v)) for k, v in parts.items())),
                "arrays": ArrayRecord(rest), META_KEY: ConfigRecord(meta)}  # type: ignore[arg-type]


# ---- coordinator half ----------------------------------------------------------------------


def decode_reply(msg: Message, glob: dict[str, np.ndarray], positions: int) -> dict[str, np.ndarray]:
    """The full model a compressed reply stands for: ``global + update`` (ValueError if malformed)."""
    meta = msg.content.config_records[META_KEY]
    comp = Compression(str(meta["method"]), float(meta["keep"]), int(meta["bits"]),  # type: ignore[arg-type]
                       bool(meta["ef"]))
    if comp.method not in METHODS[1:] or comp.keep_bits not in KEEP_BITS:
        raise ValueError(f"unknown compression {comp.method!r} at {comp.keep_bits} bits")
    rest = msg.content.array_records.get("arrays", ArrayRecord())
    keys = [k for k in float_keys(glob) if k not in rest]  # the float arrays not sent whole
    layout = Layout.of(OrderedDict((k, glob[k]) for k in keys))
    if int(meta["size"]) != layout.size:  # type: ignore[arg-type]
        raise ValueError(f"compressed update of {meta['size']!r} values, the global model has {layout.size}")
    parts = {k: bytes(a.data) for k, a in msg.content.array_records[UPDATE_KEY].items()}
    update = decode(comp, parts, layout.size, positions, segments(layout))
    if not np.all(np.isfinite(update)):
        raise ValueError("compressed update holds values that are not finite")
    base = layout.flatten({k: glob[k] for k in keys})
    out = OrderedDict(layout.unflatten(base + update))
    out.update({k: a.numpy() for k, a in rest.items()})
    return OrderedDict((k, out[k]) for k in glob if k in out) | out


class Decompress(StrategyWrapper):
    """Coordinator half: remembers the global models it sent (by a number in the train config,
    :data:`BASE_KEY`) and turns each compressed reply back into a full model before the wrapped
    strategy sees it. A reply that does not decode is turned into an error reply with the reason
    (the strategy logs and records it as any rejected reply); the round goes on."""

    MAX_BASES = 64

    def __init__(self, strategy: Strategy, initial: ArrayRecord) -> None:
        super().__init__(strategy)
        self.seed = positions_root(initial)
        self._bases: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._last: tuple[ArrayRecord, int] | None = None
        self._next = 0

    def _base(self, arrays: ArrayRecord) -> int:
        if self._last is not None and self._last[0] is arrays and self._last[1] in self._bases:
            return self._last[1]
        self._next += 1
        self._last = (arrays, self._next)
        self._bases[self._next] = {k: v.numpy() for k, v in arrays.items()}
        while len(self._bases) > self.MAX_BASES:
            self._bases.popitem(last=False)
        return self._next

    def positions_seed(self, base: int) -> int:
        return seed_for(self.seed, base, 0x5A4D)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        msgs = list(self.strategy.configure_train(server_round, arrays, config, grid))
        for m in msgs:
            if "config" in m.content.config_records:
                # what the site received: the model plus any side values the strategy sends with it
                # (SCAFFOLD's control variate); the update is relative to all of it
                sent = m.content.array_records.get("arrays", arrays)
                base = self._base(sent)
                m.content.config_records["config"][BASE_KEY] = base
                m.content.config_records["config"][SEED_KEY] = self.positions_seed(base)
        return msgs

    def expand(self, replies: Iterable[Message]) -> list[Message]:
        """The replies with every compressed update turned back into a full model."""
        out = []
        for msg in replies:
            if msg.has_error() or META_KEY not in msg.content.config_records:
                out.append(msg)
                continue
            try:
                base = int(msg.content.config_records[META_KEY]["base"])  # type: ignore[arg-type]
                if base not in self._bases:
                    raise ValueError(f"compressed relative to global model #{base}, which the coordinator no longer has")
                model = decode_reply(msg, self._bases[base], self.positions_seed(base))
            except (KeyError, TypeError, ValueError) as err:
                # the reply becomes an error reply in place (same sender): screened and recorded as rejected
                msg.__dict__["_content"] = None
                msg.error = Error(code=int(ReplyError.MALFORMED), reason=f"compressed update rejected: {err}")
                out.append(msg)
                continue
            content = RecordDict({k: v for k, v in msg.content.items() if k not in (UPDATE_KEY, META_KEY, "arrays")})
            content["arrays"] = ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in model.items()))
            msg.content = content
            out.append(msg)
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, self.expand(replies))

