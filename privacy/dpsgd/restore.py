"""Resuming a run: each site's ledger carried over by the server's checkpoint, as its replies reported it."""

from __future__ import annotations

from logging import WARNING
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.common import log

from core import recordview
from privacy.accountant import STATE_KEY, PrivacyLedger
from privacy.site_ledger import SiteLedger

#: Prefix of the train-config keys that carry restored ledgers (``<prefix><site name>/<column>``).
RESTORE_PREFIX = "dp-ledger/"


def ledgers_from_participation(participation: dict[int, dict[str, Any]],
                               names: dict[str, str]) -> dict[str, PrivacyLedger]:
    """Each site's ledger rebuilt from the privacy records its replies carried, round by round
    (``names``: reply label -> site name, :meth:`core.sites.SiteDirectory.names_by_label`)."""
    ledgers: dict[str, PrivacyLedger] = {}
    for _, entry in sorted(participation.items()):
        for label, rec in entry.get("privacy", {}).items():
            name = names.get(label, label)
            ledger = ledgers.get(name, PrivacyLedger(str(rec["accountant"])))
            ledgers[name] = ledger.with_steps(float(rec["noise_multiplier"]), float(rec["sample_rate"]),
                                              int(rec["steps"]))
    return ledgers


def restore_config(ledgers: dict[str, PrivacyLedger]) -> dict[str, Any]:
    """Train-config entries that hand every site its ledger after a coordinator restart."""
    out: dict[str, Any] = {}
    for name, ledger in ledgers.items():
        record = ledger.to_record()
        for column in ("noise", "rate", "steps"):
            out[f"{RESTORE_PREFIX}{name}/{column}"] = record[column]
    return out


def restored_ledger(train_config: ConfigRecord, name: str, accountant: str) -> PrivacyLedger | None:
    """The ledger the coordinator rebuilt for site ``name`` after a restart, if it sent one."""
    key = f"{RESTORE_PREFIX}{name}/"
    if f"{key}steps" not in train_config:
        return None
    return PrivacyLedger.from_record(ConfigRecord({c: train_config[f"{key}{c}"] for c in ("noise", "rate", "steps")}),
                                     accountant)


def adopt_restored(context: Context, train_config: ConfigRecord, name: str, accountant: str,
                   ledger: SiteLedger | None = None, job: str = "") -> None:
    """Take over the ledger the server restored for site ``name`` when it records more steps
    than the site's own (a resumed run starts with empty node state; a site keeping its
    ledger on disk has its own record and only adopts the copy if it lost it). Never lowers
    a ledger."""
    restored = restored_ledger(train_config, name, accountant)
    if restored is None:
        return
    if ledger is not None:
        if ledger.adopt(restored, job):
            log(WARNING, "site %s had no ledger of its own with %d steps; adopted the coordinator's copy",
                name, restored.steps)
        return
    own = PrivacyLedger.from_record(recordview.config(context.state, STATE_KEY), accountant)
    if restored.steps > own.steps:
        context.state[STATE_KEY] = restored.to_record()
