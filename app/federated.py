"""Federated data for tasks whose rows never leave the sites (``task=tabular``): both halves.

Coordinator half (:class:`FederatedData`), before round 1:

1. ``vocab``: the names of the categories the schema leaves to discovery (in the clear);
2. ``moments`` and 3. ``spread``: sums of the sites' statistics through the aggregation
   option's :class:`~aggregation.base.SumCoordinator` (plain: every site's vector; secagg:
   only the totals; paillier: nothing, the totals stay encrypted and each site decrypts them).

The totals ride in every later message's config (``prep-*`` keys); every site derives the
same :class:`~tasks.tabular.prep.Preprocessor` from them. After every round (and for the
initial model) the test metrics are pooled the same way from each site's held-out rows
(:mod:`tasks.tabular.evaluation`); under Paillier one key-holding site decrypts the metric
totals (never a single site's contribution).

Site half (:func:`site_vector`, :func:`site_prep`): the ClientApp's answers to those requests.
Every request carries the coordinator's schema fingerprint; a site whose own schema differs
refuses with a reason, and the run goes on with the others.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from aggregation.base import SUM_REQUEST, AggregationOption, RevealFailed, SiteHalf, SumCoordinator, SumResult, screen_sum_replies
from app.site_policy import SitePolicy
from tasks.tabular import evaluation
from tasks.tabular.prep import Preprocessor
from tasks.tabular.task import RawSite, TabularTask

VOCAB_MESSAGE = "query.fedsilo_vocab"
VOCAB_KEY = "fedsilo-vocab"
WAIT_SECONDS = 600.0


class SchemaMismatch(ValueError):
    """A site's schema is not the coordinator's (a different fingerprint)."""


@dataclass
class PrepPhase:
    """What the coordinator learned and spent in the preprocessing phase (into results.json)."""

    sites: int = 0
    seconds: float = 0.0
    vocab: dict[str, list[str]] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    totals_known: bool = True
    rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"sites": self.sites, "seconds": round(self.seconds, 3), "discovered_categories": self.vocab,
                "rejected": self.rejected, "coordinator_knows_totals": self.totals_known, "rows": self.rows}


def wait_for_nodes(grid: Grid, count: int, timeout: float = WAIT_SECONDS, minimum: int = 2) -> list[int]:
    """The connected nodes, once ``count`` are there, or after ``timeout`` seconds if at least ``minimum``
    are (a site that never comes does not stall the federation); else RuntimeError naming how many came.
    No random draw: the run's RNG stays untouched."""
    t0 = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() - t0 > timeout:
            if len(nodes) >= minimum:
                log(WARNING, "fedsilo: %s of %s sites connected within %g s; going on with them", len(nodes), count,
                    timeout)
                return nodes
            raise RuntimeError(f"only {len(nodes)} of {count} sites connected within {timeout:g} s (at least "
                               f"{minimum} are needed)")
        time.sleep(0.5)
    return nodes


class FederatedData:
    """The coordinator half: preprocessing before round 1, pooled test metrics after each round."""

    def __init__(self, task: TabularTask, option: AggregationOption, agg_cfg: Any, timeout: float,
                 standardize: str) -> None:
        self.task, self.option = task, option
        self.summer: SumCoordinator = option.summer(agg_cfg, timeout)
        self.timeout = timeout
        self.standardize = standardize
        self.sum_id = 0
        self.config = ConfigRecord()  # the prep-* keys every message carries
        self.phase = PrepPhase()
        self.nodes: list[int] = []
        self.preprocessor: Preprocessor | None = None  # the fitted transform, where the coordinator may know it

    def _request(self, what: str, length: int, extra: dict[str, Any] | None = None) -> RecordDict:
        self.sum_id += 1
        rec = ConfigRecord({"id": self.sum_id, "what": what, "length": length, **dict(self.config.items()),
                            **(extra or {})})
        if "prep-fingerprint" not in rec:
            rec["prep-fingerprint"] = self.task.fingerprint()
        return RecordDict({SUM_REQUEST: rec})

    def _reject(self, result: SumResult, step: str) -> None:
        for node, reason in result.rejected:
            self.phase.rejected.append({"node": node, "step": step, "reason": reason})
            log(WARNING, "fedsilo preprocessing (%s): site %s left out: %s", step, node, reason)

    def prepare(self, grid: Grid, num_sites: int) -> ConfigRecord:
        """Run the three steps; return the ``prep-*`` config every later message carries."""
        t0 = time.monotonic()
        self.nodes = wait_for_nodes(grid, num_sites, self.timeout)
        fingerprint = self.task.fingerprint()
        self.config = ConfigRecord({"prep-fingerprint": fingerprint, "prep-standardize": self.standardize})
        vocab: dict[str, list[str]] = {}
        if self.task.discovers():
            request = RecordDict({SUM_REQUEST: ConfigRecord({"what": "vocab", "prep-fingerprint": fingerprint})})
            replies = self.summer.send(grid, self.nodes, request, VOCAB_MESSAGE)

            def check(msg: Message) -> str | None:
                rec = msg.content.config_records.get(VOCAB_KEY)
                return None if rec is not None and "vocab" in rec else f"reply has no {VOCAB_KEY!r} record"

            good, rejected = screen_sum_replies(replies, self.nodes, check)
            self._reject(SumResult(len(good), None, None, rejected), "vocab")
            vocab = self.task.merge_vocab([json.loads(str(m.content.config_records[VOCAB_KEY]["vocab"]))
                                           for m in good.values()])
        self.config["prep-vocab"] = json.dumps(vocab, sort_keys=True)
        layout = self.task.layout(vocab)
        moments = self.summer.collect(grid, self.nodes, self._request("moments", layout.moments_size),
                                      layout.moments_size, self.sum_id)
        self._reject(moments, "moments")
        if moments.sites == 0:
            raise RuntimeError(f"no site contributed statistics; reasons: {[r for _, r in moments.rejected][:3]}")
        moments.put(self.config, "prep-moments")
        spread = self.summer.collect(grid, self.nodes, self._request("spread", layout.spread_size),
                                     layout.spread_size, self.sum_id)
        self._reject(spread, "spread")
        spread.put(self.config, "prep-spread")
        self.task.use(self._width(vocab))
        self.phase = PrepPhase(moments.sites, time.monotonic() - t0, vocab, self.phase.rejected,
                               moments.values is not None,
                               int(round(moments.values[0])) if moments.values is not None else None)
        if moments.values is not None and spread.values is not None:
            self.preprocessor = self.task.preprocessor(vocab, tuple(moments.values), tuple(spread.values),
                                                       self.standardize)
        log(INFO, "fedsilo preprocessing: statistics of %s sites combined (%s) in %.1f s; %s model inputs",
            moments.sites, self.summer.learns, self.phase.seconds, self.task.width)
        return self.config

    def _width(self, vocab: dict[str, list[str]]) -> int:
        return self.task.preprocessor(vocab, (), (), self.standardize).width

    def evaluate(self, grid: Grid, arrays: ArrayRecord) -> dict[str, float]:
        """Pooled test metrics of the global model ``arrays`` (plaintext or, under Paillier, encrypted)."""
        spec = evaluation_spec(self.task)
        content = self._request("evaluate", spec.size, {"bins": spec.bins, **spec.encoding.to_record()})
        content["arrays"] = arrays
        result = self.summer.collect(grid, self.nodes, content, spec.size, self.sum_id)
        for node, reason in result.rejected:
            log(WARNING, "fedsilo test metrics: site %s left out: %s", node, reason)
        if result.sites == 0:
            return {}
        try:
            total = self.summer.reveal(grid, self.nodes, result)
        except RevealFailed as err:  # e.g. a listed site's contribution is missing: no pooled metrics this time
            log(WARNING, "fedsilo test metrics: not revealed: %s", err)
            return {}
        out = spec.metrics(total)
        out["test_sites"] = float(result.sites)
        return out


def evaluation_spec(task: TabularTask, bins: int | None = None) -> evaluation.Spec:
    return task.eval_spec(task.cfg.auc_bins if bins is None else bins)


# ---- the site half ----------------------------------------------------------------------------
def check_fingerprint(task: TabularTask, request: ConfigRecord) -> None:
    mine, theirs = task.fingerprint(), str(request.get("prep-fingerprint", ""))
    if mine != theirs:
        raise SchemaMismatch(f"this site's schema ({task.described_by()}, fingerprint {mine}) differs from the "
                             f"coordinator's (fingerprint {theirs}): every site must use the same schema file")


def site_prep(task: TabularTask, config: ConfigRecord, half: SiteHalf, context: Context) -> Preprocessor:
    """The transform the ``prep-*`` entries of a message's config describe (decrypted if need be)."""
    check_fingerprint(task, config)
    vocab = {k: list(v) for k, v in json.loads(str(config["prep-vocab"])).items()}
    moments = half.open_total(context, config, "prep-moments")
    spread = half.open_total(context, config, "prep-spread")
    prep = task.preprocessor(vocab, tuple(moments), tuple(spread), str(config.get("prep-standardize", "numeric")))
    task.use(prep.width)
    return prep


def vocab_reply(task: TabularTask, raw: RawSite, msg: Message, policy: SitePolicy) -> Message:
    """The names of this site's discovered categories: only those seen in at least the policy's
    ``statistics.min_rows`` of its rows (a rarer name could single out a customer or a patient;
    its rows fall under ``(other)`` or no level, as any category the vocabulary does not list)."""
    check_fingerprint(task, msg.content.config_records[SUM_REQUEST])
    check_rows(raw, policy)
    vocab = task.local_vocab(raw.fit_rows, policy.statistics.min_rows)
    return Message(RecordDict({VOCAB_KEY: ConfigRecord({"vocab": json.dumps(vocab, sort_keys=True)})}), reply_to=msg)


class PolicyRefusal(ValueError):
    """A request this site's policy refuses (app/site_policy.py); the reason names the bound, never data."""


def check_rows(raw: RawSite, policy: SitePolicy) -> None:
    rows = sum(len(t) for t in raw.fit_rows)
    if rows < policy.statistics.min_rows:
        raise PolicyRefusal(f"this site has fewer non-test rows than its policy's statistics.min_rows="
                            f"{policy.statistics.min_rows}: it releases no statistic of them")


def site_vector(task: TabularTask, raw: RawSite, msg: Message, half: SiteHalf, context: Context,
                policy: SitePolicy) -> np.ndarray:
    """This site's vector for a sum request (``moments``, ``spread`` or ``evaluate``), within its policy."""
    request = msg.content.config_records[SUM_REQUEST]
    check_fingerprint(task, request)
    what = str(request["what"])
    if what in ("moments", "spread"):
        check_rows(raw, policy)
    if what == "evaluate":
        bins = request.get("bins")
        if not isinstance(bins, int) or not 2 <= bins <= policy.evaluation.max_bins:
            raise PolicyRefusal(f"a pooled evaluation with bins outside [2, {policy.evaluation.max_bins}] "
                                "(the policy's evaluation.max_bins)")
        if len(raw.test) < policy.evaluation.min_test_rows:
            raise PolicyRefusal(f"this site has fewer test rows than its policy's evaluation.min_test_rows="
                                f"{policy.evaluation.min_test_rows}: it reports no metrics on them")
    vocab = {k: list(v) for k, v in json.loads(str(request.get("prep-vocab", "{}"))).items()}
    layout = task.layout(vocab)
    if what == "moments":
        return np.sum([layout.moments(t) for t in raw.fit_rows], axis=0)
    if what == "spread":
        means = layout.means(half.open_total(context, request, "prep-moments"))
        return np.sum([layout.spread(t, means) for t in raw.fit_rows], axis=0)
    if what == "evaluate":
        prep = site_prep(task, request, half, context)
        _, test = task.prepared(raw, prep)
        model = task.build_model()
        model.load_state_dict(half.global_state(msg, context, model.state_dict()))
        model.eval()
        with torch.no_grad():
            outputs = model(test.x).double().numpy()
        spec = evaluation_spec(task, int(request["bins"]))  # type: ignore[arg-type]
        return spec.site_vector(outputs, raw.test.label.astype(np.float64), prep.label_scale())
    raise ValueError(f"unknown sum request {what!r}")
