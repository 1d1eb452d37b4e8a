"""The options of ``learner=gbdt`` (``+learner.options.KEY=VALUE``), checked before a run starts.

Defaults suit the small and middle-sized tables of banks and hospitals (XGBoost's names; where the
default differs from XGBoost's, the reason is given). Every option is public: it travels in each
request, and a site recomputes from it what the coordinator asks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from core.config import ConfigError


@dataclass(frozen=True)
class GbdtOptions:
    """``learner.options`` of ``learner=gbdt``."""

    trees: int = 300               # boosting rounds at most (early stopping ends most runs sooner)
    eta: float = 0.1               # shrinkage (XGBoost 0.3: 0.1 with early stopping generalises better on small tables)
    max_depth: int = 4             # XGBoost 6: a level is one protected sum, and 4 fits tables of a few thousand rows
    reg_lambda: float = 1.0        # L2 on leaf weights
    gamma: float = 0.0             # least gain a split must bring (min_split_loss)
    min_child_weight: float = 1.0  # least hessian sum of a child
    max_bin: int = 64              # bins per feature (XGBoost 256: 4x smaller histograms, same AUC on our tables)
    subsample: float = 1.0         # share of each site's rows a tree is grown on (drawn by the site)
    colsample_bytree: float = 1.0  # share of features a tree may use (drawn from the seed, the same at every site)
    early_stopping: int = 20       # stop after this many rounds without a lower pooled validation loss (0: never)
    grid_cells: int = 1024         # cells of the fine histogram each feature's bin edges are read from
    keep_hessians: bool = True     # store each node's hessian sum in the model (TreeSHAP needs them; see docs)
    objective: str = "auto"        # auto (from the task's label) | binary | multiclass | regression
    seed: int = 0                  # the draw of each tree's features (colsample_bytree)

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> GbdtOptions:
        """The options from ``learner.options``; :class:`~core.config.ConfigError` naming the key otherwise."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in options.items():
            if key not in known:
                raise ConfigError(f"learner.options.{key}", value, f"one of {sorted(known)} (learner=gbdt)")
            want = known[key].type
            try:
                if want == "bool":
                    if not isinstance(value, bool):
                        raise TypeError
                    values[key] = value
                elif want == "int":
                    if isinstance(value, bool) or int(value) != value:
                        raise TypeError
                    values[key] = int(value)
                elif want == "float":
                    if isinstance(value, bool):
                        raise TypeError
                    values[key] = float(value)
                else:
                    values[key] = str(value)
            except (TypeError, ValueError):
                raise ConfigError(f"learner.options.{key}", value, f"a {want}") from None
        out = cls(**values)
        out.check()
        return out

    def check(self) -> None:
        """The ranges every option must be in."""
        rules = [("trees", 1 <= self.trees <= 10_000, "an integer in [1, 10000]"),
                 ("eta", 0 < self.eta <= 1, "in (0, 1]"),
                 ("max_depth", 1 <= self.max_depth <= 10, "an integer in [1, 10]"),
                 ("reg_lambda", self.reg_lambda >= 0, ">= 0"),
                 ("gamma", self.gamma >= 0, ">= 0"),
                 ("min_child_weight", self.min_child_weight >= 0, ">= 0"),
                 ("max_bin", 2 <= self.max_bin <= 1024, "an integer in [2, 1024]"),
                 ("subsample", 0 < self.subsample <= 1, "in (0, 1]"),
                 ("colsample_bytree", 0 < self.colsample_bytree <= 1, "in (0, 1]"),
                 ("early_stopping", self.early_stopping >= 0, "an integer >= 0"),
                 ("grid_cells", self.max_bin <= self.grid_cells <= 65536, "an integer in [max_bin, 65536]"),
                 ("objective", self.objective in ("auto", "binary", "multiclass", "regression"),
                  "auto, binary, multiclass or regression")]
        for key, ok, want in rules:
            if not ok:
                raise ConfigError(f"learner.options.{key}", getattr(self, key), want)
        if self.reg_lambda == 0 and self.min_child_weight == 0:
            raise ConfigError("learner.options.min_child_weight", 0, "> 0 when reg_lambda is 0 (a leaf of no hessian "
                              "would divide by zero)")

    def to_json(self) -> str:
        """The options as the JSON every request carries."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GbdtOptions:
        """The options a request carries (checked again: a site trusts no range it has not checked)."""
        try:
            raw = json.loads(text)
        except (TypeError, ValueError):
            raise ValueError("a request whose gbdt options are not JSON") from None
        if not isinstance(raw, dict):
            raise ValueError("a request whose gbdt options are not a JSON object")
        return cls.parse(raw)
