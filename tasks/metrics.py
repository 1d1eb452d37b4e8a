"""Binary-classification metrics used by every task.

All functions take plain numpy arrays: ``y_true`` in {0, 1} and ``scores`` the predicted
probability of class 1. Threshold-dependent metrics use ``threshold`` (0.5 by default).
Undefined values (AUC on a single-class set) are returned as ``nan`` and never replaced by
an invented number; callers that must send metrics over the wire use :func:`site_summary`,
which carries counts from which pooled metrics are computed exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def _sk():  # type: ignore[no-untyped-def]
    """``sklearn.metrics``, imported on first use: it costs every ClientApp process 1.5 s."""
    from sklearn import metrics

    return metrics


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties counted half): equal to ``sklearn.metrics.roc_auc_score``
    for binary labels, without its input validation (which costs a site 2 ms per message).
    Callers check :func:`rankable` first."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    pos = np.add.reduceat(y.astype(np.float64), starts)
    neg = np.add.reduceat((~y).astype(np.float64), starts)
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def confusion_counts(
    y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5
) -> dict[str, int]:
    """Return the confusion counts ``tp``, ``fp``, ``tn``, ``fn`` at ``threshold``."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(scores) >= threshold
    return {
        "tp": int(np.sum(pred & y)),
        "fp": int(np.sum(pred & ~y)),
        "tn": int(np.sum(~pred & ~y)),
        "fn": int(np.sum(~pred & y)),
    }


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def metrics_from_counts(counts: Mapping[str, float]) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, precision and F1 from confusion counts."""
    tp, fp, tn, fn = (float(counts[k]) for k in ("tp", "fp", "tn", "fn"))
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "f1": f1,
    }


def rankable(y: np.ndarray, scores: np.ndarray) -> bool:
    """Whether ranking metrics (AUC, KS) are defined: both classes present and every score finite
    (a diverged model's NaN scores make them undefined: NaN, written as null)."""
    return bool(y.size > 0 and y.min() != y.max() and np.all(np.isfinite(scores)))


def ks_statistic(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic: max distance between the score CDFs of the classes.

    Equals ``max(TPR - FPR)`` over all thresholds, the form credit-risk teams report.
    """
    y = np.asarray(y_true)
    if y.min() == y.max():
        return float("nan")
    fpr, tpr, _ = _sk().roc_curve(y, scores)
    return float(np.max(tpr - fpr))


def binary_metrics(
    y_true: np.ndarray, scores: np.ndarray, loss: float, threshold: float = 0.5
) -> dict[str, float]:
    """All metrics of a scored binary test set.

    Returns ``auc``, ``pr_auc``, ``ks``, ``accuracy``, ``f1``, ``precision``,
    ``sensitivity``, ``specificity``, ``loss`` and ``num_examples``.
    """
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    both_classes = rankable(y, s)
    out: dict[str, float] = {
        "auc": roc_auc(y, s) if both_classes else float("nan"),
        "pr_auc": float(_sk().average_precision_score(y, s)) if both_classes else float("nan"),
        "ks": ks_statistic(y, s) if both_classes else float("nan"),
    }
    out.update(metrics_from_counts(confusion_counts(y, s, threshold)))
    out["loss"] = float(loss)
    out["num_examples"] = float(y.size)
    return out


def group_metrics(
    y_true: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    names: Sequence[str],
    threshold: float = 0.5,
) -> dict[str, float]:
    """Per-group accuracy and AUC (e.g. per hospital), plus their unweighted means.

    Keys: ``accuracy_<name>``, ``auc_<name>`` for each group present, and
    ``accuracy_site_mean`` / ``auc_site_mean`` (the mean over groups, as FLamby reports).
    """
    out: dict[str, float] = {}
    accs, aucs = [], []
    for code, name in enumerate(names):
        mask = groups == code
        if not mask.any():
            continue
        y, s = y_true[mask], scores[mask]
        acc = metrics_from_counts(confusion_counts(y, s, threshold))["accuracy"]
        auc = roc_auc(y, s) if rankable(y, s) else float("nan")
        out[f"accuracy_{name}"] = acc
        out[f"auc_{name}"] = auc
        accs.append(acc)
        if not math.isnan(auc):
            aucs.append(auc)
    if accs:
        out["accuracy_site_mean"] = float(np.mean(accs))
    if aucs:
        out["auc_site_mean"] = float(np.mean(aucs))
    return out


def site_summary(
    y_true: np.ndarray, scores: np.ndarray, loss: float, threshold: float = 0.5
) -> dict[str, float]:
    """What a site reports after federated evaluation: always the same keys.

    Confusion counts (summed by the server into exact pooled metrics), the mean loss, and
    the site's AUC with ``auc_weight`` = number of examples when the AUC is defined, else 0.
    """
    y = np.asarray(y_true)
    both = rankable(y, scores)
    out: dict[str, float] = {k: float(v) for k, v in confusion_counts(y, scores, threshold).items()}
    out["loss"] = float(loss)
    out["auc"] = roc_auc(y, scores) if both else 0.0
    out["auc_weight"] = float(y.size) if both else 0.0
    return out


#: The keys of a site's validation summary, by label kind (a reply must carry one kind's keys).
SUMMARY_KEYS: dict[str, tuple[str, ...]] = {
    "binary": ("tp", "fp", "tn", "fn", "loss", "auc", "auc_weight"),
    "multiclass": ("loss", "correct"),
    "regression": ("loss", "sse"),
}


def summary_for(kind: str, y: np.ndarray, scores: np.ndarray, loss: float, threshold: float = 0.5) -> dict[str, float]:
    """A site's validation summary for its label kind: :func:`site_summary` (binary); the loss and
    the count of correct predictions (multiclass); the loss and the sum of squared errors (regression,
    in the units the model predicts)."""
    if kind == "multiclass":
        correct = float(np.sum(np.argmax(scores, axis=1) == y)) if len(y) else 0.0
        return {"loss": float(loss), "correct": correct}
    if kind == "regression":
        return {"loss": float(loss), "sse": float(np.sum((np.asarray(scores) - y) ** 2))}
    return site_summary(y.astype(np.int64), scores, loss, threshold)


def pool_site_summaries(
    summaries: Sequence[Mapping[str, float]], weights: Sequence[float]
) -> dict[str, float]:
    """Combine :func:`summary_for` outputs: summed counts, weighted loss and site AUC (binary),
    accuracy (multiclass), mean squared error (regression)."""
    total = float(sum(weights))
    out: dict[str, float] = {}
    if all("tp" in s for s in summaries):
        counts = {k: float(sum(s[k] for s in summaries)) for k in ("tp", "fp", "tn", "fn")}
        out.update(metrics_from_counts(counts))
        auc_w = sum(s["auc_weight"] for s in summaries)
        out["auc_site_weighted"] = _ratio(sum(s["auc"] * s["auc_weight"] for s in summaries), auc_w)
    elif all("correct" in s for s in summaries):
        out["accuracy"] = _ratio(sum(s["correct"] for s in summaries), total)
    elif all("sse" in s for s in summaries):
        out["mse"] = _ratio(sum(s["sse"] for s in summaries), total)
    out["loss"] = _ratio(sum(s["loss"] * w for s, w in zip(summaries, weights)), total)
    out["num_examples"] = total
    return out

