"""Server optimizers over any strategy's aggregate: FedAdam, FedYogi, FedAdagrad, FedAvgM.

Coordinator half only (the sites train as the strategy asks). After a strategy has aggregated
a round, the difference ``delta = aggregate - global`` is a pseudo-gradient (negated); a
server optimizer turns it into the step actually taken (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2; Hsu et al. 2019 for server momentum):

``avgm``     ``m = beta1 * m + delta``;                        ``x += eta * m``
``adagrad``  ``v = v + delta^2``;                              ``x += eta * m / (sqrt(v) + tau)``
``adam``     ``v = beta2 * v + (1 - beta2) * delta^2``;        (m: ``beta1 * m + (1 - beta1) * delta``)
``yogi``     ``v = v - (1 - beta2) * delta^2 * sign(v - delta^2)``

(adagrad, adam and yogi share ``m = beta1 * m + (1 - beta1) * delta``, as in the paper and in
Flower's ``FedAdam``/``FedYogi``/``FedAdagrad``; no bias correction.) ``server_opt=none`` takes the
aggregate as it is. The step is taken in float64 and stored in the model's dtypes.

Because it only needs the aggregate, the optimizer composes with every combine step (weighted
mean, robust rules, norm bound), with central DP (it acts on the noised mean: post-processing)
and with secure aggregation (the unmasked mean update is ``delta``). Under Paillier the
coordinator holds only ciphertexts and a non-linear step cannot run on them; the config
refuses that pairing (``strategies.config.needs``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from core.layout import Layout

OPTIMIZERS = ("none", "avgm", "adagrad", "adam", "yogi")


@dataclass
class ServerOptimizer:
    """One of :data:`OPTIMIZERS` with its moments (kept across rounds, checkpointed)."""

    name: str
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: np.ndarray | None = field(default=None, repr=False)
    v: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS or self.name == "none":
            raise ValueError(f"strategy.server_opt={self.name!r} is not one of {list(OPTIMIZERS[1:])}")

    def step(self, current: ArrayRecord, aggregate: ArrayRecord) -> ArrayRecord:
        """The new global model from the round's ``aggregate`` of ``current``."""
        base = {k: current[k].numpy() for k in aggregate.keys()}  # the model's arrays (no side values)
        layout = Layout.of(base)
        x = layout.flatten(base).astype(np.float64)
        delta = layout.flatten({k: aggregate[k].numpy() for k in base}).astype(np.float64) - x
        if self.m is None:
            self.m = np.zeros_like(x)
        if self.name == "avgm":
            self.m = self.beta1 * self.m + delta
            new = x + self.lr * self.m
        else:
            self.m = self.beta1 * self.m + (1.0 - self.beta1) * delta
            sq = delta * delta
            if self.v is None:
                self.v = np.zeros_like(x)
            if self.name == "adagrad":
                self.v = self.v + sq
            elif self.name == "adam":
                self.v = self.beta2 * self.v + (1.0 - self.beta2) * sq
            else:  # yogi
                self.v = self.v - (1.0 - self.beta2) * sq * np.sign(self.v - sq)
            new = x + self.lr * self.m / (np.sqrt(self.v) + self.tau)
        arrays = layout.unflatten(new)
        return ArrayRecord(OrderedDict((k, Array(arrays[k].astype(base[k].dtype))) for k in base))

    def state_dict(self) -> dict[str, Any]:
        """Moments as lists (JSON); a checkpoint holds them so a resumed run steps identically."""
        return {"name": self.name, "m": None if self.m is None else self.m.tolist(),
                "v": None if self.v is None else self.v.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the optimizer's moments from a checkpoint; ValueError if it holds another optimizer's."""
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint holds server optimizer {state.get('name')!r}, config says {self.name!r}")
        self.m = None if state["m"] is None else np.asarray(state["m"], dtype=np.float64)
        self.v = None if state["v"] is None else np.asarray(state["v"], dtype=np.float64)
