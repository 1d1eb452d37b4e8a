"""A site's own policy: what it agrees to do, checked on every message before any work.

A coordinator that deviates from the protocol can send any run config and any message. A site
therefore answers by the policy *it* holds, never by what the coordinator says it should
accept. The policy is a YAML file the site operator writes (``fedsilo site --policy site.yaml``
or node config ``policy-path``); a deployed site without one runs under :data:`DEFAULT`. In a
simulation (a node with no data of its own, only ``partition-id``: the whole federation is one
process and one operator) every site takes the config's ``site_policy``
section, so a policy can be tried on all sites at once.

Every field, with its default (safe for a bank: nothing a deviating coordinator can raise
beyond what is standard in the field; docs/deployment.md "The site's policy"):

``tasks`` ([] = any)
    the task names this site trains.
``schema_sha256`` (null)
    ``task=tabular``: the fingerprint of the schema the site agreed to; its own schema file must
    have it (``fedsilo site --check`` prints it).
``max_rounds`` (1000)
    no run with more rounds (each round releases something).
``aggregation.allowed`` ([plain, secagg, paillier]) and ``aggregation.min_sites`` (2)
    how its updates and statistics may reach the coordinator, and the fewest sites any sum may
    combine.
``privacy.required`` (none | dpsgd), ``max_epsilon`` (10), ``max_delta`` (1e-5),
``min_noise_multiplier`` (0), ``one_release_per_round`` (true)
    ``dpsgd``: no training without DP-SGD. Whatever the run asks, a DP-SGD run's budget, delta
    and noise stay within these; the site's ledger across all its jobs on the same data
    (:mod:`privacy.site_ledger`) never passes ``max_epsilon``.
``evaluation.max_bins`` (8192), ``min_test_rows`` (10), ``test_fraction`` ([0.05, 0.5])
    pooled test metrics: the finest histogram the site contributes to, the fewest held-out rows
    it reports on, the share of its rows it may be asked to hold out.
``statistics.min_rows`` (10)
    no statistic (moments, spreads, category lists, metrics) over fewer of the site's rows; a
    category seen in fewer rows is not named to the coordinator.
``statistics.min_count`` (5), ``site_columns`` (true)
    descriptive tables (``learner=table1``, ``fedsilo stats``): every count the site releases is 0
    or at least ``min_count`` (smaller cells suppressed with their complement, histograms coarsened,
    small group levels and variables withheld); ``site_columns``: whether the site releases its own
    column (its statistics alone, after that control) besides its share of the pooled ones.
``secure_aggregation.min_neighbours`` (2), ``colluders`` (0), ``threshold`` (0.5)
    ``aggregation=secagg``: the fewest neighbours the site masks with, how many sites of its
    neighbourhood may work with the coordinator without its update being read alone, and the least
    share of its neighbourhood its self-mask's threshold may be. The site computes its threshold
    from the neighbourhood it is given (``floor((n + colluders + 1) / 2) + 1`` at least) and reveals
    nothing for fewer survivors (docs/secure-aggregation.md).
``vertical.allowed`` ([hetero_lr, split_nn, secureboost])
    the vertical protocols a party takes part in.
``apps`` ([fedsilo])
    the only Flower app that runs at the site: the installed fedsilo. Any other FAB gets an error
    reply and no process (:mod:`app.runtime.site_worker`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from core import state

#: Node-config key of the site's policy file.
NODE_CONFIG_KEY = "policy-path"


@dataclass
class AggregationPolicy:
    """``aggregation``: the options the site takes part in, and the fewest sites of a run."""

    allowed: list[str] = field(default_factory=lambda: ["plain", "secagg", "paillier"])
    min_sites: int = 2


@dataclass
class PrivacyPolicy:
    """``privacy``: the mechanism the site requires and the bounds it sets it."""

    required: str = "none"          # none | dpsgd
    max_epsilon: float = 10.0
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.0
    one_release_per_round: bool = True


@dataclass
class EvaluationPolicy:
    """``evaluation``: what pooled test metrics the site reports."""

    max_bins: int = 8192
    min_test_rows: int = 10
    test_fraction: list[float] = field(default_factory=lambda: [0.05, 0.5])


@dataclass
class StatisticsPolicy:
    """``statistics``: the fewest rows the site releases a statistic of, and how many sums a run may ask of it."""

    min_rows: int = 10
    min_count: int = 5        # descriptive tables: every released count is 0 or at least this (learners.table1)
    site_columns: bool = True  # descriptive tables: the site releases its own column too
    max_sums: int = 1000  # protected-sum program steps (statistics, pooled metrics, a learner's sums) per run


@dataclass
class SecureAggregationPolicy:
    """``secure_aggregation``: the fewest neighbours, the colluders assumed and the threshold share."""

    min_neighbours: int = 2
    colluders: int = 0
    threshold: float = 0.5


@dataclass
class VerticalPolicy:
    """``vertical``: the vertical models the site takes part in."""

    allowed: list[str] = field(default_factory=lambda: ["hetero_lr", "split_nn", "secureboost"])


@dataclass
class SitePolicy:
    """The policy schema (config group ``site_policy`` in simulation; a site's YAML file otherwise)."""

    tasks: list[str] = field(default_factory=list)
    schema_sha256: str | None = None
    max_rounds: int = 1000
    aggregation: AggregationPolicy = field(default_factory=AggregationPolicy)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    evaluation: EvaluationPolicy = field(default_factory=EvaluationPolicy)
    statistics: StatisticsPolicy = field(default_factory=StatisticsPolicy)
    secure_aggregation: SecureAggregationPolicy = field(default_factory=SecureAggregationPolicy)
    vertical: VerticalPolicy = field(default_factory=VerticalPolicy)
    apps: list[str] = field(default_factory=lambda: ["fedsilo"])


DEFAULT = SitePolicy()


class PolicyError(ValueError):
    """A policy file that cannot be read or does not fit the schema (named field, never guessed)."""


def validate(policy: SitePolicy, where: str = "site policy") -> SitePolicy:
    """Check ranges; raise :class:`PolicyError` naming the field."""
    def need(ok: bool, key: str, value: Any, what: str) -> None:
        if not ok:
            raise PolicyError(f"{where}: {key}={value!r}: expected {what}")

    p = policy
    need(p.max_rounds >= 1, "max_rounds", p.max_rounds, "an integer >= 1")
    need(p.aggregation.min_sites >= 2, "aggregation.min_sites", p.aggregation.min_sites, "an integer >= 2")
    need(p.privacy.required in ("none", "dpsgd"), "privacy.required", p.privacy.required, "none or dpsgd")
    need(math.isfinite(p.privacy.max_epsilon) and p.privacy.max_epsilon > 0, "privacy.max_epsilon",
         p.privacy.max_epsilon, "a number > 0")
    need(0 < p.privacy.max_delta < 1, "privacy.max_delta", p.privacy.max_delta, "a number in (0, 1)")
    need(p.privacy.min_noise_multiplier >= 0, "privacy.min_noise_multiplier", p.privacy.min_noise_multiplier,
         "a number >= 0")
    need(p.evaluation.max_bins >= 2, "evaluation.max_bins", p.evaluation.max_bins, "an integer >= 2")
    need(p.statistics.max_sums >= 1, "statistics.max_sums", p.statistics.max_sums, "an integer >= 1")
    need(p.evaluation.min_test_rows >= 1, "evaluation.min_test_rows", p.evaluation.min_test_rows, "an integer >= 1")
    tf = p.evaluation.test_fraction
    need(len(tf) == 2 and 0 <= tf[0] <= tf[1] < 1, "evaluation.test_fraction", tf, "[low, high] with 0 <= low <= high < 1")
    need(p.statistics.min_rows >= 1, "statistics.min_rows", p.statistics.min_rows, "an integer >= 1")
    need(p.statistics.min_count >= 1, "statistics.min_count", p.statistics.min_count, "an integer >= 1")
    sa = p.secure_aggregation
    need(sa.min_neighbours >= 1, "secure_aggregation.min_neighbours", sa.min_neighbours, "an integer >= 1")
    need(sa.colluders >= 0, "secure_aggregation.colluders", sa.colluders, "an integer >= 0")
    need(0.5 <= sa.threshold <= 1, "secure_aggregation.threshold", sa.threshold, "a share in [0.5, 1]")
    need(p.apps == ["fedsilo"], "apps", p.apps, "[fedsilo] (the installed fedsilo is the only app a site runs)")
    return policy


def load(path: str | Path) -> SitePolicy:
    """A site's policy file: YAML, every key optional, unknown keys refused, no interpolation."""
    import yaml

    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as err:
        raise PolicyError(f"site policy {path} cannot be read: {err.strerror or err}") from err
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise PolicyError(f"site policy {path} is not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise PolicyError(f"site policy {path}: expected a mapping of fields (docs/deployment.md)")
    if "${" in text:
        raise PolicyError(f"site policy {path}: interpolation (${{...}}) is not allowed in a policy")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SitePolicy), raw)
        obj = OmegaConf.to_object(merged)
    except Exception as err:  # omegaconf's ValidationError / ConfigKeyError name the key
        raise PolicyError(f"site policy {path}: {err}".splitlines()[0]) from err
    assert isinstance(obj, SitePolicy)
    return validate(obj, f"site policy {path}")


is_simulated = state.is_simulated  # the one definition, in core (privacy needs it too)


_LOADED: dict[tuple[str, int, int], SitePolicy] = {}


def of(node_config: Any, run_policy: SitePolicy | None = None) -> SitePolicy:
    """The policy this node answers by: its own file; else, in a simulation, the run's; else :data:`DEFAULT`."""
    path = node_config.get(NODE_CONFIG_KEY)
    if path:
        p = Path(str(path)).expanduser()
        try:
            st = p.stat()
            key = (str(p), st.st_size, st.st_mtime_ns)
        except OSError as err:
            raise PolicyError(f"site policy {p} cannot be read: {err.strerror or err}") from err
        if key not in _LOADED:
            _LOADED[key] = load(p)
        return _LOADED[key]
    if run_policy is not None and is_simulated(node_config):
        return validate(run_policy, "site_policy")
    return DEFAULT


def describe(policy: SitePolicy) -> list[str]:
    """One line per field, for ``fedsilo site --check``."""
    out: list[str] = []

    def walk(prefix: str, obj: Any) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if hasattr(value, "__dataclass_fields__"):
                walk(f"{prefix}{f.name}.", value)
            else:
                out.append(f"{prefix}{f.name}: {'any' if f.name == 'tasks' and not value else value}")
    walk("", policy)
    return out


def to_dict(policy: SitePolicy) -> dict[str, Any]:
    """The policy as a plain dict."""
    return asdict(policy)
