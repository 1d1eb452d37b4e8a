"""Report sections of a sum-based learner's run (``results.json`` with ``kind: learner``)."""

from __future__ import annotations

import json
from typing import Any

from app.reporting.sections import Section, _fmt

SKIP = ("name", "coordinator_learns")


def sections(results: dict[str, Any]) -> list[Section]:
    """The report's sections for a sum-based learner's run: what it fitted, what the coordinator learned."""
    learner = results.get("learner", {})
    cfg = results["config"]
    summary = Section("Summary", [
        f"Learner `{learner.get('name', '-')}` on task `{cfg['task']['name']}`, {results.get('sites', '-')} sites, "
        f"aggregation `{cfg['aggregation']['name']}`, status **{results.get('status', '-')}**.",
        f"What the coordinator learned: {learner.get('coordinator_learns', '-')} of each protected sum "
        "(docs/learners.md)."])
    outcome = Section("Outcome", tables=[(["", "value"], [
        [k, _fmt(v) if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)]
        for k, v in learner.items() if k not in SKIP])])
    conf = Section("Configuration", [f"Overrides: `{results.get('overrides') or '(defaults)'}`"])
    timing = Section("Timing and traffic", tables=[(["", "value"], [
        ["seconds", _fmt(results.get("timing", {}).get("total_seconds"), 2)],
        *([k, f"{v:,}"] for k, v in (results.get("traffic") or {}).items() if isinstance(v, int))])])
    return [summary, outcome, conf, timing]
