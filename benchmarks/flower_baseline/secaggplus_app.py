"""Flower's own secure aggregation, as its documentation builds it: the legacy SecAgg+
workflow (``SecAggPlusWorkflow`` + ``secaggplus_mod``) around a legacy FedAvg and a
``NumPyClient``. The sites train fedsilo's finance model on fedsilo's finance partitions
with fedsilo's local training, and the workflow gets fedsilo's default graph size
(``num_shares``) and threshold, so only the protocol implementation differs from
``fedsilo task=finance aggregation=secagg``. Used by ``benchmarks/secagg.py``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from aggregation.secagg.graph import auto_neighbours
from app import config
from app.support.paths import resolve_data_dir
from tasks import get as get_task
from tasks.base import seed_for


def _setup(context: Context):  # type: ignore[no-untyped-def]
    cfg = config.from_run_config(context.run_config)
    task = get_task(cfg.task.name)(cfg.task, resolve_data_dir(cfg.data_dir))
    return cfg, task


class Site(NumPyClient):
    """One finance site: fedsilo's model, partition and local training."""

    def __init__(self, context: Context) -> None:
        self.cfg, self.task = _setup(context)
        pid = int(context.node_config["partition-id"])
        self.site = self.task.sites(self.cfg.partition, config.num_sites(self.cfg), self.cfg.seed)[pid]
        self.model = self.task.build_model()
        self.keys = list(self.model.state_dict())

    def fit(self, parameters, cfg):  # type: ignore[no-untyped-def]
        torch.set_num_threads(1)
        self.model.load_state_dict({k: torch.tensor(v) for k, v in zip(self.keys, parameters)})
        server_round = int(cfg.get("server_round", 0))
        stats = self.task.train(self.model, self.site.train, seed_for(self.cfg.seed, server_round, self.site.site_id))
        out = [v.detach().numpy() for v in self.model.state_dict().values()]
        return out, len(self.site.train), {"train_loss": float(stats["train_loss"])}


client = ClientApp(client_fn=lambda context: Site(context).to_client(), mods=[secaggplus_mod])

server = ServerApp()
#: monotonic time of each server-side evaluation: round r took stamps[r] - stamps[r-1]
STAMPS: list[float] = []


@server.main()
def main(grid, context: Context) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    cfg, task = _setup(context)
    n = config.num_sites(cfg)
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    keys = list(model.state_dict())
    test = task.data().test
    STAMPS.clear()

    def evaluate(server_round, parameters, _cfg):  # type: ignore[no-untyped-def]
        model.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in zip(keys, parameters)})
        STAMPS.append(time.monotonic())
        return 0.0, {"auc": float(task.evaluate(model, test)["auc"])}

    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                      initial_parameters=ndarrays_to_parameters([v.numpy() for v in model.state_dict().values()]),
                      evaluate_fn=evaluate, on_fit_config_fn=lambda r: {"server_round": r})
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.num_rounds), strategy=strategy)
    # the same graph size and threshold as fedsilo's defaults (complete graph up to 20 sites)
    shares = min(n, auto_neighbours(n) + 1)
    threshold = min(shares, max(2, math.ceil(0.6 * shares)))
    DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold))(grid, legacy)
