"""``fedsilo ledger STATE_DIR``: a site's own DP-SGD spend, read from its own files.

For a site operator who must show what the site has spent without asking the coordinator: every
``dp-ledger.json`` under the site's state folder (``privacy/site_ledger.py``), the releases it
records and the epsilon Opacus' accountant gives for them. A deployed site keeps one ledger per
data set, across every job that trained on it (``<state-dir>/privacy/<site>-<rows digest>``): its
epsilon is the composition of all of them, and the jobs are listed inside.

    fedsilo ledger /srv/fedsilo/hospital-a.state          # a table, one line per data set (or job)
    fedsilo ledger /srv/fedsilo/hospital-a.state --json   # the same, as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.state import SiteStore
from privacy.site_ledger import DATA_LEDGERS, DOCUMENT, SiteLedger


def read(state_dir: Path) -> list[dict[str, Any]]:
    """One entry per job and site under ``state_dir``; ValueError for a damaged file (named)."""
    out = []
    for path in sorted(state_dir.glob(f"*/*/{DOCUMENT}.json")):
        job, site = path.parent.parent.name, path.parent.name
        ledger = SiteLedger(SiteStore(state_dir, job, site))  # the file's accountant; a damaged file: ValueError naming it
        history = ledger.ledger()
        delta = ledger.delta if ledger.delta is not None else 1e-5
        jobs = ledger.jobs() if job == DATA_LEDGERS else [job]
        out.append({"job": ", ".join(j or "-" for j in jobs) if job == DATA_LEDGERS else job, "jobs": jobs,
                    "scope": "data set" if job == DATA_LEDGERS else "job",
                    "site": site, "file": str(path), "accountant": ledger.accountant,
                    "releases": len(ledger.releases), "rounds": sorted({r.round for r in ledger.releases}),
                    "steps": history.steps, "delta": delta, "epsilon": history.epsilon(delta),
                    "target_epsilon": ledger.target_epsilon,
                    "adopted_from_coordinator": any(r.source == "coordinator" for r in ledger.releases)})
    return out


def main(argv: list[str]) -> int:
    """``fedsilo ledger STATE_DIR``: the site's privacy ledger, per data file; the exit code."""
    parser = argparse.ArgumentParser(prog="fedsilo ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("state_dir", help="the site's state folder (the SuperNode's node config state-dir)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    root = Path(args.state_dir).expanduser()
    if not root.is_dir():
        print(f"fedsilo ledger: {root} is not a folder (give the site's state-dir)", file=sys.stderr)
        return 2
    try:
        entries = read(root)
    except ValueError as err:
        print(f"fedsilo ledger: {err}", file=sys.stderr)
        return 1
    if not entries:
        print(f"fedsilo ledger: no DP-SGD ledger under {root} (expected {root}/<job>/<site>/{DOCUMENT}.json)",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0
    print(f"{'job':<18} {'site':<14} {'releases':>8} {'steps':>7} {'epsilon':>9} {'target':>7}  delta   rounds")
    for e in entries:
        target = "-" if e["target_epsilon"] is None else f"{e['target_epsilon']:g}"
        note = "  (coordinator's copy adopted)" if e["adopted_from_coordinator"] else ""
        print(f"{e['job']:<18} {e['site']:<14} {e['releases']:>8} {e['steps']:>7} {e['epsilon']:>9.4f} {target:>7}  "
              f"{e['delta']:g}  {e['rounds']}{note}")
    return 0
