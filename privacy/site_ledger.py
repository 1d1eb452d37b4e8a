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
    job: str = ""          # the job it was released in (a data set's ledger spans jobs)


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


def digest_release(server_round: int, model: torch.nn.Module, mechanism: tuple[Any, ...]) -> str:
    """SHA-256 of a release's inputs as the site received them, before any randomness: the round,
    the starting model's bytes and the mechanism. The site's noise is seeded from it
    (:func:`privacy.site_secret.noise_seed`), so different inputs never share noise.

    The job id is left out on purpose: equal inputs give byte-identical updates whatever the job,
    and sending the same bytes again is post-processing (free, and recognised as such by
    :meth:`SiteLedger.released` across jobs); any input that differs gets fresh noise. With the job
    in, a deployed site's runs would differ from job to job for no protection."""
    h = hashlib.sha256(f"{int(server_round)}|".encode())
    h.update(digest_state(model.state_dict()).encode())
    h.update(repr(mechanism).encode())
    return h.hexdigest()


def digest_rows(x: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 of a site's training rows: the key of its data set's ledger across jobs."""
    h = hashlib.sha256(f"{x.dtype}|{tuple(x.shape)}|{y.dtype}|{tuple(y.shape)}|".encode())
    h.update(_tensor_bytes(x))
    h.update(_tensor_bytes(y))
    return h.hexdigest()


#: The job-like folder under a site's state-dir that holds one ledger per data set (across jobs).
DATA_LEDGERS = "privacy"


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def digest_file(path: str) -> str:
    """SHA-256 of a data file's bytes (cached by path, size and modification time)."""
    import os

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]


def data_store(state_dir: str, site: str, x: torch.Tensor, y: torch.Tensor, data_file: str | None = None) -> SiteStore:
    """The state folder of the ledger of this site's data set: ``<state-dir>/privacy/<site>-<digest>``, the
    digest of its data file (every row it holds, whichever of them a run's split makes training rows: a
    coordinator that changes the seed or the test fraction does not get a fresh ledger), else of its training
    rows. Every job on the same data, whatever id the coordinator gives it, adds to this one file."""
    import os

    digest = digest_file(data_file) if data_file and os.path.isfile(data_file) else digest_rows(x, y)
    return SiteStore(state_dir, DATA_LEDGERS, f"{site}-{digest[:16]}")


class SiteLedger:
    """A site's ledger, read from and written to its own disk: for one data set across jobs
    (a deployed site, :func:`data_store`), or for one job (a simulated one)."""

    def __init__(self, store: SiteStore, accountant: str | None = None, delta: float | None = None,
                 target_epsilon: float | None = None, cap: float | None = None) -> None:
        """``accountant``, ``delta``, ``target_epsilon``: the round's (written with every release);
        None: the file's (``rdp`` for a new file), for readers such as ``fedsilo ledger``. ``cap``:
        the site's own policy's bound over every release in the file (None: no cap)."""
        self.cap = cap if cap is not None and cap != float("inf") else None
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
    def ledger(self, job: str | None = None) -> PrivacyLedger:
        """Every release so far (of ``job`` only, if given), in order, as an accountant history."""
        led = PrivacyLedger(self.accountant)
        for r in self.releases:
            if job is None or r.job == job:
                led = led.with_steps(r.noise_multiplier, r.sample_rate, r.steps)
        return led

    def jobs(self) -> list[str]:
        """The job ids the ledger holds releases of."""
        return sorted({r.job for r in self.releases})

    def released(self, server_round: int, inputs: str) -> Release | None:
        """The recorded release of ``server_round`` (in any job) computed from exactly these inputs, if any."""
        return next((r for r in self.releases if r.round == server_round and r.inputs == inputs), None)

    def round_releases(self, server_round: int, job: str = "") -> list[Release]:
        """What was released in ``server_round`` of ``job`` (a policy may allow one release per round)."""
        return [r for r in self.releases if r.round == server_round and r.job == job]

    def record(self, release: Release) -> None:
        """Append ``release`` and write the ledger (atomic, durable) before the update leaves."""
        self.releases.append(release)
        self._write()

    def adopt(self, restored: PrivacyLedger, job: str = "") -> bool:
        """Take the coordinator's copy of ``job`` when it shows more steps than this site's own record
        of it (a site that lost its state folder); never lowers the ledger. True if adopted."""
        own = self.ledger(job)
        if restored.steps <= own.steps:
            return False
        extra = [Release(-1, n, q, s, "", "", source="coordinator", time=time.time(), job=job)
                 for n, q, s in restored.history]
        self.releases = [r for r in self.releases if r.job != job] + extra
        self._write()
        return True
