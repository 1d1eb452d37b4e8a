"""The arithmetic of histogram gradient boosting, shared by both halves and the pooled reference.

Everything a site computes and everything the coordinator decides is a function here, so the
federated fit and the same code fitted on pooled rows (:func:`learners.pooled.fit`) are one
computation:

* **gradients** of the objective at the current margins, each rounded to a multiple of
  ``2^-bits`` (:func:`gradients`). Sums of such numbers are exact in float64 (checked:
  :func:`check_exact`), in the fixed-point encoding of every aggregation option and in any order,
  so a histogram total does not depend on how the rows are split over sites: federated trees
  equal pooled trees bit for bit, under plain, secure aggregation and Paillier.
* **bins**: per feature, cut points ``c_1 < ... < c_m`` (float32 values); a value's bin is
  ``1 + #{c <= x}``, bin 0 holds the missing values (:func:`bin_matrix`). A split after bin ``j``
  sends ``x < c_j`` left, as XGBoost compares (float32).
* **histograms**: per open node, feature and bin, the sums of gradients and hessians
  (:func:`histograms`); a node's split is the best of every feature's cut points with the
  missing values sent left or right (:func:`best_split`, XGBoost's gain with L2 ``lambda``,
  ``gamma`` and ``min_child_weight``); a leaf's value is ``-eta * G / (H + lambda)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.fixedpoint import HISTOGRAMS

OBJECTIVES = ("binary", "multiclass", "regression")
#: gradients, hessians and per-row losses are multiples of 2^-BITS (the sum encoding's fraction bits)
BITS = HISTOGRAMS.fraction_bits
#: XGBoost's objective names, by ours
XGB_OBJECTIVE = {"binary": "binary:logistic", "multiclass": "multi:softprob", "regression": "reg:squarederror"}
#: the least hessian a row contributes (XGBoost: 1e-16; here the least multiple of the quantum)
EPS = 1e-6  # XGBoost's kRtEps: a split must gain more than this


class ExactnessError(ValueError):
    """Gradient sums too large to stay exact at the configured precision (names the option to change)."""


def quantize(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` rounded to the nearest multiple of ``2^-bits`` (exact float64 results)."""
    return np.ldexp(np.rint(np.ldexp(values, bits)), -bits)


def check_exact(g: np.ndarray, h: np.ndarray, bits: int) -> None:
    """Refuse gradients whose sums could lose a bit in float64 (or in the 40-fraction-bit sum encoding)."""
    limit = 2.0 ** min(52 - bits, HISTOGRAMS.bits - HISTOGRAMS.fraction_bits - 2)
    if g.size and (float(np.abs(g).sum()) >= limit or float(np.abs(h).sum()) >= limit):
        raise ExactnessError(f"this site's gradient sums reach {limit:g}, beyond what sums exactly at 2^-{bits}: "
                             "rescale the regression target (e.g. to thousands)")


def softmax(margins: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``margins`` (rows x classes)."""
    z = margins - margins.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def gradients(objective: str, y: np.ndarray, margins: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row and output (rows x outputs), the quantized gradient and hessian of the loss at ``margins``."""
    if objective == "binary":
        p = 1.0 / (1.0 + np.exp(-margins[:, 0]))
        g, h = (p - y)[:, None], (p * (1.0 - p))[:, None]
    elif objective == "regression":
        g, h = (margins[:, 0] - y)[:, None], np.ones((len(y), 1))
    else:
        p = softmax(margins)
        onehot = np.zeros_like(p)
        onehot[np.arange(len(y)), y.astype(np.int64)] = 1.0
        g, h = p - onehot, 2.0 * p * (1.0 - p)
    g, h = quantize(g, bits), np.maximum(quantize(h, bits), 2.0 ** -bits)
    check_exact(g, h, bits)
    return g, h


def row_losses(objective: str, y: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """Each row's loss at ``margins``: log loss (binary, multiclass) or squared error (regression)."""
    if objective == "binary":
        m = margins[:, 0]
        return np.logaddexp(0.0, m) - y * m
    if objective == "regression":
        return (margins[:, 0] - y) ** 2
    logp = margins - np.logaddexp.reduce(margins, axis=1, keepdims=True)
    return -logp[np.arange(len(y)), y.astype(np.int64)]


def loss_sum(objective: str, y: np.ndarray, margins: np.ndarray, bits: int | None = None) -> float:
    """The summed loss at ``margins`` (each row's rounded to a multiple of ``2^-bits`` first, if given:
    then the sum is exact and the same however the rows are split over sites)."""
    losses = row_losses(objective, y, margins)
    return float(np.sum(losses if bits is None else quantize(losses, bits)))


def as_float32(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to float32 and back (XGBoost reads features as float32; NaN stays NaN)."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def bin_matrix(x: np.ndarray, cuts: list[np.ndarray]) -> np.ndarray:
    """Each value's bin (rows x features, uint16): 0 if missing, else ``1 + #{cuts <= x}``."""
    x32 = as_float32(x)
    out = np.zeros(x32.shape, dtype=np.int64)
    for f, c in enumerate(cuts):
        col = x32[:, f]
        present = ~np.isnan(col)
        out[present, f] = 1 + np.searchsorted(c, col[present], side="right")
    return out


# ---- the model -------------------------------------------------------------------------------------
@dataclass
class Tree:
    """One regression tree, stored as XGBoost stores it (node 0 the root; -1: no child)."""

    left: list[int] = field(default_factory=lambda: [-1])
    right: list[int] = field(default_factory=lambda: [-1])
    feature: list[int] = field(default_factory=lambda: [0])
    split_bin: list[int] = field(default_factory=lambda: [0])   # j: left iff 1 <= bin <= j (or missing, default_left)
    threshold: list[float] = field(default_factory=lambda: [0.0])  # c_j (internal), the leaf value (leaf)
    default_left: list[bool] = field(default_factory=lambda: [False])
    value: list[float] = field(default_factory=lambda: [0.0])   # eta * weight (every node; a leaf's is its output)
    gain: list[float] = field(default_factory=lambda: [0.0])
    cover: list[float] = field(default_factory=lambda: [0.0])   # hessian sum (0 where the model keeps none)
    depth: list[int] = field(default_factory=lambda: [0])

    def add_children(self, node: int, feature: int, split_bin: int, threshold: float, default_left: bool, gain: float,
                     values: tuple[float, float], covers: tuple[float, float]) -> tuple[int, int]:
        """Split leaf ``node``; the two new leaves' indices."""
        ids = []
        for v, c in zip(values, covers):
            ids.append(len(self.left))
            self.left.append(-1)
            self.right.append(-1)
            self.feature.append(0)
            self.split_bin.append(0)
            self.threshold.append(v)
            self.default_left.append(False)
            self.value.append(v)
            self.gain.append(0.0)
            self.cover.append(c)
            self.depth.append(self.depth[node] + 1)
        self.left[node], self.right[node] = ids
        self.feature[node], self.split_bin[node], self.threshold[node] = feature, split_bin, threshold
        self.default_left[node], self.gain[node] = default_left, gain
        return ids[0], ids[1]

    def leaf_of_bins(self, bins: np.ndarray) -> np.ndarray:
        """The node each binned row reaches (rows x features of :func:`bin_matrix`)."""
        cut = np.asarray(self.split_bin)
        return self._walk(bins, lambda b, n: b == 0, lambda b, n: b <= cut[n])

    def leaf_of_values(self, x: np.ndarray) -> np.ndarray:
        """The node each raw row reaches (float32 comparison ``x < threshold``, as XGBoost scores)."""
        thr = np.asarray(self.threshold, dtype=np.float32)
        return self._walk(as_float32(x).astype(np.float32), lambda v, n: np.isnan(v), lambda v, n: v < thr[n])

    def _walk(self, rows: np.ndarray, missing: Any, left_of: Any) -> np.ndarray:
        """Every row down the tree: at a node, missing values go the default way, the others ``left_of``."""
        node = np.zeros(rows.shape[0], dtype=np.int64)
        left, right = np.asarray(self.left), np.asarray(self.right)
        feat, dl = np.asarray(self.feature), np.asarray(self.default_left)
        for _ in range(max(self.depth) + 1):
            idx = np.nonzero(left[node] >= 0)[0]
            if not idx.size:
                break
            n = node[idx]
            v = rows[idx, feat[n]]
            node[idx] = np.where(np.where(missing(v, n), dl[n], left_of(v, n)), left[n], right[n])
        return node

    def to_dict(self) -> dict[str, list[Any]]:
        """The tree as JSON values."""
        return {k: list(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tree:
        """A tree from :meth:`to_dict`'s values (checked for shape: every list as long as ``left``)."""
        t = cls(**{k: list(d[k]) for k in cls().__dict__})
        n = len(t.left)
        if any(len(v) != n for v in t.__dict__.values()):
            raise ValueError("a tree whose node lists differ in length")
        if any(not -1 <= c < n for c in (*t.left, *t.right)):
            raise ValueError("a tree whose children point outside it")
        return t


# ---- split finding (the coordinator's decision; a key holder's under Paillier) ----------------------
@dataclass(frozen=True)
class SplitRule:
    """The regularisation a split and a leaf obey."""

    reg_lambda: float = 1.0
    gamma: float = 0.0
    min_child_weight: float = 1.0
    eta: float = 0.1

    def weight(self, g: float, h: float) -> float:
        """The leaf's output ``-eta * G / (H + lambda)``."""
        return -self.eta * g / (h + self.reg_lambda)


def best_split(g_hist: np.ndarray, h_hist: np.ndarray, cuts: list[int], features: np.ndarray,
               rule: SplitRule) -> tuple[int, int, bool, float, float, float, float, float]:
    """The best split of one node from its histograms (features x slots, slot 0 = missing).

    ``cuts[f]`` is feature f's number of cut points, ``features`` the features this tree may use.
    Returns (feature, bin j, default_left, gain, G_left, H_left, G_right, H_right); feature -1 if no
    split gains more than ``gamma`` with both children's hessian sums at least ``min_child_weight``.
    The first best in the order feature, bin, missing-right-then-left wins (deterministic)."""
    g_tot, h_tot = float(g_hist[0].sum()), float(h_hist[0].sum())
    lam = rule.reg_lambda
    parent = g_tot * g_tot / (h_tot + lam)
    best: tuple[int, int, bool, float, float, float, float, float] = (-1, 0, False, 0.0, 0.0, 0.0, 0.0, 0.0)
    best_gain = rule.gamma + EPS
    for f in features:
        m = cuts[f]
        if m == 0:
            continue
        gl, hl = np.cumsum(g_hist[f, 1:m + 1]), np.cumsum(h_hist[f, 1:m + 1])  # left = bins 1..j, j = 1..m
        gm, hm = float(g_hist[f, 0]), float(h_hist[f, 0])
        for missing_left in ((False, True) if hm > 0 else (False,)):
            gL, hL = (gl + gm, hl + hm) if missing_left else (gl, hl)
            gR, hR = g_tot - gL, h_tot - hL
            ok = (hL >= rule.min_child_weight) & (hR >= rule.min_child_weight)
            gain = np.where(ok, gL * gL / (hL + lam) + gR * gR / (hR + lam) - parent, -np.inf)
            j = int(np.argmax(gain))
            if gain[j] > best_gain:
                best_gain = float(gain[j])
                best = (int(f), j + 1, missing_left, best_gain, float(gL[j]), float(hL[j]), float(gR[j]), float(hR[j]))
    return best


# ---- bin edges from the pooled fine histogram -------------------------------------------------------
def cuts_from_counts(counts: np.ndarray, bounds: np.ndarray, max_bin: int) -> np.ndarray:
    """At most ``max_bin - 1`` cut points, at fine-grid boundaries near the pooled quantiles.

    ``counts`` are the pooled rows per fine cell (``len(bounds) + 1`` cells, the two outer ones
    open-ended), ``bounds`` the boundaries between them. A cut is placed where the cumulative count
    first reaches the next ``k / max_bin`` quantile, never where it would leave a bin empty."""
    cum = np.cumsum(counts)
    n = float(cum[-1]) if cum.size else 0.0
    out: list[float] = []
    last, k = 0.0, 1
    for i, below in enumerate(cum[:-1]):  # boundary i lies between cell i and cell i + 1
        if below <= last or below >= n:
            continue
        if below >= k * n / max_bin:
            out.append(float(bounds[i]))
            last = float(below)
            while k * n / max_bin <= below:
                k += 1
            if len(out) >= max_bin - 1:
                break
    return np.unique(np.asarray(out, dtype=np.float64))
