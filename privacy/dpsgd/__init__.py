"""DP-SGD local training: ``privacy=dpsgd``, its site half and its coordinator half.

One round at one site (Abadi et al. 2016, as Opacus implements it):

* **Poisson sampling**: every step draws each training row independently with
  probability ``q = batch_size / n`` (Opacus' ``UniformWithReplacementSampler``), and an
  epoch is ``int(1/q)`` steps; the sampling is what the accountant's amplification assumes;
* **clipping**: each example's gradient to L2 norm ``max_grad_norm`` (:mod:`privacy.clipping`);
* **noise**: ``N(0, (noise_multiplier * max_grad_norm)^2)`` on the clipped sum, then
  division by the expected batch size ``q * n`` (Opacus' ``loss_reduction="mean"``);
* data-independent terms (FedProx's proximal term, weight decay, momentum) act on the
  privatised gradient: they cost no privacy.

One mechanism per module: :mod:`.config` (the schema and a round's parameters),
:mod:`.calibration` (the sampling rate and the noise multiplier that keeps a site within
``target_epsilon`` after ``num_rounds`` full rounds), :mod:`.budget` (the ledger's checks before a
round), :mod:`.step` (one private optimiser step), :mod:`.sampler` (Poisson batches), :mod:`.loop`
(a site's private round: :func:`private_round` keeps its ledger and refuses a round that would take
it past its budget), :mod:`.restore` (ledgers carried over by a resumed run), :mod:`.report` (the
run's privacy summary) and :mod:`.option` (the trainer, the coordinator's budget ledger, the option).
"""

from __future__ import annotations

from privacy.dpsgd.budget import BudgetExhausted, check_budget, check_cap
from privacy.dpsgd.calibration import noise_multiplier, sample_rate, site_params, steps_per_epoch
from privacy.dpsgd.config import BUDGET_EXHAUSTED, BUDGET_EXHAUSTED_CODE, DPSGDConfig, DPSGDParams, validate
from privacy.dpsgd.loop import REPLY_KEY, private_round, train_private
from privacy.dpsgd.option import DPSGD, BudgetLedger, DPSGDTrainer
from privacy.dpsgd.report import summarize
from privacy.dpsgd.restore import RESTORE_PREFIX, adopt_restored, ledgers_from_participation, restore_config, restored_ledger
from privacy.dpsgd.sampler import POISSON_BLOCK, poisson_batches
from privacy.dpsgd.step import PrivateStep

__all__ = [
    "BUDGET_EXHAUSTED", "BUDGET_EXHAUSTED_CODE", "BudgetExhausted", "BudgetLedger", "DPSGD", "DPSGDConfig",
    "DPSGDParams", "DPSGDTrainer", "POISSON_BLOCK", "PrivateStep", "REPLY_KEY", "RESTORE_PREFIX", "adopt_restored",
    "check_budget", "check_cap", "ledgers_from_participation", "noise_multiplier", "poisson_batches", "private_round",
    "restore_config", "restored_ledger", "sample_rate", "site_params", "steps_per_epoch", "summarize", "train_private",
    "validate",
]
