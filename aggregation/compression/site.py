"""The site half: compress a site's update after any norm bound and before masking or sending; error
feedback keeps what compression left out (site state under the job id, or ``context.state``) and adds
it to the next update (Seide et al. 2014, Karimireddy et al. 2019)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from aggregation.compression.codec import encode, float_keys, raw_array, segments
from aggregation.compression.policy import BASE_KEY, META_KEY, RESIDUAL, SEED_KEY, UPDATE_KEY, Compression
from aggregation.compression.sparse import random_positions
from core import recordview
from core.layout import Layout
from core.seeding import seed_for
from core.state import SiteStore


class SiteCompressor:
    """A site's compression step: update in, payload out, residual kept (error feedback)."""

    def __init__(self, comp: Compression) -> None:
        self.comp = comp

    def residual(self, store: SiteStore | None, context: Context, server_round: int, n: int) -> np.ndarray:
        """What compression left out of the site's update before ``server_round`` (zeros without error feedback)."""
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
        """Keep ``e``, what compression left out in ``server_round``, for the site's next update."""
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
        return {UPDATE_KEY: ArrayRecord(OrderedDict((k, raw_array(v)) for k, v in parts.items())),
                "arrays": ArrayRecord(rest), META_KEY: ConfigRecord(meta)}  # type: ignore[arg-type]
