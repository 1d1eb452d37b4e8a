"""Personalization (``strategy.personal``), both halves: models that fit each site.

Hospitals and banks differ in case mix, so the best model for one site is rarely the global
one. Each option is a layer over any strategy's site half (:mod:`strategies.site`); what is
personal is kept in the site's :class:`~core.state.SiteStore` and never sent:

``fedper``    the head (the last layer with weights) stays at the site (Arivazhagan et al. 2019):
              the site trains from the global body and its own head, and its reply carries
              the *received* head back unchanged (a zero update), so what the coordinator
              aggregates is the body alone and the record's layout stays that of the model;
``fedbn``     the same with the normalization layers' weights (Li et al., ICLR 2021; fedsilo's
              models use GroupNorm where they normalize);
``ditto``     a personal model ``v`` trained each round after the global update, on
              ``loss(v) + lambda/2 ||v - w_global||^2`` (Li et al., ICML 2021), the global model
              being the one received that round;
``finetune``  the final global model trained ``personal_epochs`` more epochs at each site.

With ``strategy.personal_select`` (the default) a site keeps its personal model only if it beats
the global model on the site's own validation rows (loss); otherwise it keeps the global model,
and the results say so (``personalized: false``, the personal model's scores under
``personal_not_kept``). After the last round the coordinator sends every site the final global model
(``query.fedsilo_personal``, :func:`evaluate_sites`); each site scores the global model and its
personal model on its own test rows and replies with the two summaries only (counts, loss,
AUC: what federated evaluation reveals). ``results.json``'s ``personalization`` section, the
report and ``fedsilo compare`` show them side by side, per site.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from torch import nn
from typing_extensions import override

from core.sites import SITE_KEY, site_label
from strategies.fedprox import ProximalTerm
from strategies.site import SiteRound, StrategySite, model_part
from tasks.data import Split
from tasks.training import Penalty

MESSAGE_TYPE = "query.fedsilo_personal"
PERSONAL = "personal"   # the SiteStore entry of FedPer/FedBN's layers and Ditto's model
NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)


class PersonalError(ValueError):
    """A personalization option that does not fit the model (named reason)."""


def head_keys(model: nn.Module) -> list[str]:
    """The state keys of the last module that has weights (the classifier head)."""
    last = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = name
    if last is None:
        raise PersonalError("strategy.personal=fedper: the model has no layer with weights")
    keys = [k for k in model.state_dict() if k.rsplit(".", 1)[0] == last]
    if len(keys) == len(model.state_dict()):
        raise PersonalError("strategy.personal=fedper: the model is all head (a logistic regression): nothing "
                            "would be shared; use task.model=mlp, or personal=ditto or finetune")
    return keys


def norm_keys(model: nn.Module) -> list[str]:
    """The state keys of the model's normalization layers."""
    names = [name for name, m in model.named_modules() if isinstance(m, NORM_LAYERS)]
    keys = [k for k in model.state_dict() if k.rsplit(".", 1)[0] in names]
    if not keys:
        raise PersonalError("strategy.personal=fedbn: the model has no normalization layers (only the CNN of "
                            "task=images/medical_imaging has: GroupNorm); use personal=fedper, ditto or finetune")
    return keys


class PersonalLayers(StrategySite):
    """FedPer / FedBN: the layers ``keys(model)`` stay at the site."""

    def __init__(self, inner: StrategySite, which: str) -> None:
        self.inner, self.which = inner, which

    def keys(self, model: nn.Module) -> list[str]:
        """The names of ``model``'s arrays that stay at the site (FedPer: the head; FedBN: the normalization layers)."""
        return head_keys(model) if self.which == "fedper" else norm_keys(model)

    @override
    def start(self, glob: dict[str, torch.Tensor], model: nn.Module, rnd: SiteRound) -> Penalty | None:
        keys = self.keys(model)
        penalty = self.inner.start(glob, model, rnd)
        own = rnd.store.load(PERSONAL, rnd.server_round) if rnd.store is not None else None
        if own is not None:
            model.load_state_dict({k: own[k] for k in keys}, strict=False)
        return penalty

    @override
    def finish(self, model: nn.Module, glob: dict[str, torch.Tensor], stats: dict[str, float],
               rnd: SiteRound) -> dict[str, torch.Tensor]:
        keys = self.keys(model)
        state = model.state_dict()
        if rnd.store is not None:
            rnd.store.save(PERSONAL, rnd.server_round, {k: state[k] for k in keys})
        model.load_state_dict({k: glob[k] for k in keys}, strict=False)  # the received layers go back: no update
        return self.inner.finish(model, glob, stats, rnd)

    @override
    def personal_model(self, glob: dict[str, torch.Tensor], model: nn.Module, rnd: SiteRound) -> bool:
        self.inner.personal_model(glob, model, rnd)
        own = rnd.store.load(PERSONAL, rnd.server_round) if rnd.store is not None else None
        if own is None:
            return False
        model.load_state_dict({k: own[k] for k in self.keys(model)}, strict=False)
        return True


class Ditto(StrategySite):
    """Ditto: a personal model regularized towards the global model received each round."""

    def __init__(self, inner: StrategySite, lam: float, epochs: int, lr: float) -> None:
        self.inner, self.lam, self.epochs, self.lr = inner, lam, epochs, lr

    @override
    def start(self, glob: dict[str, torch.Tensor], model: nn.Module, rnd: SiteRound) -> Penalty | None:
        return self.inner.start(glob, model, rnd)

    @override
    def finish(self, model: nn.Module, glob: dict[str, torch.Tensor], stats: dict[str, float],
               rnd: SiteRound) -> dict[str, torch.Tensor]:
        reply = self.inner.finish(model, glob, stats, rnd)
        if rnd.store is None or rnd.train is None:
            raise PersonalError("strategy.personal=ditto: the site has no state store or trainer")
        personal = copy.deepcopy(model)
        personal.load_state_dict(model_part(glob, model))     # the anchor: this round's global model
        anchor = ProximalTerm(personal, self.lam) if self.lam > 0 else None
        own = rnd.store.load(PERSONAL, rnd.server_round)
        if own is not None:
            personal.load_state_dict(own)
        rnd.train(personal, anchor, self.epochs, self.lr or rnd.lr)
        rnd.store.save(PERSONAL, rnd.server_round, dict(personal.state_dict()))
        return reply

    @override
    def personal_model(self, glob: dict[str, torch.Tensor], model: nn.Module, rnd: SiteRound) -> bool:
        self.inner.personal_model(glob, model, rnd)
        own = rnd.store.load(PERSONAL, rnd.server_round) if rnd.store is not None else None
        if own is None:
            return False
        model.load_state_dict(own)
        return True


class FineTune(StrategySite):
    """Local fine-tuning of the final global model (nothing changes during the rounds)."""

    def __init__(self, inner: StrategySite, epochs: int, lr: float) -> None:
        self.inner, self.epochs, self.lr = inner, epochs, lr

    @override
    def start(self, glob: dict[str, torch.Tensor], model: nn.Module, rnd: SiteRound) -> Penalty | None:
        return self.inner.start(glob, model, rnd)

    @override
    def finish(self, model: nn.Module, glob: dict[str, torch.Tensor], stats: dict[str, float],
               rnd: SiteRound) -> dict[str, torch.Tensor]:
        return self.inner.finish(model, glob, stats, rnd)

    @override
    def personal_model(self, glob: dict[str, torch.Tensor], model: nn.Module, rnd: SiteRound) -> bool:
        self.inner.personal_model(glob, model, rnd)
        if rnd.train is None:
            raise PersonalError("strategy.personal=finetune: the site has no trainer")
        rnd.train(model, None, self.epochs, self.lr or rnd.lr)
        return True


def wrap(inner: StrategySite, s: Any) -> StrategySite:
    """``inner`` with the personalization layer ``s.personal`` (a StrategyConfig) names."""
    if s.personal in ("fedper", "fedbn"):
        return PersonalLayers(inner, s.personal)
    if s.personal == "ditto":
        return Ditto(inner, s.ditto_lambda, s.personal_epochs, s.personal_lr)
    if s.personal == "finetune":
        return FineTune(inner, s.personal_epochs, s.personal_lr)
    return inner


# ---- coordinator half ---------------------------------------------------------------------
def _prefixed(metrics: Any, prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _means(sites: dict[str, Any], part: str | None = None) -> dict[str, dict[str, float]]:
    """The mean over sites of each metric, global and personal (of ``part``, e.g. validation)."""
    out: dict[str, dict[str, float]] = {}
    for which in ("global", "personal"):
        rows = [(s[part] if part else s)[which] for s in sites.values()]
        out[which] = {k: float(np.mean([r[k] for r in rows if k in r]))
                      for k in ("accuracy", "auc", "loss") if any(k in r for r in rows)}
    return out


Scores = Callable[[nn.Module, Split], dict[str, float]]


def site_scores(half: StrategySite, rnd: SiteRound, glob: dict[str, torch.Tensor], model: nn.Module, rows: Split,
                val: Split, scores: Scores, select: bool) -> dict[str, float]:
    """A site's answer to :func:`evaluate_sites`: the final global model and the site's personal model (the
    strategy's ``personal_model``), each on its own held-out ``rows`` and on its validation rows ``val``
    (for choosing hyper-parameters without test rows). With ``select`` the site keeps the global model when its
    validation rows prefer it (its raw personal scores reported too). Summaries only: no row leaves."""
    model.load_state_dict(model_part(glob, model))
    out: dict[str, float] = {"rows": float(len(rows)), "val_rows": float(len(val))}
    global_test, global_val = scores(model, rows), scores(model, val)
    out.update({f"global/{k}": v for k, v in global_test.items()})
    out.update({f"val-global/{k}": v for k, v in global_val.items()})
    own = half.personal_model(glob, model, rnd)
    test, valid = scores(model, rows), scores(model, val)
    if own and select and valid.get("loss", 0.0) > global_val.get("loss", float("inf")):
        out.update({f"raw-personal/{k}": v for k, v in test.items()})
        own, test, valid = False, global_test, global_val
    out["personalized"] = float(own)
    out.update({f"personal/{k}": v for k, v in test.items()})
    out.update({f"val-personal/{k}": v for k, v in valid.items()})
    return out


def evaluate_sites(grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float,
                   names: dict[int, str] | None = None) -> dict[str, Any]:
    """Ask every connected site to score the final global model and its personal model on its
    own test rows (and on its validation rows, for tuning without test rows);
    ``{"sites": {site: {"global": {...}, "personal": {...}, "rows": n, "validation": {...}}}, "mean": ...,
    "validation_mean": ...}``.

    A site that fails or replies without both summaries is logged and left out."""
    nodes = sorted(grid.get_node_ids())
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config.items()))}),
                        dst_node_id=n, message_type=MESSAGE_TYPE) for n in nodes]
    sites: dict[str, Any] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "personal evaluation: node %s failed: %s", node, reply.error.reason)
            continue
        metrics = reply.content.metric_records.get("personal")
        if metrics is None or SITE_KEY not in reply.content.config_records:
            log(WARNING, "personal evaluation: node %s replied without its summaries; left out", node)
            continue
        name = site_label(reply).split(" (node")[0]
        both: dict[str, Any] = {"rows": int(metrics["rows"]), "personalized": bool(metrics["personalized"]),  # type: ignore[arg-type]
                                "validation": {"rows": int(metrics.get("val_rows", 0))}}  # type: ignore[arg-type]
        for which in ("global", "personal"):
            both[which] = _prefixed(metrics, which + "/")
            both["validation"][which] = _prefixed(metrics, f"val-{which}/")
        raw = _prefixed(metrics, "raw-personal/")
        if raw:  # the site kept the global model; its personal model scored this
            both["personal_not_kept"] = raw
        sites[name] = both
    ordered = dict(sorted(sites.items()))
    mean = _means(ordered) if ordered else {}
    if ordered:
        log(INFO, "personal evaluation: mean over %s sites: global accuracy %.4f, personal accuracy %.4f",
            len(ordered), mean["global"].get("accuracy", float("nan")), mean["personal"].get("accuracy", float("nan")))
    return {"sites": ordered, "mean": mean, "validation_mean": _means(ordered, "validation") if ordered else {}}
