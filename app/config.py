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
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import aggregation
import learners as _learner_packages  # noqa: F401  (registers learner=gbdt, its program: coordinator and sites)
import privacy
import strategies
import tasks
from aggregation import compression
from aggregation.base import AggregationConfig
from app.faults import config as faults_config
from app.faults.config import FaultsConfig
from app.site_policy import SitePolicy
from app.tracking import trackers
from app.tracking.mlflow_tracker import MlflowConfig
from core.config import ConfigError, check
from privacy.base import PrivacyConfig
from strategies import config as strategy_config
from strategies.buffered import DISPATCH
from strategies.config import FedProxConfig, StrategyConfig
from tasks import learners
from tasks.base import PartitionConfig, TaskConfig
from tasks.learners import LearnerConfig
from vertical import config as vertical_config
from vertical.config import VerticalConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

#: Option lists, each owned by its package (re-exported for the CLI and docs).
STRATEGIES = tuple(strategies.REGISTRY)
AGGREGATIONS = tuple(aggregation.REGISTRY)
PRIVACY = tuple(privacy.REGISTRY)
LOGGERS = tuple(trackers.REGISTRY)


@dataclass
class FedsiloConfig:
    """Root schema (``conf/config.yaml``)."""

    task: TaskConfig = MISSING
    strategy: StrategyConfig = MISSING
    aggregation: AggregationConfig = MISSING
    privacy: PrivacyConfig = MISSING
    partition: PartitionConfig = MISSING
    vertical: VerticalConfig = MISSING
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)  # how the model is fitted (tasks/learners.py)
    num_rounds: int = 10
    num_sites: int = 5
    seed: int = 0
    data_dir: str | None = None
    resume: str | None = None      # a run directory (or its checkpoint.npz) to continue from
    checkpoint: bool = True        # write checkpoint.npz after every round
    report: bool = True            # write report.html and report.md after the run (fedsilo command)
    logger: str = "none"           # none | tensorboard | mlflow (app/tracking/trackers.py)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    audit: bool = False            # membership-inference audit of the final model after the run (fedsilo audit)
    audit_references: int = 8      # reference models of the offline LiRA attack (0 = loss threshold only)
    simulation: dict[str, Any] = field(default_factory=dict)
    site_policy: SitePolicy = field(default_factory=SitePolicy)  # every site's, in a simulation only (app/site_policy.py)


def register_schemas() -> None:
    """Register every package's schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="fedsilo_schema", node=FedsiloConfig)
    cs.store(group="task", name="task_schema", node=TaskConfig)
    cs.store(group="partition", name="partition_schema", node=PartitionConfig)
    cs.store(group="strategy", name="strategy_schema", node=StrategyConfig)
    cs.store(group="strategy", name="fedprox_schema", node=FedProxConfig)
    cs.store(group="aggregation", name="aggregation_schema", node=AggregationConfig)
    for agg in aggregation.REGISTRY.values():
        if agg.schema is not AggregationConfig:
            cs.store(group="aggregation", name=f"{agg.name}_schema", node=agg.schema)
    cs.store(group="privacy", name="privacy_schema", node=PrivacyConfig)
    cs.store(group="vertical", name="vertical_schema", node=VerticalConfig)
    for opt in privacy.REGISTRY.values():
        if opt.schema is not PrivacyConfig:
            cs.store(group="privacy", name=f"{opt.name}_schema", node=opt.schema)


register_schemas()


def validate(cfg: DictConfig | FedsiloConfig) -> FedsiloConfig:
    """Resolve ``cfg`` into typed dataclasses and check every range and choice.

    Each package checks its own keys; the rules *between* axes are derived here from the
    aggregation option's capabilities and what the strategy settings and the privacy option
    need. Returns the typed config; raises :class:`ConfigError` naming the first bad key.
    """
    if isinstance(cfg, DictConfig):
        obj = OmegaConf.to_object(cfg)
        assert isinstance(obj, FedsiloConfig)
        cfg = obj
    tasks.validate(cfg.task, cfg.partition)
    learners.validate(cfg.learner, tasks.get(cfg.task.name))
    strategy_config.validate(cfg.strategy)
    check(cfg.aggregation.name in aggregation.REGISTRY, "aggregation.name", cfg.aggregation.name,
          f"one of {list(aggregation.REGISTRY)}")
    option = aggregation.get(cfg.aggregation.name)
    caps = option.capabilities
    for need, (key, value, neutral, instead) in strategy_config.needs(cfg.strategy):
        check(not caps.missing([need]), key, value,
              f"{neutral} with aggregation={option.name}: {caps.WHY_NOT[need]}, so {instead}")
    option.validate(cfg.aggregation, num_sites(cfg))
    compression.check(option, cfg.aggregation)
    faults_config.validate(cfg.faults)
    check(cfg.privacy.name in privacy.REGISTRY, "privacy.name", cfg.privacy.name, f"one of {list(privacy.REGISTRY)}")
    mechanism = privacy.get(cfg.privacy.name)
    mechanism.validate(cfg.privacy)
    mechanism.check_strategy(cfg.strategy)
    for need, why in mechanism.needs.items():
        check(not caps.missing([need]), "aggregation.name", cfg.aggregation.name,
              f"one whose coordinator {need.replace('_', ' ')} with privacy={mechanism.name} ({why})")
    _check_strategy_fits(cfg)
    vertical_config.validate(cfg.vertical)
    if cfg.vertical.name != "none":  # a vertical run has its own protocols: the horizontal axes stay default
        for key, value, default in (("aggregation.name", cfg.aggregation.name, "plain"),
                                    ("privacy.name", cfg.privacy.name, "none"),
                                    ("strategy.name", cfg.strategy.name, "fedavg"),
                                    ("strategy.server_opt", cfg.strategy.server_opt, "none"),
                                    ("strategy.personal", cfg.strategy.personal, "none")):
            check(value == default, key, value, f"{default} with vertical={cfg.vertical.name} (vertical runs carry "
                  "their own protection: Paillier for hetero_lr, vertical.protection for split_nn)")
        check(len(cfg.vertical.parties) >= 2, "vertical.parties", len(cfg.vertical.parties),
              "an active party and at least one passive party")
    if not learners.get(cfg.learner.name).rounds:  # a sum-based learner: one protected-sum program, no rounds
        torch_only = "; add learner.name=torch to train the task's torch model by rounds"
        for key, value, default in (("privacy.name", cfg.privacy.name, "none"),
                                    ("vertical.name", cfg.vertical.name, "none")):
            check(value == default, key, value, f"{default} with learner={cfg.learner.name} (a sum-based learner "
                  f"is protected by the aggregation option; differential privacy of its sums is not built yet){torch_only}")
        check(not cfg.audit, "audit", cfg.audit, f"false with learner={cfg.learner.name} (the membership-inference "
              f"audit attacks a torch model){torch_only}")
    check(cfg.num_rounds >= 1, "num_rounds", cfg.num_rounds, "an integer >= 1")
    check(cfg.strategy.buffer == 0 or cfg.num_rounds < DISPATCH, "num_rounds", cfg.num_rounds,
          f"fewer than {DISPATCH} model versions with strategy.buffer > 0")
    check(cfg.num_sites >= 2, "num_sites", cfg.num_sites, "an integer >= 2")
    check(cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    check(cfg.logger in LOGGERS, "logger", cfg.logger, f"one of {list(LOGGERS)}")
    check(bool(cfg.mlflow.experiment.strip()), "mlflow.experiment", cfg.mlflow.experiment, "a non-empty experiment name")
    check(cfg.audit_references >= 0, "audit_references", cfg.audit_references, "an integer >= 0")
    return cfg


def _check_strategy_fits(cfg: FedsiloConfig) -> None:
    """Strategy settings that depend on the task's model and optimizer or on the privacy option."""
    s = cfg.strategy
    if s.name in strategy_config.SIDE_VALUES:
        check(cfg.task.optimizer == "sgd", "task.optimizer", cfg.task.optimizer,
              f"sgd with strategy.name={s.name} (its normalizer counts SGD steps; Adam's steps have none)")
        check(cfg.privacy.name != "central", "privacy.name", cfg.privacy.name,
              f"none or dpsgd with strategy.name={s.name} (central DP would clip and noise its side values with "
              "the update)")
    if s.personal == "fedper":
        check(cfg.task.model != "logreg", "task.model", cfg.task.model,
              "mlp (or cnn) with strategy.personal=fedper: a logistic regression is all head, nothing would be "
              "shared; or use strategy.personal=ditto or finetune")
    if s.personal == "fedbn":
        check(cfg.task.model == "cnn", "task.model", cfg.task.model,
              "cnn with strategy.personal=fedbn (only the CNN has normalization layers); or use strategy.personal="
              "fedper, ditto or finetune")


def num_sites(cfg: FedsiloConfig) -> int:
    """The number of sites this config trains with (natural splits have their own count).

    Worked out once per composed config (a natural split of sites' own files lists their folder)
    and kept on it: every later call of a run, at the coordinator or a site, reads it back."""
    known = cfg.__dict__.get("_num_sites")
    if known is None:
        known = cfg.__dict__["_num_sites"] = _count_sites(cfg)
    return int(known)


def _count_sites(cfg: FedsiloConfig) -> int:
    from app.support.paths import resolve_data_dir

    if cfg.vertical.name != "none":
        return len(cfg.vertical.parties)
    task_cls = tasks.get(cfg.task.name)
    if cfg.partition.name != "natural" or not task_cls.federated_data:
        return task_cls.num_sites(cfg.partition, cfg.num_sites)
    return task_cls.num_sites(cfg.partition, cfg.num_sites, cfg.task, resolve_data_dir(cfg.data_dir))


def parse_overrides(text: str) -> list[str]:
    """Split a run-config ``overrides`` string into Hydra override tokens (shell quoting)."""
    return list(_split(text))


@lru_cache(maxsize=64)
def _split(text: str) -> tuple[str, ...]:  # every message of a run carries the same string: split it once
    return tuple(shlex.split(text))


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


class RunConfigRefused(ValueError):
    """A run config a site will not compose (see :func:`site_config`)."""


#: The top-level keys a run config's overrides may set at a site: the schema's fields (no ``hydra``
#: keys: ``hydra.searchpath`` would make the site read config files from a path the coordinator chose).
SITE_KEYS = frozenset(f.name for f in fields(FedsiloConfig))


def site_config(run_config: dict[str, Any], node_config: Any) -> FedsiloConfig:
    """The config of a Flower run as a *site* reads it: data, never code or a path to read.

    The coordinator's overrides are refused if they hold an interpolation (``${...}``: OmegaConf
    resolvers such as ``oc.env`` would read the site's environment) or set anything but the
    schema's own keys. Outside a simulation, ``data_dir`` is the site's own (node config
    ``data-dir``, else this installation's bundled data), never the coordinator's: the site's
    data, schema and state paths come from its node config (:func:`app.plan.site_plan`).
    """
    from app import site_policy

    text = str(run_config.get("overrides", ""))
    if "${" in text:
        raise RunConfigRefused("its overrides hold an interpolation ('${'); a site takes configuration as data, "
                               "never as an expression to evaluate")
    tokens = parse_overrides(text)
    for token in tokens:
        key = token.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("@", 1)[0]
        if key not in SITE_KEYS:
            raise RunConfigRefused(f"it overrides {key!r}, which is not a fedsilo setting a site accepts")
    if not site_policy.is_simulated(node_config):
        tokens = [t for t in tokens if not t.lstrip("+~").startswith("data_dir=")]
        if node_config.get("data-dir"):
            tokens.append(f"data_dir={node_config['data-dir']}")
    return _from_site_tokens(tuple(tokens))


@lru_cache(maxsize=32)
def _from_site_tokens(tokens: tuple[str, ...]) -> FedsiloConfig:
    return compose(tokens)


__all__ = ["AGGREGATIONS", "CONF_DIR", "PRIVACY", "STRATEGIES", "ConfigError", "FaultsConfig", "FedsiloConfig",
           "compose", "from_run_config", "site_config", "num_sites", "parse_overrides", "run_overrides", "to_dict", "validate"]


def to_dict(cfg: FedsiloConfig) -> dict[str, Any]:
    """Plain, JSON-serialisable dict of a typed config."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
