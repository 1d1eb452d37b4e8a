"""Pooled test metrics from sums: what each site adds, and the metrics of the totals.

Each site scores the global model on its own held-out test rows and contributes one
vector, summed under the run's protection like the preprocessing statistics
(:class:`Spec` says which, for a label kind). Binary labels, integers
(:data:`core.fixedpoint.COUNTS`)::

    [rows, round(loss sum * 2^20), tp, fp, tn, fn, positives' logit histogram (bins + 2), negatives' (bins + 2)]

The histograms have
``bins`` equal bins of the logit over ``[-LOGIT_RANGE, LOGIT_RANGE]`` and one bin for each
tail (``task.auc_bins``, 8192 by default). From the totals: accuracy, precision,
sensitivity, specificity, F1 and loss exactly (the loss to 1e-6 of a row's loss); ROC AUC
and KS from the histograms. The AUC counts a positive and a negative in the same bin as
half a correct pair, so it is within ``auc_bound = sum_b pos_b * neg_b / (2 P N)`` of the
exact pooled AUC (reported with the metrics; 3e-4 for the bundled credit task).

Multiclass labels (``K`` classes), integers: ``[rows, round(log-loss sum * 2^20), the K x K
confusion matrix (true x predicted), and per class the histograms of logit(p_c) of its rows and
of the others]``: accuracy, macro F1, log loss exactly; the macro one-vs-rest AUC (the mean
over classes present with other classes) from the histograms, within the largest class's bound.

Regression labels, fixed point (:data:`core.fixedpoint.STATS`), on the label's own scale:
``[rows, sum of squared errors, sum of absolute errors, sum y, sum y^2, loss sum]``: MSE, RMSE,
MAE and R^2 = 1 - SSE / (sum y^2 - (sum y)^2 / n) exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.fixedpoint import COUNTS, STATS, Encoding
from tasks.metrics import metrics_from_counts

BINS = 8192
LOGIT_RANGE = 10.0
HEAD = 6  # rows, loss sum, tp, fp, tn, fn
LOSS_SCALE = float(1 << 20)


def size(bins: int = BINS) -> int:
    """Values of a binary metric vector with ``bins`` logit bins."""
    return HEAD + 2 * (bins + 2)


def bin_of(logits: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Histogram bin of each logit: 0 below the range, ``bins + 1`` above it."""
    scaled = (logits + LOGIT_RANGE) / (2 * LOGIT_RANGE) * bins
    return np.clip(np.floor(scaled).astype(np.int64) + 1, 0, bins + 1)


def site_vector(logits: np.ndarray, y: np.ndarray, loss_sum: float, bins: int = BINS) -> np.ndarray:
    """One site's contribution (binary labels ``y`` in {0, 1}, ``logits`` of the positive class)."""
    y = np.asarray(y).astype(bool)
    logits = np.asarray(logits, dtype=np.float64)
    pred = logits >= 0.0  # probability >= 0.5
    b = bin_of(logits, bins)
    head = [len(y), round(loss_sum * LOSS_SCALE), np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & ~y),
            np.sum(~pred & y)]
    pos = np.bincount(b[y], minlength=bins + 2)
    neg = np.bincount(b[~y], minlength=bins + 2)
    return np.concatenate([np.asarray(head, dtype=np.float64), pos, neg]).astype(np.float64)


def metrics(total: np.ndarray, bins: int = BINS) -> dict[str, float]:
    """Pooled metrics of the summed vectors."""
    if total.shape != (size(bins),):
        raise ValueError(f"evaluation sum has shape {total.shape}, expected ({size(bins)},)")
    n, loss_sum, tp, fp, tn, fn = (float(v) for v in total[:HEAD])
    pos = np.rint(total[HEAD: HEAD + bins + 2])
    neg = np.rint(total[HEAD + bins + 2:])
    out = metrics_from_counts({"tp": tp, "fp": fp, "tn": tn, "fn": fn})
    out["loss"] = loss_sum / LOSS_SCALE / n if n > 0 else float("nan")
    out["num_examples"] = n
    p, q = pos.sum(), neg.sum()
    if p > 0 and q > 0:
        neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
        out["auc"] = float((np.dot(pos, neg_below) + 0.5 * np.dot(pos, neg)) / (p * q))
        out["auc_bound"] = float(0.5 * np.dot(pos, neg) / (p * q))
        # KS: max over thresholds (bin edges) of TPR - FPR
        tpr = 1.0 - np.cumsum(pos) / p
        fpr = 1.0 - np.cumsum(neg) / q
        out["ks"] = float(np.max(np.concatenate([[0.0], tpr - fpr])))
    else:
        out["auc"] = out["auc_bound"] = out["ks"] = float("nan")
    return out


def _auc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(AUC, its bound) of two histograms over the same ascending bins; NaN without both classes."""
    p, q = pos.sum(), neg.sum()
    if p <= 0 or q <= 0:
        return float("nan"), float("nan")
    neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((np.dot(pos, neg_below) + 0.5 * np.dot(pos, neg)) / (p * q)), float(0.5 * np.dot(pos, neg) / (p * q))


@dataclass(frozen=True)
class Spec:
    """The test-metric sum of one label kind: its size, encoding, site vector and metrics."""

    kind: str = "binary"
    classes: int = 2
    bins: int = BINS

    @property
    def size(self) -> int:
        """Values of one site's metric vector."""
        if self.kind == "multiclass":
            return 2 + self.classes * self.classes + self.classes * 2 * (self.bins + 2)
        if self.kind == "regression":
            return 6
        return size(self.bins)

    @property
    def encoding(self) -> Encoding:
        """The fixed-point encoding of the vector (counts exactly; regression sums at 40 fraction bits)."""
        return STATS if self.kind == "regression" else COUNTS

    def site_vector(self, outputs: np.ndarray, y: np.ndarray, label_scale: tuple[float, float] = (0.0, 1.0)
                    ) -> np.ndarray:
        """One site's vector from the model's raw outputs on its test rows and their labels
        (binary 0/1, class index, or the regression label on its own scale)."""
        out = np.asarray(outputs, dtype=np.float64)
        if self.kind == "binary":
            loss = float(np.sum(np.logaddexp(0.0, out) - y * out))  # BCE with logits, summed
            return site_vector(out, y, loss, self.bins)
        if self.kind == "regression":
            mean, std = label_scale
            pred = out * std + mean
            err = pred - y
            loss = float(np.sum(((y - mean) / std - out) ** 2))
            return np.array([len(y), np.dot(err, err), np.abs(err).sum(), y.sum(), np.dot(y, y), loss])
        k = self.classes
        logp = out - np.logaddexp.reduce(out, axis=1, keepdims=True)
        yi = np.asarray(y).astype(np.int64)
        loss = float(-logp[np.arange(len(yi)), yi].sum())
        confusion = np.zeros((k, k))
        np.add.at(confusion, (yi, np.argmax(out, axis=1)), 1.0)
        logit = logp - np.log(-np.expm1(np.minimum(logp, -1e-12)))  # log p - log(1 - p)
        hists = []
        for c in range(k):
            b = bin_of(logit[:, c], self.bins)
            hists += [np.bincount(b[yi == c], minlength=self.bins + 2), np.bincount(b[yi != c], minlength=self.bins + 2)]
        return np.concatenate([[len(yi), round(loss * LOSS_SCALE)], confusion.ravel(), *hists]).astype(np.float64)

    def metrics(self, total: np.ndarray) -> dict[str, float]:
        """Pooled metrics of the summed vectors."""
        if total.shape != (self.size,):
            raise ValueError(f"evaluation sum has shape {total.shape}, expected ({self.size},)")
        if self.kind == "binary":
            return metrics(total, self.bins)
        if self.kind == "regression":
            n, sse, sae, sy, syy, loss = (float(v) for v in total)
            sst = syy - sy * sy / n if n > 0 else float("nan")
            return {"mse": sse / n, "rmse": float(np.sqrt(sse / n)), "mae": sae / n,
                    "r2": 1.0 - sse / sst if sst > 0 else float("nan"), "loss": loss / n, "num_examples": n}
        k = self.classes
        n, loss = float(total[0]), float(total[1]) / LOSS_SCALE
        confusion = np.rint(total[2: 2 + k * k]).reshape(k, k)
        tp = np.diag(confusion)
        f1 = [2 * tp[c] / (confusion[c].sum() + confusion[:, c].sum()) for c in range(k)
              if confusion[c].sum() + confusion[:, c].sum() > 0]
        aucs, bounds = [], []
        base = 2 + k * k
        for c in range(k):
            pos = np.rint(total[base + 2 * c * (self.bins + 2): base + (2 * c + 1) * (self.bins + 2)])
            neg = np.rint(total[base + (2 * c + 1) * (self.bins + 2): base + (2 * c + 2) * (self.bins + 2)])
            auc, bound = _auc(pos, neg)
            if np.isfinite(auc):
                aucs.append(auc)
                bounds.append(bound)
        macro_auc = float(np.mean(aucs)) if aucs else float("nan")
        return {"accuracy": float(tp.sum() / n) if n > 0 else float("nan"), "macro_f1": float(np.mean(f1)),
                "f1": float(np.mean(f1)), "macro_auc": macro_auc, "auc": macro_auc,
                "auc_bound": float(max(bounds)) if bounds else float("nan"), "loss": loss / n if n > 0 else float("nan"),
                "num_examples": n}
