"""The coordinator half of a vertical federation: it relays, checks and records; it holds no data.

:func:`run` drives one run through a :class:`Relay` (Flower messages in :mod:`app.vertical`):
hello (roles, schemas, sizes) -> private set intersection of the training customers (and of the
held-out ones) -> training (``hetero_lr`` or ``split_nn``) with the held-out customers scored
after every epoch -> every party saves its own part of the model. A scoring run (``mode=score``)
intersects the ids to score and combines the parties' partial scores at the active party.

What passes through here: blinded points, Paillier ciphertexts, masked values, sealed bytes,
counts, digests and the active party's aggregate metrics. The :class:`Ledger` counts the bytes
each party sends to each other party (relayed) and to the coordinator, and times each phase.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vertical.config import VerticalConfig

COORDINATOR = "coordinator"


class VerticalError(RuntimeError):
    """The federation cannot go on: a party is missing, has the wrong role or schema, failed a
    step, or the intersection is too small. The message names the party and the reason."""


class Relay(Protocol):
    """How the coordinator reaches the parties (app/vertical.py's ServerApp relay, or in-process in tests)."""

    def hello(self, payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Send ``hello`` to every node; replies keyed by party name (the relay learns the names)."""

    def send(self, step: str, payloads: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Send ``step`` to the named parties (their payloads); their replies, or VerticalError."""


def size(value: Any) -> int:
    """Bytes ``value`` takes on the wire (for the traffic record)."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    return 8


@dataclass
class Ledger:
    """Bytes between each pair (relayed through the coordinator) and seconds per phase."""

    pairs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    compute: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def relay(self, src: str, dst: str, value: Any) -> Any:
        """Count ``value``'s bytes from ``src`` to ``dst``; return it unchanged."""
        self.pairs[f"{src}->{dst}"] += size(value)
        return value

    def to_dict(self) -> dict[str, Any]:
        """The traffic record as results.json holds it."""
        return {"bytes": dict(self.pairs), "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
                "party_compute_seconds": {k: round(v, 4) for k, v in self.compute.items()}}


class Session:
    """The relay, the ledger and the parties' names and roles."""

    def __init__(self, relay: Relay, cfg: VerticalConfig, seed: int) -> None:
        self.relay, self.cfg, self.seed = relay, cfg, seed
        self.ledger = Ledger()
        self.active = ""
        self.passive: list[str] = []
        self.info: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, dict[str, Any]] = {}  # hetero_lr: each party's Paillier modulus, sealed to each peer
        self.losses: list[float] = []       # split_nn: the training loss of each step this epoch

    @property
    def parties(self) -> list[str]:
        """The parties, the active one first."""
        return [self.active, *self.passive]

    def send(self, step: str, payloads: dict[str, dict[str, Any]], phase: str) -> dict[str, dict[str, Any]]:
        """One message to each named party; counts the coordinator's own traffic and the time."""
        t0 = time.perf_counter()
        for name, p in payloads.items():
            self.ledger.pairs[f"{COORDINATOR}->{name}"] += sum(size(v) for v in p.values())
        replies = self.relay.send(step, payloads)
        for name, r in replies.items():
            self.ledger.pairs[f"{name}->{COORDINATOR}"] += sum(size(v) for v in r.values())
            self.ledger.compute[phase] += float(r.get("_secs", 0.0))
        wall = time.perf_counter() - t0
        self.ledger.seconds[phase] += wall
        self.ledger.seconds[f"{phase}:critical_compute"] += max((float(r.get("_secs", 0.0))
                                                                 for r in replies.values()), default=0.0)
        return replies


def fingerprints(cfg: VerticalConfig) -> dict[str, str]:
    """The schema fingerprint the config expects of each party (from schema files the coordinator can read)."""
    from pathlib import Path

    from tasks.tabular.schema import Schema, SchemaError

    out = {}
    for p in cfg.parties:
        if p.schema and Path(p.schema).is_file():
            try:
                out[p.name] = Schema.load(p.schema).fingerprint()
            except SchemaError:
                continue
    return out


def hello(s: Session, expected: dict[str, str], roles: dict[str, str], domain: str) -> None:
    """Learn the parties; refuse a missing party, a wrong role or a different schema."""
    replies = s.relay.hello({"domain": domain})
    s.info = replies
    for name, r in replies.items():
        if name in roles and r.get("role") != roles[name]:
            raise VerticalError(f"party {name} says its role is {r.get('role')!r}; the federation expects "
                                f"{roles[name]!r} (node config 'role')")
        if name in expected and r.get("fingerprint") != expected[name]:
            raise VerticalError(f"party {name} reads its file with schema {r.get('fingerprint')}; the federation "
                                f"expects schema {expected[name]} (a different schema file?)")
    unknown = sorted(set(replies) - set(roles)) if roles else []
    if unknown:
        raise VerticalError(f"node(s) calling themselves {unknown} are not parties of this federation "
                            f"(vertical.parties: {sorted(roles)})")
    missing = sorted(set(roles) - set(replies))
    if missing:
        raise VerticalError(f"party/parties {missing} did not answer: the federation needs every party "
                            f"({sorted(roles)}); answered: {sorted(replies)}")
    actives = sorted(n for n, r in replies.items() if r.get("role") == "active")
    if len(actives) != 1:
        raise VerticalError(f"a vertical federation needs exactly one active party (the label holder); "
                            f"parties with role active: {actives or 'none'}")
    s.active = actives[0]
    s.passive = sorted(n for n, r in replies.items() if r.get("role") == "passive")
    if not s.passive:
        raise VerticalError("a vertical federation needs at least one passive party; only the active party answered")


def intersect(s: Session, which: str, domain: str, minimum: int) -> int:
    """Diffie-Hellman PSI (:mod:`vertical.psi`) on ``which`` rows; the aligned count."""
    keys = {n: {f"pub:{n}": s.info[n]["pub"], **({f"sig:{n}": s.info[n]["sig"]} if "sig" in s.info[n] else {})}
            for n in s.parties}
    # every party gets every other party's run key (signed): the active and passive parties seal to each other
    setup = {p: {"which": which, "domain": domain, "active": s.active,
                 **{k: v for q in s.parties if q != p for k, v in keys[q].items()}} for p in s.parties}
    blinded = s.send("psi.setup", setup, f"psi_{which}")
    crossed = s.send("psi.cross", {p: {"which": which, "active": s.active,
                                       "sealed": s.ledger.relay(s.active, p, blinded[s.active][f"sealed:{p}"])}
                                   for p in s.passive}, f"psi_{which}")
    align: dict[str, Any] = {"which": which, "peers": json.dumps(s.passive)}
    for p in s.passive:
        align[f"own:{p}"] = s.ledger.relay(p, s.active, crossed[p]["sealed"])
        align[f"blob:{p}"] = s.ledger.relay(p, s.active, blinded[p][f"sealed:{s.active}"])
    aligned = s.send("psi.align", {s.active: align}, f"psi_{which}")[s.active]
    count = int(aligned["count"])
    if count < minimum:
        raise VerticalError(f"the parties have {count} {which} customers in common, fewer than "
                            f"vertical.min_intersection={minimum}: too few to {'train' if which == 'train' else 'score'} "
                            "(check that the parties' id columns name the same customers, in the same format)")
    accepted = s.send("psi.accept", {p: {"which": which, "active": s.active,
                                         "sealed": s.ledger.relay(s.active, p, aligned[f"sealed:{p}"])}
                                     for p in s.passive}, f"psi_{which}")
    for p in s.passive:
        if accepted[p]["digest"] != aligned[f"digest:{p}"] or int(accepted[p]["count"]) != count:
            raise VerticalError(f"party {p} and the active party {s.active} did not align the same {which} rows")
    return count


@dataclass
class Trainer:
    """A vertical model's coordinator loop (one per model, in its module)."""

    setup: Callable[[Session], None]
    step: Callable[[Session, int, int, dict[str, Any] | None], dict[str, Any] | None]
    finish_epoch: Callable[[Session, dict[str, Any] | None], None]
    score: Callable[[Session, str, bool], dict[str, Any]]
    prefix: str


def batches(n: int, batch_size: int) -> int:
    """Batches of ``batch_size`` in ``n`` rows (0: one batch)."""
    return -(-n // (batch_size or n))


def run(relay: Relay, cfg: VerticalConfig, seed: int, run_id: str, trainer: Trainer,
        on_epoch: Callable[[int, dict[str, Any], float], None] | None = None) -> dict[str, Any]:
    """A training run; returns what ``results.json`` reports under ``vertical``."""
    s = Session(relay, cfg, seed)
    domain = f"fedsilo-psi-v1|{run_id}"
    roles = {p.name: p.role for p in cfg.parties}
    t0 = time.perf_counter()
    hello(s, fingerprints(cfg), roles, domain)
    n = intersect(s, "train", domain, cfg.min_intersection)
    has_test = all("test_rows" in s.info[p] for p in s.parties)
    n_test = intersect(s, "test", domain, 1) if has_test else 0
    psi_seconds = time.perf_counter() - t0
    trainer.setup(s)
    history: list[dict[str, Any]] = []
    pending: dict[str, Any] | None = None
    saved: dict[str, dict[str, Any]] = {}
    for epoch in range(1, cfg.epochs + 1):
        e0 = time.perf_counter()
        before = dict(s.ledger.pairs)
        for b in range(batches(n, cfg.batch_size)):
            pending = trainer.step(s, epoch, b, pending)
        trainer.finish_epoch(s, pending)
        pending = None
        secs = time.perf_counter() - e0
        metrics = trainer.score(s, "test", False) if n_test else {}
        row = {"epoch": epoch, "seconds": round(secs, 3), **metrics,
               "bytes": {k: v - before.get(k, 0) for k, v in s.ledger.pairs.items()}}
        history.append(row)
        # every party keeps its part of the model after every epoch (its checkpoint, at the party)
        saved = s.send(f"{trainer.prefix}.save", {p: {"epoch": epoch} for p in s.parties}, "save")
        if on_epoch is not None:
            on_epoch(epoch, metrics, secs)
    return {"parties": {p: {k: v for k, v in s.info[p].items() if k in ("role", "rows", "features", "test_rows",
                                                                       "fingerprint")} for p in s.parties},
            "active": s.active, "passive": s.passive, "intersection": {"train": n, "test": n_test},
            "psi_seconds": round(psi_seconds, 3), "epochs": history, "final": history[-1] if history else {},
            "model_parts": {p: r.get("saved") for p, r in saved.items()}, **s.ledger.to_dict()}


def score_run(relay: Relay, cfg: VerticalConfig, seed: int, run_id: str, trainer: Trainer) -> dict[str, Any]:
    """Score the customers in the parties' score files with their saved model parts."""
    s = Session(relay, cfg, seed)
    domain = f"fedsilo-psi-v1|{run_id}"
    hello(s, fingerprints(cfg), {p.name: p.role for p in cfg.parties}, domain)
    loaded = s.send(f"{trainer.prefix}.load", {p: {} for p in s.parties}, "load")
    runs = {r.get("run") for r in loaded.values()}
    if len(runs) != 1:
        raise VerticalError(f"the parties' saved model parts come from different training runs: "
                            f"{ {p: r.get('run') for p, r in loaded.items()} }")
    n = intersect(s, "score", domain, 1)
    metrics = trainer.score(s, "score", True)
    return {"active": s.active, "passive": s.passive, "intersection": {"score": n}, "model_run": runs.pop(),
            "score": metrics, **s.ledger.to_dict()}


def batch_score(s: Session, prefix: str, which: str, write: bool) -> dict[str, Any]:
    """Score the aligned ``which`` rows with the parties together: each passive party's ``<prefix>.partial``
    (sealed to the active party), relayed to the active party's ``<prefix>.score``; its metrics."""
    parts = s.send(f"{prefix}.partial", {p: {"which": which, "active": s.active} for p in s.passive}, f"score_{which}")
    payload: dict[str, Any] = {"which": which, "peers": ",".join(s.passive), "write": write}
    for p in s.passive:
        payload[f"sealed:{p}"] = s.ledger.relay(p, s.active, parts[p]["sealed"])
    return metrics_of(s.send(f"{prefix}.score", {s.active: payload}, f"score_{which}")[s.active])


def metrics_of(reply: dict[str, Any]) -> dict[str, Any]:
    """The metrics of a party's scoring reply."""
    out: dict[str, Any] = {k[2:]: float(v) for k, v in reply.items() if k.startswith("m:")}
    for k in ("scored", "rows", "scores_file"):
        if k in reply:
            out[k] = reply[k]
    return out


def finite(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without its non-finite floats."""
    return {k: v for k, v in d.items() if not (isinstance(v, float) and not np.isfinite(v))}
