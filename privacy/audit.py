"""Privacy audit: membership inference against a trained global model.

Does the final model reveal whether a given row was in some site's training data? Two
attacks, both black-box on the model's loss, both scored on members
(rows the sites trained on) and non-members (held-out test rows never trained on):

* **loss threshold** (Yeom et al. 2018): a row is called a member when its loss is low.
  No attacker training; the baseline every audit reports.
* **offline LiRA** (Carlini et al. 2022, "Membership Inference Attacks From First
  Principles", the offline variant): ``K`` reference models are trained on random halves
  of a *population* set disjoint from members and the evaluation non-members (the other
  half of the test rows). For each audited row the attacker fits a Gaussian to the
  reference models' logit-scaled confidence in its true label and scores the target
  model's confidence by how far it lies above that distribution: calibrating per row
  removes "easy" rows that every model gets right.

Reported: attack AUC (0.5 = no better than chance) and TPR at 1 % FPR (Carlini et al.'s
low-FPR view: does the attack confidently identify *some* members?). A model trained with
DP-SGD at small epsilon must show AUC close to 0.5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from tasks.base import Split

#: Trains a fresh reference model on a split; returns it (the task's own recipe).
TrainReference = Callable[[Split, int], nn.Module]


@dataclass(frozen=True)
class AttackResult:
    """One membership-inference attack's figures: AUC with its 95% interval, TPR at 1% FPR."""

    auc: float
    tpr_at_1pct_fpr: float
    auc_ci95: tuple[float, float]

    def as_dict(self) -> dict[str, object]:
        """The figures as results.json holds them."""
        return {"auc": self.auc, "auc_ci95": list(self.auc_ci95), "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr}


def score_attack(scores: np.ndarray, is_member: np.ndarray, bootstrap: int = 200, seed: int = 0) -> AttackResult:
    """AUC (with a 95 % bootstrap interval: audits are small samples) and TPR at FPR <= 1 %
    of membership scores (higher = more likely a member)."""
    fpr, tpr, _ = roc_curve(is_member, scores)
    rng = np.random.default_rng(seed)
    members, others = np.flatnonzero(is_member == 1), np.flatnonzero(is_member == 0)
    aucs = []
    for _ in range(bootstrap):  # resample members and non-members separately
        idx = np.r_[rng.choice(members, members.size), rng.choice(others, others.size)]
        aucs.append(roc_auc_score(is_member[idx], scores[idx]))
    low, high = (np.percentile(aucs, [2.5, 97.5]) if aucs else (np.nan, np.nan))
    return AttackResult(float(roc_auc_score(is_member, scores)), float(tpr[fpr <= 0.01].max(initial=0.0)),
                        (float(low), float(high)))


@torch.no_grad()
def true_label_confidence(model: nn.Module, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (BCE loss, logit-scaled confidence in the true label ``log p/(1-p)``)."""
    model.eval()
    logits = model(split.x).double()
    signed = torch.where(split.y > 0.5, logits, -logits)  # logit of the true label's probability
    loss = nn.functional.softplus(-signed)
    return loss.numpy(), signed.numpy()


def capped_rows(split: Split, limit: int, seed: int) -> Split:
    """At most ``limit`` rows of ``split``, drawn at random (all of them if it is smaller)."""
    if len(split) <= limit:
        return split
    return split.take(np.sort(np.random.default_rng(seed).choice(len(split), limit, replace=False)))


def loss_threshold(model: nn.Module, members: Split, non_members: Split) -> AttackResult:
    """Yeom et al.'s attack: score = -loss."""
    loss_in, _ = true_label_confidence(model, members)
    loss_out, _ = true_label_confidence(model, non_members)
    labels = np.r_[np.ones(len(loss_in)), np.zeros(len(loss_out))]
    return score_attack(-np.r_[loss_in, loss_out], labels)


def offline_lira(model: nn.Module, members: Split, non_members: Split, population: Split,
                 train_reference: TrainReference, references: int = 8, seed: int = 0,
                 train_size: int | None = None) -> AttackResult:
    """Offline LiRA with ``references`` models, each trained on a random ``train_size`` rows
    (default: half) of ``population``, as the target was trained on its members."""
    audited = Split(torch.cat([members.x, non_members.x]), torch.cat([members.y, non_members.y]))
    rng = np.random.default_rng(seed)
    ref_conf = []
    for _k in range(references):
        size = min(len(population) // 2, train_size or len(population))
        half = np.sort(rng.choice(len(population), size, replace=False))
        ref = train_reference(population.take(half), int(rng.integers(2**31)))
        ref_conf.append(true_label_confidence(ref, audited)[1])
    conf = np.stack(ref_conf)  # references x rows
    mu = conf.mean(0)
    sd = np.maximum(conf.std(0), 1e-3) if references > 1 else np.full(conf.shape[1], 1.0)
    _, target = true_label_confidence(model, audited)
    scores = norm.logcdf(target, loc=mu, scale=sd)  # one-sided: target more confident than OUT models
    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    return score_attack(scores, labels)


def audit(model: nn.Module, members: Split, held_out: Split, train_reference: TrainReference | None = None,
          references: int = 8, seed: int = 0, train_size: int | None = None, max_rows: int = 5000) -> dict[str, object]:
    """Run the attacks on ``model``; ``held_out`` is split into evaluation non-members and
    the LiRA population. Members and non-members are each capped at ``max_rows`` (AUC and
    TPR at a fixed FPR do not depend on the two sets' sizes being equal; more rows give a
    tighter interval). Returns the figures ``results.json`` records under ``audit``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(held_out))
    evaluation, population = held_out.take(np.sort(order[: len(order) // 2])), held_out.take(np.sort(order[len(order) // 2:]))
    m, n = capped_rows(members, max_rows, seed), capped_rows(evaluation, max_rows, seed + 1)
    out: dict[str, object] = {"members": len(m), "non_members": len(n), "loss_threshold": loss_threshold(model, m, n).as_dict()}
    if train_reference is not None and references > 0:
        out["offline_lira"] = offline_lira(model, m, n, population, train_reference, references, seed,
                                           train_size).as_dict()
        out["references"] = references
    attacks = [v for k, v in out.items() if isinstance(v, dict)]
    out["max_auc"] = max(a["auc"] for a in attacks)  # type: ignore[index]
    return out
