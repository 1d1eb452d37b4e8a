"""The ``strategy`` config group: its schemas, option lists and range checks (owned here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.config import check

STRATEGIES = ("fedavg", "fedprox", "scaffold", "fednova")
SERVER_OPTIMIZERS = ("none", "avgm", "adagrad", "adam", "yogi")  # strategies/server_opt.py
PERSONAL = ("none", "fedper", "fedbn", "ditto", "finetune")    # strategies/personal.py
#: Strategies whose sites send side values inside the update (control variates, step counts).
SIDE_VALUES = ("scaffold", "fednova")
STRAGGLER_POLICIES = ("partial", "drop")
ROBUST_RULES = ("none", "krum", "multikrum", "trimmed_mean", "median")  # strategies/combine.py


@dataclass
class StrategyConfig:
    """Schema of the ``strategy`` group: what every strategy accepts.

    Systems heterogeneity (FedProx paper, section 5.2) is part of every strategy:
    ``local_epochs`` gives each site its own amount of local work (site ``i`` uses entry
    ``i % len``; empty = the task's ``local_epochs``), and each round a ``stragglers``
    fraction of the sites, drawn from the seed, only manages part of its work. Their
    partial updates are aggregated (``straggler_policy=partial``) or they miss the round
    and are dropped (``drop``, FedAvg's behaviour in the paper).
    """

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    round_timeout: float = 600.0
    local_epochs: list[int] = field(default_factory=list)
    stragglers: float = 0.0
    straggler_policy: str = "drop"
    wait_for_slow: bool = True      # false: sites known to be slow (faults.slow_fraction) are stragglers every round
    robust: str = "none"            # Byzantine-robust rule: none | krum | multikrum | trimmed_mean | median
    assumed_byzantine: float = 0.2  # f = floor(share * replies) the robust rule tolerates
    norm_bound: float = 0.0         # L2 bound on each site's update (secagg: on the mean update too); 0 = off
    # Server optimizer over the strategy's aggregate (Reddi et al. 2021; Hsu et al. 2019):
    server_opt: str = "none"        # none | avgm | adagrad | adam | yogi
    server_lr: float = 1.0          # eta: the server's step size (avgm: 1 with beta1=0 is FedAvg)
    server_beta1: float = 0.9       # first-moment decay (avgm: the server momentum)
    server_beta2: float = 0.99      # second-moment decay (adam, yogi)
    server_tau: float = 1e-3        # adaptivity: added to sqrt(v) (adagrad, adam, yogi)
    # Personalization (strategies/personal.py): what stays at each site, evaluated on its own test rows.
    personal: str = "none"          # none | fedper (head) | fedbn (normalization layers) | ditto | finetune
    ditto_lambda: float = 0.1       # Ditto: pull of the personal model towards the global one
    personal_epochs: int = 1        # Ditto: personal epochs per round; finetune: epochs on the final model
    personal_lr: float = 0.0        # learning rate of personal training; 0 = the task's lr
    personal_select: bool = True    # a site keeps its personal model only if its validation loss beats the global's
    # Buffered asynchronous rounds (FedBuff, strategies/buffered.py); buffer=0: synchronous rounds.
    buffer: int = 0                 # usable replies that move the global model (one round = one model version)
    concurrency: int = 0            # sites training at once; 0 = every site
    staleness_exponent: float = 0.5  # a reply tau versions old counts (1 + tau) ** -exponent
    max_staleness: int = 0          # replies older than this many versions are discarded; 0 = never


@dataclass
class FedProxConfig(StrategyConfig):
    """Schema of ``strategy=fedprox``: FedAvg plus the proximal term ``mu/2 ||w - w_global||^2``.

    With ``adaptive_mu`` the server raises ``mu`` by ``mu_step`` when the global loss
    rises and lowers it by ``mu_step`` after ``mu_patience`` consecutive decreases (the
    FedProx paper's heuristic), never below 0.
    """

    name: str = "fedprox"
    mu: float = 0.01
    adaptive_mu: bool = False
    mu_step: float = 0.1
    mu_patience: int = 5
    straggler_policy: str = "partial"


#: What the coordinator must be able to do for a strategy setting (checked against the
#: aggregation option's capabilities by the composition root, ``app/config.py``).
def needs(s: StrategyConfig) -> list[tuple[str, tuple[str, object, str, str]]]:
    """(capability, (key, value, the value that needs none, what to do instead)) for every
    setting of ``s`` that needs a capability of the aggregation option."""
    out: list[tuple[str, tuple[str, object, str, str]]] = []
    if s.robust != "none":
        out.append(("sees_individual_updates", (
            "strategy.robust", s.robust, "none",
            "no robust rule can run; bound every update's norm instead (strategy.norm_bound=B)")))
    if s.server_opt != "none":
        out.append(("holds_plaintext_model", (
            "strategy.server_opt", s.server_opt, "none",
            "a server optimizer cannot step on ciphertexts; use aggregation=secagg (it acts on the unmasked "
            "mean update) or plain")))
    if s.name in SIDE_VALUES:
        out.append(("holds_plaintext_model", (
            "strategy.name", s.name, "fedavg or fedprox",
            f"{s.name} needs the averaged side values in the clear; use aggregation=secagg or plain")))
    if s.buffer > 0:
        out.append(("sees_individual_updates", (
            "strategy.buffer", s.buffer, "0",
            "buffered asynchronous rounds put each reply on the current model, weighted by its staleness, "
            "while a masked or encrypted sum exists only for one cohort starting from one model; use "
            "aggregation=plain (privacy=dpsgd protects each update from the coordinator)")))
    if s.norm_bound > 0:
        out.append(("holds_plaintext_model", ("strategy.norm_bound", s.norm_bound, "0",
                                        "it cannot bound the aggregate; use aggregation=secagg or plain")))
    return out


def validate(s: StrategyConfig) -> None:
    """Range and choice checks of the ``strategy`` group."""
    check(s.name in STRATEGIES, "strategy.name", s.name, f"one of {list(STRATEGIES)}")
    check(0 < s.fraction_train <= 1, "strategy.fraction_train", s.fraction_train, "0 < fraction <= 1")
    check(0 <= s.fraction_evaluate <= 1, "strategy.fraction_evaluate", s.fraction_evaluate, "0 <= fraction <= 1")
    check(s.round_timeout > 0, "strategy.round_timeout", s.round_timeout, "seconds > 0")
    check(all(e >= 1 for e in s.local_epochs), "strategy.local_epochs", s.local_epochs,
          "a list of epochs >= 1 (one per site, cycled), or [] for the task's local_epochs")
    check(0 <= s.stragglers < 1, "strategy.stragglers", s.stragglers, "0 <= fraction < 1")
    check(s.straggler_policy in STRAGGLER_POLICIES, "strategy.straggler_policy", s.straggler_policy,
          f"one of {list(STRAGGLER_POLICIES)}")
    check(s.robust in ROBUST_RULES, "strategy.robust", s.robust, f"one of {list(ROBUST_RULES)}")
    check(0 <= s.assumed_byzantine < 0.5, "strategy.assumed_byzantine", s.assumed_byzantine,
          "0 <= share < 0.5 (robust rules need an honest majority)")
    check(s.norm_bound >= 0, "strategy.norm_bound", s.norm_bound, "0 (off) or an L2 norm > 0")
    check(s.server_opt in SERVER_OPTIMIZERS, "strategy.server_opt", s.server_opt, f"one of {list(SERVER_OPTIMIZERS)}")
    check(s.server_lr > 0, "strategy.server_lr", s.server_lr, "a step size > 0")
    check(0 <= s.server_beta1 < 1, "strategy.server_beta1", s.server_beta1, "0 <= beta1 < 1")
    check(0 <= s.server_beta2 < 1, "strategy.server_beta2", s.server_beta2, "0 <= beta2 < 1")
    check(s.server_tau > 0, "strategy.server_tau", s.server_tau, "a number > 0")
    check(s.personal in PERSONAL, "strategy.personal", s.personal, f"one of {list(PERSONAL)}")
    check(s.ditto_lambda >= 0, "strategy.ditto_lambda", s.ditto_lambda, "a number >= 0")
    check(s.personal_epochs >= 1, "strategy.personal_epochs", s.personal_epochs, "an integer >= 1")
    check(s.personal_lr >= 0, "strategy.personal_lr", s.personal_lr, "0 (the task's lr) or a learning rate > 0")
    check(s.buffer >= 0, "strategy.buffer", s.buffer, "0 (synchronous rounds) or a number of replies >= 1")
    check(s.concurrency >= 0, "strategy.concurrency", s.concurrency, "0 (every site) or a number of sites >= 1")
    check(s.staleness_exponent >= 0, "strategy.staleness_exponent", s.staleness_exponent, "a number >= 0")
    check(s.max_staleness >= 0, "strategy.max_staleness", s.max_staleness, "0 (never discard) or versions >= 1")
    if s.buffer > 0:
        check(s.name in ("fedavg", "fedprox"), "strategy.name", s.name,
              "fedavg or fedprox with strategy.buffer > 0 (SCAFFOLD's and FedNova's side values assume every "
              "reply of a round started from the same model)")
        check(s.personal in ("none", "fedper", "fedbn"), "strategy.personal", s.personal,
              "none, fedper or fedbn with strategy.buffer > 0")
    if s.name in SIDE_VALUES:
        check(s.norm_bound == 0, "strategy.norm_bound", s.norm_bound,
              f"0 with strategy.name={s.name} (a norm bound would clip its side values with the update)")
    if isinstance(s, FedProxConfig):
        check(s.mu >= 0, "strategy.mu", s.mu, "a number >= 0")
        check(s.mu_step > 0, "strategy.mu_step", s.mu_step, "a number > 0")
        check(s.mu_patience >= 1, "strategy.mu_patience", s.mu_patience, "an integer >= 1")
