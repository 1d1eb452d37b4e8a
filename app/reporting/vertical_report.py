"""Report sections of a vertical run (``results.json`` with ``kind: vertical``)."""

from __future__ import annotations

from typing import Any

from app.reporting.sections import Section, _fmt

METRICS = ("auc", "pr_auc", "ks", "accuracy", "f1", "loss", "train_loss")


def sections(results: dict[str, Any]) -> list[Section]:
    """The report's sections for a vertical run."""
    v = results.get("vertical", {})
    cfg = results["config"]["vertical"]
    summary = Section("Summary", [
        f"Vertical federation, model `{results['model']}` ({results['mode']}), status **{results['status']}**"
        + (f": {results['error']}" if results.get("error") else "") + ".",
        f"Active party (labels): `{v.get('active', '-')}`; passive parties: "
        + ", ".join(f"`{p}`" for p in v.get("passive", [])) + ".",
        "Common customers (private set intersection): "
        + ", ".join(f"{k} {n:,}" for k, n in v.get("intersection", {}).items()) + "."])
    parties = Section("Parties", tables=[(["party", "role", "rows", "model inputs", "held-out rows", "schema"], [
        [p, str(i.get("role")), str(i.get("rows", "-")), str(i.get("features", "-")), str(i.get("test_rows", "-")),
         str(i.get("fingerprint", "-"))] for p, i in v.get("parties", {}).items()])])
    seen = Section("Who sees what", tables=[(["", "what it can see"], [
        [k, str(t)] for k, t in results.get("visibility", {}).items()])])
    epochs = v.get("epochs", [])
    curve = Section("Metrics per epoch", ["The held-out customers, scored after every epoch at the active party."],
                    tables=[(["epoch", *METRICS, "seconds"], [
                        [str(e["epoch"]), *(_fmt(e.get(k)) for k in METRICS), _fmt(e.get("seconds"), 2)]
                        for e in epochs])]) if epochs else Section("Scores", tables=[(["metric", "value"], [
                            [k, _fmt(x) if isinstance(x, float) else str(x)]
                            for k, x in v.get("score", {}).items()])])
    priv = Section("Privacy")
    if results.get("privacy"):
        priv.tables.append((["", "value"], [[k, _fmt(x) if isinstance(x, float) else str(x)]
                                            for k, x in results["privacy"].items()]))
    else:
        priv.paragraphs.append("hetero_lr: every per-row value crosses encrypted (Paillier, keys held by the parties) "
                               "or masked; split_nn without protection: see Who sees what."
                               if cfg.get("name") == "hetero_lr" or cfg.get("protection") == "none" else "-")
    timing = Section("Timing and traffic", [
        "Bytes relayed between each pair of parties and to/from the coordinator (payload bytes); seconds per "
        "phase at the coordinator (wall) and the parties' compute time."],
        tables=[(["from -> to", "bytes"], [[k, f"{n:,}"] for k, n in v.get("bytes", {}).items()]),
                (["phase", "seconds (wall)"], [[k, _fmt(x, 3)] for k, x in v.get("seconds", {}).items()])])
    return [summary, parties, seen, curve, priv, timing]
