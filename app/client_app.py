"""fedsilo's ClientApp: what runs at each site.

The site composes the same config as the server from the run config, loads *its own*
partition (selected by the node config's ``partition-id``), trains locally, and answers
federated-evaluation requests on its validation rows. Data and model are cached per
process; nothing about the site is kept in module globals across runs except that cache.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import tasks
from app import config
from app.paths import resolve_data_dir
from strategies.validation import SITE_KEY, WEIGHT_KEY
from tasks.base import SiteData, Task, seed_for
from tasks.metrics import site_summary
from tasks.training import predict

app = ClientApp()


def load_site(context: Context) -> tuple[config.FedsiloConfig, Task, SiteData]:
    """This node's config, task and data; a clear error if the federation does not fit."""
    cfg = config.from_run_config(context.run_config)
    task = tasks.get(cfg.task.name)(cfg.task, resolve_data_dir(cfg.data_dir))
    n_sites = config.num_sites(cfg)
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("node config has no 'partition-id': start the SuperNode with "
                         "--node-config 'partition-id=<i> num-partitions=<n>'")
    pid, n_parts = int(node["partition-id"]), int(node.get("num-partitions", n_sites))
    if n_parts != n_sites or not 0 <= pid < n_sites:
        raise ValueError(
            f"this federation has {n_parts} nodes but the config defines {n_sites} sites "
            f"(task={cfg.task.name}, partition={cfg.partition.name}); partition-id={pid}"
        )
    return cfg, task, task.sites(cfg.partition, n_sites, cfg.seed)[pid]


def _site_record(site: SiteData, server_round: int) -> ConfigRecord:
    return ConfigRecord({"id": site.site_id, "name": site.name, "round": server_round})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global model, train on the site's rows, return weights and metrics."""
    torch.set_num_threads(1)
    cfg, task, site = load_site(context)
    server_round = int(msg.content["config"]["server-round"])
    model = task.build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    stats = task.train(model, site.train, seed_for(cfg.seed, server_round, site.site_id))
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({WEIGHT_KEY: len(site.train), **stats}),
        SITE_KEY: _site_record(site, server_round),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on the site's validation rows (counts, loss, site AUC)."""
    torch.set_num_threads(1)
    _, task, site = load_site(context)
    server_round = int(msg.content["config"].get("server-round", 0))
    model = task.build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    scores, loss = predict(model, site.val.x, site.val.y)
    summary = site_summary(site.val.labels(), scores, loss)
    content = RecordDict({
        "metrics": MetricRecord({WEIGHT_KEY: len(site.val), **summary}),
        SITE_KEY: _site_record(site, server_round),
    })
    return Message(content, reply_to=msg)
