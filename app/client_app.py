"""fedsilo's ClientApp: what runs at each site.

The site composes the same config as the server from the run config, loads *its own*
partition (selected by the node config's ``partition-id``, or its own file by
``data-path``), and runs one round of local work through its layers (:mod:`app.composition`):

1. the aggregation option's site half turns the message into the global model (decrypting
   under Paillier);
2. the strategy's systems-heterogeneity plan says how much work this round gets, and the
   strategy's site term (FedProx's proximal term) joins the objective;
3. the privacy option's trainer trains (plain, or DP-SGD with the site's ledger);
4. the aggregation option's site half sends the update in its form (in the clear, masked,
   encrypted). Its protocol messages (secure aggregation's key stages) reach it through
   :func:`query`.

Data and model are cached per process; nothing about the site is kept in module globals
across runs except that cache. Handlers are module-level functions: the simulation engine
pickles the ClientApp with every message, and a closure would be pickled by value.
"""

from __future__ import annotations

import time
from dataclasses import replace
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

import aggregation
import strategies
import tasks
from aggregation.base import LocalResult, MaskingLimits, SiteEnv
from app import composition, config, federated, site_guard, site_policy
from app.faults import attacks, slow
from app.faults import dropouts as faults
from app.runtime.paths import resolve_data_dir
from core.identity import IdentityError, SiteIdentity
from core.replies import ReplyError, SiteRefusal
from core.seeding import seed_for
from core.sites import SITE_KEY, WEIGHT_KEY, site_record_for
from core.state import JOB_KEY, SiteStore, default_root
from strategies import heterogeneity, personal
from strategies.site import SiteRound, StrategySite, model_part
from tasks import site_file
from tasks.base import SiteData, Split, Task
from tasks.metrics import summary_for
from tasks.tabular.schema import SchemaError
from tasks.tabular.table import SiteInputError
from tasks.tabular.task import RawSite, TabularTask
from tasks.training import Penalty, predict, steps_per_epoch

#: Every message passes the site's guard first: the run config as data, the site's own policy (app/site_guard.py).
app = ClientApp(mods=[site_guard.guard])

#: A site's own data or schema not fitting the federation: refused with the reason, never a crash.
DATA_ERRORS = (SiteInputError, SchemaError, federated.SchemaMismatch, site_file.SiteDataError)


def load_site(context: Context, msg: Message | None = None) -> tuple[config.FedsiloConfig, Task, SiteData]:
    """This node's config, task and data; a clear error if the federation does not fit.

    A deployed site names its own data file in its node config (``data-path``, written by
    ``fedsilo data split`` or by the site itself); otherwise (simulation) the node's
    ``partition-id`` selects its share of the task's bundled data. A task whose rows are
    preprocessed federally (``task=tabular``) applies the transform the message's config
    carries (:mod:`app.federated`).
    """
    cfg, task, source = load_source(context)
    if isinstance(source, SiteData):
        return cfg, task, source
    if msg is None or "config" not in msg.content.config_records:
        raise ValueError(f"task={cfg.task.name}: a message without the preprocessing config reached the site")
    assert isinstance(task, TabularTask)
    prep = federated.site_prep(task, msg.content.config_records["config"], composition.site(cfg).aggregation, context)
    return cfg, task, task.prepared(source, prep)[0]


def load_source(context: Context) -> tuple[config.FedsiloConfig, Task, SiteData | RawSite]:
    """This node's config, task and data as the task keeps them (raw rows for ``task=tabular``)."""
    node = context.node_config
    # The same few sites answer many messages per process (the simulation engine's workers, a
    # deployed site's long-lived worker, app.runtime.site_worker): keyed by the run's config and the
    # node's, and for a site's own files by their size and modification time (an edited file is
    # read again).
    key = (str(context.run_config.get("overrides", "")), tuple(sorted((k, str(v)) for k, v in node.items())),
           tuple(_stamp(node[k]) for k in ("data-path", "schema-path", site_policy.NODE_CONFIG_KEY) if k in node))
    if key not in _SITES:
        if len(_SITES) >= 4096:
            _SITES.clear()
        _SITES[key] = _load_site(context)
    return _SITES[key]


def _stamp(path: object) -> tuple[str, int, int]:
    try:
        st = Path(str(path)).expanduser().stat()
    except OSError:
        return str(path), -1, -1
    return str(path), st.st_size, st.st_mtime_ns


_SITES: dict[tuple[object, ...], tuple[config.FedsiloConfig, Task, SiteData | RawSite]] = {}


def _load_site(context: Context) -> tuple[config.FedsiloConfig, Task, SiteData | RawSite]:
    node = context.node_config
    cfg = config.site_config(context.run_config, node)
    if "schema-path" in node:
        task_cfg = replace(cfg.task, schema=str(node["schema-path"]))
    elif cfg.task.name == "tabular" and not site_policy.is_simulated(node):
        # a path from the coordinator is never read at a site: the schema is the site's own file
        raise SchemaError("this site has no schema of its own: start it with --schema FILE.yaml (node config "
                          "schema-path); a deployed site never reads a schema path the coordinator sends")
    else:
        task_cfg = cfg.task
    task = tasks.get(cfg.task.name)(task_cfg, resolve_data_dir(cfg.data_dir))
    n_sites = config.num_sites(cfg)
    if isinstance(task, TabularTask):
        agreed = site_guard.policy_for(context, cfg).schema_sha256
        if agreed and task.fingerprint() != agreed:
            raise SchemaError(f"this site's schema ({task.described_by()}) has fingerprint {task.fingerprint()}, not "
                              f"the one its policy agreed to (schema_sha256: {agreed})")
        if "data-path" in node:  # a deployed site's own table
            path = Path(str(node["data-path"])).expanduser()
            site_id = int(node.get("partition-id", 0))  # type: ignore[call-overload]
            return cfg, task, task.raw_site_file(path, site_id, str(node.get("site-name", path.stem)), cfg.seed)
        pid = int(node.get("partition-id", -1))  # type: ignore[call-overload]
        return cfg, task, task.raw_site(cfg.partition, n_sites, cfg.seed, pid)
    if "data-path" in node:
        return cfg, task, site_file.load(str(node["data-path"]), task=cfg.task.name, num_sites=n_sites,
                                         input_shape=task.input_shape)
    if "partition-id" not in node:
        raise ValueError("node config has neither 'data-path' nor 'partition-id': start the SuperNode with "
                         "--node-config 'data-path=\"/path/to/site.npz\"' (fedsilo data split) or "
                         "'partition-id=<i> num-partitions=<n>'")
    pid, n_parts = int(node["partition-id"]), int(node.get("num-partitions", n_sites))
    if n_parts != n_sites or not 0 <= pid < n_sites:
        raise ValueError(
            f"this federation has {n_parts} nodes but the config defines {n_sites} sites "
            f"(task={cfg.task.name}, partition={cfg.partition.name}); partition-id={pid}"
        )
    return cfg, task, task.sites(cfg.partition, n_sites, cfg.seed)[pid]


def site_env(cfg: config.FedsiloConfig, site: SiteData | RawSite, context: Context | None = None) -> SiteEnv:
    """What the site halves of aggregation options are told about this site (and its policy's bounds)."""
    attacker = attacks.is_attacker(cfg, site.site_id)

    def drops(server_round: int, stage: str | None) -> bool:
        return faults.drops(cfg, server_round, site.site_id, stage)

    def dropped_reply(msg: Message, stage: str | None) -> Message:
        return SiteRefusal(ReplyError.DROPPED, faults.reason(stage)).reply(msg, site.name)

    # Honest sites bound their own updates where the option asks them to (strategy.norm_bound under secagg).
    policy = site_guard.policy_for(context, cfg) if context is not None else site_policy.DEFAULT
    node = context.node_config if context is not None else {}
    simulated = site_policy.is_simulated(node)
    state_dir = str(node["state-dir"]) if node.get("state-dir") else None if simulated else str(default_root())
    return SiteEnv(site.site_id, site.name, cfg.seed, len(site.train), 0.0 if attacker else cfg.strategy.norm_bound,
                   drops, dropped_reply, attacker, policy.aggregation.min_sites,
                   MaskingLimits(**vars(policy.secure_aggregation)), lambda: site_identity(node, site.name), state_dir)


def site_identity(node: dict, name: str) -> SiteIdentity:
    """This site's signing identity and the roster it trusts: node config ``site-key`` and ``roster``
    (``fedsilo keys roster``; required at a deployed site); in a simulation without them, derived from
    the site's name."""
    if "site-key" in node and "roster" in node:
        return SiteIdentity.load(str(node.get("site-name", name)), str(node["site-key"]), str(node["roster"]))
    if site_policy.is_simulated(node):  # one process, one operator: identities derived from the names
        return SiteIdentity.simulated(name)
    raise IdentityError("a deployed site needs its identity key and the consortium's roster (node config "
                        "site-key and roster; fedsilo keys roster --sites ... makes them)")


def _local_update(msg: Message, context: Context, cfg: config.FedsiloConfig, task: Task, site: SiteData,
                  layers: composition.SiteLayers, env: SiteEnv) -> LocalResult:
    """This round's local work; :class:`SiteRefusal` for a site that misses the round."""
    train_config = msg.content["config"]
    server_round = int(train_config["server-round"])  # type: ignore[index,call-overload]
    stage = layers.aggregation.train_stage
    if faults.drops(cfg, server_round, site.site_id, stage):
        raise SiteRefusal(ReplyError.DROPPED, faults.reason(stage))
    slowdown = slow.slowdown(cfg, site.site_id)
    work = heterogeneity.plan(
        cfg.strategy, cfg.task.local_epochs, steps_per_epoch(len(site.train), cfg.task.batch_size),
        cfg.seed, server_round, site.site_id, config.num_sites(cfg), slowdown,
    )
    if work.dropped:
        raise SiteRefusal(ReplyError.MISSED_DEADLINE, heterogeneity.MISSED_DEADLINE)
    model = task.build_model()
    glob = layers.aggregation.global_state(msg, context, model.state_dict())
    seed = seed_for(cfg.seed, server_round, site.site_id)
    half, rnd = strategy_round(cfg, task, site, context, train_config, server_round, seed)  # type: ignore[arg-type]
    penalty = half.start(glob, model, rnd)  # the model's weights (personal layers too) and the extra term
    byzantine = env.attacker
    train_rows = attacks.poison_data(cfg, site.train) if byzantine else site.train
    started = time.perf_counter()
    stats, records = layers.trainer.train(task, model, train_rows, seed, context, train_config,  # type: ignore[arg-type]
                                          site.name, work.epochs, work.max_steps, penalty, rnd.store,
                                          limits=site_guard.privacy_limits(context, cfg))
    slow.wait(slowdown, time.perf_counter() - started)  # faults.slow_fraction: this site computes slowly
    if byzantine:  # faults.byzantine_fraction: this site corrupts what it sends (for robustness studies)
        model.load_state_dict(attacks.poison_model(cfg, model.state_dict(), model_part(glob, model), server_round,
                                                   site.site_id))
    state = half.finish(model, glob, stats, rnd)  # the reply's record: the model and the strategy's side values
    site_rec = site_record_for(site.site_id, site.name, server_round, work.straggler)
    buffers = frozenset(name for name, _ in model.named_buffers())
    return LocalResult(state, stats, {SITE_KEY: site_rec, **records}, server_round, rnd.store, buffers, glob)


def strategy_round(cfg: config.FedsiloConfig, task: Task, site: SiteData, context: Context,
                   train_config: ConfigRecord, server_round: int, seed: int) -> tuple[StrategySite, SiteRound]:
    """The strategy's site half and what it may use this round: the site's own state store (node
    config ``state-dir``, else :func:`core.state.default_root`) under the coordinator's job id,
    and a trainer for personal models on the site's training rows (plain training, seeded apart
    from the round's own)."""
    store = None
    if JOB_KEY in train_config:
        root = context.node_config.get("state-dir") or default_root()
        store = SiteStore(str(root), str(train_config[JOB_KEY]), site.name)

    def train_more(model: torch.nn.Module, penalty: Penalty | None, epochs: int, lr: float) -> dict[str, float]:
        return task.train(model, site.train, seed_for(seed, 0x9E75), epochs=epochs, penalty=penalty, lr=lr)

    return strategies.site(cfg.strategy), SiteRound(train_config, server_round, store, task.cfg.lr, task.cfg.momentum,
                                                    train_more)


def refused(msg: Message, context: Context, err: Exception) -> Message:
    """The reply of a site whose own data or schema do not fit: the reason names file, column and
    row (``SiteInputError.public``), never a value or an id; the whole message goes to the site's log."""
    name = str(context.node_config.get("site-name", context.node_config.get("partition-id", "site")))
    public = getattr(err, "public", str(err))
    if public != str(err):
        log(WARNING, "site %s: %s", name, err)
    return SiteRefusal(ReplyError.BAD_DATA, public).reply(msg, name)


def train(msg: Message, context: Context) -> Message:
    """Load the global model, do this round's local work, reply through the aggregation option.

    The amount of work comes from the strategy's systems-heterogeneity settings
    (:mod:`strategies.heterogeneity`); the objective gets the term the server asked for
    (FedProx's proximal term when ``proximal-mu > 0``). The reply's weight is the site's
    number of training rows, whatever share of its work it managed.
    """
    torch.set_num_threads(1)
    try:
        cfg, task, site = load_site(context, msg)
    except DATA_ERRORS as err:
        return refused(msg, context, err)
    layers = composition.site(cfg)
    env = site_env(cfg, site, context)
    try:
        result = _local_update(msg, context, cfg, task, site, layers, env)
    except SiteRefusal as refusal:
        return refusal.reply(msg, site.name)
    return layers.aggregation.reply(msg, context, result, env)


def query(msg: Message, context: Context) -> Message:
    """A protocol message of the aggregation option (e.g. secure aggregation's key stages)."""
    try:
        cfg, _, site = load_source(context)
    except DATA_ERRORS as err:
        return refused(msg, context, err)
    return composition.site(cfg).aggregation.query(msg, context, site_env(cfg, site, context))  # type: ignore[arg-type]


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on the site's validation rows (counts, loss, site AUC)."""
    torch.set_num_threads(1)
    try:
        cfg, task, site = load_site(context, msg)
    except DATA_ERRORS as err:
        return refused(msg, context, err)
    layers = composition.site(cfg)
    server_round = int(msg.content["config"].get("server-round", 0))  # type: ignore[union-attr,call-overload]
    model = task.build_model()
    model.load_state_dict(layers.aggregation.global_state(msg, context, model.state_dict()))
    scores, loss = predict(model, site.val.x, site.val.y, kind=task.label_kind)
    summary = summary_for(task.label_kind, site.val.y.numpy(), scores, loss)
    content = RecordDict({
        "metrics": MetricRecord({WEIGHT_KEY: len(site.val), **summary}),
        SITE_KEY: site_record_for(site.site_id, site.name, server_round),
    })
    layers.aggregation.after_evaluate(context, model)  # e.g. Paillier's next obfuscators, ahead of training
    return Message(content, reply_to=msg)


def own_test_rows(cfg: config.FedsiloConfig, task: Task, context: Context, msg: Message) -> tuple[SiteData, Split, str]:
    """(the site's data, the rows it scores personal models on, what they are).

    ``task=tabular``: the site's own held-out test rows. A bundled task split by its natural
    sites (FLamby's hospitals): that site's share of the task's test set, its local test set. Any
    other split: the site's validation rows (its only held-out rows of its own distribution)."""
    cfg, task, source = load_source(context)
    if isinstance(source, RawSite):
        assert isinstance(task, TabularTask)
        prep = federated.site_prep(task, msg.content.config_records["config"], composition.site(cfg).aggregation,
                                   context)
        site, test = task.prepared(source, prep)
        return site, test, "own test rows"
    if cfg.partition.name == "natural" and "data-path" not in context.node_config:
        test = task.data().test
        assert test.group is not None
        return source, test.take(np.flatnonzero(test.group == source.site_id)), "local test rows"
    return source, source.val, "validation rows"


def _scores(task: Task, model: torch.nn.Module, rows: Split) -> dict[str, float]:
    scores, loss = predict(model, rows.x, rows.y, kind=task.label_kind)
    y = rows.y.numpy()
    out = {"loss": float(loss)}
    if task.label_kind == "binary":
        s = summary_for("binary", y, scores, loss)
        out["accuracy"] = (s["tp"] + s["tn"]) / max(1.0, float(len(y)))
        if s["auc_weight"] > 0:
            out["auc"] = s["auc"]
    elif task.label_kind == "multiclass":
        out["accuracy"] = float(np.mean(np.argmax(scores, axis=1) == y)) if len(y) else float("nan")
    return {k: v for k, v in out.items() if np.isfinite(v)}


@app.query("fedsilo_personal")
def personal_query(msg: Message, context: Context) -> Message:
    """Score the final global model and this site's personal model on its own test rows and on
    its validation rows (for choosing hyper-parameters without test rows; :mod:`strategies.personal`).
    The reply holds these summaries only."""
    torch.set_num_threads(1)
    try:
        cfg, task, _ = load_source(context)
        site, rows, _ = own_test_rows(cfg, task, context, msg)
        layers = composition.site(cfg)
        config_rec = msg.content["config"]
        server_round = int(config_rec["server-round"])  # type: ignore[index,call-overload]
        model = task.build_model()
        glob = layers.aggregation.global_state(msg, context, model.state_dict())
        model.load_state_dict(model_part(glob, model))
        out: dict[str, float] = {"rows": float(len(rows)), "val_rows": float(len(site.val))}
        global_test, global_val = _scores(task, model, rows), _scores(task, model, site.val)
        out.update({f"global/{k}": v for k, v in global_test.items()})
        out.update({f"val-global/{k}": v for k, v in global_val.items()})
        seed = seed_for(cfg.seed, server_round, site.site_id)
        half, rnd = strategy_round(cfg, task, site, context, config_rec, server_round, seed)  # type: ignore[arg-type]
        own = half.personal_model(glob, model, rnd)
        test, val = _scores(task, model, rows), _scores(task, model, site.val)
        if own and cfg.strategy.personal_select and val.get("loss", 0.0) > global_val.get("loss", float("inf")):
            # the site's own validation rows prefer the global model: it keeps that one (its raw personal scores too)
            out.update({f"raw-personal/{k}": v for k, v in test.items()})
            own, test, val = False, global_test, global_val
        out["personalized"] = float(own)
        out.update({f"personal/{k}": v for k, v in test.items()})
        out.update({f"val-personal/{k}": v for k, v in val.items()})
    except (*DATA_ERRORS, personal.PersonalError, ValueError, KeyError) as err:
        return refused(msg, context, err)
    return Message(RecordDict({"personal": MetricRecord(out),  # type: ignore[arg-type]
                               SITE_KEY: site_record_for(site.site_id, site.name, server_round)}), reply_to=msg)


def sum_query(msg: Message, context: Context) -> Message:
    """This site's share of a protected sum: preprocessing statistics or test metrics (:mod:`app.federated`)."""
    torch.set_num_threads(1)
    try:
        cfg, task, source = load_source(context)
        if not isinstance(source, RawSite) or not isinstance(task, TabularTask):
            raise ValueError(f"task={cfg.task.name} has no federated statistics")
        half = composition.site(cfg).aggregation
        values = federated.site_vector(task, source, msg, half, context, site_guard.policy_for(context, cfg))
    except federated.PolicyRefusal as err:
        return site_guard.refusal(msg, context, str(err))
    except (*DATA_ERRORS, ValueError) as err:
        return refused(msg, context, err)
    return half.sum_reply(msg, context, values, site_env(cfg, source, context))  # type: ignore[arg-type]


@app.query("fedsilo_vocab")
def vocab_query(msg: Message, context: Context) -> Message:
    """The category names this site has, for the features whose categories are discovered."""
    try:
        cfg, task, source = load_source(context)
        if not isinstance(source, RawSite) or not isinstance(task, TabularTask):
            raise ValueError(f"task={cfg.task.name} has no federated vocabulary")
        return federated.vocab_reply(task, source, msg, site_guard.policy_for(context, cfg))
    except federated.PolicyRefusal as err:
        return site_guard.refusal(msg, context, str(err))
    except (*DATA_ERRORS, ValueError) as err:
        return refused(msg, context, err)


@app.query("fedsilo_vertical")
def vertical_query(msg: Message, context: Context) -> Message:
    """A step of a vertical federation (:mod:`app.vertical`)."""
    torch.set_num_threads(1)
    from app import vertical

    return vertical.answer(msg, context)


# Every option's messages reach the same handlers: the ClientApp knows no option by name.
app.train()(train)
for _name in aggregation.train_names():
    app.train(_name)(train)
for _name in aggregation.query_names():
    app.query(_name)(query)
for _name in aggregation.sum_names():
    app.query(_name.removeprefix("query."))(sum_query)
