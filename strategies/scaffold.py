"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), option II, both halves.

The coordinator keeps a control variate ``c`` (one array per model parameter); site ``i``
keeps its own ``c_i`` (:class:`core.state.SiteStore`: it never leaves the site and
survives a restart). In a round:

* coordinator: the training instruction carries the model *and* ``c`` as one record
  (``c``'s arrays under the prefix ``scaffold.c/``);
* site: trains with the corrected gradient ``g(y) + c - c_i`` (the linear term
  ``<y, c - c_i>`` joins the objective, so the correction goes through the task's own
  optimizer, DP-SGD's included), then ``c_i+ = c_i - c + (x - y) / (a * lr)`` where ``a`` is
  the number of plain-SGD steps its local steps amount to (:func:`strategies.site.step_normalizer`;
  ``a = K`` without momentum, as in the paper). Its reply is one record: the model ``y`` and
  ``c + (c_i+ - c_i)`` under the prefix;
* coordinator: the combine step (weighted mean, robust rule, or the protected sum under
  ``aggregation=secagg``: the control-variate update travels inside the same masked vector)
  gives the mean model and ``c + mean(delta c_i)``; the model step is taken (and handed to a
  server optimizer if one is set; without one the global step size is 1), and
  ``c += |S| / N * mean(delta c_i)``.

Control variates are averaged with the same row weights as the model (the weighted objective
``sum_i p_i f_i`` the federation minimises). Under Paillier the coordinator could not update
``c`` from ciphertexts; the config refuses that pairing (``strategies.config.needs``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn
from typing_extensions import override

from strategies.fedavg import FedAvg
from strategies.site import SiteRound, StrategySite, add_penalties, model_part, step_normalizer
from tasks.training import Penalty

PREFIX = "scaffold.c/"
STATE = "scaffold-ci"


def split(arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """(the model's arrays, the control variate by parameter name) of a SCAFFOLD record."""
    model = ArrayRecord(OrderedDict((k, v) for k, v in arrays.items() if not k.startswith(PREFIX)))
    c = {k[len(PREFIX):]: v.numpy() for k, v in arrays.items() if k.startswith(PREFIX)}
    return model, c


class Scaffold(FedAvg):
    """FedAvg whose instructions carry the control variate ``c`` and which updates it from the
    averaged control-variate updates. Parameters as for :class:`~strategies.fedavg.FedAvg`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.c: dict[str, np.ndarray] | None = None

    @override
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        if self.c is None:  # parameters only: float arrays; zero at the start
            self.c = {k: np.zeros_like(v.numpy()) for k, v in arrays.items() if v.numpy().dtype.kind == "f"}
        full = OrderedDict(arrays.items())
        for k, v in self.c.items():
            full[PREFIX + k] = Array(v)
        return super().configure_train(server_round, ArrayRecord(full), config, grid)

    @override
    def finish_train(self, server_round: int, arrays: ArrayRecord | None,
                     metrics: MetricRecord | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if arrays is None or self.c is None:
            return super().finish_train(server_round, arrays, metrics)
        model, mean_c = split(arrays)
        phase = self.record.round(server_round).train
        used = (phase.replied if phase is not None and phase.replied else self.num_sites)
        share = min(1.0, used / self.num_sites)
        self.c = {k: (v.astype(np.float64) + share * (mean_c[k].astype(np.float64) - v)).astype(v.dtype)
                  for k, v in self.c.items()}
        return super().finish_train(server_round, model, metrics)

    @override
    def state_dict(self) -> dict[str, Any]:
        c = None if self.c is None else {k: [list(v.shape), str(v.dtype), v.ravel().tolist()] for k, v in self.c.items()}
        return {**super().state_dict(), "scaffold_c": c}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        c = state.get("scaffold_c")
        self.c = None if c is None else {k: np.asarray(vals, dtype=dtype).reshape(shape)
                                         for k, (shape, dtype, vals) in c.items()}


class ScaffoldSite(StrategySite):
    """The site half: corrected local steps, its own ``c_i``, the control-variate update in the reply."""

    def __init__(self) -> None:
        self._c: dict[str, torch.Tensor] = {}
        self._ci: dict[str, torch.Tensor] = {}

    @override
    def start(self, glob: dict[str, torch.Tensor], model: nn.Module, rnd: SiteRound) -> Penalty | None:
        base = super().start(glob, model, rnd)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._c = {n: glob[PREFIX + n].to(torch.float32) for n in names}
        stored = rnd.store.load(STATE, rnd.server_round) if rnd.store is not None else None
        self._ci = stored if stored is not None else {n: torch.zeros_like(self._c[n]) for n in names}
        correction = {n: (self._c[n] - self._ci[n]).detach() for n in names}

        def linear(m: nn.Module) -> torch.Tensor:
            params = dict(m.named_parameters())
            return sum((params[n] * correction[n]).sum() for n in names)  # type: ignore[return-value]

        return add_penalties(base, linear)

    @override
    def finish(self, model: nn.Module, glob: dict[str, torch.Tensor], stats: dict[str, float],
               rnd: SiteRound) -> dict[str, torch.Tensor]:
        state = super().finish(model, glob, stats, rnd)
        x = model_part(glob, model)
        a = step_normalizer(float(stats["local_steps"]), rnd.momentum)
        new_ci = {}
        for n, c in self._c.items():
            drift = (x[n].double() - state[n].double()) / (a * rnd.lr) if a > 0 else torch.zeros_like(c, dtype=torch.float64)
            new_ci[n] = (self._ci[n].double() - c.double() + drift).to(c.dtype)
        if rnd.store is not None:
            rnd.store.save(STATE, rnd.server_round, new_ci)
        out = dict(state)
        for n, c in self._c.items():
            out[PREFIX + n] = (c.double() + new_ci[n].double() - self._ci[n].double()).to(glob[PREFIX + n].dtype)
        return out
