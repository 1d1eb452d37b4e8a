"""Plain Flower FedAvg, written as Flower's quickstart does, with fedsilo's finance model.

Same MLP (28-64-32-1), rows per site, batch size, optimiser, rounds, federated and
server-side evaluation as ``fedsilo task=finance``; the data are synthetic tensors made
in place, so the app measures what Flower itself costs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn


def make_model(features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))


def make_data(seed: int, rows: int, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(rows, generator=g) > 0).float()
    return x, y


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y))


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    c = context.run_config
    pid = int(context.node_config["partition-id"])
    x, y = make_data(pid, int(c["rows-per-site"]), int(c["features"]))
    model = make_model(int(c["features"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    perm = torch.randperm(len(y))
    for i in range(0, len(y), 64):
        idx = perm[i : i + 64]
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(x[idx]).squeeze(-1), y[idx]).backward()
        opt.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(y), "train_loss": loss_of(model, x, y)})})
    return Message(content, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    c = context.run_config
    x, y = make_data(1000 + int(context.node_config["partition-id"]), int(c["val-rows"]), int(c["features"]))
    model = make_model(int(c["features"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": len(y), "loss": loss_of(model, x, y)})}),
                   reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    c = context.run_config
    features = int(c["features"])
    model = make_model(features)
    xt, yt = make_data(99, int(c["test-rows"]), features)

    stamps: list[float] = []  # when each server-side evaluation ran: round k took stamps[k] - stamps[k-1]

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        stamps.append(time.monotonic())
        return MetricRecord({"loss": loss_of(model, xt, yt)})

    FedAvg(min_available_nodes=int(c["num-sites"])).start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(c["num-server-rounds"]), evaluate_fn=central)
    if str(c.get("timing-file", "")):  # benchmarks/scale.py: seconds per round, measured as fedsilo's Recorder does
        Path(str(c["timing-file"])).write_text(json.dumps([b - a for a, b in zip(stamps, stamps[1:])]))
