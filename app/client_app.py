"""fedsilo's ClientApp: what runs at each site.

The site composes the same config as the server from the run config, loads *its own*
partition (selected by the node config's ``partition-id``), trains locally, and answers
federated-evaluation requests on its validation rows. Data and model are cached per
process; nothing about the site is kept in module globals across runs except that cache.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import tasks
from app import config
from app.runtime.paths import resolve_data_dir
from app.faults import attacks
from app.faults import dropouts as faults
from privacy import dpsgd
from strategies import client_penalty, heterogeneity, robust
from aggregation.secagg import client as secagg
from aggregation.secagg.vector import Layout, WeightedUpdateCodec
from strategies.validation import SITE_KEY, WEIGHT_KEY
from tasks import site_file
from tasks.base import SiteData, Task, seed_for
from tasks.metrics import site_summary
from tasks.training import predict, steps_per_epoch

#: Error code of a reply from a straggler that missed the round (``straggler_policy=drop``).
MISSED_DEADLINE_CODE = 408

app = ClientApp()


def load_site(context: Context) -> tuple[config.FedsiloConfig, Task, SiteData]:
    """This node's config, task and data; a clear error if the federation does not fit.

    A deployed site names its own data file in its node config (``data-path``, written by
    ``fedsilo data split`` or by the site itself); otherwise (simulation) the node's
    ``partition-id`` selects its share of the task's bundled data.
    """
    node = context.node_config
    if "data-path" not in node:  # simulation: the same few sites answer many messages per process
        key = (str(context.run_config.get("overrides", "")), str(node.get("partition-id")),
               str(node.get("num-partitions")))
        if key not in _SITES:
            if len(_SITES) >= 4096:
                _SITES.clear()
            _SITES[key] = _load_site(context)
        return _SITES[key]
    return _load_site(context)


_SITES: dict[tuple[str, str, str], tuple[config.FedsiloConfig, Task, SiteData]] = {}


def _load_site(context: Context) -> tuple[config.FedsiloConfig, Task, SiteData]:
    cfg = config.from_run_config(context.run_config)
    task = tasks.get(cfg.task.name)(cfg.task, resolve_data_dir(cfg.data_dir))
    n_sites = config.num_sites(cfg)
    node = context.node_config
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


def _site_record(site: SiteData, server_round: int, straggler: bool = False) -> ConfigRecord:
    return ConfigRecord({"id": site.site_id, "name": site.name, "round": server_round, "straggler": straggler})


def _local_update(msg: Message, context: Context, stage: str | None) -> tuple[Message | None, dict]:
    """This round's local work. Returns (error reply, {}) for a site that misses the round,
    else (None, result) with the trained model and what the reply needs."""
    cfg, task, site = load_site(context)
    train_config = msg.content["config"]
    server_round = int(train_config["server-round"])
    if faults.drops(cfg, server_round, site.site_id, stage):
        return Message(Error(code=faults.DROPPED_CODE, reason=f"{site.name}: {faults.reason(stage)}"), reply_to=msg), {}
    work = heterogeneity.plan(
        cfg.strategy, cfg.task.local_epochs, steps_per_epoch(len(site.train), cfg.task.batch_size),
        cfg.seed, server_round, site.site_id, config.num_sites(cfg),
    )
    if work.dropped:
        return Message(Error(code=MISSED_DEADLINE_CODE, reason=f"{site.name}: {heterogeneity.MISSED_DEADLINE}"),
                       reply_to=msg), {}
    model = task.build_model()
    glob = _global_state(msg, cfg, context, model)
    model.load_state_dict(glob)
    seed, penalty = seed_for(cfg.seed, server_round, site.site_id), client_penalty(train_config, model)
    byzantine = attacks.is_attacker(cfg, site.site_id)
    train_rows = attacks.poison_data(cfg, site.train) if byzantine else site.train
    dp_record = None
    if isinstance(cfg.privacy, config.DPSGDConfig):  # DP-SGD, accounted over every round in context.state
        params = dpsgd.site_params(cfg.privacy, len(site.train), cfg.task.batch_size, cfg.num_rounds, work.epochs)
        dpsgd.adopt_restored(context, train_config, site.name, params.accountant)  # after a coordinator restart
        try:
            stats, dp_record = task.train_private(model, train_rows, seed, context, params, epochs=work.epochs,
                                                  max_steps=work.max_steps, penalty=penalty)
        except dpsgd.BudgetExhausted as err:
            return Message(Error(code=dpsgd.BUDGET_EXHAUSTED_CODE, reason=f"{site.name}: {err}"), reply_to=msg), {}
    else:
        stats = task.train(model, train_rows, seed, epochs=work.epochs, max_steps=work.max_steps, penalty=penalty)
    if byzantine:  # faults.byzantine_fraction: this site corrupts what it sends (for robustness studies)
        model.load_state_dict(attacks.poison_model(cfg, model.state_dict(), glob, server_round, site.site_id))
    return None, {"cfg": cfg, "site": site, "model": model, "stats": stats, "round": server_round,
                  "straggler": work.straggler, "privacy": dp_record}


def _extra_records(r: dict) -> dict:  # type: ignore[type-arg]
    """Records every training reply carries besides the update: the site, its privacy spending."""
    out = {SITE_KEY: _site_record(r["site"], r["round"], r["straggler"])}
    if r["privacy"] is not None:
        out[dpsgd.REPLY_KEY] = r["privacy"]
    return out


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global model, do this round's local work, return weights and metrics.

    The amount of work comes from the strategy's systems-heterogeneity settings
    (:mod:`strategies.heterogeneity`); the objective gets the term the server asked for
    (FedProx's proximal term when ``proximal-mu > 0``). The reply's weight is the site's
    number of training rows, whatever share of its work it managed.
    """
    torch.set_num_threads(1)
    error, r = _local_update(msg, context, None)
    if error is not None:
        return error
    site = r["site"]
    if isinstance(r["cfg"].aggregation, config.PaillierConfig):  # encrypted weighted model and rows only
        from aggregation.paillier import client as pai

        codec, private, encryptor = _paillier(r["cfg"], context)
        records = pai.reply_records(r["model"].state_dict(), len(site.train), codec, encryptor, private, context,
                                    r["cfg"].aggregation.workers)
        return Message(RecordDict({**records, **_extra_records(r)}), reply_to=msg)
    content = RecordDict({
        "arrays": ArrayRecord(r["model"].state_dict()),
        "metrics": MetricRecord({WEIGHT_KEY: len(site.train), **r["stats"]}),
        **_extra_records(r),
    })
    return Message(content, reply_to=msg)


def _paillier(cfg: config.FedsiloConfig, context: Context):  # type: ignore[no-untyped-def]
    """(model codec factory, private key, encryptor) of this site under ``aggregation=paillier``."""
    from strategies import paillier_packer
    from aggregation.paillier import client as pai

    a = cfg.aggregation
    assert isinstance(a, config.PaillierConfig)
    private, encryptor = pai.site_key(context, a.keypair)
    return pai.ModelCodecFactory(paillier_packer(a, private.public_key.n.bit_length()), a.weight_unit), private, encryptor


def _global_state(msg: Message, cfg: config.FedsiloConfig, context: Context, model: torch.nn.Module):  # type: ignore[no-untyped-def]
    """The global model sent with ``msg``: decrypted first under ``aggregation=paillier``."""
    arrays = msg.content["arrays"]
    if not isinstance(cfg.aggregation, config.PaillierConfig):
        return arrays.to_torch_state_dict()
    from aggregation.paillier import client as pai

    codec, private, _ = _paillier(cfg, context)
    return pai.global_state(arrays, model.state_dict(), codec, private, cfg.aggregation.workers, context)


# ---- secure aggregation (aggregation=secagg): one handler per protocol stage -------------------
# Module-level functions, not closures: the simulation engine pickles the ClientApp with every
# message, and a closure is pickled by value (1.6 ms a message), a module function by name.
def _secagg_stage(stage: str, handler, msg: Message, context: Context) -> Message:  # type: ignore[no-untyped-def]
    """Run a protocol stage: fault injection first; refused messages become error replies."""
    cfg, _, site = load_site(context)
    server_round = int(msg.content.config_records[secagg.WIRE_KEY]["round"]) \
        if secagg.WIRE_KEY in msg.content.config_records else 0
    if faults.drops(cfg, server_round, site.site_id, stage):
        return Message(Error(code=faults.DROPPED_CODE, reason=f"{site.name}: {faults.reason(stage)}"), reply_to=msg)
    try:
        return handler(msg, context)
    except (secagg.ProtocolError, secagg.SecAggAbort) as err:
        return secagg.refuse(msg, err)


@app.query("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Stage 0: advertise this round's public keys."""
    return _secagg_stage("keys", secagg.advertise_keys, msg, context)


@app.query("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    """Stage 1: Shamir-share the secrets with the neighbours."""
    return _secagg_stage("share", secagg.share_keys, msg, context)


def _unmask(msg: Message, context: Context) -> Message:
    """Stage 3 (and, pipelined, stage 1 of the next round: unless this site drops there)."""
    cfg, _, site = load_site(context)
    server_round = int(msg.content[secagg.WIRE_KEY]["round"])
    return secagg.unmask(msg, context, share_next=not faults.drops(cfg, server_round + 1, site.site_id, "share"))


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Stage 3: reveal the shares that remove the survivors' and the dropped sites' masks."""
    return _secagg_stage("unmask", _unmask, msg, context)


@app.train("secagg")
def train_secagg(msg: Message, context: Context) -> Message:
    """Local training as :func:`train`, replying with the masked weighted update only.

    The site encodes ``n_k * (w_local - w_global)``, its row count and its training loss
    into one field vector (:mod:`aggregation.secagg.vector`) and masks it; its row count
    and update never leave the site in the clear.
    """
    torch.set_num_threads(1)
    error, r = _local_update(msg, context, "masked_input")
    if error is not None:
        return error
    cfg, site = r["cfg"], r["site"]
    glob = msg.content["arrays"]
    base = {k: v.numpy() for k, v in glob.items()}
    layout = Layout.of(base)
    local = {k: v.detach().cpu().numpy() for k, v in r["model"].state_dict().items()}
    update = layout.flatten(local) - layout.flatten(base)
    if cfg.strategy.norm_bound > 0 and not attacks.is_attacker(cfg, site.site_id):  # honest sites bound themselves
        update, _ = robust.bound_norm(update, cfg.strategy.norm_bound)
    rng = np.random.default_rng(seed_for(cfg.seed, r["round"], site.site_id, 0x5EC))

    def encode(codec: WeightedUpdateCodec) -> np.ndarray:
        return codec.encode(update, len(site.train), float(r["stats"]["train_loss"]), rng)

    extra = RecordDict(_extra_records(r))
    advertise_next = not faults.drops(cfg, r["round"] + 1, site.site_id, "keys")
    try:
        return secagg.masked_input(msg, context, encode, extra, advertise_next)
    except (secagg.ProtocolError, secagg.SecAggAbort, ValueError) as err:
        return secagg.refuse(msg, err)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on the site's validation rows (counts, loss, site AUC)."""
    torch.set_num_threads(1)
    cfg, task, site = load_site(context)
    server_round = int(msg.content["config"].get("server-round", 0))
    model = task.build_model()
    model.load_state_dict(_global_state(msg, cfg, context, model))
    scores, loss = predict(model, site.val.x, site.val.y)
    summary = site_summary(site.val.labels(), scores, loss)
    content = RecordDict({
        "metrics": MetricRecord({WEIGHT_KEY: len(site.val), **summary}),
        SITE_KEY: _site_record(site, server_round),
    })
    if isinstance(cfg.aggregation, config.PaillierConfig):  # next round's obfuscators, ahead of training
        from aggregation.paillier import client as pai

        codec, private, _ = _paillier(cfg, context)
        pai.prepare_next_round(context, model.state_dict(), codec, private, cfg.aggregation.workers)
    return Message(content, reply_to=msg)
