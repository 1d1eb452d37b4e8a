"""The two protected-sum programs of tasks whose rows stay at the sites (:mod:`tasks.federated`).

* :class:`Preprocessing`, before round 1: the names of the categories the schema leaves to
  discovery (in the clear, each seen at least the site policy's ``statistics.min_rows`` times),
  then the totals of the sites' ``moments`` and ``spread`` statistics. The totals are kept in
  every later message's config (``prep-*`` keys); every site derives the same transform from them
  (:meth:`~tasks.federated.FederatedTask.transform_for`). Under Paillier they stay encrypted
  and only the sites open them.
* :class:`PooledMetrics`, after every round (and for the initial model): the sufficient
  statistics of the test metrics of the sites' held-out rows (:mod:`tasks.tabular.evaluation`),
  revealed to the coordinator as a total (under Paillier one key-holding site reveals it, never
  a single site's contribution).

Every request carries the coordinator's schema fingerprint; a site whose own schema differs
refuses with a reason and the run goes on with the others. Each site half checks the site's own
policy before computing anything (:class:`~core.programs.PolicyRefusal`, naming the bound).
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass, field
from logging import INFO, WARNING, getLogger
from typing import Any, ClassVar

import numpy as np
import torch

from core.programs import Ask, Gather, PolicyRefusal, Program, ProgramError, SiteCall, Total, register
from tasks.federated import FederatedTask, RawSite, Transform

LOG = getLogger("flwr")


@dataclass
class PrepPhase:
    """What the coordinator learned and spent in the preprocessing phase (into results.json)."""

    sites: int = 0
    seconds: float = 0.0
    vocab: dict[str, list[str]] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    totals_known: bool = True
    rows: int | None = None
    preprocessor: Transform | None = None  # the fitted transform, where the coordinator may know it

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessing`` section of results.json."""
        return {"sites": self.sites, "seconds": round(self.seconds, 3), "discovered_categories": self.vocab,
                "rejected": self.rejected, "coordinator_knows_totals": self.totals_known, "rows": self.rows}


def _federated(call: SiteCall) -> tuple[FederatedTask, RawSite]:
    task, raw = call.task, call.data
    if not isinstance(task, FederatedTask) or not isinstance(raw, RawSite):
        raise ProgramError(f"task={getattr(task, 'name', '?')} keeps no rows of its own at the site: it has no "
                           "federated statistics")
    task.check_fingerprint(call.params)
    return task, raw


def check_evaluation(bins: Any, test_rows: int, policy: Any) -> int:
    """The pooled-evaluation bounds of the site's policy: ``bins`` within ``evaluation.max_bins`` and at least
    ``evaluation.min_test_rows`` held-out rows; :class:`PolicyRefusal` naming the bound otherwise; the bins."""
    limits = policy.evaluation
    if not isinstance(bins, int) or not 2 <= bins <= limits.max_bins:
        raise PolicyRefusal(f"a pooled evaluation with bins outside [2, {limits.max_bins}] (the policy's "
                            "evaluation.max_bins)")
    if test_rows < limits.min_test_rows:
        raise PolicyRefusal(f"this site has fewer test rows than its policy's evaluation.min_test_rows="
                            f"{limits.min_test_rows}: it reports no metrics on them")
    return bins


def check_rows(raw: RawSite, policy: Any) -> None:
    """Refuse statistics of fewer non-test rows than the policy's ``statistics.min_rows``."""
    rows = sum(len(t) for t in raw.fit_rows)
    if rows < policy.statistics.min_rows:
        raise PolicyRefusal(f"this site has fewer non-test rows than its policy's statistics.min_rows="
                            f"{policy.statistics.min_rows}: it releases no statistic of them")


@register
class Preprocessing(Program):
    """Federated preprocessing: vocabulary, then moments, then spread (see the module docstring)."""

    name: ClassVar[str] = "fedsilo.preprocessing"

    def __init__(self, task: FederatedTask) -> None:
        super().__init__()
        self.task = task
        self.phase = PrepPhase()

    def _reject(self, rejected: list[tuple[int, str]], step: str) -> None:
        for node, reason in rejected:
            self.phase.rejected.append({"node": node, "step": step, "reason": reason})
            LOG.log(WARNING, "fedsilo preprocessing (%s): site %s left out: %s", step, node, reason)

    def run(self) -> Generator[Ask | Gather, Any, PrepPhase]:
        """Vocabulary (if the schema discovers categories), moments, spread; the phase's outcome."""
        task = self.task
        standardize = task.standardize()
        self.state.update({"prep-fingerprint": task.fingerprint(), "prep-standardize": standardize})
        vocab: dict[str, list[str]] = {}
        if task.discovers():
            got = yield Gather("vocab")
            self._reject(got.rejected, "vocab")
            vocab = task.merge_vocab([json.loads(str(v)) for v in got.values])
        self.state["prep-vocab"] = json.dumps(vocab, sort_keys=True)
        layout = task.layout(vocab)
        moments: Total = yield Ask("moments", layout.moments_size, keep="prep-moments")
        self._reject(moments.rejected, "moments")
        if moments.sites == 0:
            raise RuntimeError(f"no site contributed statistics; reasons: {[r for _, r in moments.rejected][:3]}")
        spread: Total = yield Ask("spread", layout.spread_size, keep="prep-spread")
        self._reject(spread.rejected, "spread")
        task.use(task.preprocessor(vocab, (), (), standardize).width)
        phase = self.phase
        phase.sites, phase.vocab, phase.totals_known = moments.sites, vocab, moments.values is not None
        phase.rows = int(round(moments.values[0])) if moments.values is not None else None
        if moments.values is not None and spread.values is not None:
            phase.preprocessor = task.preprocessor(vocab, tuple(moments.values), tuple(spread.values), standardize)
        LOG.log(INFO, "fedsilo preprocessing: statistics of %s sites combined; %s model inputs", moments.sites,
                task.width)
        return phase

    @classmethod
    def site(cls, step: str, call: SiteCall) -> np.ndarray | str:
        """``vocab``: the site's category names; ``moments``, ``spread``: its statistics' vectors."""
        task, raw = _federated(call)
        check_rows(raw, call.policy)
        if step == "vocab":  # a rarer name could single out a customer or a patient: it stays at the site
            return json.dumps(task.local_vocab(raw.fit_rows, call.policy.statistics.min_rows), sort_keys=True)
        vocab = {k: list(v) for k, v in json.loads(str(call.params.get("prep-vocab", "{}"))).items()}
        layout = task.layout(vocab)
        if step == "moments":
            return np.sum([layout.moments(t) for t in raw.fit_rows], axis=0)
        if step == "spread":
            means = layout.means(call.total("prep-moments"))
            return np.sum([layout.spread(t, means) for t in raw.fit_rows], axis=0)
        raise ProgramError(f"unknown step {step!r} of {cls.name}")


@register
class PooledMetrics(Program):
    """Test metrics of a model on the sites' held-out rows, pooled as one total (module docstring)."""

    name: ClassVar[str] = "fedsilo.metrics"

    def __init__(self, task: FederatedTask, arrays: Any, prep_state: dict[str, Any], bins: int | None = None) -> None:
        super().__init__()
        self.task, self.arrays = task, arrays
        self.bins = task.cfg.auc_bins if bins is None else bins
        self.state.update(prep_state)

    def run(self) -> Generator[Ask | Gather, Any, dict[str, float]]:
        """One sum of the metrics' statistics; the metrics (empty if no site or no reveal)."""
        spec = self.task.eval_spec(self.bins)
        total: Total = yield Ask("evaluate", spec.size, {"bins": spec.bins}, spec.encoding, reveal=True,
                                 arrays=self.arrays)
        for node, reason in total.rejected:
            LOG.log(WARNING, "fedsilo test metrics: site %s left out: %s", node, reason)
        if total.sites == 0 or total.values is None:
            return {}
        out = spec.metrics(total.values)
        out["test_sites"] = float(total.sites)
        return out

    @classmethod
    def site(cls, step: str, call: SiteCall) -> np.ndarray:
        """The site's metric statistics of the model the request carries, on its own test rows."""
        task, raw = _federated(call)
        if step != "evaluate":
            raise ProgramError(f"unknown step {step!r} of {cls.name}")
        bins = check_evaluation(call.params.get("bins"), len(raw.test), call.policy)
        prep = task.transform_for(call.params, call.total)
        _, test = task.prepared(raw, prep)
        model = task.build_model()
        model.load_state_dict(call.model(model.state_dict()))
        model.eval()
        with torch.no_grad():
            outputs = model(test.x).double().numpy()
        return task.eval_spec(bins).site_vector(outputs, raw.test.label.astype(np.float64), prep.label_scale())
