"""The option: the site's trainer, the coordinator's budget ledger (a reply observer) and ``privacy=dpsgd`` itself."""

from __future__ import annotations

from logging import WARNING
from typing import Any, Protocol

from flwr.app import ConfigRecord, Context, Message
from flwr.common import log
from torch import nn
from typing_extensions import override

from core.records import RoundRecord, RunRecord
from core.replies import ReplyError, SiteRefusal
from core.secret_files import SecretFileError
from core.sites import site_label
from core.state import JOB_KEY, SiteStore, is_simulated
from privacy.base import Coordinator, LocalTrainer, PrivacyOption, SiteLimits, task_generator
from privacy.dpsgd.budget import BudgetExhausted
from privacy.dpsgd.calibration import site_params, steps_per_epoch
from privacy.dpsgd.config import BUDGET_EXHAUSTED_CODE, DPSGDConfig, validate
from privacy.dpsgd.loop import REPLY_KEY, private_round
from privacy.dpsgd.report import summarize
from privacy.dpsgd.restore import adopt_restored, ledgers_from_participation, restore_config
from privacy.site_ledger import SiteLedger, data_store, digest_release
from privacy.site_secret import keeps_secret, noise_seed
from tasks.base import Split, Task
from tasks.training import Penalty


class _Strategy(Protocol):
    """What the ledger needs of the strategy it observes (:class:`strategies.fedavg.FedAvg` has it)."""

    def exclude(self, node: int, reason: str) -> None: ...

    def label(self, msg: Message) -> str: ...


class DPSGDTrainer(LocalTrainer):
    """A round of DP-SGD at the site (:func:`private_round`); a spent budget is refused."""

    def __init__(self, dp: DPSGDConfig, num_rounds: int, batch_size: int) -> None:
        self.dp, self.num_rounds, self.batch_size = dp, num_rounds, batch_size

    @override
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

    @override
    def observers(self) -> list[Any]:
        return [self]

    @override
    @property
    def keeps_site_state(self) -> bool:
        return True  # each site's own ledger (privacy.site_ledger), filed under the job id

    def observe(self, server_round: int, replies: list[Message], strategy: _Strategy) -> None:
        """Record the privacy spent that ``replies`` report; exclude sites whose budget is exhausted."""
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

    @override
    def summary(self) -> dict[str, Any]:
        return summarize(self.dp, self.record.to_dict(), self.exhausted, self.record.sites.names_by_label())

    def resume(self, train_config: ConfigRecord) -> None:
        """Each site's ledger, as its replies reported it, into the resumed round's instructions."""
        ledgers = ledgers_from_participation(self.record.to_dict(), self.record.sites.names_by_label())
        for key, value in restore_config(ledgers).items():
            train_config[key] = value

    @override
    def note(self, rnd: RoundRecord) -> str:
        if not rnd.privacy:
            return ""
        return f" | DP-SGD epsilon max {max(r['epsilon'] for r in rnd.privacy.values()):.3f}"


class DPSGD(PrivacyOption):
    """``privacy=dpsgd``: DP-SGD at every site, with its ledger and budget (docs/privacy.md)."""

    name = "dpsgd"
    schema = DPSGDConfig

    @override
    def validate(self, cfg: Any) -> None:
        validate(cfg)

    @override
    def headline(self, summary: dict[str, Any]) -> str:
        return f"epsilon {summary['max_epsilon']:.3f} at delta={summary['delta']:g} (largest over sites)"

    @override
    def tables(self, summary: dict[str, Any]) -> tuple[list[str], list[tuple[list[str], list[list[str]]]]]:
        rows = [[site, f"{r['epsilon']:.3f}", f"{r['delta']:g}", str(r["last_round"]), f"{r['noise_multiplier']:.3f}",
                 f"{r['sample_rate']:.4f}"] for site, r in sorted(summary["sites"].items())]
        paragraphs = ([f"Sites that stopped because their budget was spent: {summary['budget_exhausted']}."]
                      if summary.get("budget_exhausted") else [])
        return paragraphs, [(["site", "epsilon", "delta", "last round", "noise multiplier", "sample rate"], rows)]

    @override
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

    @override
    def trainer(self, cfg: Any, num_rounds: int, batch_size: int) -> LocalTrainer:
        return DPSGDTrainer(cfg, num_rounds, batch_size)

    @override
    def coordinator(self, cfg: Any, num_sites: int, record: RunRecord) -> Coordinator:
        return BudgetLedger(cfg, record)
