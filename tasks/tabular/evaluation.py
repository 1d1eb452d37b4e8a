"""Pooled test metrics from sums: what each site adds, and the metrics of the totals.

Each site scores the global model on its own held-out test rows and contributes one
vector of sums (binary labels)::

    [rows, loss sum, tp, fp, tn, fn, positives' logit histogram (BINS + 2), negatives' (BINS + 2)]

summed under the run's protection like the preprocessing statistics. The histograms have
``BINS`` equal bins of the logit over ``[-LOGIT_RANGE, LOGIT_RANGE]`` and one bin for each
tail. From the totals: accuracy, precision, sensitivity, specificity, F1 and loss exactly;
ROC AUC and KS from the histograms. The AUC counts a positive and a negative in the same
bin as half a correct pair, so it is within ``auc_bound = sum_b pos_b * neg_b / (2 P N)``
of the exact pooled AUC (reported with the metrics; about 1e-4 for the bundled tasks).
"""

from __future__ import annotations

import numpy as np

from tasks.metrics import metrics_from_counts

BINS = 8192
LOGIT_RANGE = 10.0
HEAD = 6  # rows, loss sum, tp, fp, tn, fn
SIZE = HEAD + 2 * (BINS + 2)


def bin_of(logits: np.ndarray) -> np.ndarray:
    """Histogram bin of each logit: 0 below the range, BINS + 1 above it."""
    scaled = (logits + LOGIT_RANGE) / (2 * LOGIT_RANGE) * BINS
    return np.clip(np.floor(scaled).astype(np.int64) + 1, 0, BINS + 1)


def site_vector(logits: np.ndarray, y: np.ndarray, loss_sum: float) -> np.ndarray:
    """One site's contribution (binary labels ``y`` in {0, 1}, ``logits`` of the positive class)."""
    y = np.asarray(y).astype(bool)
    pred = logits >= 0.0  # probability >= 0.5
    b = bin_of(np.asarray(logits, dtype=np.float64))
    head = [len(y), loss_sum, np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & ~y), np.sum(~pred & y)]
    pos = np.bincount(b[y], minlength=BINS + 2)
    neg = np.bincount(b[~y], minlength=BINS + 2)
    return np.concatenate([np.asarray(head, dtype=np.float64), pos, neg]).astype(np.float64)


def metrics(total: np.ndarray) -> dict[str, float]:
    """Pooled metrics of the summed vectors."""
    if total.shape != (SIZE,):
        raise ValueError(f"evaluation sum has shape {total.shape}, expected ({SIZE},)")
    n, loss_sum, tp, fp, tn, fn = (float(v) for v in total[:HEAD])
    pos = np.rint(total[HEAD: HEAD + BINS + 2])
    neg = np.rint(total[HEAD + BINS + 2:])
    out = metrics_from_counts({"tp": tp, "fp": fp, "tn": tn, "fn": fn})
    out["loss"] = loss_sum / n if n > 0 else float("nan")
    out["num_examples"] = n
    p, q = pos.sum(), neg.sum()
    if p > 0 and q > 0:
        neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
        out["auc"] = float((np.dot(pos, neg_below) + 0.5 * np.dot(pos, neg)) / (p * q))
        out["auc_bound"] = float(0.5 * np.dot(pos, neg) / (p * q))
        # KS: max over thresholds of TPR - FPR, with thresholds at bin edges (scores above the edge)
        tpr = 1.0 - np.cumsum(pos) / p
        fpr = 1.0 - np.cumsum(neg) / q
        out["ks"] = float(np.max(np.concatenate([[0.0], tpr - fpr])))
    else:
        out["auc"] = out["auc_bound"] = out["ks"] = float("nan")
    return out
