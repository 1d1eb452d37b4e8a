"""DP-SGD local training: the client half of ``privacy=dpsgd``.

One round at one site (Abadi et al. 2016, as Opacus implements it):

* **Poisson sampling**: every step draws each training row independently with
  probability ``q = batch_size / n`` (Opacus' ``UniformWithReplacementSampler``), and an
  epoch is ``int(1/q)`` steps; the sampling is what the accountant's amplification assumes;
* **clipping**: each example's gradient to L2 norm ``max_grad_norm`` (:mod:`privacy.clipping`);
* **noise**: ``N(0, (noise_multiplier * max_grad_norm)^2)`` on the clipped sum, then
  division by the expected batch size ``q * n`` (Opacus' ``loss_reduction="mean"``);
* data-independent terms (FedProx's proximal term, weight decay, momentum) act on the
  privatised gradient: they cost no privacy.

The noise multiplier comes from :func:`site_params`: given, or the smallest one that keeps
the site within ``target_epsilon`` after ``num_rounds`` full rounds. :func:`private_round`
keeps the site's ledger in ``context.state`` and refuses (:func:`check_budget`) a round
that would take the site past its budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.common import log
from torch import nn

from core import recordview
from core.config import check
from core.records import RoundRecord, RunRecord
from core.replies import ReplyError, SiteRefusal
from core.secret_files import SecretFileError
from core.sites import site_label
from core.state import JOB_KEY, SiteStore, is_simulated
from privacy.accountant import ACCOUNTANTS, STATE_KEY, PrivacyLedger, noise_for_budget
from privacy.base import Coordinator, LocalTrainer, PrivacyConfig, PrivacyOption, SiteLimits, task_generator
from privacy.clipping import ENGINES, LayerClipper, LinearClipper, make_clipper
from privacy.site_ledger import DATA_LEDGERS, Release, SiteLedger, data_store, digest_inputs, digest_release, digest_state
from privacy.site_secret import keeps_secret, noise_seed
from tasks.base import Split, Task
from tasks.training import Augment, LocalTrainConfig, Penalty, loss_fn, make_optimizer


class _Strategy(Protocol):
    """What the ledger needs of the strategy it observes (:class:`strategies.fedavg.FedAvg` has it)."""

    def exclude(self, node: int, reason: str) -> None: ...

    def label(self, msg: Message) -> str: ...

#: Error code of a site's reply when the round would exceed its privacy budget.
BUDGET_EXHAUSTED_CODE = int(ReplyError.BUDGET_EXHAUSTED)
BUDGET_EXHAUSTED = "privacy budget exhausted"


@dataclass
class DPSGDConfig(PrivacyConfig):
    """Schema of ``privacy=dpsgd``: example-level DP at every site.

    Each site's epsilon is cumulative over every round it trains in; a site whose next
    round would exceed ``target_epsilon`` does not train.
    """

    name: str = "dpsgd"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # null = derived from target_epsilon over num_rounds x local epochs
    batch_size: int = 0                    # expected Poisson batch size; 0 = the task's batch_size
    accountant: str = "rdp"                # rdp | prv (Opacus accountants)
    engine: str = "auto"                   # per-sample clipping: auto | fast | opacus | functorch


def validate(d: DPSGDConfig) -> None:
    check(d.target_epsilon > 0, "privacy.target_epsilon", d.target_epsilon, "a number > 0")
    check(0 < d.delta < 1, "privacy.delta", d.delta, "0 < delta < 1 (well below 1/rows per site)")
    check(d.max_grad_norm > 0, "privacy.max_grad_norm", d.max_grad_norm, "a number > 0")
    check(d.noise_multiplier is None or d.noise_multiplier > 0, "privacy.noise_multiplier",
          d.noise_multiplier, "null (derived from target_epsilon) or a number > 0")
    check(d.batch_size >= 0, "privacy.batch_size", d.batch_size, "0 (the task's batch_size) or an integer >= 1")
    check(d.accountant in ACCOUNTANTS, "privacy.accountant", d.accountant, f"one of {list(ACCOUNTANTS)}")
    check(d.engine in ENGINES, "privacy.engine", d.engine, f"one of {list(ENGINES)}")


@dataclass(frozen=True)
class DPSGDParams:
    """What the site's DP-SGD needs, resolved from ``privacy.*`` and its data size."""

    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    target_epsilon: float
    accountant: str
    engine: str = "auto"


def sample_rate(batch_size: int, rows: int) -> float:
    """Poisson sampling rate giving ``batch_size`` rows per step on average."""
    if rows <= 0:
        raise ValueError("a site with no training rows cannot run DP-SGD")
    return min(1.0, batch_size / rows)


def steps_per_epoch(rate: float) -> int:
    """Steps in one epoch at Poisson rate ``rate`` (Opacus: ``int(1/rate)``)."""
    return max(1, int(1 / rate))


def noise_multiplier(target_epsilon: float, delta: float, rate: float, planned_steps: int, accountant: str,
                     given: float | None) -> float:
    """``given``, or the smallest multiplier keeping ``planned_steps`` within the budget."""
    if given is not None:
        return float(given)
    return noise_for_budget(float(target_epsilon), float(delta), float(rate), int(planned_steps), accountant)


class BudgetExhausted(RuntimeError):
    """This round would take the site past its target epsilon."""


def check_cap(ledger: SiteLedger, params: DPSGDParams, steps: int) -> None:
    """The site's own cap (policy ``privacy.max_epsilon``) over everything it released from these rows, in
    every job; :class:`BudgetExhausted` if this release would pass it."""
    if ledger.cap is None:
        return
    after = ledger.ledger().with_steps(params.noise_multiplier, params.sample_rate, steps).epsilon(params.delta)
    if after > ledger.cap:
        raise BudgetExhausted(f"{BUDGET_EXHAUSTED}: this site's data set would reach epsilon {after:.3f} over its "
                              f"{len(ledger.jobs())} job(s) > its policy's max_epsilon {ledger.cap:g}")


def check_budget(ledger: PrivacyLedger, params: DPSGDParams, steps: int) -> float:
    """Epsilon after ``steps`` more steps; :class:`BudgetExhausted` if it exceeds the target."""
    after = ledger.with_steps(params.noise_multiplier, params.sample_rate, steps).epsilon(params.delta)
    if after > params.target_epsilon:
        raise BudgetExhausted(
            f"{BUDGET_EXHAUSTED}: this round's {steps} DP-SGD steps would take epsilon from "
            f"{ledger.epsilon(params.delta):.3f} to {after:.3f} > target {params.target_epsilon} (delta={params.delta})"
        )
    return after


class PrivateStep:
    """Sets ``p.grad`` of every trainable parameter to one batch's privatised gradient:
    ``(sum_i clip(g_i) + N(0, (sigma*C)^2 I)) / (q*n)``; the caller steps the optimiser.
    The noise comes from ``generator``."""

    def __init__(self, model: nn.Module, params: DPSGDParams, rows: int, generator: torch.Generator,
                 loss: str = "binary") -> None:
        self.clipper = make_clipper(model, loss_fn(loss, reduction="sum"), params.engine)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]
        self.max_grad_norm, self.generator = params.max_grad_norm, generator
        self.scale = 1.0 / (params.sample_rate * rows)
        self.noise_scale = params.noise_multiplier * params.max_grad_norm * self.scale
        # one flat gradient buffer and one noise buffer, reused every step: the clipped sum is
        # written into views of ``flat`` and the noise added in one operation
        dtype = self.params[0].dtype if self.params else torch.float32
        self.flat = torch.empty(sum(self.sizes), dtype=dtype)
        self.noise = torch.empty(sum(self.sizes), dtype=dtype)
        self.views = [v.view_as(p) for v, p in zip(self.flat.split(self.sizes), self.params, strict=True)]
        self.fused = isinstance(self.clipper, (LinearClipper, LayerClipper))  # writes its clipped sum into ``views``
        self._grads_set = False

    def set_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """Returns (summed loss of the batch, examples clipped)."""
        if x.shape[0] and self.fused:  # scaling folded into the clip factors
            loss, n_clipped = self.clipper.clipped_sum_into(  # type: ignore[attr-defined]  # a fused clipper
                self.views, x, y, self.max_grad_norm, self.scale)
        elif x.shape[0]:
            grads, loss, n_clipped = self.clipper.clipped_sum(x, y, self.max_grad_norm)
            for v, g in zip(self.views, grads, strict=True):
                torch.mul(g, self.scale, out=v)
        else:  # an empty Poisson batch is still a step: noise only
            self.flat.zero_()
            loss, n_clipped = 0.0, 0
        if self.noise_scale > 0:
            self.flat.add_(self.noise.normal_(generator=self.generator), alpha=self.noise_scale)
        if not self._grads_set:  # every p.grad is its view of ``flat`` (the optimiser only reads it); the
            for p, v in zip(self.params, self.views, strict=True):  # Opacus clipper resets p.grad each step
                p.grad = v
            self._grads_set = self.fused
        return loss, n_clipped

    def close(self) -> None:
        self.clipper.close()


#: Uniform draws per block of Poisson batches drawn at once (rows x steps <= this).
POISSON_BLOCK = 1 << 20


def poisson_batches(rows: int, rate: float, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of ``steps`` Poisson batches: row ``i`` is in a batch when its uniform draw
    is below ``rate``, independently for every row and step. The draws for a block of steps
    are made in one call when the block starts (one call per block instead of one per step:
    the per-call cost, not the draws, dominated a small model's step)."""
    block = max(1, POISSON_BLOCK // max(1, rows))
    done = 0
    while done < steps:
        k = min(block, steps - done)
        # positions in the flattened (steps x rows) draw: one 1-D scan (a 2-D np.nonzero costs 4x)
        flat = np.flatnonzero(torch.rand(k, rows, generator=generator).numpy() < rate)
        bounds = np.searchsorted(flat, np.arange(k + 1) * rows).tolist()
        for s in range(k):
            yield torch.from_numpy(flat[bounds[s] : bounds[s + 1]] - s * rows)
        done += k


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


# ---- the site's side of a round ----------------------------------------------------------
#: Key of the ConfigRecord in a training reply that reports the site's privacy spending.
REPLY_KEY = "privacy"


def site_params(dp: DPSGDConfig, rows: int, task_batch_size: int, num_rounds: int, epochs: int) -> DPSGDParams:
    """The site's DP-SGD parameters: its sampling rate and the noise that spreads its
    budget over ``num_rounds`` rounds of ``epochs`` epochs (or the given multiplier)."""
    rate = sample_rate(dp.batch_size or task_batch_size, rows)
    planned = num_rounds * epochs * steps_per_epoch(rate)
    sigma = noise_multiplier(dp.target_epsilon, dp.delta, rate, planned, dp.accountant, dp.noise_multiplier)
    return DPSGDParams(rate, sigma, dp.max_grad_norm, dp.delta, dp.target_epsilon, dp.accountant, dp.engine)


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


# ---- resuming a run: ledgers carried over by the server's checkpoint ---------------------
#: Prefix of the train-config keys that carry restored ledgers (``<prefix><site name>/<column>``).
RESTORE_PREFIX = "dp-ledger/"


def ledgers_from_participation(participation: dict[int, dict[str, Any]],
                               names: dict[str, str]) -> dict[str, PrivacyLedger]:
    """Each site's ledger rebuilt from the privacy records its replies carried, round by round
    (``names``: reply label -> site name, :meth:`core.sites.SiteDirectory.names_by_label`)."""
    ledgers: dict[str, PrivacyLedger] = {}
    for _, entry in sorted(participation.items()):
        for label, rec in entry.get("privacy", {}).items():
            name = names.get(label, label)
            ledger = ledgers.get(name, PrivacyLedger(str(rec["accountant"])))
            ledgers[name] = ledger.with_steps(float(rec["noise_multiplier"]), float(rec["sample_rate"]),
                                              int(rec["steps"]))
    return ledgers


def restore_config(ledgers: dict[str, PrivacyLedger]) -> dict[str, Any]:
    """Train-config entries that hand every site its ledger after a coordinator restart."""
    out: dict[str, Any] = {}
    for name, ledger in ledgers.items():
        record = ledger.to_record()
        for column in ("noise", "rate", "steps"):
            out[f"{RESTORE_PREFIX}{name}/{column}"] = record[column]
    return out


def restored_ledger(train_config: ConfigRecord, name: str, accountant: str) -> PrivacyLedger | None:
    """The ledger the coordinator rebuilt for site ``name`` after a restart, if it sent one."""
    key = f"{RESTORE_PREFIX}{name}/"
    if f"{key}steps" not in train_config:
        return None
    return PrivacyLedger.from_record(ConfigRecord({c: train_config[f"{key}{c}"] for c in ("noise", "rate", "steps")}),
                                     accountant)


def adopt_restored(context: Context, train_config: ConfigRecord, name: str, accountant: str,
                   ledger: SiteLedger | None = None, job: str = "") -> None:
    """Take over the ledger the server restored for site ``name`` when it records more steps
    than the site's own (a resumed run starts with empty node state; a site keeping its
    ledger on disk has its own record and only adopts the copy if it lost it). Never lowers
    a ledger."""
    restored = restored_ledger(train_config, name, accountant)
    if restored is None:
        return
    if ledger is not None:
        if ledger.adopt(restored, job):
            log(WARNING, "site %s had no ledger of its own with %d steps; adopted the coordinator's copy",
                name, restored.steps)
        return
    own = PrivacyLedger.from_record(recordview.config(context.state, STATE_KEY), accountant)
    if restored.steps > own.steps:
        context.state[STATE_KEY] = restored.to_record()


# ---- the server's record of it ------------------------------------------------------------
def summarize(dp: DPSGDConfig, participation: dict[int, dict[str, Any]], exhausted: dict[int, str],
              names: dict[str, str]) -> dict[str, Any]:
    """``results.json``'s ``privacy`` section: each site's cumulative epsilon after its last
    round, per round, and the sites that stopped because their budget was spent. Sites are
    keyed by name (a resumed run reaches them under new node ids)."""
    per_site: dict[str, dict[str, Any]] = {}
    for server_round in sorted(participation):
        for label, rec in participation[server_round].get("privacy", {}).items():
            per_site[names.get(label, label)] = {**rec, "last_round": server_round, "label": label}
    return {
        "mechanism": "dpsgd",
        "guarantee": ("example-level (epsilon, delta)-DP for every training row of each site, with respect to "
                      "everything that leaves the site (each round's update, hence the final model); "
                      "rows of different sites are disjoint, so a row's guarantee is its own site's epsilon"),
        "delta": dp.delta,
        "target_epsilon": dp.target_epsilon,
        "accountant": dp.accountant,
        "max_grad_norm": dp.max_grad_norm,
        "epsilon_per_site": {site: rec["epsilon"] for site, rec in per_site.items()},
        "max_epsilon": max((rec["epsilon"] for rec in per_site.values()), default=0.0),
        "sites": per_site,
        "budget_exhausted": {str(node): reason for node, reason in exhausted.items()},
    }


# ---- the option: site trainer and coordinator half ---------------------------------------
class DPSGDTrainer(LocalTrainer):
    """A round of DP-SGD at the site (:func:`private_round`); a spent budget is refused."""

    def __init__(self, dp: DPSGDConfig, num_rounds: int, batch_size: int) -> None:
        self.dp, self.num_rounds, self.batch_size = dp, num_rounds, batch_size

    def train(self, task: Task, model: nn.Module, split: Split, seed: int, context: Context,
              train_config: ConfigRecord, site_name: str, epochs: int, max_steps: int | None,
              penalty: Penalty | None, store: SiteStore | None = None,
              limits: SiteLimits | None = None) -> tuple[dict[str, float], dict[str, ConfigRecord]]:
        limits = limits or SiteLimits()
        node = context.node_config
        params = site_params(self.dp, len(split), self.batch_size, self.num_rounds, epochs)
        if params.noise_multiplier < limits.min_noise_multiplier:
            raise SiteRefusal(ReplyError.POLICY, f"the run's DP-SGD noise multiplier {params.noise_multiplier:.4g} is "
                              f"below this site's policy's min_noise_multiplier={limits.min_noise_multiplier:g}")
        if not is_simulated(node) and not keeps_secret(node):
            raise SiteRefusal(ReplyError.POLICY, "DP-SGD at a deployed site needs a secret of its own for its noise "
                              "(node config state-dir or dp-noise-seed); without one the coordinator could "
                              "regenerate the noise")
        job = str(train_config.get(JOB_KEY, ""))
        if "state-dir" in node:  # a deployed site: one ledger for its data set, across every job
            store = data_store(str(node["state-dir"]), site_name, split.x, split.y,
                               str(node["data-path"]) if "data-path" in node else None)
        ledger = (SiteLedger(store, params.accountant, params.delta, params.target_epsilon, limits.max_epsilon)
                  if store is not None else None)
        adopt_restored(context, train_config, site_name, params.accountant, ledger, job)  # after a coordinator restart
        server_round = int(train_config.get("server-round", 0))  # type: ignore[arg-type]
        local = task.local_train_config(epochs)
        planned = steps_per_epoch(params.sample_rate) * local.epochs if max_steps is None else max_steps
        mechanism = (params.noise_multiplier, params.sample_rate, params.max_grad_norm, planned, local)
        try:
            generator, augment = task_generator(task, noise_seed(node, seed, digest_release(server_round, model,
                                                                                             mechanism)))
        except SecretFileError as err:  # a secret others may read is no secret: refused, with the fix
            raise SiteRefusal(ReplyError.POLICY, str(err)) from err
        try:
            stats, record = private_round(context, params, model, split.x, split.y, local,
                                          generator, penalty=penalty, max_steps=max_steps, augment=augment,
                                          ledger=ledger, server_round=server_round, job=job, limits=limits)
        except BudgetExhausted as err:
            raise SiteRefusal(ReplyError.BUDGET_EXHAUSTED, str(err)) from err
        return stats, {REPLY_KEY: record}


class BudgetLedger(Coordinator):
    """DP-SGD's coordinator half: records each site's reported epsilon every round, stops
    sending training work to a site whose budget is spent, and summarises the run."""

    def __init__(self, dp: DPSGDConfig, record: RunRecord) -> None:
        self.dp, self.record = dp, record
        self.exhausted: dict[int, str] = {}  # node -> the site's refusal

    def observers(self) -> list[Any]:
        return [self]

    @property
    def keeps_site_state(self) -> bool:
        return True  # each site's own ledger (privacy.site_ledger), filed under the job id

    def observe(self, server_round: int, replies: list[Message], strategy: _Strategy) -> None:
        spent = {site_label(m): dict(m.content.config_records[REPLY_KEY]) for m in replies
                 if not m.has_error() and REPLY_KEY in m.content.config_records}
        if spent:
            self.record.round(server_round).privacy = spent
        for m in replies:
            if m.has_error() and m.error.code == BUDGET_EXHAUSTED_CODE:
                reason = m.error.reason or ""
                self.exhausted[m.metadata.src_node_id] = reason
                strategy.exclude(m.metadata.src_node_id, reason)
                log(WARNING, "round %s: %s stops training: %s", server_round, strategy.label(m), m.error.reason)

    def summary(self) -> dict[str, Any]:
        return summarize(self.dp, self.record.to_dict(), self.exhausted, self.record.sites.names_by_label())

    def resume(self, train_config: ConfigRecord) -> None:
        """Each site's ledger, as its replies reported it, into the resumed round's instructions."""
        ledgers = ledgers_from_participation(self.record.to_dict(), self.record.sites.names_by_label())
        for key, value in restore_config(ledgers).items():
            train_config[key] = value

    def note(self, rnd: RoundRecord) -> str:
        if not rnd.privacy:
            return ""
        return f" | DP-SGD epsilon max {max(r['epsilon'] for r in rnd.privacy.values()):.3f}"


class DPSGD(PrivacyOption):
    name = "dpsgd"
    schema = DPSGDConfig

    def validate(self, cfg: Any) -> None:
        validate(cfg)

    def headline(self, summary: dict[str, Any]) -> str:
        return f"epsilon {summary['max_epsilon']:.3f} at delta={summary['delta']:g} (largest over sites)"

    def tables(self, summary: dict[str, Any]) -> tuple[list[str], list[tuple[list[str], list[list[str]]]]]:
        rows = [[site, f"{r['epsilon']:.3f}", f"{r['delta']:g}", str(r["last_round"]), f"{r['noise_multiplier']:.3f}",
                 f"{r['sample_rate']:.4f}"] for site, r in sorted(summary["sites"].items())]
        paragraphs = ([f"Sites that stopped because their budget was spent: {summary['budget_exhausted']}."]
                      if summary.get("budget_exhausted") else [])
        return paragraphs, [(["site", "epsilon", "delta", "last round", "noise multiplier", "sample rate"], rows)]

    def policy_problems(self, cfg: Any, limits: SiteLimits) -> list[str]:
        out = []
        if cfg.target_epsilon > limits.max_epsilon:
            out.append(f"privacy.target_epsilon={cfg.target_epsilon:g} exceeds the policy's max_epsilon={limits.max_epsilon:g}")
        if cfg.delta > limits.max_delta:
            out.append(f"privacy.delta={cfg.delta:g} exceeds the policy's max_delta={limits.max_delta:g}")
        if cfg.noise_multiplier is not None and cfg.noise_multiplier < limits.min_noise_multiplier:
            out.append(f"privacy.noise_multiplier={cfg.noise_multiplier:g} is below the policy's "
                       f"min_noise_multiplier={limits.min_noise_multiplier:g}")
        return out

    def trainer(self, cfg: Any, num_rounds: int, batch_size: int) -> LocalTrainer:
        return DPSGDTrainer(cfg, num_rounds, batch_size)

    def coordinator(self, cfg: Any, num_sites: int, record: RunRecord) -> Coordinator:
        return BudgetLedger(cfg, record)
