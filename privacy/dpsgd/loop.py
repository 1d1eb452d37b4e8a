"""A site's private round: the loop of private steps, and the round's ledger kept and checked."""

from __future__ import annotations

import time
from logging import INFO

import torch
from flwr.app import ConfigRecord, Context
from flwr.common import log
from torch import nn

from core import recordview
from core.replies import ReplyError, SiteRefusal
from privacy.accountant import STATE_KEY, PrivacyLedger
from privacy.base import SiteLimits
from privacy.dpsgd.budget import check_budget, check_cap
from privacy.dpsgd.calibration import steps_per_epoch
from privacy.dpsgd.config import DPSGDParams
from privacy.dpsgd.sampler import poisson_batches
from privacy.dpsgd.step import PrivateStep
from privacy.site_ledger import DATA_LEDGERS, Release, SiteLedger, digest_inputs, digest_state
from tasks.training import Augment, LocalTrainConfig, Penalty, make_optimizer


def train_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: LocalTrainConfig,
    params: DPSGDParams,
    generator: torch.Generator,
    penalty: Penalty | None = None,
    max_steps: int | None = None,
    augment: Augment | None = None,
) -> dict[str, float]:
    """Train ``model`` in place with DP-SGD for ``cfg.epochs`` epochs of Poisson batches.

    Returns the mean training loss, the steps taken and the share of examples whose
    gradient was clipped. ``max_steps`` stops early (a straggler's partial work): only the
    steps taken are accounted. Deterministic given ``generator``.
    """
    model.train()
    n = x.shape[0]
    optimizer = make_optimizer(model, cfg)
    step = PrivateStep(model, params, n, generator, cfg.loss)
    budget = steps_per_epoch(params.sample_rate) * cfg.epochs if max_steps is None else max_steps
    total, seen, clipped, steps = 0.0, 0, 0, 0
    try:
        for idx in poisson_batches(n, params.sample_rate, budget, generator):
            xb = x[idx] if augment is None or not idx.numel() else augment(x[idx], generator)
            loss, n_clipped = step.set_grads(xb, y[idx])  # sets every p.grad: no zero_grad needed
            if penalty is not None:
                extra = torch.autograd.grad(penalty(model), step.params, allow_unused=True)
                for p, e in zip(step.params, extra, strict=True):
                    if e is not None:
                        assert p.grad is not None  # set by step.set_grads above
                        p.grad += e
            optimizer.step()
            total += loss
            seen += idx.numel()
            clipped += n_clipped
            steps += 1
    finally:
        step.close()
    return {"train_loss": total / max(1, seen), "local_steps": float(steps), "clipped_share": clipped / max(1, seen)}


#: Key of the ConfigRecord in a training reply that reports the site's privacy spending.
REPLY_KEY = "privacy"


def private_round(
    context: Context,
    params: DPSGDParams,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: LocalTrainConfig,
    generator: torch.Generator,
    penalty: Penalty | None = None,
    max_steps: int | None = None,
    augment: Augment | None = None,
    ledger: SiteLedger | None = None,
    server_round: int = 0,
    job: str = "",
    limits: SiteLimits | None = None,
) -> tuple[dict[str, float], ConfigRecord]:
    """One round of DP-SGD at a site. Raises :class:`BudgetExhausted` (before touching the
    model) if the round would exceed the target. Returns the training stats and the reply's
    privacy record (cumulative epsilon and what it was computed from).

    With ``ledger`` (the site's own file, :mod:`privacy.site_ledger`) the release is written
    there before this returns, a byte-identical replay of a recorded release costs nothing,
    and any other update that would pass the target is refused and discarded. Without it the
    ledger lives in ``context.state`` (one process, no disk)."""
    planned = steps_per_epoch(params.sample_rate) * cfg.epochs if max_steps is None else max_steps
    if ledger is None:
        own = PrivacyLedger.from_record(recordview.config(context.state, STATE_KEY), params.accountant)
        check_budget(own, params, planned)
        stats = train_private(model, x, y, cfg, params, generator, penalty, max_steps, augment)
        own = own.with_steps(params.noise_multiplier, params.sample_rate, int(stats["local_steps"]))
        context.state[STATE_KEY] = own.to_record()
    else:
        own = ledger.ledger(job)
        mechanism = (params.noise_multiplier, params.sample_rate, params.max_grad_norm, planned, cfg)
        inputs = digest_inputs(model, generator, mechanism)
        prior = ledger.released(server_round, inputs)
        if prior is None:
            if limits is not None and limits.one_release_per_round and ledger.round_releases(server_round, job):
                raise SiteRefusal(ReplyError.POLICY, f"round {server_round} of this job was released already, from "
                                  "other inputs; this site's policy allows one release per round")
            check_budget(own, params, planned)
            check_cap(ledger, params, planned)
        stats = train_private(model, x, y, cfg, params, generator, penalty, max_steps, augment)
        update = digest_state(model.state_dict())
        if prior is None or prior.update != update:
            steps = int(stats["local_steps"])
            check_budget(own, params, steps)  # a replay that came out different is a new release
            check_cap(ledger, params, steps)
            ledger.record(Release(server_round, params.noise_multiplier, params.sample_rate, steps, inputs, update,
                                  time=time.time(), job=job))
            own = ledger.ledger(job)
        else:
            log(INFO, "round %s: the same update as this site's recorded release; no new privacy spend", server_round)
    epsilon = own.epsilon(params.delta)
    record = ConfigRecord({
        "epsilon": epsilon, "delta": params.delta, "target_epsilon": params.target_epsilon,
        "noise_multiplier": params.noise_multiplier, "sample_rate": params.sample_rate,
        "max_grad_norm": params.max_grad_norm, "steps": int(stats["local_steps"]), "total_steps": own.steps,
        "accountant": params.accountant, "clipped_share": float(stats["clipped_share"]),
    })
    if ledger is not None and ledger.store.folder.parent.name == DATA_LEDGERS:  # a deployed site: its rows, every job
        record["job_epsilon"] = epsilon
        # what the site has spent on these rows in every job (a byte-identical replay adds nothing): its guarantee
        record["epsilon"] = record["data_epsilon"] = ledger.ledger().epsilon(params.delta)
    return stats, record
