"""The DP-SGD ledger a site keeps on its own disk: its spend, provable without the coordinator.

Every update a site releases under ``privacy=dpsgd`` is written to ``dp-ledger.json`` in the
site's state folder for the job (:class:`core.state.SiteStore`: node config ``state-dir``,
one folder per job and site) *after* training and *before* the reply is built, atomically and
durably. The site checks its budget against this file, before training and again before
release, and the epsilon its reply reports is computed from it. The coordinator's per-round
record of those replies is a copy; it cannot lower the site's figure.

What this guarantees, whatever the coordinator does:

* **a lost reply** (the coordinator or the network died after the site trained): the spend is
  in the site's file already; the next round is checked against it;
* **a coordinator restart** (``resume=RUN_DIR``): the resumed run sends the same job id, so the
  site finds its file; the coordinator's rebuilt copy is adopted only when the site has no
  record of its own with as many steps (a site that lost its disk), so it can only raise a figure;
* **a replayed round** (the same round asked for again, e.g. after a restart): training is a
  deterministic function of its inputs (the global model, the generator state, the DP
  parameters). If the inputs are those of a recorded release and the update comes out
  byte-identical, nothing new is released (sending the same update again is post-processing)
  and nothing is added. Any other update is a new release: it is charged, and refused, update
  discarded, if that would take the site past its target.

Each release records its round, the mechanism (noise multiplier, sample rate, steps) and the
SHA-256 digests of its inputs and of the update; Opacus' accountant composes the mechanisms
(:class:`privacy.accountant.PrivacyLedger`), so anyone holding the file can recompute the epsilon.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from core.state import SiteStore
from privacy.accountant import PrivacyLedger

#: Name of the ledger document in the site's state folder (``dp-ledger.json``).
DOCUMENT = "dp-ledger"
VERSION = 1


@dataclass(frozen=True)
class Release:
    """One update that left the site, and what it cost."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    inputs: str      # SHA-256 of what training was a function of (see :func:`digest_inputs`)
    update: str      # SHA-256 of the update that was released
    source: str = "site"   # "site", or "coordinator" for a copy adopted after the site lost its own
    time: float = 0.0


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().numpy().tobytes()


def digest_state(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (in key order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def digest_inputs(model: torch.nn.Module, generator: torch.Generator, mechanism: tuple[Any, ...]) -> str:
    """SHA-256 of what a round's DP-SGD is a deterministic function of: the starting model,
    the generator's state (sampling and noise) and the mechanism and plan (``mechanism``)."""
    h = hashlib.sha256(digest_state(model.state_dict()).encode())
    h.update(_tensor_bytes(generator.get_state()))
    h.update(repr(mechanism).encode())
    return h.hexdigest()


class SiteLedger:
    """A site's ledger for one job, read from and written to its own disk."""

    def __init__(self, store: SiteStore, accountant: str | None = None, delta: float | None = None,
                 target_epsilon: float | None = None) -> None:
        """``accountant``, ``delta``, ``target_epsilon``: the round's (written with every release);
        None: the file's (``rdp`` for a new file), for readers such as ``fedsilo ledger``."""
        self.store, self.accountant = store, accountant or "rdp"
        self._given_accountant = accountant is not None
        self.path = store.folder / f"{DOCUMENT}.json"
        self.delta, self.target_epsilon = delta, target_epsilon
        self.releases = self._read()

    def _read(self) -> list[Release]:
        doc = self.store.read_json(DOCUMENT)
        if doc is None:
            return []
        if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("releases"), list):
            raise ValueError(f"{self.path}: not a fedsilo DP-SGD ledger (expected version {VERSION} with 'releases')")
        if not self._given_accountant:
            self.accountant = str(doc.get("accountant", self.accountant))
        self.delta = self.delta if self.delta is not None else doc.get("delta")
        self.target_epsilon = self.target_epsilon if self.target_epsilon is not None else doc.get("target_epsilon")
        out = []
        for i, entry in enumerate(doc["releases"]):
            try:
                rel = Release(**entry)
                ok = (isinstance(rel.round, int) and isinstance(rel.steps, int) and rel.steps >= 0
                      and float(rel.noise_multiplier) >= 0 and 0 < float(rel.sample_rate) <= 1)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{self.path}: release {i} is malformed ({err})") from err
            if not ok:
                raise ValueError(f"{self.path}: release {i} has an invalid round, step count or mechanism: {entry}")
            out.append(rel)
        return out

    def _write(self) -> None:
        self.store.write_json(DOCUMENT, {"version": VERSION, "accountant": self.accountant, "delta": self.delta,
                                         "target_epsilon": self.target_epsilon,
                                         "releases": [asdict(r) for r in self.releases]})

    # ---- what the site has spent --------------------------------------------------------
    def ledger(self) -> PrivacyLedger:
        """Every release so far, in order, as an accountant history."""
        led = PrivacyLedger(self.accountant)
        for r in self.releases:
            led = led.with_steps(r.noise_multiplier, r.sample_rate, r.steps)
        return led

    def released(self, server_round: int, inputs: str) -> Release | None:
        """The recorded release of ``server_round`` computed from exactly these inputs, if any."""
        return next((r for r in self.releases if r.round == server_round and r.inputs == inputs), None)

    def record(self, release: Release) -> None:
        """Append ``release`` and write the ledger (atomic, durable) before the update leaves."""
        self.releases.append(release)
        self._write()

    def adopt(self, restored: PrivacyLedger) -> bool:
        """Take the coordinator's copy when it shows more steps than this site's own record
        (a site that lost its state folder); never lowers the ledger. True if adopted."""
        own = self.ledger()
        if restored.steps <= own.steps:
            return False
        extra = [Release(-1, n, q, s, "", "", source="coordinator", time=time.time()) for n, q, s in restored.history]
        self.releases = extra
        self._write()
        return True
