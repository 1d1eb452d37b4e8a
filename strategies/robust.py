"""Byzantine-robust aggregation (``strategy.robust``) and update norm bounding (``strategy.norm_bound``).

Server half only: robust rules need nothing from honest sites. The rules are functions
here; :mod:`strategies.combine` stacks them as combine steps of any strategy. They replace the weighted
mean of the screened replies by a rule a minority of arbitrary updates cannot drag far:

``krum``          the one update closest to its ``n - f - 2`` nearest others (Blanchard et al., 2017)
``multikrum``     the row-weighted mean of the ``n - f`` best Krum scores
``trimmed_mean``  per value, the mean after dropping the ``f`` largest and ``f`` smallest (Yin et al., 2018)
``median``        per value, the median (Yin et al., 2018)

``f`` is ``floor(strategy.assumed_byzantine * n)`` of the round's ``n`` usable replies
(capped where a rule needs it: Krum scores need ``n - f - 2 >= 1``, trimming keeps one
value). Krum selection and the trimmed mean are Flower's own
(``flwr.serverapp.strategy.multikrum.select_multikrum``, ``fedtrimmedavg.trim_mean``);
FedProx's proximal term composes with every rule (it acts at the sites).

Every rule needs the server to see each site's update, so none is possible under
``aggregation=secagg`` or ``paillier``. What remains there is **norm bounding**
(:func:`core.clipping.bound_norm`): under plain aggregation each site's update is clipped to L2 norm
``norm_bound`` before aggregation; under secure aggregation the honest sites clip their
own updates and the server clips the unmasked mean update, so one round can never move
the global model by more than ``norm_bound`` whatever the attackers send.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from core.sites import WEIGHT_KEY
from strategies.config import ROBUST_RULES as RULES


def _arrays(msg: Message) -> ArrayRecord:
    return next(iter(msg.content.array_records.values()))


def byzantine_count(rule: str, n: int, assumed: float) -> int:
    """``f`` for ``n`` replies: ``floor(assumed * n)``, capped to what ``rule`` can work with."""
    f = math.floor(assumed * n + 1e-9)
    if rule in ("krum", "multikrum"):
        f = min(f, max(0, n - 3))  # a Krum score sums the n - f - 2 >= 1 nearest distances
    if rule == "trimmed_mean":
        f = min(f, (n - 1) // 2)  # at least one value survives the trimming
    return max(f, 0)


def aggregate(rule: str, replies: list[Message], assumed: float) -> tuple[ArrayRecord, list[int]]:
    """The robust aggregate of ``replies`` (screened, in site order) and the indices it used.

    ``krum``/``multikrum`` use only the selected replies (row-weighted mean of them);
    ``trimmed_mean``/``median`` use every reply's values, unweighted, as in Flower.
    """
    n = len(replies)
    f = byzantine_count(rule, n, assumed)
    if rule in ("krum", "multikrum"):
        contents = [m.content for m in replies]
        chosen = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=1 if rule == "krum" else n - f)
        used = sorted(next(i for i, c in enumerate(contents) if c is s) for s in chosen)
        weights = np.array([float(next(iter(replies[i].content.metric_records.values()))[WEIGHT_KEY])  # type: ignore[arg-type]
                            for i in used])
        weights = weights / weights.sum()
        first = _arrays(replies[used[0]])
        out = OrderedDict()
        for name in first.keys():
            stacked = np.stack([_arrays(replies[i])[name].numpy() for i in used])
            out[name] = np.tensordot(weights, stacked.astype(np.float64), axes=1).astype(stacked.dtype)
        return ArrayRecord(OrderedDict((k, Array(v)) for k, v in out.items())), used
    if rule in ("trimmed_mean", "median"):
        first = _arrays(replies[0])
        robust_out: OrderedDict[str, Array] = OrderedDict()
        for name in first.keys():
            stacked = np.stack([_arrays(m)[name].numpy() for m in replies])
            value = trim_mean(stacked, f / n) if rule == "trimmed_mean" else np.median(stacked, axis=0)
            robust_out[name] = Array(np.asarray(value, dtype=stacked.dtype))
        return ArrayRecord(robust_out), list(range(n))
    raise ValueError(f"strategy.robust={rule!r}: allowed {list(RULES)}")


def bound_reply(msg: Message, glob: ArrayRecord, bound: float) -> bool:
    """Clip the update ``reply - glob`` of a plain reply to L2 norm ``bound``, in place."""
    record = _arrays(msg)
    names = [k for k in glob.keys() if np.issubdtype(glob[k].numpy().dtype, np.floating)]
    base = {k: glob[k].numpy().astype(np.float64) for k in names}
    deltas = {k: record[k].numpy().astype(np.float64) - base[k] for k in names}
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in deltas.values()))
    if bound <= 0 or norm <= bound:
        return False
    factor = bound / norm
    for k in names:
        dtype = record[k].numpy().dtype
        record[k] = Array((base[k] + factor * deltas[k]).astype(dtype))
    return True
