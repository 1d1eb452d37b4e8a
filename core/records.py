"""The typed record of a run's rounds: who took part, who was rejected and why, what each layer did.

``results.json`` keeps its layout (``history[].participation`` is :meth:`RoundRecord.to_dict`);
in the code every part has a type and one writer:

============================  ==============================================================
field                         written by
============================  ==============================================================
``train.sampled``             the strategy's ``configure_train`` (after excluded sites are dropped)
``train.replied/rejected/``   the layer that receives the replies: the strategy's screening
``sites/stragglers``          (plain), the secure-aggregation or Paillier coordinator half
``train.norm_bounded/robust`` the combine step (:mod:`strategies.combine`)
``evaluate.*``                the strategy's federated evaluation
``left``, ``joined``          the strategy's node tracking
``budget_exhausted``          the strategy, for sites a privacy layer excluded
``privacy``                   DP-SGD's coordinator half (:class:`privacy.dpsgd.BudgetLedger`)
``privacy_central``           central DP (:class:`privacy.central.CentralDP`)
``secagg`` (any option name)  that aggregation option's protocol log (:attr:`RoundRecord.protocol`)
``mu``                        FedProx
============================  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from core.sites import SiteDirectory


@dataclass
class Rejection:
    """A reply that did not count, and why."""

    site: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """The rejection as results.json holds it."""
        return {"site": self.site, "reason": self.reason}


@dataclass
class RobustUse:
    """What a Byzantine-robust rule did in a round."""

    rule: str
    f: int
    used: list[str]


@dataclass
class PhaseRecord:
    """One phase (training or federated evaluation) of one round. ``None`` = not recorded."""

    sampled: int | None = None
    replied: int | None = None
    rejected: list[Rejection] | None = None
    sites: list[str] | None = None
    stragglers: list[str] | None = None
    norm_bounded: list[str] | None = None
    robust: RobustUse | None = None

    def screened(self, good: list[str], rejected: list[Rejection], stragglers: list[str],
                 sites: bool = True) -> None:
        """Record a screening: the accepted sites (by label), the rejections, the stragglers."""
        self.replied, self.rejected, self.stragglers = len(good), rejected, stragglers
        if sites:
            self.sites = good

    def to_dict(self) -> dict[str, Any]:
        """The phase as results.json holds it (empty fields left out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "rejected":
                value = [r.to_dict() for r in value]
            elif f.name == "robust":
                value = {"rule": value.rule, "f": value.f, "used": list(value.used)}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseRecord:
        """The phase :meth:`to_dict` wrote."""
        rec = cls(**{k: v for k, v in d.items() if k not in ("rejected", "robust")})
        if "rejected" in d:
            rec.rejected = [Rejection(**r) for r in d["rejected"]]
        if "robust" in d:
            rec.robust = RobustUse(**d["robust"])
        return rec


@dataclass
class Departure:
    """A site that left the federation in a round: its name, node and how it was noticed."""

    site: str
    node: int
    noticed: str


@dataclass
class Arrival:
    """A node that joined the federation in a round, and how it was noticed."""

    node: int
    noticed: str


@dataclass
class RoundRecord:
    """Everything recorded about one round (see the module docstring for who writes what)."""

    train: PhaseRecord | None = None
    evaluate: PhaseRecord | None = None
    left: list[Departure] = field(default_factory=list)
    joined: list[Arrival] = field(default_factory=list)
    budget_exhausted: int | None = None
    privacy: dict[str, dict[str, Any]] | None = None       # DP-SGD: each site's report, by label
    privacy_central: dict[str, Any] | None = None
    mu: float | None = None
    #: protocol logs of the aggregation option, under its name (``secagg``: stages, survivors, timings)
    protocol: dict[str, dict[str, Any]] = field(default_factory=dict)

    def phase(self, name: str) -> PhaseRecord:
        """The ``train`` or ``evaluate`` record, created on first use."""
        if getattr(self, name) is None:
            setattr(self, name, PhaseRecord())
        rec: PhaseRecord = getattr(self, name)
        return rec

    def to_dict(self) -> dict[str, Any]:
        """The round as results.json holds it (empty fields left out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "protocol":
                out.update(value)
                continue
            if value is None or (isinstance(value, list) and not value):
                continue
            if isinstance(value, PhaseRecord):
                value = value.to_dict()
            elif f.name in ("left", "joined"):
                value = [dict(vars(v)) for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRecord:
        """The round :meth:`to_dict` wrote (protocol records kept as they are)."""
        known = {f.name for f in fields(cls)} - {"protocol"}
        rec = cls(**{k: v for k, v in d.items() if k in known and k not in ("train", "evaluate", "left", "joined")})
        rec.protocol = {k: v for k, v in d.items() if k not in known}
        for name in ("train", "evaluate"):
            if name in d:
                setattr(rec, name, PhaseRecord.from_dict(d[name]))
        rec.left = [Departure(**v) for v in d.get("left", [])]
        rec.joined = [Arrival(**v) for v in d.get("joined", [])]
        return rec


@dataclass
class RunRecord:
    """The rounds of a run, and the names of the sites met so far (shared by the coordinator's layers)."""

    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    sites: SiteDirectory = field(default_factory=SiteDirectory)

    def round(self, server_round: int) -> RoundRecord:
        """The record of ``server_round`` (made on first use)."""
        if server_round not in self.rounds:
            self.rounds[server_round] = RoundRecord()
        return self.rounds[server_round]

    def to_dict(self) -> dict[int, dict[str, Any]]:
        """``participation`` as results.json stores it: round -> record."""
        return {r: rec.to_dict() for r, rec in sorted(self.rounds.items())}

    def load(self, participation: dict[str, dict[str, Any]], node_names: dict[str, str]) -> None:
        """Restore from a checkpoint (keys as JSON stores them)."""
        self.rounds = {int(r): RoundRecord.from_dict(e) for r, e in participation.items()}
        self.sites.names = {int(n): name for n, name in node_names.items()}
