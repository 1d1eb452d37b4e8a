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
    scalars = {k: v for k, v in learner.items() if k not in SKIP and not isinstance(v, (list, dict))}
    outcome = Section("Outcome", tables=[(["", "value"], [[k, _cell(v)] for k, v in scalars.items()])])
    out = [summary, outcome]
    if isinstance(learner.get("curves"), dict) and learner["curves"]:
        out.append(_survival_curves(learner["curves"]))
    if learner.get("analysis") == "table1":  # the table itself, not its JSON
        from learners.table1 import notes, rows_of

        header, rows = rows_of(learner)
        out.append(Section("Table 1", notes(learner), tables=[(header, rows)]))
    for key, value in learner.items():  # the learner's tables: named values, rows of records, lists of names
        if key in SKIP or key in scalars or not value or key == "curves" or \
                (learner.get("analysis") == "table1" and key in ("pooled", "sites", "variables")):
            continue
        out.append(_section(key, value))
    conf = Section("Configuration", [f"Overrides: `{results.get('overrides') or '(defaults)'}`"])
    timing = Section("Timing and traffic", tables=[(["", "value"], [
        ["seconds", _fmt(results.get("timing", {}).get("total_seconds"), 2)],
        *([k, f"{v:,}"] for k, v in (results.get("traffic") or {}).items() if isinstance(v, int))])])
    return [*out, conf, timing]


ROWS = 25  # the most rows a learner's table shows (results.json holds them all)


def _cell(v: Any) -> str:
    return _fmt(v) if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _section(key: str, value: Any) -> Section:
    """One of a learner's results as a section: a dict as name/value rows, a list of records as a table
    (the first and last rows of a long one), a list of names as a line."""
    title = key.replace("_", " ").capitalize()
    if isinstance(value, dict):
        rows = [[str(k), _cell(v)] for k, v in value.items()]
        note = [f"{len(rows)} entries; the first {ROWS} shown (results.json holds all)."] if len(rows) > ROWS else []
        return Section(title, note, tables=[(["", "value"], rows[:ROWS])])
    if isinstance(value, list) and all(isinstance(r, dict) for r in value):
        cols = list(dict.fromkeys(k for r in value for k in r))
        shown = value if len(value) <= ROWS else [*value[:5], *value[-(ROWS - 5):]]
        note = [f"{len(value)} rows; the first 5 and the last {ROWS - 5} shown (results.json holds all)."] \
            if len(value) > ROWS else []
        return Section(title, note, tables=[(cols, [[_cell(r.get(c)) for c in cols] for r in shown])])
    return Section(title, [", ".join(f"`{v}`" for v in value) if isinstance(value, list) else _cell(value)])


def _survival_curves(curves: dict[str, Any]) -> Section:
    """Kaplan-Meier curves (steps) with their confidence bands, one per group, and each group's median."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = []
    for level, c in curves.items():
        t = [0.0, *c["time"]]
        line = ax.step(t, [1.0, *c["survival"]], where="post", label=f"{level} ({c['rows']} rows)")[0]
        ax.fill_between(t, [1.0, *c["lower"]], [1.0, *c["upper"]], step="post", alpha=0.15, color=line.get_color())
        rows.append([level, str(c["rows"]), str(c["events_total"]), _fmt(c["median"]),
                     f"{_fmt(c['median_lower'])} - {_fmt(c['median_upper'])}"])
    ax.set_xlabel("time")
    ax.set_ylabel("survival")
    ax.set_ylim(0, 1.02)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return Section("Kaplan-Meier curves", ["Pooled across the sites from protected sums of events and numbers at "
                                           "risk (docs/survival.md); bands: exponential Greenwood."],
                   tables=[(["group", "rows", "events", "median", "median interval"], rows)],
                   figures=[("kaplan_meier", buf.getvalue())])
