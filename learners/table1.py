"""``learner=table1`` (``fedsilo stats``): the "Table 1" of a clinical paper across sites, from protected sums,
with the disclosure control each site enforces on what leaves it.

For every variable of the schema (its features, and the label: a survival label's time and event) and every
level of an optional ``group``: n, missing, mean +- sd, median [Q1, Q3] (each quantile with an interval that
holds the pooled rows' own quantile), and the count and percentage of each category; pooled over the sites and,
where each site's policy allows, per site. The steps:

1. ``vocab`` (discovered categories), then ``span``: per numeric variable whether the site holds negative values
   and, for each power of two, whether all its values lie within it: decided into one power of two ``2^E`` per
   variable, the grid's end (never a value);
2. ``table`` (integers): per group level, its rows and per variable the missing count, the categories' counts
   and a fine histogram: ``2^bits`` cells over ``[0, 2^E)`` (``[-2^E, 2^E)`` with negative values);
3. ``moments`` (reals): per group level and numeric variable, ``sum(x - c)`` and ``sum((x - c)^2)`` about a
   public centre ``c`` (the pooled median's cell): mean and sd exact;
4. ``site`` (where the run asks for per-site columns): the same two vectors of the site alone, in the clear, if
   its policy's ``statistics.site_columns`` allows.

**Disclosure control at the site** (its policy's ``statistics.min_count`` = k): before a vector leaves, a group
level with fewer than k of the site's rows is withheld (every count and sum of it: the output counts the levels
withheld); a category count below k is suppressed, and more cells (the smallest next) until the suppressed rows
are 0 or at least k (complementary suppression: no withheld count follows from the others); a variable with
fewer than k values in a level is withheld; a histogram is **coarsened** in the dyadic tree of its cells: a cell
block is split into its two halves only if each half holds 0 or at least k rows, and each block's rows are
counted in its first cell. Every released count is therefore 0 or at least k, and since every grid a request
may name is a dyadic tree anchored at 0 (a power-of-two end that covers the site's values, ``2^bits`` cells,
bits at most :data:`MAX_BITS`), whatever grids a coordinator asks for, what a site releases is a coarsening of
its release on the finest such grid. The ``all`` column is the sum of the released levels (no withheld count is
the difference of two released ones). What is *not* controlled: missing counts (absent measurements, released
as counted), and differences between releases of different groupings (a second run, or a deviating
coordinator's change of ``group`` within a run, up to ``statistics.max_sums`` steps): docs/survival.md "Table 1".

**Quantiles with their bound.** Rows in a coarsened block are counted at its first cell, so the released
cumulative counts ``F'`` are never below the true ``F`` and exceed it by at most ``M``, the rows in coarsened
blocks (reported). The pooled rows' quantile of rank ``r`` therefore lies in ``[left edge of the cell where F'
reaches r, right edge of the cell where F' reaches r + M]``; the estimate interpolates between order statistics
as numpy's default (``linear``) at the cells' left edges, exact for values on the grid (integers with a cell of
at most 1) where no block near the quantile was coarsened.
"""

from __future__ import annotations

import csv
import html
import io
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
from learners.survival import flag
from tasks.base import Task
from tasks.federated import RawSite
from tasks.learners import LearnerConfig, SumLearner, register
from tasks.tabular.table import MISSING_LEVEL
from tasks.tabular.task import TabularTask

EMIN, EMAX = -16, 64          # the grid's end 2^E for E in [EMIN, EMAX]
MAX_BITS = 16                 # the finest grid a request may name: 2^16 cells per sign
QUANTILES = (0.25, 0.5, 0.75)
OTHER = "(other)"             # a discovered feature's values outside the federation's vocabulary
MISSING = "(missing)"


@dataclass(frozen=True)
class Table1Options:
    """``learner.options`` of ``learner=table1``."""

    group: str = ""          # a categorical or boolean feature, or a binary/multiclass label: a column per level
    bits: int = 10           # 2^bits cells per sign of each numeric variable's grid
    site_columns: bool = True  # ask every site for its own column (each site's policy decides)

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> Table1Options:
        """The options, checked; :class:`~core.config.ConfigError` naming the key otherwise."""
        known = set(cls.__dataclass_fields__)
        for key in options:
            if key not in known:
                raise ConfigError(f"learner.options.{key}", options[key], f"one of {sorted(known)} (learner=table1)")
        try:
            out = cls(group=str(options.get("group", "")), bits=int(options.get("bits", 10)),
                      site_columns=flag(options.get("site_columns", True)))
        except (TypeError, ValueError):
            raise ConfigError("learner.options", dict(options), "values of the types of learner=table1's options "
                              "(docs/survival.md, Table 1)") from None
        if not 4 <= out.bits <= MAX_BITS:
            raise ConfigError("learner.options.bits", out.bits, f"an integer in [4, {MAX_BITS}]")
        return out


# ---- the variables and the layout of the vectors ----------------------------------------------------------
@dataclass(frozen=True)
class Variable:
    """One row block of the table: a numeric variable, or a categorical one with its cells."""

    name: str
    numeric: bool
    cells: tuple[str, ...] = ()     # categorical: the levels, then (other) if discovered, then (missing)


def variables(task: TabularTask, vocab: Mapping[str, list[str]]) -> list[Variable]:
    """The table's variables in schema order: the label's (time and event for survival), then the features."""
    lab, out = task.schema.label, []
    if lab.kind == "survival":
        out += [Variable(lab.column, True), Variable(str(lab.event), False, ("censored", "event"))]
    elif lab.kind == "regression":
        out.append(Variable(lab.column, True))
    else:
        out.append(Variable(lab.column, False, label_levels(task)))
    for f in task.schema.features:
        if f.type == "numeric":
            out.append(Variable(f.name, True))
        elif f.type == "boolean":
            out.append(Variable(f.name, False, ("false", "true", MISSING)))
        else:
            extra = (OTHER,) if f.categories is None or f.other else ()
            out.append(Variable(f.name, False, (*tables.levels(f, dict(vocab)), *extra, MISSING)))
    return out


def label_levels(task: TabularTask) -> tuple[str, ...]:
    """A binary or multiclass label's levels (its class indices' names)."""
    lab = task.schema.label
    return ("negative", "positive") if lab.kind == "binary" else tuple(lab.classes)


def group_levels(task: TabularTask, group: str, vocab: Mapping[str, list[str]]) -> list[str]:
    """The columns of a grouping: its levels and (missing); ``["all"]`` without one."""
    if not group:
        return ["all"]
    if group == task.schema.label.column and task.schema.label.kind in ("binary", "multiclass"):
        return list(label_levels(task))
    for v in variables(task, vocab):
        if v.name == group and not v.numeric:
            return list(v.cells)
    raise ConfigError("learner.options.group", group, "a categorical or boolean feature, or a binary or multiclass "
                      "label (a numeric one: declare it categorical with its categories in the schema)")


@dataclass(frozen=True)
class Layout:
    """Where each count sits in a site's ``table`` vector and each sum in its ``moments`` vector (both halves
    compute it from the run's public state)."""

    levels: tuple[str, ...]
    variables: tuple[Variable, ...]
    cells: tuple[int, ...]          # numeric variables: the histogram's cells (categorical: 0)

    @property
    def numeric(self) -> list[int]:
        """The numeric variables' indices."""
        return [i for i, v in enumerate(self.variables) if v.numeric]

    def block(self, i: int) -> int:
        """Entries of variable ``i`` per level: numeric: missing, withheld, the released cells, and per cell the rows
        the coarsening may have moved across its right edge (rounded up to a multiple of the site's min_count);
        categorical: each cell, the suppressed rows, the suppressed cells."""
        v = self.variables[i]
        return 2 + 2 * self.cells[i] if v.numeric else len(v.cells) + 2

    @property
    def per_level(self) -> int:
        """Entries per group level."""
        return 2 + sum(self.block(i) for i in range(len(self.variables)))  # rows, level withheld, variables

    @property
    def length(self) -> int:
        """The ``table`` vector's length."""
        return len(self.levels) * self.per_level

    @property
    def moments_length(self) -> int:
        """The ``moments`` vector's length."""
        return len(self.levels) * 2 * len(self.numeric)

    def offsets(self) -> list[int]:
        """Where each variable's entries start within a level's."""
        at, out = 2, []
        for i in range(len(self.variables)):
            out.append(at)
            at += self.block(i)
        return out


def make_layout(task: TabularTask, vocab: Mapping[str, list[str]], levels: list[str], ends: list[float],
                bits: int) -> Layout:
    """The layout for the decided grid ends (``ends``: per numeric variable, 2^E, negative if it has negatives)."""
    vs = variables(task, vocab)
    cells, k = [], 0
    for v in vs:
        if v.numeric:
            cells.append((2 << bits) if ends[k] < 0 else (1 << bits))
            k += 1
        else:
            cells.append(0)
    return Layout(tuple(levels), tuple(vs), tuple(cells))


# ---- the site's rows ---------------------------------------------------------------------------------------
@dataclass
class Columns:
    """A site's rows of every split: per variable its values (numeric: float, NaN missing; categorical: cell index)
    and each row's group level (-1: none)."""

    values: list[np.ndarray]
    level: np.ndarray


def site_columns(call: SiteCall, vocab: Mapping[str, list[str]], levels: list[str], group: str) -> Columns:
    """The site's rows as the table's variables (train, validation and test: a description uses them all)."""
    task, data = call.task, call.data
    if not isinstance(task, TabularTask) or not isinstance(data, RawSite):
        raise ProgramError("learner=table1 needs task=tabular (a site's own table)")
    parts = [t for t in (data.train, data.val, data.test) if t is not None and len(t)]
    vs = variables(task, vocab)
    lab = task.schema.label
    cols: list[list[np.ndarray]] = [[] for _ in vs]
    for t in parts:
        for i, v in enumerate(vs):
            if v.name == lab.column and lab.kind == "survival":
                cols[i].append(np.asarray(t.label[:, 0], dtype=np.float64))
            elif lab.kind == "survival" and v.name == lab.event:
                cols[i].append(np.asarray(t.label[:, 1], dtype=np.int64))
            elif v.name == lab.column:
                cols[i].append(np.asarray(t.label, dtype=np.float64) if v.numeric else
                               np.asarray(t.label, dtype=np.int64))
            elif v.numeric:
                cols[i].append(np.asarray(t.numeric[v.name], dtype=np.float64))
            elif v.name in t.numeric:  # boolean: 0/1/NaN
                x = np.asarray(t.numeric[v.name], dtype=np.float64)
                cols[i].append(np.where(np.isnan(x), 2, x).astype(np.int64))
            else:
                index = {c: k for k, c in enumerate(v.cells)}
                other = index.get(OTHER, -1)
                cells = np.asarray(t.categorical[v.name]).astype(str)
                cols[i].append(np.array([index[MISSING] if c == MISSING_LEVEL else index.get(c, other) for c in cells],
                                        dtype=np.int64))
    values = [np.concatenate(c) if c else np.zeros(0) for c in cols]
    if not group:
        level: np.ndarray = np.zeros(len(values[0]) if values else 0, dtype=np.int64)
    else:
        where = next((i for i, v in enumerate(vs) if v.name == group and not v.numeric), None)
        if where is None:
            raise ProgramError("a table1 request grouped by a variable this site's schema has not as categories")
        level = values[where]
    return Columns(values, level)


# ---- disclosure control (the site's) ------------------------------------------------------------------------
def dyadic_release(counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``counts`` (a power-of-two number of cells) coarsened in their dyadic tree, top down: a block whose halves
    each hold 0 or at least ``k`` rows is split; a half with fewer (but some) rows beside one with at least ``k``
    gives them to the other half's occupied cell nearest to it; a block with two such halves is released whole (at
    its middle cell). Every released count is 0 or at least ``k``. Returns the released counts and, per cell ``c``,
    at least the rows whose side of ``c``'s right edge the release may have changed (the true count of rows in cells
    up to ``c`` is within that of the released one). The whole range must hold 0 or at least ``k`` rows."""
    n = len(counts)
    if n & (n - 1):
        raise ValueError("a dyadic release needs a power-of-two number of cells")
    work = np.asarray(counts, dtype=np.float64).copy()
    out, unsure = np.zeros(n), np.zeros(n)
    stack = [(0, n)]
    while stack:
        start, size = stack.pop()
        if size == 1:
            out[start] = work[start]
            continue
        half, mid = size // 2, start + size // 2
        left, right = float(work[start:mid].sum()), float(work[mid:start + size].sum())
        small_l, small_r = 0 < left < k, 0 < right < k
        if small_l and small_r:  # neither half may show: the block is released whole, at its middle cell
            out[mid] = left + right
            unsure[start:start + size - 1] += left + right
            continue
        if small_l:  # the few rows of the left half join the right half's first occupied cell
            to = mid + int(np.flatnonzero(work[mid:start + size])[0])
            work[to] += left
            work[start:mid] = 0
            unsure[start:to] += left
        elif small_r:  # ... or the left half's last occupied cell
            to = start + int(np.flatnonzero(work[start:mid])[-1])
            work[to] += right
            work[mid:start + size] = 0
            unsure[to:start + size - 1] += right
        for s0 in (mid, start):
            if work[s0:s0 + half].sum() > 0:
                stack.append((s0, half))
    return out, unsure


def round_up(x: np.ndarray, k: int) -> np.ndarray:
    """Each count rounded up to 0 or a multiple of ``k`` (a bound that stays a bound and shows no small count)."""
    return np.ceil(np.asarray(x, dtype=np.float64) / k) * k


def suppress_cells(counts: np.ndarray, k: int) -> tuple[np.ndarray, int, int]:
    """A categorical variable's counts with every count below ``k`` suppressed, then the smallest others until the
    suppressed rows are 0 or at least ``k``: (released counts, suppressed rows, suppressed cells)."""
    out = counts.astype(np.float64).copy()
    hidden = (out > 0) & (out < k)
    while hidden.any() and out[hidden].sum() < k:
        rest = np.flatnonzero(~hidden & (out > 0))
        if not rest.size:
            break
        hidden[rest[np.argmin(out[rest])]] = True
    rows = int(out[hidden].sum())
    out[hidden] = 0
    return out, rows, int(hidden.sum())


def cell_index(x: np.ndarray, end: float, cells: int) -> np.ndarray:
    """Each value's cell on the grid of ``cells`` cells over [0, end) (end > 0) or [end, -end) (end < 0)."""
    lo, width = (end, -2 * end / cells) if end < 0 else (0.0, end / cells)
    return np.clip(np.floor((x - lo) / width), 0, cells - 1).astype(np.int64)


def cell_edges(end: float, cells: int) -> tuple[float, float]:
    """The grid's left end and cell width."""
    return (end, -2 * end / cells) if end < 0 else (0.0, end / cells)


def site_vectors(cols: Columns, layout: Layout, ends: list[float], centres: list[float] | None, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The site's ``table`` vector and (with ``centres``) its ``moments`` vector, after its disclosure control."""
    table = np.zeros((len(layout.levels), layout.per_level))
    moments = np.zeros((len(layout.levels), len(layout.numeric), 2))
    offsets = layout.offsets()
    for g in range(len(layout.levels)):
        rows = cols.level == g
        n_rows = int(rows.sum())
        if 0 < n_rows < k:
            table[g, 1] = 1  # the level is withheld: none of its counts or sums leave
            continue
        table[g, 0] = n_rows
        if n_rows == 0:
            continue
        num = 0
        for i, v in enumerate(layout.variables):
            at, x = offsets[i], cols.values[i][rows]
            if v.numeric:
                present = x[~np.isnan(x)]
                table[g, at] = len(x) - len(present)
                if 0 < len(present) < k:
                    table[g, at + 1] = 1
                elif len(present):
                    hist = np.bincount(cell_index(present, ends[num], layout.cells[i]), minlength=layout.cells[i])
                    released, unsure = dyadic_release(hist, k)
                    table[g, at + 2:at + 2 + layout.cells[i]] = released
                    table[g, at + 2 + layout.cells[i]:at + 2 + 2 * layout.cells[i]] = round_up(unsure, k)
                    if centres is not None:
                        d = present - centres[num]
                        moments[g, num] = (d.sum(), (d * d).sum())
                num += 1
            else:
                counts = np.bincount(x, minlength=len(v.cells))[:len(v.cells)]
                released, hidden_rows, hidden_cells = suppress_cells(counts, k)
                table[g, at:at + len(v.cells)] = released
                table[g, at + len(v.cells)] = hidden_rows
                table[g, at + len(v.cells) + 1] = hidden_cells
    return table.ravel(), moments.ravel()


# ---- the summaries (coordinator) ----------------------------------------------------------------------------
def quantile(hist: np.ndarray, unsure: np.ndarray, p: float, end: float) -> dict[str, float]:
    """The quantile ``p`` (numpy's ``linear``) of the rows behind a released histogram: the estimate, and the interval
    that holds the rows' own (``unsure[c]``: at least the rows whose side of cell ``c``'s right edge the release
    may have changed, so the true cumulative count is within ``unsure`` of the released one)."""
    lo, width = cell_edges(end, len(hist))
    cum = np.cumsum(hist)
    n = float(cum[-1])
    h = (n - 1) * p
    below, above = math.floor(h) + 1, math.ceil(h) + 1   # the order statistics (1-based) numpy interpolates

    def first(curve: np.ndarray, rank: float) -> int:
        hit = np.flatnonzero(curve >= rank)
        return int(hit[0]) if hit.size else len(curve) - 1

    a, b = lo + first(cum, below) * width, lo + first(cum, above) * width
    estimate = a + (h - math.floor(h)) * (b - a)
    return {"estimate": float(estimate), "lower": float(lo + first(cum + unsure, below) * width),
            "upper": float(lo + (first(cum - unsure, above) + 1) * width)}


def summarise(table: np.ndarray, moments: np.ndarray | None, layout: Layout, ends: list[float],
              centres: list[float]) -> dict[str, dict[str, Any]]:
    """Per column (each level and ``all``): rows, levels withheld, and per variable its statistics."""
    t = table.reshape(len(layout.levels), layout.per_level)
    m = None if moments is None else moments.reshape(len(layout.levels), len(layout.numeric), 2)
    columns: list[tuple[str, np.ndarray, np.ndarray | None]] = [
        (lvl, t[g], None if m is None else m[g]) for g, lvl in enumerate(layout.levels)]
    if len(layout.levels) > 1:
        columns.append(("all", t.sum(axis=0), None if m is None else m.sum(axis=0)))
    offsets = layout.offsets()
    out: dict[str, dict[str, Any]] = {}
    for name, row, mom in columns:
        col: dict[str, Any] = {"rows": int(row[0]), "levels_withheld": int(row[1]), "variables": {}}
        num = 0
        for i, v in enumerate(layout.variables):
            at = offsets[i]
            if v.numeric:
                hist = row[at + 2:at + 2 + layout.cells[i]]
                unsure = row[at + 2 + layout.cells[i]:at + 2 + 2 * layout.cells[i]]
                n = int(hist.sum())
                s: dict[str, Any] = {"n": n, "missing": int(row[at]), "withheld_sites": int(row[at + 1]),
                                     "coarsened": bool(unsure.any())}
                if n:
                    s["quantiles"] = {str(p): quantile(hist, unsure, p, ends[num]) for p in QUANTILES}
                    s["cell_width"] = cell_edges(ends[num], layout.cells[i])[1]
                    if mom is not None:
                        s1, s2 = float(mom[num, 0]), float(mom[num, 1])
                        s["mean"] = centres[num] + s1 / n
                        s["sd"] = math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1)) if n > 1 else math.nan
                col["variables"][v.name] = s
                num += 1
            else:
                counts = row[at:at + len(v.cells)]
                col["variables"][v.name] = {
                    "counts": {c: int(x) for c, x in zip(v.cells, counts)},
                    "suppressed_rows": int(row[at + len(v.cells)]),
                    "suppressed_cells": int(row[at + len(v.cells) + 1])}
        out[name] = col
    return out


# ---- the program ---------------------------------------------------------------------------------------------
@dataclass
class Table1Outcome:
    """The table: pooled columns, per-site columns, and what was withheld."""

    options: Table1Options
    min_count_note: str
    levels: list[str]
    variables: list[dict[str, Any]]
    pooled: dict[str, dict[str, Any]] = field(default_factory=dict)
    sites: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    site_count: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)


@register_program
@dataclass
class Table1Program(Program):
    """``learner=table1``: the program (module docstring)."""

    name: ClassVar[str] = "fedsilo.table1"
    decisions: ClassVar[frozenset[str]] = frozenset({"span", "table", "moments"})

    task: Task
    options: Table1Options

    def __post_init__(self) -> None:
        super().__init__()

    @override
    def run(self) -> Generator[Ask | Gather, Any, Table1Outcome]:
        """Span, table, moments, and each site's own column."""
        o, task = self.options, self.task
        if not isinstance(task, TabularTask):
            raise ProgramError("learner=table1 needs task=tabular (the sites' own tables)")
        self.state["prep-fingerprint"] = task.fingerprint()
        vocab = yield from tables.discover(task)
        levels = group_levels(task, o.group, vocab)
        vs = variables(task, vocab)
        self.state.update({"t1-options": json.dumps(asdict(o)), "t1-vocab": json.dumps(vocab, sort_keys=True),
                           "t1-levels": json.dumps(levels)})
        numeric = [v for v in vs if v.numeric]
        out = Table1Outcome(o, "", levels, [{"name": v.name, "numeric": v.numeric, "cells": list(v.cells)} for v in vs])
        span: Total = yield Ask("span", 1 + len(numeric) * (2 + EMAX - EMIN), encoding=COUNTS, decide=True)
        self._note(span, "span", out)
        if span.values is None:
            raise RuntimeError(f"no site contributed; reasons: {[r for _, r in span.rejected][:3]}")
        ends = [float(e) for e in span.values]
        self.state["t1-ends"] = json.dumps(ends)
        layout = make_layout(task, vocab, levels, ends, o.bits)
        table: Total = yield Ask("table", layout.length, encoding=COUNTS, decide=True)
        self._note(table, "table", out)
        if table.values is None:
            raise RuntimeError("no total of the table's counts")
        out.site_count = table.sites
        centres = self._centres(table.values, layout, ends)
        self.state["t1-centres"] = json.dumps(centres)
        moments: Total = yield Ask("moments", layout.moments_length, encoding=STATS, decide=True)
        self._note(moments, "moments", out)
        out.pooled = summarise(table.values, moments.values, layout, ends, centres)
        if o.site_columns:
            got = yield Gather("site")
            out.rejected += [{"node": n, "step": "site", "reason": r} for n, r in got.rejected]
            for value in sorted(got.values):  # each site names its column (its file's name)
                own = json.loads(str(value))
                vec = np.zeros(layout.length)
                for index, count in own["table"]:
                    vec[int(index)] = float(count)
                name, k = str(own.get("name", "site")), 2
                while name in out.sites:
                    name, k = f"{own.get('name', 'site')} ({k})", k + 1
                out.sites[name] = summarise(vec, np.asarray(own["moments"], dtype=np.float64), layout,
                                                      ends, centres)
        return out

    def _note(self, total: Total, step: str, out: Table1Outcome) -> None:
        out.rejected += [{"node": n, "step": step, "reason": r} for n, r in total.rejected]

    @staticmethod
    def _centres(total: np.ndarray, layout: Layout, ends: list[float]) -> list[float]:
        """Per numeric variable, the left edge of the pooled median's cell (0 without values)."""
        t = total.reshape(len(layout.levels), layout.per_level).sum(axis=0)
        offsets, out, num = layout.offsets(), [], 0
        for i, v in enumerate(layout.variables):
            if v.numeric:
                hist = t[offsets[i] + 2:offsets[i] + 2 + layout.cells[i]]
                out.append(quantile(hist, np.zeros(len(hist)), 0.5, ends[num])["estimate"] if hist.sum() else 0.0)
                num += 1
        return out

    @classmethod
    @override
    def decision(cls, step: str, total: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """``span``: per numeric variable its grid's end 2^E (negative: the grid is [-2^E, 2^E)); ``table`` and
        ``moments``: the totals (they are the table)."""
        if step == "span":
            sites, width, ends = float(total[0]), 2 + EMAX - EMIN, []
            for k in range((len(total) - 1) // width):
                block = total[1 + k * width:1 + (k + 1) * width]
                fits = np.flatnonzero(block[1:] >= sites)
                e = EMIN + int(fits[0]) if fits.size else EMAX
                ends.append(-(2.0 ** e) if block[0] > 0 else 2.0 ** e)
            return np.asarray(ends)
        if step in ("table", "moments"):
            return total
        raise ProgramError(f"{cls.name} decides no {step!r} total")

    @classmethod
    @override
    def site(cls, step: str, call: SiteCall) -> np.ndarray | str:
        """The site's vector for ``step`` after its disclosure control (its policy checked first)."""
        task, params, policy = call.task, call.params, call.policy
        if isinstance(task, TabularTask):
            task.check_fingerprint(params)
        if step == "vocab":
            return tables.local_vocab(call)
        o = Table1Options.parse(json.loads(str(params.get("t1-options", "{}"))))
        vocab = json.loads(str(params.get("t1-vocab", "{}")))
        levels = json.loads(str(params.get("t1-levels", '["all"]')))
        if not isinstance(task, TabularTask) or levels != group_levels(task, o.group, vocab):
            raise ProgramError("a table1 request whose group levels are not those of its group in this site's schema")
        cols = site_columns(call, vocab, levels, o.group)
        k = int(policy.statistics.min_count)
        if len(cols.level) < policy.statistics.min_rows:
            raise PolicyRefusal(f"this site has fewer rows than its policy's statistics.min_rows="
                                f"{policy.statistics.min_rows}: it releases no statistic of them")
        vs = variables(task, vocab)
        numeric = [i for i, v in enumerate(vs) if v.numeric]
        if step == "span":
            width = 2 + EMAX - EMIN
            out = np.zeros(1 + len(numeric) * width)
            out[0] = 1
            for j, i in enumerate(numeric):
                x = cols.values[i][~np.isnan(cols.values[i])]
                top = float(np.abs(x).max()) if x.size else 0.0
                out[1 + j * width] = float((x < 0).any())
                out[2 + j * width:1 + (j + 1) * width] = [float(top < 2.0 ** e) for e in range(EMIN, EMAX + 1)]
            return out
        ends = json.loads(str(params.get("t1-ends", "[]")))
        if not isinstance(ends, list) or len(ends) != len(numeric):
            raise ProgramError("a table1 request whose grid ends do not fit this site's numeric variables")
        for j, i in enumerate(numeric):
            e = math.log2(abs(float(ends[j]))) if ends[j] else math.nan
            x = cols.values[i][~np.isnan(cols.values[i])]
            if not (e == int(e) and EMIN <= e <= EMAX) or (x.size and float(np.abs(x).max()) >= abs(ends[j])) \
                    or (ends[j] > 0 and x.size and x.min() < 0):
                raise ProgramError(f"a table1 request whose grid for variable {vs[i].name!r} is no power-of-two "
                                   "range that covers this site's values")
        layout = make_layout(task, vocab, levels, ends, o.bits)
        centres = None
        if step in ("moments", "site"):
            centres = json.loads(str(params.get("t1-centres", "[]")))
            if not isinstance(centres, list) or len(centres) != len(numeric) or \
                    not all(isinstance(c, (int, float)) and math.isfinite(c) for c in centres):
                raise ProgramError("a table1 request whose centres do not fit this site's numeric variables")
        table, moments = site_vectors(cols, layout, [float(e) for e in ends], centres, k)
        if step == "table":
            return table
        if step == "moments":
            return moments
        if step == "site":
            if not policy.statistics.site_columns:
                raise PolicyRefusal("this site's policy (statistics.site_columns=false) releases no column of its own")
            nz = np.flatnonzero(table)
            return json.dumps({"name": call.data.name, "table": [[int(i), int(table[i])] for i in nz],
                               "moments": moments.tolist()})
        raise ProgramError(f"unknown step {step!r} of {cls.name}")


# ---- the table as Markdown, HTML and CSV ----------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.6g}"


def rows_of(res: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows: a row per numeric statistic and per category, a column per pooled level and,
    after them, per site."""
    cols = [(f"{lvl}", res["pooled"][lvl]) for lvl in res["pooled"]]
    cols += [(f"{site}", res["sites"][site]["all" if "all" in res["sites"][site] else res["levels"][0]])
             for site in res.get("sites", {})]
    header = ["variable", ""] + [f"{name} (N = {c['rows']})" for name, c in cols]
    rows: list[list[str]] = []
    for v in res["variables"]:
        name = v["name"]
        stats = [c["variables"][name] for _, c in cols]
        if v["numeric"]:
            def num(s: Mapping[str, Any], what: str) -> str:
                if not s.get("n"):
                    return "withheld" if s.get("withheld_sites") else "-"
                if what == "mean":
                    return f"{_fmt(s['mean'])} ± {_fmt(s['sd'])}" if "mean" in s else "-"
                q = s["quantiles"]
                return f"{_fmt(q['0.5']['estimate'])} [{_fmt(q['0.25']['estimate'])}, {_fmt(q['0.75']['estimate'])}]"
            rows.append([name, "mean ± sd"] + [num(s, "mean") for s in stats])
            rows.append(["", "median [Q1, Q3]"] + [num(s, "median") for s in stats])
            rows.append(["", "n (missing)"] + [f"{s['n']} ({s['missing']})" for s in stats])
        else:
            for k, cell in enumerate(v["cells"]):
                line = [name if k == 0 else "", cell]
                for (_, c), s in zip(cols, stats):
                    x = s["counts"][cell]
                    hidden = s["suppressed_cells"] and x == 0
                    mark = "†" if s["suppressed_rows"] else ""  # a sum over the sites that released the cell
                    line.append("suppressed" if hidden else f"{x}{mark} ({100 * x / max(c['rows'], 1):.1f}%)")
                rows.append(line)
            if any(s["suppressed_rows"] for s in stats):
                rows.append(["", "suppressed rows"] + [str(s["suppressed_rows"]) for s in stats])
    return header, rows


def markdown(res: Mapping[str, Any]) -> str:
    """The table in Markdown, with its notes."""
    header, rows = rows_of(res)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes(res)) + "\n"


def notes(res: Mapping[str, Any]) -> list[str]:
    """What the table's reader must know: the disclosure control and what it withheld, the quantiles' bounds."""
    out = [f"{res['site_count']} sites; pooled columns are sums of what each site released under its own disclosure "
           "control (statistics.min_count: every released count is 0 or at least it); † a count of the sites that "
           "released that cell (others suppressed it: the variable's 'suppressed rows'); a median [Q1, Q3] estimates "
           "numpy's (linear) quantile, which lies in the interval results.json states for it."]
    withheld = {lvl: c["levels_withheld"] for lvl, c in res["pooled"].items() if c["levels_withheld"]}
    if withheld:
        out.append("group levels withheld (fewer rows at a site than its min_count), sites per level: "
                   + ", ".join(f"{k}: {v}" for k, v in withheld.items()))
    for v in res["variables"]:
        allc = res["pooled"].get("all", res["pooled"][next(iter(res["pooled"]))])["variables"][v["name"]]
        if v["numeric"] and allc.get("n"):
            q = allc["quantiles"]["0.5"]
            out.append(f"{v['name']}: grid cell {_fmt(allc['cell_width'])}"
                       + ("; histograms coarsened at sites" if allc["coarsened"] else "")
                       + f"; the pooled median lies in [{_fmt(q['lower'])}, {_fmt(q['upper'])}]")
        if v["numeric"] and allc.get("withheld_sites"):
            out.append(f"{v['name']}: withheld by {allc['withheld_sites']} site-levels (fewer values than min_count)")
        if not v["numeric"] and allc.get("suppressed_rows"):
            out.append(f"{v['name']}: {allc['suppressed_rows']} rows in {allc['suppressed_cells']} suppressed cells")
    rejected = res.get("rejected") or []
    if rejected:
        out.append(f"{len(rejected)} site answers refused: " + "; ".join(sorted({r['reason'] for r in rejected}))[:400])
    return out


def html_table(res: Mapping[str, Any]) -> str:
    """The table as an HTML fragment."""
    header, rows = rows_of(res)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes(res))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table><ul>{items}</ul>"


def csv_table(res: Mapping[str, Any]) -> str:
    """The table as CSV (one row per table row)."""
    header, rows = rows_of(res)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


class Table1Learner(SumLearner):
    """``learner.name=table1`` (options: :class:`Table1Options`; ``fedsilo stats``)."""

    name: ClassVar[str] = "table1"

    @override
    def validate(self, cfg: LearnerConfig, task: type[Task]) -> None:
        """The options' ranges, and a task with tables."""
        Table1Options.parse(dict(cfg.options))
        if not issubclass(task, TabularTask):
            raise ConfigError("learner.name", "table1", "task=tabular (the sites' own tables; docs/survival.md)")

    @override
    def program(self, task: Task, options: Mapping[str, Any]) -> Program:
        """The Table 1 program over ``task``'s sites."""
        return Table1Program(task, Table1Options.parse(dict(options)))

    @override
    def results(self, outcome: Any) -> dict[str, Any]:
        """The ``learner`` section of results.json: every column's statistics and what was withheld."""
        out: Table1Outcome = outcome
        return {"analysis": "table1", "site_count": out.site_count, "levels": out.levels, "variables": out.variables,
                "pooled": out.pooled, "sites": out.sites, "options": asdict(out.options), "rejected": out.rejected}

    @override
    def save(self, outcome: Any, folder: Path) -> dict[str, str]:
        """``table1.md``, ``table1.html``, ``table1.csv`` and ``table1.json`` in the run's folder."""
        res = json.loads(json.dumps(self.results(outcome), default=str))
        files = {"table1.md": markdown(res), "table1.html": html_table(res), "table1.csv": csv_table(res),
                 "table1.json": json.dumps(res, indent=1) + "\n"}
        for name, text in files.items():
            (folder / name).write_text(text)
        return {name.split(".")[1]: str(folder / name) for name in files}


register(Table1Learner())
