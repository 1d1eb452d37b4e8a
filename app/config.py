"""fedsilo's configuration: typed Hydra schemas, composition and validation.

One source of truth for every process. The ``fedsilo`` command composes the config with
``@hydra.main``; the ServerApp and every ClientApp compose the *same* config from Flower's
run config, whose ``overrides`` key carries the Hydra overrides (``"task=medical
num_rounds=5"``). Both paths go through the schemas registered here, so a wrong type or
an unknown key fails at composition with Hydra's message naming the key, and
:func:`validate` then checks ranges and choices, raising :class:`ConfigError` with the
key, the bad value and what is allowed.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import tasks
from tasks.base import PartitionConfig, TaskConfig
from tasks.partition import PARTITIONS

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

#: Options of the axes that are not implemented yet are named, so a user who asks for
#: them gets a precise answer instead of a generic "not found".
STRATEGIES = ("fedavg", "fedprox")
STRAGGLER_POLICIES = ("partial", "drop")
AGGREGATIONS = ("plain", "secagg", "paillier")
DROP_STAGES = ("keys", "share", "masked_input", "unmask")
PRIVACY = ("none", "dpsgd", "central")
DP_ACCOUNTANTS = ("rdp", "prv")
DP_ENGINES = ("auto", "fast", "opacus", "functorch")
OPTIMIZERS = ("sgd", "adam")
ROBUST_RULES = ("none", "krum", "multikrum", "trimmed_mean", "median")  # strategies/robust.py
ATTACKS = ("sign_flip", "scale", "gaussian", "label_flip")  # app/attacks.py


class ConfigError(ValueError):
    """A config value is out of range or not an allowed choice."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={value!r} is invalid: allowed {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


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
    robust: str = "none"            # Byzantine-robust rule: none | krum | multikrum | trimmed_mean | median
    assumed_byzantine: float = 0.2  # f = floor(share * replies) the robust rule tolerates
    norm_bound: float = 0.0         # L2 bound on each site's update (secagg: on the mean update too); 0 = off


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


@dataclass
class AggregationConfig:
    """Schema of the ``aggregation`` group."""

    name: str = "plain"


@dataclass
class SecAggConfig(AggregationConfig):
    """Schema of ``aggregation=secagg`` (:mod:`aggregation.secagg`)."""

    name: str = "secagg"
    clip: float = 4.0          # each site's update (local - global weights) clipped to [-clip, clip]
    value_bits: int = 24       # quantisation bits per value: step 2*clip/(2^bits - 1)
    threshold: float = 0.6     # Shamir threshold as a share of a site's neighbourhood (> 0.5)
    neighbours: int = 0        # SecAgg+ neighbours per site; 0 = complete graph up to 20 sites, then O(log n)
    stage_timeout: float = 120.0  # seconds to wait for the sites' replies in each protocol stage


@dataclass
class PaillierConfig(AggregationConfig):
    """Schema of ``aggregation=paillier`` (:mod:`aggregation.paillier`)."""

    name: str = "paillier"
    public_key: str | None = None  # the server's public-key file (fedsilo keys paillier --out DIR)
    keypair: str | None = None     # the sites' key-pair file (simulation; a SuperNode's node config wins)
    clip: float = 8.0              # weighted model values (rows/weight_unit * w) clipped to [-clip, clip]
    value_bits: int = 20           # quantisation bits per value
    weight_unit: float = 1000.0    # rows that count as weight 1 when weighting models
    max_sites: int = 16            # most sites whose sum must fit a slot (guard bits)
    workers: int = 1               # processes a site encrypts/decrypts with; 0 = all its cores


@dataclass
class FaultsConfig:
    """Fault injection for tests and demos (``faults.*``); off by default."""

    drop_rate: float = 0.0     # share of the sites that drop out of each round (chosen from the seed)
    drop_stage: str = "masked_input"  # secagg stage at which they drop (plain: they send no update)
    byzantine_fraction: float = 0.0   # share of the sites that attack (a fixed set, drawn from the seed)
    attack: str = "sign_flip"         # sign_flip | scale | gaussian | label_flip (app/attacks.py)
    attack_scale: float = 0.0         # the attack's strength; 0 = its default
    crash_after_round: int = 0        # the coordinator dies after writing this round's checkpoint (0 = never)


@dataclass
class PrivacyConfig:
    """Schema of the ``privacy`` group."""

    name: str = "none"


@dataclass
class DPSGDConfig(PrivacyConfig):
    """Schema of ``privacy=dpsgd`` (:mod:`privacy.dpsgd`): example-level DP at every site.

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


@dataclass
class CentralDPConfig(PrivacyConfig):
    """Schema of ``privacy=central`` (:mod:`privacy.central`): site-level DP at the server.

    Each site's update (local - global) is clipped to L2 norm ``clipping_norm``, the
    updates are averaged with equal weights, and Gaussian noise of standard deviation
    ``noise_multiplier * clipping_norm / sampled sites`` is added (DP-FedAvg).
    """

    name: str = "central"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None    # stop training before the next round would exceed it


@dataclass
class FedsiloConfig:
    """Root schema (``conf/config.yaml``)."""

    task: TaskConfig = MISSING
    strategy: StrategyConfig = MISSING
    aggregation: AggregationConfig = MISSING
    privacy: PrivacyConfig = MISSING
    partition: PartitionConfig = MISSING
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    num_rounds: int = 10
    num_sites: int = 5
    seed: int = 0
    data_dir: str | None = None
    resume: str | None = None      # a run directory (or its checkpoint.npz) to continue from
    checkpoint: bool = True        # write checkpoint.npz after every round
    report: bool = True            # write report.html and report.md after the run (fedsilo command)
    logger: str = "none"           # none | tensorboard (round figures as TensorBoard scalars)
    audit: bool = False            # membership-inference audit of the final model after the run (fedsilo audit)
    audit_references: int = 8      # reference models of the offline LiRA attack (0 = loss threshold only)
    simulation: dict[str, Any] = field(default_factory=dict)


def register_schemas() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="fedsilo_schema", node=FedsiloConfig)
    cs.store(group="task", name="task_schema", node=TaskConfig)
    cs.store(group="strategy", name="strategy_schema", node=StrategyConfig)
    cs.store(group="strategy", name="fedprox_schema", node=FedProxConfig)
    cs.store(group="aggregation", name="aggregation_schema", node=AggregationConfig)
    cs.store(group="aggregation", name="secagg_schema", node=SecAggConfig)
    cs.store(group="aggregation", name="paillier_schema", node=PaillierConfig)
    cs.store(group="privacy", name="privacy_schema", node=PrivacyConfig)
    cs.store(group="privacy", name="dpsgd_schema", node=DPSGDConfig)
    cs.store(group="privacy", name="central_schema", node=CentralDPConfig)
    cs.store(group="partition", name="partition_schema", node=PartitionConfig)


register_schemas()


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def validate(cfg: DictConfig | FedsiloConfig) -> FedsiloConfig:
    """Resolve ``cfg`` into typed dataclasses and check every range and choice.

    Returns the typed config; raises :class:`ConfigError` naming the first bad key.
    """
    if isinstance(cfg, DictConfig):
        obj = OmegaConf.to_object(cfg)
        assert isinstance(obj, FedsiloConfig)
        cfg = obj
    t, p, s = cfg.task, cfg.partition, cfg.strategy
    _check(t.name in tasks.REGISTRY, "task.name", t.name, f"one of {sorted(tasks.REGISTRY)}")
    task_cls = tasks.get(t.name)
    _check(t.model in task_cls.models, "task.model", t.model, f"one of {list(task_cls.models)} for task {t.name}")
    _check(t.lr > 0, "task.lr", t.lr, "a number > 0")
    _check(0 <= t.momentum < 1, "task.momentum", t.momentum, "0 <= momentum < 1")
    _check(t.weight_decay >= 0, "task.weight_decay", t.weight_decay, "a number >= 0")
    _check(0 <= t.dropout < 1, "task.dropout", t.dropout, "0 <= dropout < 1")
    _check(t.batch_size >= 1, "task.batch_size", t.batch_size, "an integer >= 1")
    _check(t.local_epochs >= 1, "task.local_epochs", t.local_epochs, "an integer >= 1")
    _check(0 <= t.val_fraction < 1, "task.val_fraction", t.val_fraction, "0 <= val_fraction < 1")
    _check(t.train_rows >= 0, "task.train_rows", t.train_rows, "0 (all rows) or an integer >= 1")
    _check(all(h >= 1 for h in t.hidden), "task.hidden", t.hidden, "a list of layer widths >= 1")
    _check(t.optimizer in OPTIMIZERS, "task.optimizer", t.optimizer, f"one of {list(OPTIMIZERS)}")
    _check(p.name in PARTITIONS, "partition.name", p.name, f"one of {list(PARTITIONS)}")
    _check(p.alpha > 0, "partition.alpha", p.alpha, "a number > 0")
    _check(p.min_partition_size >= 1, "partition.min_partition_size", p.min_partition_size, "an integer >= 1")
    _check(p.natural_sites >= 0, "partition.natural_sites", p.natural_sites, "0 (all) or a number of sites >= 2")
    if p.name == "natural":
        _check(task_cls.natural_sites is not None, "partition.name", p.name,
               f"iid or dirichlet: task {t.name} has no natural split")
        n_natural = len(task_cls.natural_sites or ())
        _check(p.natural_sites == 0 or 2 <= p.natural_sites <= n_natural, "partition.natural_sites", p.natural_sites,
               f"0 (all {n_natural}) or 2..{n_natural}: the first k of task {t.name}'s natural sites "
               f"{list(task_cls.natural_sites or ())}")
    _check(s.name in STRATEGIES, "strategy.name", s.name, f"one of {list(STRATEGIES)}")
    _check(0 < s.fraction_train <= 1, "strategy.fraction_train", s.fraction_train, "0 < fraction <= 1")
    _check(0 <= s.fraction_evaluate <= 1, "strategy.fraction_evaluate", s.fraction_evaluate, "0 <= fraction <= 1")
    _check(s.round_timeout > 0, "strategy.round_timeout", s.round_timeout, "seconds > 0")
    _check(all(e >= 1 for e in s.local_epochs), "strategy.local_epochs", s.local_epochs,
           "a list of epochs >= 1 (one per site, cycled), or [] for the task's local_epochs")
    _check(0 <= s.stragglers < 1, "strategy.stragglers", s.stragglers, "0 <= fraction < 1")
    _check(s.straggler_policy in STRAGGLER_POLICIES, "strategy.straggler_policy", s.straggler_policy,
           f"one of {list(STRAGGLER_POLICIES)}")
    _check(s.robust in ROBUST_RULES, "strategy.robust", s.robust, f"one of {list(ROBUST_RULES)}")
    _check(0 <= s.assumed_byzantine < 0.5, "strategy.assumed_byzantine", s.assumed_byzantine,
           "0 <= share < 0.5 (robust rules need an honest majority)")
    _check(s.norm_bound >= 0, "strategy.norm_bound", s.norm_bound, "0 (off) or an L2 norm > 0")
    if s.robust != "none":
        _check(cfg.aggregation.name == "plain", "strategy.robust", s.robust,
               f"none with aggregation={cfg.aggregation.name}: the server cannot see single updates there, so no "
               "robust rule can run; bound every update's norm instead (strategy.norm_bound=B)")
    if s.norm_bound > 0:
        _check(cfg.aggregation.name != "paillier", "strategy.norm_bound", s.norm_bound,
               "0 with aggregation=paillier (the server holds only ciphertexts and cannot bound the aggregate); "
               "use aggregation=secagg or plain")
    if isinstance(s, FedProxConfig):
        _check(s.mu >= 0, "strategy.mu", s.mu, "a number >= 0")
        _check(s.mu_step > 0, "strategy.mu_step", s.mu_step, "a number > 0")
        _check(s.mu_patience >= 1, "strategy.mu_patience", s.mu_patience, "an integer >= 1")
    _check(cfg.aggregation.name in AGGREGATIONS, "aggregation.name", cfg.aggregation.name, f"one of {list(AGGREGATIONS)}")
    a = cfg.aggregation
    if isinstance(a, SecAggConfig):
        _check(a.clip > 0, "aggregation.clip", a.clip, "a number > 0")
        _check(8 <= a.value_bits <= 32, "aggregation.value_bits", a.value_bits, "an integer in 8..32")
        _check(0.5 < a.threshold <= 1, "aggregation.threshold", a.threshold,
               "0.5 < threshold <= 1 (a majority of the round's sites)")
        _check(a.stage_timeout > 0, "aggregation.stage_timeout", a.stage_timeout, "seconds > 0")
        _check(a.neighbours == 0 or (a.neighbours >= 2 and a.neighbours % 2 == 0), "aggregation.neighbours",
               a.neighbours, "0 (automatic) or an even number >= 2")
    if isinstance(a, PaillierConfig):
        _check(a.clip > 0, "aggregation.clip", a.clip, "a number > 0")
        _check(8 <= a.value_bits <= 32, "aggregation.value_bits", a.value_bits, "an integer in 8..32")
        _check(a.weight_unit > 0, "aggregation.weight_unit", a.weight_unit, "rows > 0")
        _check(a.workers >= 0, "aggregation.workers", a.workers, "0 (all cores) or a number of processes >= 1")
        _check(a.max_sites >= num_sites(cfg), "aggregation.max_sites", a.max_sites,
               f"at least the number of sites ({num_sites(cfg)})")
    f = cfg.faults
    _check(0 <= f.drop_rate < 1, "faults.drop_rate", f.drop_rate, "0 <= fraction < 1")
    _check(f.drop_stage in DROP_STAGES, "faults.drop_stage", f.drop_stage, f"one of {list(DROP_STAGES)}")
    _check(0 <= f.byzantine_fraction < 1, "faults.byzantine_fraction", f.byzantine_fraction, "0 <= fraction < 1")
    _check(f.attack in ATTACKS, "faults.attack", f.attack, f"one of {list(ATTACKS)}")
    _check(f.crash_after_round >= 0, "faults.crash_after_round", f.crash_after_round,
           "0 (never) or a round number >= 1")
    _check(f.attack_scale >= 0, "faults.attack_scale", f.attack_scale, "0 (the attack's default) or a number > 0")
    _check(cfg.privacy.name in PRIVACY, "privacy.name", cfg.privacy.name, f"one of {list(PRIVACY)}")
    _validate_privacy(cfg)
    _check(cfg.num_rounds >= 1, "num_rounds", cfg.num_rounds, "an integer >= 1")
    _check(cfg.num_sites >= 2, "num_sites", cfg.num_sites, "an integer >= 2")
    _check(cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    _check(cfg.logger in ("none", "tensorboard"), "logger", cfg.logger, "one of ['none', 'tensorboard']")
    _check(cfg.audit_references >= 0, "audit_references", cfg.audit_references, "an integer >= 0")
    return cfg


def _validate_privacy(cfg: FedsiloConfig) -> None:
    d = cfg.privacy
    if isinstance(d, DPSGDConfig):
        _check(d.target_epsilon > 0, "privacy.target_epsilon", d.target_epsilon, "a number > 0")
        _check(0 < d.delta < 1, "privacy.delta", d.delta, "0 < delta < 1 (well below 1/rows per site)")
        _check(d.max_grad_norm > 0, "privacy.max_grad_norm", d.max_grad_norm, "a number > 0")
        _check(d.noise_multiplier is None or d.noise_multiplier > 0, "privacy.noise_multiplier",
               d.noise_multiplier, "null (derived from target_epsilon) or a number > 0")
        _check(d.batch_size >= 0, "privacy.batch_size", d.batch_size, "0 (the task's batch_size) or an integer >= 1")
        _check(d.accountant in DP_ACCOUNTANTS, "privacy.accountant", d.accountant, f"one of {list(DP_ACCOUNTANTS)}")
        _check(d.engine in DP_ENGINES, "privacy.engine", d.engine, f"one of {list(DP_ENGINES)}")
    if isinstance(d, CentralDPConfig):
        _check(d.noise_multiplier > 0, "privacy.noise_multiplier", d.noise_multiplier, "a number > 0")
        _check(d.clipping_norm > 0, "privacy.clipping_norm", d.clipping_norm, "a number > 0")
        _check(0 < d.delta < 1, "privacy.delta", d.delta, "0 < delta < 1")
        _check(d.target_epsilon is None or d.target_epsilon > 0, "privacy.target_epsilon", d.target_epsilon,
               "null (no limit) or a number > 0")
        _check(cfg.strategy.robust == "none" and cfg.strategy.norm_bound == 0, "strategy.robust",
               cfg.strategy.robust, "none (and strategy.norm_bound=0) with privacy=central, which already clips every "
               "update to privacy.clipping_norm and averages with equal weights")
        _check(cfg.aggregation.name == "plain", "aggregation.name", cfg.aggregation.name,
               "plain with privacy=central (the server clips each site's update, so it must see them; "
               "use privacy=dpsgd with secagg or paillier)")


def num_sites(cfg: FedsiloConfig) -> int:
    """The number of sites this config trains with (natural splits have their own count)."""
    return tasks.get(cfg.task.name).num_sites(cfg.partition, cfg.num_sites)


def parse_overrides(text: str) -> list[str]:
    """Split a run-config ``overrides`` string into Hydra override tokens (shell quoting)."""
    return shlex.split(text)


def run_overrides(overrides: list[str], data_dir: str | Path) -> str:
    """The run-config ``overrides`` string the ServerApp and ClientApps compose: the user's
    overrides with ``data_dir`` pinned to the resolved data folder (inverse of :func:`parse_overrides`)."""
    tokens = [o for o in overrides if not o.lstrip("+~").startswith("data_dir=")]
    return shlex.join([*tokens, f"data_dir={data_dir}"])


@lru_cache(maxsize=32)
def _compose_cached(overrides: tuple[str, ...]) -> FedsiloConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return validate(cfg)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> FedsiloConfig:
    """Compose and validate the config for ``overrides`` (cached per process).

    The result is shared between callers: treat it as read-only.
    """
    return _compose_cached(tuple(overrides))


def from_run_config(run_config: dict[str, Any]) -> FedsiloConfig:
    """The config of a Flower run: composes ``run_config["overrides"]`` (cached by its text:
    every message a site handles asks for it)."""
    return _from_overrides_text(str(run_config.get("overrides", "")))


@lru_cache(maxsize=32)
def _from_overrides_text(text: str) -> FedsiloConfig:
    return compose(parse_overrides(text))


def to_dict(cfg: FedsiloConfig) -> dict[str, Any]:
    """Plain, JSON-serialisable dict of a typed config."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
