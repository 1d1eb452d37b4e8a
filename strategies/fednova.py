"""FedNova (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020), both halves.

Sites that do different amounts of local work (``strategy.local_epochs`` per site, stragglers'
partial work, different data sizes) pull FedAvg towards the objectives of the sites that took
more steps. FedNova averages *normalized* updates instead and rescales the result:

* site ``i`` took ``tau_i`` local steps; ``a_i`` is what they amount to in plain-SGD steps
  (:func:`strategies.site.step_normalizer`: ``tau_i`` without momentum). Its reply is the
  normalized model ``x + (y_i - x) / a_i`` and, as one more array of the same record,
  ``a_i / SCALE`` (``fednova.a``; the coordinator sends 0 there);
* the combine step (or the protected sum under ``aggregation=secagg``, which carries
  ``a_i`` inside the same masked vector) gives ``x + sum_i p_i d_i`` and
  ``tau_eff / SCALE = sum_i p_i a_i / SCALE``;
* the coordinator steps ``x + tau_eff * sum_i p_i d_i`` (then a server optimizer, if set).

With equal ``a_i`` this is FedAvg. ``SCALE`` keeps ``a_i / SCALE`` inside secure
aggregation's clipping range (``aggregation.clip``) for up to ``clip * SCALE`` steps.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn
from typing_extensions import override

from strategies.fedavg import FedAvg
from strategies.site import SiteRound, StrategySite, model_part, step_normalizer

KEY = "fednova.a"
SCALE = 1000.0


class FedNova(FedAvg):
    """FedAvg over normalized updates, rescaled by the mean normalizer. Parameters as for
    :class:`~strategies.fedavg.FedAvg`."""

    @override
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        full = OrderedDict(arrays.items())
        full[KEY] = Array(np.zeros(1, dtype=np.float64))
        return super().configure_train(server_round, ArrayRecord(full), config, grid)

    @override
    def finish_train(self, server_round: int, arrays: ArrayRecord | None,
                     metrics: MetricRecord | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if arrays is None or KEY not in arrays.keys() or self.current is None:
            return super().finish_train(server_round, arrays, metrics)
        tau_eff = float(arrays[KEY].numpy()[0]) * SCALE
        out = OrderedDict()
        for k, v in arrays.items():
            if k == KEY:
                continue
            x = self.current[k].numpy()
            step = v.numpy().astype(np.float64) - x.astype(np.float64)
            out[k] = Array((x.astype(np.float64) + tau_eff * step).astype(x.dtype))
        if metrics is not None:
            metrics = MetricRecord({**dict(metrics.items()), "fednova_tau_eff": tau_eff})
        return super().finish_train(server_round, ArrayRecord(out), metrics)


class FedNovaSite(StrategySite):
    """The site half: the normalized model and its normalizer in one record."""

    @override
    def finish(self, model: nn.Module, glob: dict[str, torch.Tensor], stats: dict[str, float],
               rnd: SiteRound) -> dict[str, torch.Tensor]:
        state = super().finish(model, glob, stats, rnd)
        x = model_part(glob, model)
        a = max(step_normalizer(float(stats["local_steps"]), rnd.momentum), 1e-12)
        out = {k: ((x[k].double() + (v.double() - x[k].double()) / a).to(v.dtype) if v.is_floating_point() else v)
               for k, v in state.items()}
        out[KEY] = torch.tensor([a / SCALE], dtype=glob[KEY].dtype)
        return out
