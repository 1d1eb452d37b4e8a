"""``learner=survival``: Kaplan-Meier, Nelson-Aalen, log-rank and Cox proportional hazards across sites, from
protected sums, as if the rows were pooled.

A table whose schema has a survival label (``label: {column: TIME, event: EVENT, kind: survival}``) is analysed
on **all** its rows at every site (no train/test split: these are estimates, not predictions). The program:

1. ``vocab`` (discovered categories), then ``span``: each site's rows, events, times off the grid, and the count
   of its times in each power-of-two bucket: decided into the grid's end (a power of two, never a time);
2. ``counts``: per group and grid cell, the events and the censored times (integers): the pooled Kaplan-Meier
   and Nelson-Aalen estimates, Greenwood's variance, confidence bands, medians, and the log-rank test. With the
   grid's unit ``grid`` (default 1) and times that are multiples of it (the sites count those that are not:
   ``span``), every distinct time is its own cell and the estimates are **exact** at the pooled event times;
   otherwise each time is read as the start of its cell (a shift of less than ``grid``);
3. ``logrank`` (with a ``group``): each site's observed-minus-expected events and their covariance over its own
   rows: the log-rank test stratified by site;
4. ``moments``, then ``newton`` until no coefficient moves more than ``tol``: at every pooled event time the
   risk-set sums ``S0 = sum exp(x b)``, ``S1 = sum x exp(x b)``, ``S2 = sum x x' exp(x b)`` and the tied events'
   own sums (Efron) over each site's rows, decided into the next coefficients of the pooled partial likelihood
   (Breslow's or Efron's ties, an optional L2 penalty on standardised inputs); with ``strata=site`` each site's
   own partial likelihood's gradient and Hessian (its rows are its stratum);
5. ``concordance``: per event time and bin of the risk score, the events, and the rows still at risk after it:
   Harrell's C pooled, exact but for pairs whose scores share a bin (the bound is reported).

Counts are totals of integers (the same, bit for bit, under every aggregation option); risk-set sums are float
sums in the fixed-point encoding of every option. What the coordinator learns: the pooled counts of events and
censored times in each cell (so the pooled event times: that is what an exact Kaplan-Meier curve shows), the
pooled risk-set sums at each event time, the coefficients. Every step is a decision: under Paillier a
key-holding site verifies the total (authenticated contributions, at least ``aggregation.min_sites``) and returns
``span``'s grid end, ``newton``'s next coefficients (never a risk-set sum), and the totals of ``counts``,
``logrank`` and ``concordance`` (they are the results). A site sends nothing if it holds fewer rows than its
``statistics.min_rows``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from typing_extensions import override

from core.config import ConfigError
from core.fixedpoint import COUNTS, STATS
from core.programs import Ask, Gather, PolicyRefusal, Program, ProgramError, SiteCall, Total
from core.programs import register as register_program
from learners import rows as tables
from learners.glm import GlmProgram, moments_vector
from tasks.base import Task
from tasks.learners import LearnerConfig, SumLearner, register
from tasks.tabular.table import MISSING_LEVEL
from tasks.tabular.task import TabularTask

BUCKETS = 64           # power-of-two buckets of the times: [0, 1), [1, 2), [2, 4), ... [2^62, 2^63)
TIES = ("efron", "breslow")
STRATA = ("none", "site")


@dataclass(frozen=True)
class SurvivalOptions:
    """``learner.options`` of ``learner=survival``."""

    group: str = ""            # a categorical or boolean feature: curves, medians and the log-rank test per level
    grid: float = 1.0          # the time grid's unit (exact when every time is a multiple of it)
    max_cells: int = 20000     # at most this many cells: a longer span coarsens the unit (stated in the results)
    cox: bool = True           # fit the Cox model
    ties: str = "efron"        # efron | breslow
    strata: str = "none"       # none | site: a baseline hazard per site
    penalizer: float = 0.0     # L2 penalty (penalizer / 2 * |b|^2) on the standardised coefficients
    max_iter: int = 50
    tol: float = 1e-10
    alpha: float = 0.05        # 1 - the confidence level of bands and intervals
    score_bins: int = 512      # bins of the risk score for the concordance (0: no concordance)
    smoothing: bool = True     # Nelson-Aalen with ties smoothed (lifelines' default)

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> SurvivalOptions:
        """The options, checked; :class:`~core.config.ConfigError` naming the key otherwise."""
        known = set(cls.__dataclass_fields__)
        for key in options:
            if key not in known:
                raise ConfigError(f"learner.options.{key}", options[key], f"one of {sorted(known)} (learner=survival)")
        base = cls()
        try:
            values: dict[str, Any] = {k: type(getattr(base, k))(options[k]) if not isinstance(getattr(base, k), bool)
                                      else flag(options[k]) for k in options}
            out = cls(**values)
        except (TypeError, ValueError):
            raise ConfigError("learner.options", dict(options), "values of the types of learner=survival's "
                              "options (docs/survival.md)") from None
        for key, ok, want in (("grid", out.grid > 0, "> 0"), ("max_cells", 16 <= out.max_cells <= 10**6, "in [16, 1e6]"),
                              ("ties", out.ties in TIES, f"one of {list(TIES)}"),
                              ("strata", out.strata in STRATA, f"one of {list(STRATA)}"),
                              ("penalizer", out.penalizer >= 0, ">= 0"), ("max_iter", 1 <= out.max_iter <= 500, "[1, 500]"),
                              ("tol", out.tol > 0, "> 0"), ("alpha", 0 < out.alpha < 1, "in (0, 1)"),
                              ("score_bins", out.score_bins == 0 or 16 <= out.score_bins <= 4096, "0 or in [16, 4096]")):
            if not ok:
                raise ConfigError(f"learner.options.{key}", getattr(out, key), want)
        return out


def flag(v: Any) -> bool:
    """A boolean option given as a bool or a text (true/false, 1/0, yes/no); ValueError otherwise."""
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "1", "yes"):
        return True
    if str(v).lower() in ("false", "0", "no"):
        return False
    raise ValueError(v)


# ---- the site's rows ----------------------------------------------------------------------------------
@dataclass
class SiteRows:
    """All of a site's rows: inputs (raw), times, events, group index (-1: none or missing)."""

    x: np.ndarray
    time: np.ndarray
    event: np.ndarray
    group: np.ndarray


def site_rows(call: SiteCall, vocab: dict[str, list[str]], group: str, levels: list[str]) -> SiteRows:
    """The site's rows of every split (train, validation, test: an analysis uses them all)."""
    task, data = call.task, call.data
    if not isinstance(task, TabularTask) or task.schema.label.kind != "survival":
        raise ProgramError("learner=survival needs task=tabular with a survival label (label.kind: survival)")
    parts = [t for t in (data.train, data.val, data.test) if t is not None and len(t)]
    xs, ys, gs = [], [], []
    for t in parts:
        r = tables.table_rows(task.schema, t, vocab)
        xs.append(r.x)
        ys.append(r.y)
        if group:
            raw = t.categorical[group] if group in t.categorical else np.array(
                ["true" if v == 1 else "false" if v == 0 else MISSING_LEVEL for v in t.numeric[group]], dtype=object)
            index = {lvl: k for k, lvl in enumerate(levels)}
            gs.append(np.array([index.get(str(v), -1) for v in raw], dtype=np.int64))
        else:
            gs.append(np.zeros(len(t), dtype=np.int64))
    y = np.concatenate(ys)
    return SiteRows(np.concatenate(xs)[:, reference_coding(task, vocab)], y[:, 0], y[:, 1], np.concatenate(gs))


def reference_coding(task: TabularTask, vocab: dict[str, list[str]]) -> list[int]:
    """The inputs the Cox model uses: every input but the first level of each categorical feature (its reference:
    with no intercept, a full set of levels is collinear), so each coefficient compares a level with the first."""
    keep, at = [], 0
    for f in task.schema.features:
        width = len(tables.levels(f, vocab)) if f.type == "categorical" else 1
        keep += list(range(at + (1 if f.type == "categorical" else 0), at + width))
        at += width
    return keep


def group_levels(task: TabularTask, group: str, vocab: dict[str, list[str]]) -> list[str]:
    """The levels of the grouping feature: a categorical feature's (listed or discovered), a boolean's."""
    if not group:
        return ["all"]
    try:
        f = task.schema.feature(group)
    except StopIteration:
        raise ConfigError("learner.options.group", group, "a feature of the schema (categorical or boolean)") from None
    if f.type == "boolean":
        return ["false", "true"]
    if f.type != "categorical":
        raise ConfigError("learner.options.group", group, "a categorical or boolean feature (a numeric one: declare "
                          "it categorical with its categories in the schema)")
    return list(tables.levels(f, vocab))


# ---- estimates from the pooled counts -------------------------------------------------------------------
def kaplan_meier(times: np.ndarray, d: np.ndarray, c: np.ndarray, alpha: float, smoothing: bool) -> dict[str, Any]:
    """Kaplan-Meier, Greenwood, exponential Greenwood bands, Nelson-Aalen and the median, at the cells' times
    ``times`` from the events ``d`` and censored ``c`` in each (as lifelines computes them)."""
    from scipy.stats import norm

    at_risk = np.cumsum((d + c)[::-1])[::-1]
    keep = d > 0
    t, dk, nk = times[keep], d[keep], at_risk[keep]
    surv = np.cumprod(1.0 - dk / nk)
    with np.errstate(divide="ignore", invalid="ignore"):  # at S = 0 Greenwood's sum is inf, the bands 1 (lifelines)
        greenwood = np.cumsum(dk / (nk * (nk - dk)))
        z = norm.ppf(1 - alpha / 2)
        v = np.log(surv)
        lower = np.nan_to_num(np.exp(-np.exp(np.log(-v) - z * np.sqrt(greenwood) / v)), nan=1.0)
        upper = np.nan_to_num(np.exp(-np.exp(np.log(-v) + z * np.sqrt(greenwood) / v)), nan=1.0)
    if smoothing:
        na = np.cumsum([sum(1.0 / (n - i) for i in range(int(e))) for n, e in zip(nk, dk)])
    else:
        na = np.cumsum(dk / nk)

    def first_below(curve: np.ndarray) -> float:
        below = np.flatnonzero(curve <= 0.5)
        return float(t[below[0]]) if below.size else math.inf

    return {"time": t.tolist(), "at_risk": nk.tolist(), "events": dk.tolist(), "survival": surv.tolist(),
            "greenwood": greenwood.tolist(), "lower": lower.tolist(), "upper": upper.tolist(),
            "cumulative_hazard": na.tolist(), "median": first_below(surv), "median_lower": first_below(lower),
            "median_upper": first_below(upper), "rows": int((d + c).sum()), "events_total": int(d.sum())}


def observed_expected(d: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-rank's observed, expected and hypergeometric covariance from events ``d`` and numbers at risk ``n``
    (groups x times)."""
    dt, nt = d.sum(axis=0), n.sum(axis=0)
    ok = nt > 0
    d, n, dt, nt = d[:, ok], n[:, ok], dt[ok], nt[ok]
    frac = n / nt
    expected = (dt * frac).sum(axis=1)
    scale = np.where(nt > 1, dt * (nt - dt) / np.maximum(nt - 1, 1), 0.0)
    cov = np.einsum("t,gt,ht->gh", scale, frac, frac)
    v = np.diag((scale * frac).sum(axis=1)) - cov
    return d.sum(axis=1), expected, v


def chi_square(o_minus_e: np.ndarray, v: np.ndarray) -> dict[str, float]:
    """The (G - 1)-degree statistic and p-value of observed-minus-expected events with covariance ``v``."""
    from scipy.stats import chi2

    k = len(o_minus_e) - 1
    if k < 1:
        return {"statistic": math.nan, "p": math.nan, "df": 0}
    stat = float(o_minus_e[:k] @ np.linalg.solve(v[:k, :k], o_minus_e[:k]))
    return {"statistic": stat, "p": float(chi2.sf(stat, k)), "df": k}


# ---- the partial likelihood -------------------------------------------------------------------------------
def risk_sums(x: np.ndarray, cells: np.ndarray, event: np.ndarray, beta: np.ndarray, event_cells: np.ndarray,
              efron: bool) -> np.ndarray:
    """Per event cell: S0, S1, S2 over the rows at risk (cell >= it), and the cell's events' count, sum of x and
    (Efron) D0, D1, D2: one flat vector (event cells x width)."""
    p = x.shape[1]
    w = np.exp(x @ beta)
    wx = w[:, None] * x
    wxx = (wx[:, :, None] * x[:, None, :]).reshape(len(w), p * p)
    top = int(max(cells.max(initial=0), event_cells.max(initial=0))) + 1
    per = np.zeros((top, 1 + p + p * p))
    np.add.at(per, cells, np.column_stack([w, wx, wxx]))
    at_risk = np.cumsum(per[::-1], axis=0)[::-1][event_cells]
    ev = event > 0
    own = np.zeros((top, 1 + p + (1 + p + p * p if efron else 0)))
    cols = [np.ones(int(ev.sum())), x[ev]] + ([w[ev], wx[ev], wxx[ev]] if efron else [])
    np.add.at(own, cells[ev], np.column_stack(cols))
    return np.column_stack([at_risk, own[event_cells]]).ravel()


def partial_likelihood(sums: np.ndarray, p: int, beta: np.ndarray, efron: bool) -> tuple[float, np.ndarray, np.ndarray]:
    """Log partial likelihood, gradient and Hessian from :func:`risk_sums`' totals."""
    width = (1 + p + p * p) + 1 + p + ((1 + p + p * p) if efron else 0)
    s = sums.reshape(-1, width)
    s0, s1, s2 = s[:, 0], s[:, 1:1 + p], s[:, 1 + p:1 + p + p * p].reshape(-1, p, p)
    k = 1 + p + p * p
    d, xd = s[:, k], s[:, k + 1:k + 1 + p]
    ll, g, h = 0.0, np.zeros(p), np.zeros((p, p))
    for j in range(len(s0)):
        dj = int(round(d[j]))
        if dj <= 0:
            continue
        ll += float(xd[j] @ beta)
        g += xd[j]
        if efron:
            d0, d1 = s[j, k + 1 + p], s[j, k + 2 + p:k + 2 + 2 * p]
            d2 = s[j, k + 2 + 2 * p:].reshape(p, p)
            for m in range(dj):
                f = m / dj
                a, b, c = s0[j] - f * d0, s1[j] - f * d1, s2[j] - f * d2
                ll -= math.log(a)
                g -= b / a
                h -= c / a - np.outer(b, b) / (a * a)
        else:
            mean = s1[j] / s0[j]
            ll -= dj * math.log(s0[j])
            g -= dj * mean
            h -= dj * (s2[j] / s0[j] - np.outer(mean, mean))
    return ll, g, h


def schoenfeld_sum(sums: np.ndarray, p: int, efron: bool, g: np.ndarray) -> np.ndarray:
    """``sum_j (g_j - mean g) * sum_{i dies at j} (x_i - m_j)`` over the event cells ``j`` from :func:`risk_sums`'
    totals: the Schoenfeld residuals weighted by the centred time transform ``g`` (one per event cell; the mean is
    over the events). ``m_j`` is the risk set's weighted mean of x at ``j`` (Efron's average over the tied events'
    shrinking risk sets, as lifelines computes the residuals; Breslow's ``S1 / S0``)."""
    width = (1 + p + p * p) + 1 + p + ((1 + p + p * p) if efron else 0)
    s = sums.reshape(-1, width)
    k = 1 + p + p * p
    d, xd = s[:, k], s[:, k + 1:k + 1 + p]
    gbar = float((d * g).sum() / d.sum())
    out = np.zeros(p)
    for j in range(len(d)):
        dj = int(round(d[j]))
        if dj <= 0:
            continue
        if efron:
            d0, d1 = s[j, k + 1 + p], s[j, k + 2 + p:k + 2 + 2 * p]
            mean = sum((s[j, 1:1 + p] - m / dj * d1) / (s[j, 0] - m / dj * d0) for m in range(dj)) / dj
        else:
            mean = s[j, 1:1 + p] / s[j, 0]
        out += (g[j] - gbar) * (xd[j] - dj * mean)
    return out


def proportional_hazards(u: np.ndarray, cov: np.ndarray, g: np.ndarray, d: np.ndarray, names: list[str]
                         ) -> dict[str, Any]:
    """The Grambsch-Therneau test from the scaled Schoenfeld residuals (the approximation lifelines'
    ``proportional_hazard_test`` and R's cox.zph before 2019 use): per input ``D (U V)_k^2 / (V_kk S_g)`` with one
    degree of freedom, and globally ``D U V U' / S_g`` with p, where ``U`` is :func:`schoenfeld_sum`, ``V`` the
    coefficients' covariance, ``D`` the events and ``S_g`` the events' sum of squares of the centred transform."""
    from scipy.stats import chi2

    total = float(d.sum())
    gbar = float((d * g).sum() / total)
    sg = float((d * (g - gbar) ** 2).sum())
    uv = u @ cov
    out: dict[str, Any] = {"time_transform": "km"}
    for k, name in enumerate(names):
        t = total * uv[k] ** 2 / (cov[k, k] * sg)
        out[name] = {"statistic": float(t), "p": float(chi2.sf(t, 1))}
    t = total * float(uv @ u) / sg
    out["global"] = {"statistic": t, "df": len(names), "p": float(chi2.sf(t, len(names)))}
    return out


def local_terms(x: np.ndarray, time: np.ndarray, event: np.ndarray, beta: np.ndarray, grid: float,
                efron: bool) -> np.ndarray:
    """A site's own partial likelihood (its rows its stratum): [log-likelihood, gradient, Hessian]."""
    cells = np.floor(time / grid).astype(np.int64)
    event_cells = np.unique(cells[event > 0])
    if not event_cells.size:
        p = x.shape[1]
        return np.zeros(1 + p + p * p)
    ll, g, h = partial_likelihood(risk_sums(x, cells, event, beta, event_cells, efron), x.shape[1], beta, efron)
    return np.concatenate([[ll], g, h.ravel()])


def concordance_table(lp: np.ndarray, cells: np.ndarray, event: np.ndarray, event_cells: np.ndarray,
                      bins: int) -> np.ndarray:
    """Per event cell k and score bin b: the events at k in b, and the rows whose time is after cell k's in b
    (each row counted at the last event cell before its own): 2 x event cells x bins."""
    score = np.clip(np.floor(bins / (1.0 + np.exp(-lp))).astype(np.int64), 0, bins - 1)
    k = len(event_cells)
    events = np.zeros((k, bins))
    later = np.zeros((k, bins))
    pos = np.searchsorted(event_cells, cells)          # the first event cell >= the row's cell
    ev = (event > 0) & (pos < k) & (event_cells[np.minimum(pos, k - 1)] == cells)
    np.add.at(events, (pos[ev], score[ev]), 1.0)
    last = pos - 1                                     # the last event cell strictly before the row's cell
    ok = last >= 0
    np.add.at(later, (last[ok], score[ok]), 1.0)
    return np.concatenate([events.ravel(), later.ravel()])


def concordance(table: np.ndarray, k: int, bins: int) -> dict[str, float]:
    """Harrell's C from the pooled :func:`concordance_table` (higher risk, earlier event: concordant) and its
    bound: the share of comparable pairs whose scores share a bin (counted half)."""
    events, later = table[:k * bins].reshape(k, bins), table[k * bins:].reshape(k, bins)
    after = np.cumsum(later[::-1], axis=0)[::-1]       # rows whose time is after event cell k's
    below = np.cumsum(after, axis=1) - after            # ... in a lower score bin
    pairs = float((events * after.sum(axis=1, keepdims=True)).sum())
    concordant = float((events * below).sum())
    tied = float((events * after).sum())
    if pairs <= 0:
        return {"c_index": math.nan, "pairs": 0.0, "bound": math.nan}
    # an earlier event with a higher score is concordant: with scores as the risk, rows after it with lower score
    return {"c_index": (concordant + 0.5 * tied) / pairs, "pairs": pairs, "bound": 0.5 * tied / pairs}


# ---- the program -----------------------------------------------------------------------------------
@dataclass
class SurvivalOutcome:
    """What the analyses found."""

    options: SurvivalOptions
    grid: float
    exact: bool
    levels: list[str]
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)
    logrank: dict[str, Any] = field(default_factory=dict)
    cox: dict[str, Any] = field(default_factory=dict)
    sites: int = 0
    rows: int = 0
    events: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)


@register_program
@dataclass
class SurvivalProgram(Program):
    """``learner=survival``: the program (module docstring)."""

    name: ClassVar[str] = "fedsilo.survival"
    #: every step is decided (under Paillier a key holder verifies the total first); the decisions of ``counts``,
    #: ``logrank`` and ``concordance`` are their totals: those are the results
    decisions: ClassVar[frozenset[str]] = frozenset({"span", "counts", "logrank", "moments", "newton", "concordance"})

    task: Task
    options: SurvivalOptions

    def __post_init__(self) -> None:
        super().__init__()

    def _note(self, total: Total | Any, step: str, out: SurvivalOutcome) -> None:
        out.rejected += [{"node": n, "step": step, "reason": r} for n, r in total.rejected]

    @override
    def run(self) -> Generator[Ask | Gather, Any, SurvivalOutcome]:
        """Span, counts (curves, log-rank), the Cox model, its concordance."""
        o, task = self.options, self.task
        if not isinstance(task, TabularTask) or task.label_kind != "survival":
            raise ProgramError("learner=survival needs task=tabular with a survival label (label.kind: survival)")
        self.state["prep-fingerprint"] = task.fingerprint()
        vocab = yield from tables.discover(task)
        levels = group_levels(task, o.group, vocab)
        keep = reference_coding(task, vocab)
        names = [tables.feature_names(task, vocab)[k] for k in keep]
        p = len(names)
        self.state.update({"sv-options": json.dumps(asdict(o)), "sv-vocab": json.dumps(vocab, sort_keys=True),
                           "sv-levels": json.dumps(levels), "sv-features": p, "sv-grid": o.grid})
        span: Total = yield Ask("span", 3 + BUCKETS, encoding=COUNTS, decide=True)
        if span.values is None:
            raise RuntimeError(f"no site contributed; reasons: {[r for _, r in span.rejected][:3]}")
        rows, events, off_grid, end = (float(v) for v in span.values)
        grid = o.grid
        while end / grid > o.max_cells:
            grid *= 2
        cells = int(math.floor(end / grid)) + 1
        self.state.update({"sv-grid": grid, "sv-cells": cells})
        out = SurvivalOutcome(o, grid, off_grid == 0 and grid == o.grid, levels, sites=span.sites, rows=int(rows),
                              events=int(events))
        self._note(span, "span", out)
        if events <= 0:
            raise RuntimeError("no site holds an event (every time is censored): there is nothing to estimate")
        g = len(levels)
        rows_of = g + 1 if o.group else 1  # with a group: each level's counts, then every row's (missing levels too)
        counts: Total = yield Ask("counts", 2 * rows_of * cells, encoding=COUNTS, decide=True)
        self._note(counts, "counts", out)
        if counts.values is None:
            raise RuntimeError("no total of the event counts")
        dc = counts.values.reshape(rows_of, 2, cells)
        times = np.arange(cells) * grid
        for k, level in enumerate(levels if o.group else ["all"]):
            out.curves[level] = kaplan_meier(times, dc[k, 0], dc[k, 1], o.alpha, o.smoothing)
        if o.group:
            out.curves["all"] = kaplan_meier(times, dc[g, 0], dc[g, 1], o.alpha, o.smoothing)
        if o.group and g > 1:
            at_risk = np.cumsum((dc[:g, 0] + dc[:g, 1])[:, ::-1], axis=1)[:, ::-1]
            obs, exp_, v = observed_expected(dc[:g, 0], at_risk)
            out.logrank = {"groups": levels, "observed": obs.tolist(), "expected": exp_.tolist(),
                           **chi_square(obs - exp_, v)}
            strat: Total = yield Ask("logrank", g + g * g, encoding=STATS, decide=True)
            self._note(strat, "logrank", out)
            if strat.values is not None:
                out.logrank["stratified_by_site"] = chi_square(strat.values[:g], strat.values[g:].reshape(g, g))
        event_cells = np.flatnonzero(dc[-1, 0] > 0)
        self.state["sv-event-cells"] = json.dumps(event_cells.tolist())
        if o.cox and p:
            out.cox = yield from self._cox(names, event_cells, out)
        return out

    def _cox(self, names: list[str], event_cells: np.ndarray, out: SurvivalOutcome) -> Generator[Ask, Any, dict[str, Any]]:
        o, p = self.options, len(names)
        curve = out.curves["all"]
        km_g = [1.0 - v for v in curve["survival"]] if len(curve["time"]) == len(event_cells) else []
        km_d = np.asarray(curve["events"], dtype=np.float64)
        moments: Total = yield Ask("moments", 3 * p, decide=True)
        self._note(moments, "moments", out)
        if moments.values is None:
            raise RuntimeError("no site contributed the inputs' moments")
        means, sds = moments.values[:p], moments.values[p:]
        self.state["sv-scale"] = json.dumps([means.tolist(), sds.tolist()])
        beta = np.zeros(p)
        ph = o.strata != "site" and bool(km_g)
        if ph:  # the proportional-hazards test's time transform at each event cell: 1 - KM (R's "km")
            self.state["sv-ph-g"] = json.dumps(km_g)
        width = 1 + p + p * p if o.strata == "site" else \
            len(event_cells) * ((1 + p + p * p) * (2 if o.ties == "efron" else 1) + 1 + p)
        path, ll, cov = [], math.nan, np.full((p, p), math.nan)
        converged = False
        for it in range(o.max_iter):
            self.state["sv-beta"] = json.dumps(beta.tolist())
            step: Total = yield Ask("newton", width, {"iteration": it}, encoding=STATS, decide=True)
            self._note(step, "newton", out)
            if step.values is None:
                raise RuntimeError(f"Newton step {it + 1}: no total")
            new, ll = step.values[:p], float(step.values[p])
            cov = step.values[p + 1:p + 1 + p * p].reshape(p, p)
            schoenfeld = step.values[p + 1 + p * p:]
            change = float(np.max(np.abs(new - beta)))
            path.append(change)
            beta = new
            if change < o.tol:
                converged = True
                break
        from scipy.stats import norm

        coef, se = beta / sds, np.sqrt(np.maximum(np.diag(cov), 0.0)) / sds
        z = norm.ppf(1 - o.alpha / 2)
        table = {n: {"coef": float(c), "hazard_ratio": float(np.exp(c)), "se": float(s), "z": float(c / s),
                     "p": float(2 * norm.sf(abs(c / s))), "hr_lower": float(np.exp(c - z * s)),
                     "hr_upper": float(np.exp(c + z * s))} for n, c, s in zip(names, coef, se)}
        result: dict[str, Any] = {"ties": o.ties, "strata": o.strata, "penalizer": o.penalizer, "iterations": len(path),
                                  "converged": converged, "log_likelihood": ll, "coefficients": table,
                                  "covariance": (cov / np.outer(sds, sds)).tolist(), "step_sizes": path}
        if ph and schoenfeld.size == p:  # at the last step's coefficients (they moved by less than tol)
            result["proportional_hazards"] = proportional_hazards(schoenfeld, cov, np.asarray(km_g), km_d, names)
        if o.score_bins:
            self.state["sv-beta"] = json.dumps(beta.tolist())
            conc: Total = yield Ask("concordance", 2 * len(event_cells) * o.score_bins, encoding=COUNTS, decide=True)
            self._note(conc, "concordance", out)
            if conc.values is not None:
                result["concordance"] = concordance(conc.values, len(event_cells), o.score_bins)
        return result

    @classmethod
    @override
    def decision(cls, step: str, total: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """``span``: rows, events, off-grid times, the grid's end; ``moments``: means and deviations; ``newton``:
        the next coefficients, the log-likelihood and the covariance at the current ones."""
        if step == "span":
            nonzero = np.flatnonzero(total[3:] > 0)
            end = 2.0 ** int(nonzero[-1]) if nonzero.size else 1.0  # the upper edge of the highest bucket
            return np.array([total[0], total[1], total[2], end])
        if step in ("counts", "logrank", "concordance"):
            return total
        p = int(params["sv-features"])
        if step == "moments":
            return GlmProgram.decision("moments", total, {"glm-features": p})
        if step == "newton":
            o = SurvivalOptions.parse(json.loads(str(params["sv-options"])))
            beta = np.asarray(json.loads(str(params["sv-beta"])), dtype=np.float64)
            if o.strata == "site":
                ll, g, h = float(total[0]), total[1:1 + p], total[1 + p:].reshape(p, p)
            else:
                ll, g, h = partial_likelihood(total, p, beta, o.ties == "efron")
            ll -= 0.5 * o.penalizer * float(beta @ beta)
            g = g - o.penalizer * beta
            h = h - o.penalizer * np.eye(p)
            cov = np.linalg.pinv(-h)
            u: list[float] = []
            if o.strata != "site" and "sv-ph-g" in params:
                g_ph = np.asarray(json.loads(str(params["sv-ph-g"])), dtype=np.float64)
                cells = len(json.loads(str(params.get("sv-event-cells", "[]"))))
                if g_ph.shape != (cells,):
                    raise ProgramError("a survival request whose time transform does not fit its event times")
                u = schoenfeld_sum(total, p, o.ties == "efron", g_ph).tolist()
            return np.concatenate([beta + cov @ g, [ll], cov.ravel(), u])
        raise ProgramError(f"{cls.name} decides no {step!r} total")

    @classmethod
    @override
    def site(cls, step: str, call: SiteCall) -> np.ndarray | str:
        """The site's vector for ``step`` (its policy checked first)."""
        task, params = call.task, call.params
        if isinstance(task, TabularTask):
            task.check_fingerprint(params)
        if step == "vocab":
            return tables.local_vocab(call)
        o = SurvivalOptions.parse(json.loads(str(params.get("sv-options", "{}"))))
        vocab = json.loads(str(params.get("sv-vocab", "{}")))
        levels = json.loads(str(params.get("sv-levels", '["all"]')))
        r = site_rows(call, vocab, o.group, levels)
        if len(r.time) < call.policy.statistics.min_rows:
            raise PolicyRefusal(f"this site has fewer rows than its policy's statistics.min_rows="
                                f"{call.policy.statistics.min_rows}: it releases no statistic of them")
        grid = float(params.get("sv-grid", o.grid))  # type: ignore[arg-type]
        if not grid > 0:
            raise ProgramError("a survival request with a grid unit that is not > 0")
        if step == "span":
            bucket = np.where(r.time < 1, 0, np.floor(np.log2(np.maximum(r.time, 1))).astype(np.int64) + 1)
            off = np.abs(r.time / grid - np.round(r.time / grid)) > 1e-9
            return np.concatenate([[len(r.time), r.event.sum(), off.sum()],
                                   np.bincount(np.minimum(bucket, BUCKETS - 1), minlength=BUCKETS)]).astype(np.float64)
        cells = int(params.get("sv-cells", 0))  # type: ignore[call-overload]
        cell = np.floor(r.time / grid).astype(np.int64)
        if cells <= 0 or cell.max(initial=0) >= cells:
            raise ProgramError("a survival request whose grid does not cover this site's times")
        if step == "counts":
            g = len(levels)
            out = np.zeros((g + 1 if o.group else 1, 2, cells))
            censored = (1 - r.event).astype(np.int64)
            if o.group:
                ok = r.group >= 0
                np.add.at(out, (r.group[ok], censored[ok], cell[ok]), 1.0)
            np.add.at(out, (np.full(len(cell), out.shape[0] - 1), censored, cell), 1.0)
            return out.ravel()
        if step == "logrank":
            g = len(levels)
            d = np.zeros((g, cells))
            n_cens = np.zeros((g, cells))
            ok = r.group >= 0
            np.add.at(d, (r.group[ok & (r.event > 0)], cell[ok & (r.event > 0)]), 1.0)
            np.add.at(n_cens, (r.group[ok & (r.event == 0)], cell[ok & (r.event == 0)]), 1.0)
            at_risk = np.cumsum((d + n_cens)[:, ::-1], axis=1)[:, ::-1]
            obs, exp_, v = observed_expected(d, at_risk)
            return np.concatenate([obs - exp_, v.ravel()])
        p = int(params.get("sv-features", -1))  # type: ignore[call-overload]
        if r.x.shape[1] != p:
            raise ProgramError(f"the request counts {p} inputs, this site's table has {r.x.shape[1]}")
        if step == "moments":
            return moments_vector(r.x)
        scale = json.loads(str(params.get("sv-scale", "null")))
        beta = np.asarray(json.loads(str(params.get("sv-beta", "[]"))), dtype=np.float64)
        event_cells = np.asarray(json.loads(str(params.get("sv-event-cells", "[]"))), dtype=np.int64)
        if not isinstance(scale, list) or len(scale) != 2 or beta.shape != (p,) or not np.all(np.isfinite(beta)):
            raise ProgramError("a survival request whose scale or coefficients do not fit this site's inputs")
        means, sds = np.asarray(scale[0], dtype=np.float64), np.asarray(scale[1], dtype=np.float64)
        x = np.nan_to_num((r.x - means) / sds, nan=0.0)
        if step == "newton":
            if o.strata == "site":
                return local_terms(x, r.time, r.event, beta, grid, o.ties == "efron")
            return risk_sums(x, cell, r.event, beta, event_cells, o.ties == "efron")
        if step == "concordance":
            return concordance_table(x @ beta, cell, r.event, event_cells, o.score_bins)
        raise ProgramError(f"unknown step {step!r} of {cls.name}")


class SurvivalLearner(SumLearner):
    """``learner.name=survival`` (options: :class:`SurvivalOptions`)."""

    name: ClassVar[str] = "survival"

    @override
    def validate(self, cfg: LearnerConfig, task: type[Task]) -> None:
        """The options' ranges, and a task with tables."""
        SurvivalOptions.parse(dict(cfg.options))
        if not issubclass(task, TabularTask):
            raise ConfigError("learner.name", "survival", "task=tabular with a survival label (docs/survival.md)")

    @override
    def program(self, task: Task, options: Mapping[str, Any]) -> Program:
        """The survival program over ``task``'s sites."""
        return SurvivalProgram(task, SurvivalOptions.parse(dict(options)))

    @override
    def results(self, outcome: Any) -> dict[str, Any]:
        """The ``learner`` section of results.json: the curves, the tests, the Cox model."""
        out: SurvivalOutcome = outcome
        return {"analysis": "survival", "grid": out.grid, "exact": out.exact, "sites": out.sites, "rows": out.rows,
                "events": out.events, "groups": out.levels, "curves": out.curves, "logrank": out.logrank,
                "cox": out.cox, "options": asdict(out.options), "rejected": out.rejected}

    @override
    def save(self, outcome: Any, folder: Path) -> dict[str, str]:
        """``survival.json`` (the results above) in the run's folder."""
        path = folder / "survival.json"
        path.write_text(json.dumps(self.results(outcome), indent=1, default=str) + "\n")
        return {"survival": str(path)}


register(SurvivalLearner())
