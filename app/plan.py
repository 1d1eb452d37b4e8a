"""Run plans: what the entry points need, resolved once per run (coordinator) or per site (each node).

* :class:`RunPlan`, the coordinator's: the config (composed once), the number of sites (worked out
  once), the output folder, the learner and the task.
* :class:`SitePlan`, a site's: the config as the site reads it (data, never code), its own policy,
  its task and its data as the task keeps them, its layers (the aggregation option's site half and
  the privacy option's trainer). Cached per run config, node config and the modification stamps
  of the site's own files, so the simulation engine's workers and a deployed site's long-lived
  worker resolve it once, not per message.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.common import log

import tasks
from aggregation.base import MaskingLimits, SiteEnv
from app import composition, config, site_guard, site_policy
from app.faults import attacks
from app.faults import dropouts as faults
from app.site_policy import SitePolicy
from app.support.paths import default_output_dir, resolve_data_dir
from core.identity import IdentityError, SiteIdentity
from core.replies import ReplyError, SiteRefusal
from core.state import default_root
from privacy.base import SiteLimits
from tasks import learners, site_file
from tasks.base import OpenTotal, SiteData, SiteSource, Split, Task
from tasks.federated import SchemaMismatch
from tasks.tabular.schema import SchemaError
from tasks.tabular.table import SiteInputError

#: A site's own data or schema not fitting the federation: refused with the reason, never a crash.
DATA_ERRORS = (SiteInputError, SchemaError, SchemaMismatch, site_file.SiteDataError)


def refused(msg: Message, context: Context, err: Exception) -> Message:
    """The reply of a site whose own data or schema do not fit: the reason names file, column and
    row (``SiteInputError.public``), never a value or an id; the whole message goes to the site's log."""
    name = str(context.node_config.get("site-name", context.node_config.get("partition-id", "site")))
    public = getattr(err, "public", str(err))
    if public != str(err):
        log(WARNING, "site %s: %s", name, err)
    return SiteRefusal(ReplyError.BAD_DATA, public).reply(msg, name)


@dataclass
class RunPlan:
    """The coordinator's view of a run, composed once (see the module docstring)."""

    cfg: config.FedsiloConfig
    num_sites: int
    out_dir: Path
    run_id: int
    overrides: str

    @classmethod
    def of(cls, context: Context) -> RunPlan:
        """The plan of ``context``'s run: its config, sites and output folder (``output-dir``)."""
        cfg = config.from_run_config(context.run_config)
        out = str(context.run_config.get("output-dir", "") or "")
        return cls(cfg, config.num_sites(cfg), Path(out) if out else default_output_dir(context.run_id),
                   context.run_id, str(context.run_config.get("overrides", "")))

    @property
    def learner(self) -> learners.Learner:
        """How the model is fitted (``learner.name``)."""
        return learners.get(self.cfg.learner.name)

    @cached_property
    def task(self) -> Task:
        """The task object (at the coordinator of rows that stay at the sites: without rows)."""
        return tasks.get(self.cfg.task.name)(self.cfg.task, resolve_data_dir(self.cfg.data_dir))


@dataclass
class SitePlan:
    """A site's view of a run, resolved once per run and node (see the module docstring)."""

    cfg: config.FedsiloConfig
    num_sites: int
    task: Task
    source: SiteSource
    policy: SitePolicy
    node: dict[str, Any]

    @cached_property
    def layers(self) -> composition.SiteLayers:
        """The aggregation option's site half and the privacy option's trainer."""
        return composition.site(self.cfg)

    @property
    def limits(self) -> SiteLimits:
        """The bounds the site's policy sets its privacy mechanism."""
        return site_guard.limits_of(self.policy)

    def _config(self, msg: Message, context: Context) -> tuple[ConfigRecord | None, OpenTotal]:
        """``msg``'s config and how the site opens the totals it carries (the aggregation option's site half)."""
        record = msg.content.config_records.get("config")
        half = self.layers.aggregation
        return record, lambda key: half.open_total(context, record or ConfigRecord(), key)

    def site_data(self, msg: Message, context: Context) -> SiteData:
        """The site's training and validation tensors for ``msg`` (rows kept at the site: transformed by
        the preprocessing its config's totals describe, opened by the aggregation option)."""
        return self.task.site_data(self.source, *self._config(msg, context))

    def own_test_rows(self, msg: Message, context: Context) -> tuple[SiteData, Split, str]:
        """(the site's data, the held-out rows of its own it scores personal models on, what they are)."""
        partition = None if "data-path" in self.node else self.cfg.partition
        return self.task.own_test_rows(self.source, *self._config(msg, context), partition)

    def env(self, context: Context) -> SiteEnv:
        """What the site halves of aggregation options are told about this site (and its policy's bounds)."""
        cfg, site, n = self.cfg, self.source, self.num_sites
        attacker = attacks.is_attacker(cfg, site.site_id, n)

        def drops(server_round: int, stage: str | None) -> bool:
            return faults.drops(cfg, server_round, site.site_id, stage, n)

        def dropped_reply(msg: Message, stage: str | None) -> Message:
            return SiteRefusal(ReplyError.DROPPED, faults.reason(stage)).reply(msg, site.name)

        node = self.node
        simulated = site_policy.is_simulated(node)
        state_dir = str(node["state-dir"]) if node.get("state-dir") else None if simulated else str(default_root())
        # Honest sites bound their own updates where the option asks them to (strategy.norm_bound under secagg).
        return SiteEnv(site.site_id, site.name, cfg.seed, len(site.train), 0.0 if attacker else cfg.strategy.norm_bound,
                       drops, dropped_reply, attacker, self.policy.aggregation.min_sites,
                       MaskingLimits(**vars(self.policy.secure_aggregation)), lambda: site_identity(node, site.name),
                       state_dir)


def site_identity(node: dict, name: str) -> SiteIdentity:
    """The site's signing identity and the roster it trusts: node config ``site-key`` and ``roster``
    (``fedsilo keys roster``; required at a deployed site); in a simulation without them, derived from
    the site's name."""
    if "site-key" in node and "roster" in node:
        return SiteIdentity.load(str(node.get("site-name", name)), str(node["site-key"]), str(node["roster"]))
    if site_policy.is_simulated(node):  # one process, one operator: identities derived from the names
        return SiteIdentity.simulated(name)
    raise IdentityError("a deployed site needs its identity key and the consortium's roster (node config "
                        "site-key and roster; fedsilo keys roster --sites ... makes them)")


def site_plan(context: Context) -> SitePlan:
    """The node's plan for ``context``'s run; a clear error if the federation does not fit.

    A deployed site names its own data in its node config (``data-path``, written by ``fedsilo data
    split`` or by the site itself); in a simulation the node's ``partition-id`` selects its share of
    the task's data. The same few sites answer many messages per process: the plan is kept per run
    config, node config and the size and modification time of the site's own files (an edited file
    is read again)."""
    node = context.node_config
    key = (str(context.run_config.get("overrides", "")), tuple(sorted((k, str(v)) for k, v in node.items())),
           tuple(_stamp(node[k]) for k in ("data-path", "schema-path", site_policy.NODE_CONFIG_KEY) if k in node))
    if key not in _PLANS:
        if len(_PLANS) >= 4096:
            _PLANS.clear()
        _PLANS[key] = _resolve(context)
    return _PLANS[key]


def _stamp(path: object) -> tuple[str, int, int]:
    try:
        st = Path(str(path)).expanduser().stat()
    except OSError:
        return str(path), -1, -1
    return str(path), st.st_size, st.st_mtime_ns


_PLANS: dict[tuple[object, ...], SitePlan] = {}


def _resolve(context: Context) -> SitePlan:
    node = dict(context.node_config)
    cfg = config.site_config(context.run_config, node)
    task_cls = tasks.get(cfg.task.name)
    if "schema-path" in node:
        task_cfg = replace(cfg.task, schema=str(node["schema-path"]))
    elif task_cls.federated_data and cfg.task.name == "tabular" and not site_policy.is_simulated(node):
        # a path from the coordinator is never read at a site: the schema is the site's own file
        raise SchemaError("this site has no schema of its own: start it with --schema FILE.yaml (node config "
                          "schema-path); a deployed site never reads a schema path the coordinator sends")
    else:
        task_cfg = cfg.task
    task = task_cls(task_cfg, resolve_data_dir(cfg.data_dir))
    n_sites = config.num_sites(cfg)
    policy = site_guard.policy_for(context, cfg)
    task.agree(policy.schema_sha256 or "")
    if "data-path" in node:  # a deployed site's own data
        path = Path(str(node["data-path"])).expanduser()
        site_id = int(node.get("partition-id", 0))
        source = task.site_from_file(path, site_id, str(node.get("site-name", path.stem)), cfg.seed, n_sites)
        return SitePlan(cfg, n_sites, task, source, policy, node)
    if "partition-id" not in node and not task_cls.federated_data:
        raise ValueError("node config has neither 'data-path' nor 'partition-id': start the SuperNode with "
                         "--node-config 'data-path=\"/path/to/site.npz\"' (fedsilo data split) or "
                         "'partition-id=<i> num-partitions=<n>'")
    pid = int(node.get("partition-id", -1))
    n_parts = int(node.get("num-partitions", n_sites))
    if not task_cls.federated_data and (n_parts != n_sites or not 0 <= pid < n_sites):
        raise ValueError(
            f"this federation has {n_parts} nodes but the config defines {n_sites} sites "
            f"(task={cfg.task.name}, partition={cfg.partition.name}); partition-id={pid}"
        )
    return SitePlan(cfg, n_sites, task, task.site_from_partition(cfg.partition, n_sites, cfg.seed, pid), policy, node)
