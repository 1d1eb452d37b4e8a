"""Horizontal histogram boosting as one protected-sum program: both halves.

The coordinator half (:meth:`GbdtProgram.run`) asks, in order:

1. ``vocab`` (``task=tabular`` with categories left to discovery): the names, as preprocessing does;
2. ``range``: per feature, the count of values in each signed power-of-two bucket (and the label's
   counts or sum): decided into each feature's grid (the non-empty buckets between those of the pooled
   0.5 % and 99.5 % quantiles: powers of two, never a value) and the base margin;
3. ``grid``: per feature, the count of values in each cell of that grid (each bucket cut into equal
   cells, about ``grid_cells`` in all): decided into at most ``max_bin - 1`` cut points near the pooled
   quantiles (grid boundaries, never a site's value);
4. per boosting round, per tree level, ``level``: every site's gradient and hessian histograms of
   the open nodes (one tree per class): decided into each node's split and leaf values; then
   ``evaluate`` on the validation rows: the pooled validation loss, for early stopping;
5. ``evaluate`` on the sites' own test rows (``task=tabular``): the pooled test metrics.

Every total is of integers or of multiples of ``2^-24`` (:mod:`learners.gbdt.trees`), so
it is exact, the same under every aggregation option and whatever the sites' split of the rows:
:func:`learners.pooled.fit` (this program on one site holding all rows) grows the same trees.
``range``, ``grid`` and ``level`` are decisions (:attr:`core.programs.Ask.decide`): with plain or
secure aggregation the coordinator reads the totals and decides; under Paillier a key-holding site
verifies the total (every contribution authenticated, at least its ``aggregation.min_sites`` sites)
and returns only the decision.

The site half is a pure function of the site's rows, the options and the model the request
carries (finished trees and the trees being grown, bytes); it checks its policy's
``statistics.min_rows`` before every step.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING, getLogger
from typing import Any, ClassVar

import numpy as np
from typing_extensions import override

from core.fixedpoint import COUNTS, HISTOGRAMS
from core.programs import Ask, Gather, PolicyRefusal, Program, ProgramError, SiteCall, Total
from learners import rows as tables
from learners.gbdt.model import Ensemble
from learners.gbdt.options import GbdtOptions
from learners.gbdt.trees import BITS, SplitRule, Tree, best_split, bin_matrix, cuts_from_counts, gradients, loss_sum, quantize
from tasks.base import PooledTask, Task
from tasks.federated import FederatedTask
from tasks.metrics import binary_metrics
from tasks.programs import check_evaluation
from tasks.tabular.task import TabularTask

LOG = getLogger("flwr")

EXPONENTS = 32                        # power-of-two buckets 2^-32 .. 2^31 on each side of zero
BUCKETS = 2 * (2 * EXPONENTS) + 2     # negative buckets, zero, positive buckets, missing
QUANTILE = 0.005                      # the grid spans the buckets of the 0.5 % and 99.5 % quantiles
DECISION = 10                         # values per open node a level decision returns
INCONSISTENT = -2                     # a level decision's feature for a node whose total is no histogram of rows
MAX_MODEL_BYTES = 64 << 20            # the largest model (decompressed) a site reads from a request
#: the program's public state a checkpoint keeps (the model itself is kept as trees)
PUBLIC = ("gbdt-options", "gbdt-objective", "gbdt-classes", "prep-fingerprint", "gbdt-vocab", "gbdt-features",
          "gbdt-buckets", "gbdt-base", "gbdt-cuts")


# ---- the model in a request ------------------------------------------------------------------------
def encode_trees(trees: list[Tree]) -> bytes:
    """Trees as the bytes a request carries (what a site needs to score them)."""
    rows = [[t.left, t.right, t.feature, t.split_bin, [int(b) for b in t.default_left], t.value, t.depth] for t in trees]
    return zlib.compress(json.dumps(rows, separators=(",", ":")).encode(), 6)


def decode_trees(blob: Any, features: int) -> list[Tree]:
    """The trees of :func:`encode_trees`, checked (a request is data from the coordinator, never trusted)."""
    if not isinstance(blob, bytes):
        raise ProgramError("a gbdt request whose model is not bytes")
    try:
        d = zlib.decompressobj()
        raw = d.decompress(blob, MAX_MODEL_BYTES)
        if d.unconsumed_tail:
            raise ProgramError(f"a gbdt model of more than {MAX_MODEL_BYTES} bytes")
        rows = json.loads(raw)
        trees = []
        for left, right, feature, split_bin, dl, value, depth in rows:
            t = Tree.from_dict({"left": left, "right": right, "feature": feature, "split_bin": split_bin,
                                "threshold": [0.0] * len(left), "default_left": [bool(b) for b in dl],
                                "value": [float(v) for v in value], "gain": [0.0] * len(left),
                                "cover": [0.0] * len(left), "depth": depth})
            if any(not 0 <= f < max(features, 1) for f in t.feature) or not all(np.isfinite(t.value)):
                raise ProgramError("a gbdt model naming a feature this site does not have, or a value not finite")
            trees.append(t)
        return trees
    except (ValueError, TypeError, zlib.error) as err:
        raise ProgramError(f"a malformed gbdt model ({type(err).__name__})") from None


# ---- what the site computes -----------------------------------------------------------------------
@dataclass
class SiteView:
    """The site's rows binned for the request's options and cuts (cached per data and state)."""

    train: tables.Rows
    val: tables.Rows
    test: tables.Rows | None
    margins: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (split, model digest) -> margins
    bins: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)     # (split, cut points) -> bins

    def binned(self, split: str, rows: tables.Rows, params: Mapping[str, Any], cuts: list[np.ndarray]) -> np.ndarray:
        """``rows`` binned by the request's cut points (once per split and cut points: every level asks again)."""
        key = (split, str(params.get("gbdt-cuts")))
        if key not in self.bins:
            if len(self.bins) > 8:
                self.bins.clear()
            self.bins[key] = bin_matrix(rows.x, cuts)
        return self.bins[key]


_VIEWS: dict[tuple[int, ...], SiteView] = {}


def _view(call: SiteCall) -> SiteView:
    vocab = json.loads(str(call.params.get("gbdt-vocab", "{}")))
    train, val, test = tables.cached_site_rows(call.task, call.data, vocab)
    key = (id(train), id(val), id(test))
    if key not in _VIEWS:
        if len(_VIEWS) > 64:
            _VIEWS.clear()
        _VIEWS[key] = SiteView(train, val, test)
    return _VIEWS[key]


def _options(params: Mapping[str, Any]) -> GbdtOptions:
    return GbdtOptions.from_json(str(params.get("gbdt-options", "{}")))


def _cuts(params: Mapping[str, Any], features: int, max_bin: int) -> list[np.ndarray]:
    raw = json.loads(str(params.get("gbdt-cuts", "null")))
    if not isinstance(raw, list) or len(raw) != features:
        raise ProgramError(f"a gbdt request whose cut points are not {features} lists")
    cuts = [np.asarray(c, dtype=np.float64) for c in raw]
    if any(c.ndim != 1 or c.size >= max_bin or not np.all(np.diff(c) > 0) or not np.all(np.isfinite(c)) for c in cuts):
        raise ProgramError("a gbdt request whose cut points are not increasing, finite, fewer than max_bin")
    return cuts


def bucket_of(x: np.ndarray) -> np.ndarray:
    """Each value's signed power-of-two bucket (0 .. BUCKETS - 2; missing: BUCKETS - 1)."""
    out = np.full(x.shape, BUCKETS - 1, dtype=np.int64)
    present = ~np.isnan(x)
    v = x[present]
    e = np.clip(np.floor(np.log2(np.maximum(np.abs(v), 2.0 ** -EXPONENTS))), -EXPONENTS, EXPONENTS - 1).astype(np.int64)
    pos = 2 * EXPONENTS + 1 + (e + EXPONENTS)        # positive: after the zero bucket
    neg = 2 * EXPONENTS - 1 - (e + EXPONENTS)        # negative: mirrored below it
    zero = np.abs(v) < 2.0 ** -EXPONENTS
    out[present] = np.where(zero, 2 * EXPONENTS, np.where(v > 0, pos, neg))
    return out


def bucket_bounds(b: int) -> tuple[float, float]:
    """The value range ``[lo, hi)`` of bucket ``b``."""
    if b == 2 * EXPONENTS:
        return -(2.0 ** -EXPONENTS), 2.0 ** -EXPONENTS
    if b > 2 * EXPONENTS:
        e = b - (2 * EXPONENTS + 1) - EXPONENTS
        return 2.0 ** e, 2.0 ** (e + 1)
    e = (2 * EXPONENTS - 1 - b) - EXPONENTS
    return -(2.0 ** (e + 1)), -(2.0 ** e)


def cell_bounds(buckets: list[int], cells: int) -> np.ndarray:
    """The inner boundaries of a feature's fine grid (float32 values, increasing): each of its ``buckets``
    (the non-empty power-of-two buckets between its pooled 0.5 % and 99.5 % quantiles) cut into equal cells,
    about ``cells`` in all, so the grid is as fine, relatively, at 0.01 as at 10,000."""
    if not buckets:
        return np.zeros(0)
    per = max(1, cells // len(buckets))
    points = [lo + (hi - lo) * np.arange(per + 1) / per for lo, hi in (bucket_bounds(b) for b in buckets)]
    bounds = np.unique(np.asarray(np.concatenate(points), dtype=np.float32).astype(np.float64))
    return bounds[1:-1] if bounds.size > 2 else bounds[:0]  # the outer cells stay open-ended


def grid_of(params: Mapping[str, Any], features: int, cells: int) -> list[np.ndarray]:
    """Every feature's fine-grid boundaries from the request's ``gbdt-buckets`` (checked)."""
    raw = json.loads(str(params.get("gbdt-buckets", "null")))
    if not isinstance(raw, list) or len(raw) != features or \
            any(not isinstance(b, list) or any(not isinstance(i, int) or not 0 <= i < BUCKETS - 1 for i in b) for b in raw):
        raise ProgramError(f"a gbdt request whose grid buckets are not {features} lists of bucket numbers")
    return [cell_bounds(sorted(set(b)), cells) for b in raw]


def bucket_counts(x: np.ndarray) -> np.ndarray:
    """Per feature, the count of values in each signed power-of-two bucket (features x BUCKETS; last: missing)."""
    counts = np.zeros((x.shape[1], BUCKETS))
    for f in range(x.shape[1]):
        counts[f] = np.bincount(bucket_of(x[:, f]), minlength=BUCKETS)
    return counts


def grid_buckets(counts: np.ndarray) -> np.ndarray:
    """Per feature, the buckets its fine grid covers (features x (BUCKETS - 1), 0/1): the non-empty ones between
    the buckets of its 0.5 % and 99.5 % quantiles, from the pooled :func:`bucket_counts` (missing values do not
    place the grid)."""
    counts = counts[:, :-1]
    used = np.zeros(counts.shape)
    for f in range(counts.shape[0]):
        n = counts[f].sum()
        if n <= 0:
            continue
        cum = np.cumsum(counts[f])
        lo_b = int(np.searchsorted(cum, QUANTILE * n, side="left"))
        hi_b = int(np.searchsorted(cum, (1 - QUANTILE) * n, side="left"))
        used[f, lo_b:hi_b + 1] = counts[f, lo_b:hi_b + 1] > 0
    return used


def cell_counts(column: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The count of a feature's present values (as float32) in each cell of its fine grid ``bounds``."""
    col = column.astype(np.float32).astype(np.float64)
    col = col[~np.isnan(col)]
    return np.bincount(np.searchsorted(bounds, col, side="right"), minlength=len(bounds) + 1)


def local_cuts(x: np.ndarray, max_bin: int, grid_cells: int) -> list[np.ndarray]:
    """The cut points a federation of one site holding ``x`` would decide (the ``range`` and ``grid`` steps and
    their decisions, on these rows alone): a vertical party holds every row of its columns, so it bins them
    itself, and its cut points are those of the pooled horizontal fit on the same columns."""
    used = grid_buckets(bucket_counts(x))
    out = []
    for f in range(x.shape[1]):
        bounds = cell_bounds(np.nonzero(used[f])[0].tolist(), grid_cells)
        out.append(cuts_from_counts(cell_counts(x[:, f], bounds), bounds, max_bin))
    return out


def label_stats(objective: str, y: np.ndarray, classes: int, bits: int) -> np.ndarray:
    """Rows and the label's counts (classification) or quantized sum (regression)."""
    if objective == "multiclass":
        return np.concatenate([[len(y)], np.bincount(y.astype(np.int64), minlength=classes)[:classes]])
    if objective == "binary":
        return np.array([len(y), float(np.sum(y))])
    return np.array([len(y), float(np.sum(quantize(y, bits)))])


def base_margins(objective: str, stats: np.ndarray, classes: int) -> np.ndarray:
    """The base margin per output from the pooled label statistics."""
    n = max(float(stats[0]), 1.0)
    if objective == "binary":
        p = min(max(float(stats[1]) / n, 1e-6), 1 - 1e-6)
        return np.array([np.log(p / (1 - p))])
    if objective == "regression":
        return np.array([float(stats[1]) / n])
    prior = np.maximum(stats[1:1 + classes] / n, 1e-6)
    return np.log(prior / prior.sum())


def _margins(view: SiteView, split: str, rows: tables.Rows, params: Mapping[str, Any], trees: list[Tree],
             cuts: list[np.ndarray], base: np.ndarray, classes: int) -> np.ndarray:
    """The model's margins on ``rows`` (rows x outputs), from the last margins cached for a prefix of the trees."""
    key = (split, model_digest(params))
    if key in view.margins:
        return view.margins[key]
    bins = view.binned(split, rows, params, cuts)
    prev = str(params.get("gbdt-previous", ""))
    start, margins = 0, np.tile(base, (len(rows), 1))
    if (split, prev) in view.margins and 0 <= int(params.get("gbdt-previous-trees", -1)) <= len(trees):  # type: ignore[call-overload]
        start, margins = int(params["gbdt-previous-trees"]), view.margins[(split, prev)].copy()  # type: ignore[call-overload]
    for i in range(start, len(trees)):
        t = trees[i]
        margins[:, i % classes] += np.asarray(t.value)[t.leaf_of_bins(bins)]
    if len(view.margins) > 16:
        view.margins.clear()
    view.margins[key] = margins
    return margins


def model_digest(params: Mapping[str, Any]) -> str:
    """The digest a site caches the margins of a request's model under (see :func:`_margins`)."""
    blob = params.get("gbdt-model", b"")
    base = np.asarray(json.loads(str(params.get("gbdt-base", "[]"))), dtype=np.float64)
    cuts = [np.asarray(c, dtype=np.float64) for c in json.loads(str(params.get("gbdt-cuts", "[]")))]
    return hashlib.sha256(bytes(blob) + base.tobytes() + json.dumps([c.tolist() for c in cuts]).encode()).hexdigest()


@dataclass
class Outcome:
    """What the program returns: the model and how it was reached."""

    trees: list[Tree]
    base: list[float]
    cuts: list[list[float]]
    names: list[str]
    objective: str
    classes: int
    options: GbdtOptions
    history: list[dict[str, float]] = field(default_factory=list)
    best_round: int = 0
    sites: int = 0
    sums: int = 0
    test: dict[str, float] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    seconds_per_round: float = 0.0
    vocab: dict[str, list[str]] = field(default_factory=dict)
    stopped: str = ""

    schema: str | None = None
    ended_early: list[dict[str, int]] = field(default_factory=list)  # trees ended at a level a site dropped out of
    inconsistent: list[dict[str, int]] = field(default_factory=list)  # nodes left leaves: their total was no histogram

    def header(self, state: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What a resumed run needs of the outcome and of the program's public state (JSON values)."""
        return {"base": self.base, "cuts": self.cuts, "names": self.names, "objective": self.objective,
                "classes": self.classes, "sites": self.sites, "vocab": self.vocab, "schema": self.schema,
                "rejected": self.rejected, "ended_early": self.ended_early, "inconsistent": self.inconsistent,
                "state": {k: v for k, v in (state or {}).items() if k in PUBLIC}}

    @classmethod
    def from_header(cls, h: Mapping[str, Any], options: GbdtOptions) -> Outcome:
        """The outcome so far, from :meth:`header`."""
        return cls([], list(h["base"]), list(h["cuts"]), list(h["names"]), str(h["objective"]), int(h["classes"]),
                   options, sites=int(h["sites"]), vocab=dict(h["vocab"]), schema=h.get("schema"),
                   rejected=list(h["rejected"]), ended_early=list(h["ended_early"]),
                   inconsistent=list(h.get("inconsistent", [])))

    def ensemble(self) -> Ensemble:
        """The fitted model."""
        return Ensemble(self.trees, self.base, self.cuts, self.names, self.objective, self.classes, self.schema,
                        self.vocab)


@dataclass
class GbdtProgram(Program):
    """``learner=gbdt``: the program (module docstring)."""

    name: ClassVar[str] = "fedsilo.gbdt"
    decisions: ClassVar[frozenset[str]] = frozenset({"range", "grid", "level"})

    task: Task
    options: GbdtOptions
    test_bins: int = 1024

    def __post_init__(self) -> None:
        super().__init__()
        self._resumed: Mapping[str, Any] | None = None

    @override
    def restore(self, progress: Mapping[str, Any]) -> None:
        """Continue after the round ``progress`` was taken at (a checkpoint of a run with the same config)."""
        if progress.get("program") != self.name or not isinstance(progress.get("trees"), list):
            raise ProgramError(f"a checkpoint of {progress.get('program')!r}, not of {self.name}")
        self._resumed = progress

    # ---- coordinator half ----
    def _note(self, total: Total, step: str, out: Outcome) -> None:
        for node, reason in total.rejected:
            out.rejected.append({"node": node, "step": step, "reason": reason})
            LOG.log(WARNING, "fedsilo gbdt (%s): site %s left out: %s", step, node, reason)

    @override
    def run(self) -> Generator[Ask | Gather, Any, Outcome]:
        """Sketch, then rounds of level-wise growth with early stopping, then the pooled test metrics."""
        o, task = self.options, self.task
        objective = tables.objective_of(task) if o.objective == "auto" else o.objective
        classes = tables.classes_of(task) if objective == "multiclass" else 1
        self.state.update({"gbdt-options": o.to_json(), "gbdt-objective": objective, "gbdt-classes": classes})
        if isinstance(task, FederatedTask):
            self.state["prep-fingerprint"] = task.fingerprint()
        if self._resumed is not None:
            return (yield from self._rounds(self._resumed))
        vocab = yield from tables.discover(task)
        self.state["gbdt-vocab"] = json.dumps(vocab, sort_keys=True)
        names = tables.feature_names(task, vocab)
        F = len(names)
        self.state["gbdt-features"] = F
        out = Outcome([], [], [], names, objective, classes, o, vocab=vocab)
        if isinstance(task, TabularTask):  # what `fedsilo predict` reads rows to score with
            out.schema = task.path(task.cfg.schema, "schema").read_text(encoding="utf-8")
        # 2. the grid's range per feature, and the base margin
        label_len = 1 + (classes if objective == "multiclass" else 1)
        rng_total: Total = yield Ask("range", label_len + F * BUCKETS, encoding=HISTOGRAMS, decide=True)
        self._note(rng_total, "range", out)
        if rng_total.values is None:
            raise RuntimeError(f"no site contributed to the bin ranges; reasons: {[r for _, r in rng_total.rejected][:3]}")
        base = rng_total.values[:classes]
        used = rng_total.values[classes:].reshape(F, BUCKETS - 1) > 0.5
        self.state["gbdt-buckets"] = json.dumps([np.nonzero(u)[0].tolist() for u in used])
        self.state["gbdt-base"] = json.dumps(base.tolist())
        # 3. cut points from the pooled fine histograms
        cells = sum(len(b) + 1 for b in grid_of(self.state, F, o.grid_cells))
        grid_total: Total = yield Ask("grid", cells, encoding=COUNTS, decide=True)
        self._note(grid_total, "grid", out)
        if grid_total.values is None:
            raise RuntimeError("no site contributed to the bin edges")
        cuts = unpack_cuts(grid_total.values, F, o.max_bin)
        self.state["gbdt-cuts"] = json.dumps([c.tolist() for c in cuts])
        out.base, out.cuts, out.sites = base.tolist(), [c.tolist() for c in cuts], rng_total.sites
        rng = np.random.default_rng([o.seed, 36])
        return (yield from self._rounds({"round": 0, "trees": [], "history": [], "best": 0, "best_loss": None,
                                         "rng": rng.bit_generator.state, "outcome": out.header()}))

    def _rounds(self, start: Mapping[str, Any]) -> Generator[Ask | Gather, Any, Outcome]:
        """The boosting rounds from ``start`` (round 0, or a checkpoint's progress), then the test metrics."""
        o, task = self.options, self.task
        out = Outcome.from_header(start["outcome"], o)
        classes, F = out.classes, len(out.names)
        for key in PUBLIC:
            if key in start["outcome"]["state"]:
                self.state[key] = start["outcome"]["state"][key]
        cuts = [np.asarray(c, dtype=np.float64) for c in out.cuts]
        trees = [Tree.from_dict(t) for t in start["trees"]]
        out.history = list(start["history"])
        best, t0 = int(start["best"]), time.monotonic()
        best_loss = float("inf") if start["best_loss"] is None else float(start["best_loss"])
        rng = np.random.default_rng()
        rng.bit_generator.state = dict(start["rng"])
        self.state["gbdt-model"] = encode_trees(trees)
        if trees:
            self.state["gbdt-previous"] = ""  # the sites compute the margins of every tree once
        stopped = o.early_stopping and len(out.history) - best >= o.early_stopping
        for rnd in range(int(start["round"]), 0 if stopped else o.trees):
            allowed = np.arange(F) if o.colsample_bytree >= 1 else np.sort(
                rng.choice(F, size=max(1, int(round(o.colsample_bytree * F))), replace=False))
            grow = [Tree() for _ in range(classes)]
            open_nodes: list[list[int]] = [[0] for _ in range(classes)]
            round_sites = 0
            for depth in range(o.max_depth):
                if not any(open_nodes):
                    break
                self.state["gbdt-grow"] = encode_trees(grow)
                params: dict[str, int | str] = {"round": rnd, "open": json.dumps(open_nodes),
                                                "allowed": json.dumps(allowed.tolist())}
                count = sum(len(n) for n in open_nodes)
                _, width = slots(cuts)
                total: Total = yield Ask("level", count * 2 * width, params, HISTOGRAMS, decide=True)
                self._note(total, "level", out)
                if depth == 0:
                    if total.values is None:
                        raise RuntimeError(f"round {rnd}: no total of the root's histograms (every site left out, "
                                           "or no key holder decided it)")
                    round_sites = total.sites
                elif total.values is None or total.sites < round_sites:
                    # a site dropped out mid-tree: its rows would be missing below this level only, so the tree ends
                    # here (its open nodes keep the leaf values of the level above, which held every site of the round)
                    LOG.log(WARNING, "fedsilo gbdt: round %s, depth %s: %s of the round's %s sites in the total; the "
                            "tree ends at this level", rnd + 1, depth, total.sites, round_sites)
                    out.ended_early.append({"round": rnd + 1, "depth": depth, "sites": total.sites,
                                            "round_sites": round_sites})
                    break
                decided = total.values.reshape(count, DECISION)
                nxt: list[list[int]] = [[] for _ in range(classes)]
                i = 0
                for k in range(classes):
                    for node in open_nodes[k]:
                        f, j, dl, gain, v_self, v_l, v_r, h_self, h_l, h_r = decided[i]
                        i += 1
                        tree = grow[k]
                        if depth == 0:
                            tree.value[0] = tree.threshold[0] = float(v_self)
                            tree.cover[0] = float(h_self)
                        if f == INCONSISTENT:
                            LOG.log(WARNING, "fedsilo gbdt: round %s, depth %s, node %s: the total is not a histogram of "
                                    "rows (its features' sums differ, or a hessian sum is negative): a site sent "
                                    "values that are not its rows'; the node stays a leaf", rnd + 1, depth, node)
                            out.inconsistent.append({"round": rnd + 1, "depth": depth, "node": int(node)})
                        if f < 0:
                            continue
                        left, right = tree.add_children(node, int(f), int(j), float(cuts[int(f)][int(j) - 1]),
                                                        bool(dl), float(gain), (float(v_l), float(v_r)),
                                                        (float(h_l), float(h_r)))
                        if depth + 1 < o.max_depth:
                            nxt[k] += [left, right]
                open_nodes = nxt
            trees += grow
            self.state["gbdt-previous"] = model_digest(self.state)
            self.state["gbdt-previous-trees"] = len(trees) - classes
            self.state["gbdt-model"] = encode_trees(trees)
            self.state.pop("gbdt-grow", None)
            val: Total = yield Ask("evaluate", 2, {"rows": "val"}, HISTOGRAMS, reveal=True)
            self._note(val, "evaluate", out)
            loss = float(val.values[0] / val.values[1]) if val.values is not None and val.values[1] > 0 else float("nan")
            out.history.append({"round": rnd + 1, "val_loss": loss, "sites": float(val.sites)})
            if loss < best_loss - 1e-12:
                best, best_loss = rnd + 1, loss
            self.progress = {"program": self.name, "round": rnd + 1, "trees": [t.to_dict() for t in trees],
                             "history": list(out.history), "best": best,
                             "best_loss": best_loss if np.isfinite(best_loss) else None,
                             "rng": rng.bit_generator.state, "outcome": out.header(self.state)}
            if o.early_stopping and rnd + 1 - best >= o.early_stopping:
                out.stopped = f"no lower validation loss in {o.early_stopping} rounds"
                break
            if np.isnan(loss) and o.early_stopping:
                LOG.log(WARNING, "fedsilo gbdt: round %s has no pooled validation loss", rnd + 1)
        out.seconds_per_round = (time.monotonic() - t0) / max(len(out.history), 1)
        best = best or len(out.history)
        out.best_round = best
        out.trees = trees[:best * classes]
        out.stopped = out.stopped or f"{o.trees} rounds"
        LOG.log(INFO, "fedsilo gbdt: %s rounds grown, the best (pooled validation loss %.5f) after %s", len(out.history),
                best_loss, best)
        if isinstance(task, FederatedTask):
            self.state["gbdt-model"] = encode_trees(out.trees)
            self.state.pop("gbdt-previous", None)
            self.state.pop("gbdt-previous-trees", None)
            spec = task.eval_spec(self.test_bins)
            test: Total = yield Ask("evaluate", spec.size, {"rows": "test", "bins": spec.bins}, spec.encoding,
                                    reveal=True)
            self._note(test, "test", out)
            if test.values is not None and test.sites > 0:
                out.test = {**spec.metrics(test.values), "test_sites": float(test.sites)}
        elif isinstance(task, PooledTask):  # a bundled task's test set is the coordinator's (as for learner=torch)
            split = task.data().test
            ens = out.ensemble()
            m = ens.margins(split.x.numpy().astype(np.float64))
            y = split.y.numpy().astype(np.float64)
            out.test = binary_metrics(y, 1.0 / (1.0 + np.exp(-m[:, 0])), loss_sum("binary", y, m) / max(len(y), 1))
        return out

    # ---- decisions (the coordinator's, or a key holder's under Paillier) ----
    @classmethod
    @override
    def decision(cls, step: str, total: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """``range``: base margins and each feature's grid range; ``grid``: cut points; ``level``: splits."""
        o = _options(params)
        F, classes = int(params["gbdt-features"]), int(params["gbdt-classes"])
        objective = str(params["gbdt-objective"])
        if step == "range":
            label_len = 1 + (classes if objective == "multiclass" else 1)
            base = base_margins(objective, total[:label_len], classes)
            used = grid_buckets(total[label_len:].reshape(F, BUCKETS))
            return np.concatenate([base, used.ravel()])
        if step == "grid":
            grids = grid_of(params, F, o.grid_cells)
            out = np.zeros((F, o.max_bin))
            start = 0
            for f, bounds in enumerate(grids):
                c = cuts_from_counts(total[start:start + len(bounds) + 1], bounds, o.max_bin)
                start += len(bounds) + 1
                out[f, 0] = c.size
                out[f, 1:1 + c.size] = c
            return out.ravel()
        if step == "level":
            cut_lists = [np.asarray(c, dtype=np.float64) for c in json.loads(str(params["gbdt-cuts"]))]
            cuts = [len(c) for c in cut_lists]
            allowed = np.asarray(json.loads(str(params["allowed"])), dtype=np.int64)
            count = sum(len(n) for n in json.loads(str(params["open"])))
            starts, width = slots(cut_lists)
            hist = total.reshape(count, 2, width)
            rule = SplitRule(o.reg_lambda, o.gamma, o.min_child_weight, o.eta)
            out = np.zeros((count, DECISION))
            for i in range(count):
                g, h = padded(hist[i, 0], starts, cuts), padded(hist[i, 1], starts, cuts)
                out[i] = decide_node(g, h, cuts, allowed, rule, o.keep_hessians)
                if not is_histogram(g, h):
                    out[i, 0], out[i, 5:] = INCONSISTENT, 0.0
            return out.ravel()
        raise ProgramError(f"{cls.name} decides no {step!r} total")

    # ---- site half ----
    @classmethod
    @override
    def site(cls, step: str, call: SiteCall) -> np.ndarray | str:
        """The site's vector (or its vocabulary) for ``step``, after its policy's checks."""
        task, p = call.task, call.params
        if isinstance(task, FederatedTask):
            task.check_fingerprint(p)
        o = _options(p)
        if step == "vocab":
            return tables.local_vocab(call)
        view = _view(call)
        F = int(p.get("gbdt-features", -1))  # type: ignore[call-overload]
        if view.train.x.shape[1] != F:
            raise ProgramError(f"the request counts {F} features, this site's table has {view.train.x.shape[1]}")
        if len(view.train) < call.policy.statistics.min_rows:
            raise PolicyRefusal(f"this site has fewer training rows than its policy's statistics.min_rows="
                                f"{call.policy.statistics.min_rows}: it releases no statistic of them")
        objective, classes = str(p.get("gbdt-objective")), int(p.get("gbdt-classes", 1))  # type: ignore[call-overload]
        if objective not in ("binary", "multiclass", "regression") or not 1 <= classes <= 1000:
            raise ProgramError("a gbdt request with an unknown objective or class count")
        x, y = view.train.x, view.train.y
        if step == "range":
            return np.concatenate([label_stats(objective, y, classes, BITS), bucket_counts(x).ravel()])
        if step == "grid":
            parts = [cell_counts(x[:, f], bounds) for f, bounds in enumerate(grid_of(p, F, o.grid_cells))]
            return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)
        cuts = _cuts(p, F, o.max_bin)
        base = np.asarray(json.loads(str(p.get("gbdt-base", "[]"))), dtype=np.float64)
        if base.shape != (classes,):
            raise ProgramError("a gbdt request whose base margins do not match its classes")
        trees = decode_trees(p.get("gbdt-model"), F)
        if step == "level":
            return cls._histograms(view, p, o, trees, cuts, base, classes, objective, call.policy.statistics.min_rows)
        if step == "evaluate":
            rows = str(p.get("rows"))
            if rows == "val":
                m = _margins(view, "val", view.val, p, trees, cuts, base, classes)
                return np.array([loss_sum(objective, view.val.y, m, BITS), len(view.val)])
            if rows == "test" and view.test is not None and isinstance(task, FederatedTask):
                bins = check_evaluation(p.get("bins"), len(view.test), call.policy)
                m = _margins(view, "test", view.test, p, trees, cuts, base, classes)
                return task.eval_spec(bins).site_vector(m if classes > 1 else m[:, 0], view.test.y)
            raise ProgramError(f"no {rows!r} rows to evaluate at this site")
        raise ProgramError(f"unknown step {step!r} of {cls.name}")

    @classmethod
    def _histograms(cls, view: SiteView, p: Mapping[str, Any], o: GbdtOptions, trees: list[Tree],
                    cuts: list[np.ndarray], base: np.ndarray, classes: int, objective: str, min_rows: int) -> np.ndarray:
        """The site's gradient and hessian histograms of the open nodes; zeros for a node holding fewer than
        ``min_rows`` of its rows (its policy's ``statistics.min_rows``: no statistic of so few rows leaves)."""
        F = len(cuts)
        starts, width = slots(cuts)
        rnd = int(p.get("round", -1))  # type: ignore[call-overload]
        grow = decode_trees(p.get("gbdt-grow"), F)
        open_nodes = json.loads(str(p.get("open", "[]")))
        if len(grow) != classes or not isinstance(open_nodes, list) or len(open_nodes) != classes or rnd < 0:
            raise ProgramError("a gbdt level request whose growing trees or open nodes do not match its classes")
        if len(trees) != rnd * classes:
            raise ProgramError(f"a gbdt level request of round {rnd} with {len(trees)} finished trees")
        margins = _margins(view, "train", view.train, p, trees, cuts, base, classes)
        g, h = gradients(objective, view.train.y, margins, BITS)
        bins = view.binned("train", view.train, p, cuts)
        rows = np.ones(len(view.train), dtype=bool)
        if o.subsample < 1:  # the site's own draw: rows are never named to the coordinator
            rows = np.random.default_rng([rnd, len(view.train), 36]).random(len(view.train)) < o.subsample
        offsets = np.asarray(starts, dtype=np.int64)
        parts = []
        for k in range(classes):
            nodes = [int(n) for n in open_nodes[k]]
            tree = grow[k]
            if any(not 0 <= n < len(tree.left) or tree.left[n] != -1 for n in nodes):
                raise ProgramError("a gbdt level request whose open nodes are not leaves of the growing tree")
            pos = np.full(len(tree.left), -1, dtype=np.int64)
            pos[nodes] = np.arange(len(nodes))
            at = pos[tree.leaf_of_bins(bins)]
            sel = (at >= 0) & rows
            keys = (at[sel, None] * (2 * width) + offsets[None, :] + bins[sel]).ravel()
            size = len(nodes) * 2 * width
            gh = np.bincount(keys, weights=np.repeat(g[sel, k], F), minlength=size)
            hh = np.bincount(keys + width, weights=np.repeat(h[sel, k], F), minlength=size)
            hist = (gh + hh).reshape(len(nodes), 2 * width)
            held = np.bincount(at[sel], minlength=len(nodes))
            hist[(held > 0) & (held < min_rows)] = 0.0
            parts.append(hist.ravel())
        return np.concatenate(parts) if parts else np.zeros(0)


def is_histogram(g: np.ndarray, h: np.ndarray) -> bool:
    """Whether a node's total histograms (features x slots) can be sums over rows: every row lies in exactly one
    slot of every feature (its bin, or missing), so each feature's slots sum to the same node total, exactly (the
    sums are of multiples of 2^-24), and no hessian sum is negative. A site that sends anything else (a scaled or
    shifted histogram, values not of its rows) breaks this in the total, under every aggregation option; the
    node is then left a leaf (:data:`INCONSISTENT`)."""
    if not g.size:
        return True
    gs, hs = g.sum(axis=1), h.sum(axis=1)
    return bool(np.all(gs == gs[0]) and np.all(hs == hs[0]) and h.min() >= 0)


def decide_node(g: np.ndarray, h: np.ndarray, cuts: list[int], allowed: np.ndarray, rule: SplitRule,
                keep_hessians: bool) -> np.ndarray:
    """One open node's decision (:data:`DECISION` values) from its histograms (features x slots, slot 0 missing):
    feature (-1: none), bin, default left, gain, the leaf values of the node and of its two children, and their
    hessian sums (zeros unless ``keep_hessians``: TimberStrike reads them; docs/gbdt.md)."""
    g_tot, h_tot = float(g[0].sum()), float(h[0].sum())
    f, j, dl, gain, gl, hl, gr, hr = best_split(g, h, cuts, allowed, rule)
    keep = 1.0 if keep_hessians else 0.0
    return np.array([f, j, float(dl), gain, rule.weight(g_tot, h_tot), rule.weight(gl, hl) if f >= 0 else 0.0,
                     rule.weight(gr, hr) if f >= 0 else 0.0, keep * h_tot, keep * hl, keep * hr])


def slots(cuts: list[np.ndarray]) -> tuple[list[int], int]:
    """Where each feature's histogram starts in a node's, and its width: feature f has ``len(cuts[f]) + 2``
    slots (missing, then its ``len(cuts[f]) + 1`` bins), so a binary feature costs 3 values, not ``max_bin``."""
    sizes = [len(c) + 2 for c in cuts]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist() if sizes else []
    return starts, int(sum(sizes))


def padded(hist: np.ndarray, starts: list[int], cuts: list[int]) -> np.ndarray:
    """A node's compact histogram (:func:`slots`) as features x (most slots), zeros after each feature's own."""
    out = np.zeros((len(cuts), max(cuts, default=0) + 2))
    for f, (start, m) in enumerate(zip(starts, cuts)):
        out[f, :m + 2] = hist[start:start + m + 2]
    return out


def unpack_cuts(decided: np.ndarray, features: int, max_bin: int) -> list[np.ndarray]:
    """The cut points of a ``grid`` decision (per feature: its count, then the cuts)."""
    rows = decided.reshape(features, max_bin)
    return [rows[f, 1:1 + int(rows[f, 0])].astype(np.float64) for f in range(features)]
