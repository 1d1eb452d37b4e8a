"""Pooled test metrics from sums: what each site adds, and the metrics of the totals.

Each site scores the global model on its own held-out test rows and contributes one
vector of integers (binary labels; :data:`core.fixedpoint.COUNTS`)::

    [rows, round(loss sum * 2^20), tp, fp, tn, fn, positives' logit histogram (bins + 2), negatives' (bins + 2)]

summed under the run's protection like the preprocessing statistics. The histograms have
``bins`` equal bins of the logit over ``[-LOGIT_RANGE, LOGIT_RANGE]`` and one bin for each
tail (``task.auc_bins``, 8192 by default). From the totals: accuracy, precision,
sensitivity, specificity, F1 and loss exactly (the loss to 1e-6 of a row's loss); ROC AUC
and KS from the histograms. The AUC counts a positive and a negative in the same bin as
half a correct pair, so it is within ``auc_bound = sum_b pos_b * neg_b / (2 P N)`` of the
exact pooled AUC (reported with the metrics; 3e-4 for the bundled credit task).
"""

from __future__ import annotations

import numpy as np

from tasks.metrics import metrics_from_counts

BINS = 8192
LOGIT_RANGE = 10.0
HEAD = 6  # rows, loss sum, tp, fp, tn, fn
LOSS_SCALE = float(1 << 20)


def size(bins: int = BINS) -> int:
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
