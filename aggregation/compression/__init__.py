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

One mechanism per module: :mod:`.policy` (the setting, its record keys, which option takes which
method: each option's ``compressions``), :mod:`.quantiser` (stochastic rounding per block),
:mod:`.varint` (LEB128 gaps of sparse positions), :mod:`.sparse` (top-k and seeded rand-k
positions), :mod:`.codec` (one update in and out of its payload), :mod:`.site` (the site half,
:class:`SiteCompressor`, called by an option's site half after any norm bound and before masking
or sending, with error feedback) and :mod:`.server` (the coordinator half, :class:`Decompress`: a
strategy wrapper that turns compressed replies back into full models, ``global + update``, before
the strategy screens and combines them, so robust rules, norm bounds and central DP see ordinary
models).
"""

from __future__ import annotations

from aggregation.compression.codec import decode, encode, float_keys, raw_array, segments
from aggregation.compression.policy import (
    BASE_KEY,
    KEEP_BITS,
    META_KEY,
    METHODS,
    RESIDUAL,
    SEED_KEY,
    STYPE,
    UPDATE_KEY,
    Compression,
    check,
)
from aggregation.compression.quantiser import BLOCK, blocks_of, dequantise, quantise
from aggregation.compression.server import Decompress, decode_reply
from aggregation.compression.site import SiteCompressor
from aggregation.compression.sparse import per_array, positions_root, random_positions, topk_count, topk_positions
from aggregation.compression.varint import varint_decode, varint_encode

__all__ = [
    "BASE_KEY", "BLOCK", "Compression", "Decompress", "KEEP_BITS", "META_KEY", "METHODS", "RESIDUAL", "SEED_KEY",
    "STYPE", "SiteCompressor", "UPDATE_KEY", "raw_array", "blocks_of", "check", "decode", "decode_reply", "dequantise",
    "encode", "float_keys", "per_array", "positions_root", "quantise", "random_positions", "segments", "topk_count",
    "topk_positions", "varint_decode", "varint_encode",
]
