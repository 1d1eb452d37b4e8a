"""``fedsilo compare DIR...``: runs side by side, as one compares runs in TensorBoard or W&B.

Each ``DIR`` is a run directory (holding ``results.json``) or a folder of them, such as a
Hydra multirun directory (``multirun/<date>/<time>/``: one numbered job per folder); runs
are found recursively. Each run is named by the overrides in which the runs differ
(``strategy=fedprox seed=1``), so a sweep's table reads at a glance. Written to
``--out`` (default ``./compare``):

``compare.md`` / ``compare.csv``  one row per run: its differing keys, status, final test
                                 metrics, best round, epsilon, seconds and traffic
``compare.png``                  test AUC and loss per round, every run overlaid (and
                                 epsilon per round when runs used DP)
``compare.html``                 all of it in one self-contained page
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.reporting.report import Section, _png, to_html, to_markdown
from app.reporting.results import RESULTS_FILE

COLUMNS = ("auc", "accuracy", "f1", "ks", "loss")
#: Shown when some compared run has them: regression runs (task=tabular with a numeric label).
REGRESSION_COLUMNS = ("r2", "mae", "rmse")


@dataclass
class Run:
    """One run directory and its results."""

    path: Path
    results: dict[str, Any]
    name: str = ""


def find_runs(dirs: list[Path]) -> list[Run]:
    """Every run under ``dirs`` (each a run directory or a folder of them), in path order."""
    found: dict[Path, Run] = {}
    for d in dirs:
        if not d.exists():
            raise FileNotFoundError(f"{d} does not exist")
        paths = [d / RESULTS_FILE] if (d / RESULTS_FILE).is_file() else sorted(d.rglob(RESULTS_FILE))
        for p in paths:
            try:
                found[p.parent.resolve()] = Run(p.parent, json.loads(p.read_text()))
            except json.JSONDecodeError as err:
                raise ValueError(f"{p} is not valid JSON: {err}") from err
    if not found:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {', '.join(map(str, dirs))}")
    runs = sorted(found.values(), key=lambda r: _sort_key(r.path))
    _name(runs)
    return runs


def _sort_key(path: Path) -> tuple[Any, ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)  # multirun jobs 0, 1, ..., 10


def _name(runs: list[Run]) -> None:
    """Name each run by the overrides in which the runs differ (``(defaults)`` for a run with
    none of them; its folder when all runs had the same overrides)."""
    tokens = [[t for t in shlex.split(r.results.get("overrides", "")) if not t.startswith("data_dir=")] for r in runs]
    common = set.intersection(*(set(t) for t in tokens)) if tokens else set()
    for r, toks in zip(runs, tokens):
        own = [t for t in toks if t not in common]
        r.name = " ".join(own) if own else ("(defaults)" if any(set(t) - common for t in tokens) else r.path.name)


def final_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """A run's test metrics: the last round's, or a sum-based learner's (``learner.test``)."""
    return results.get("final") or (results.get("learner") or {}).get("test") or {}


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """The comparison table's header and rows, one row per run (a sum-based learner's: its rounds of trees or
    Newton steps, its test metrics and traffic)."""
    columns = [*COLUMNS, *(k for k in REGRESSION_COLUMNS if any(k in final_metrics(r.results) for r in runs))]
    personal = any(r.results.get("personalization") for r in runs)
    head = ["run", "status", "rounds", *columns, "best AUC (round)", "max epsilon",
            *(["site mean accuracy (global / personal)"] if personal else []), "seconds", "MB to sites", "path"]
    rows = []
    for r in runs:
        res = r.results
        final, hist, learner = final_metrics(res), res.get("history", []), res.get("learner") or {}
        aucs = [(h["server"].get("auc"), h["round"]) for h in hist if h["server"].get("auc") is not None]
        best = max(aucs) if aucs else None
        p = res.get("privacy") or {}
        eps = p.get("max_epsilon", p.get("epsilon"))
        mb = (sum(h.get("traffic", {}).get("bytes_to_sites", 0) for h in hist) if hist else
              (res.get("traffic") or {}).get("bytes_to_sites", 0)) / 1e6
        rounds = len(hist) if hist or not learner else learner.get("rounds", learner.get("iterations", 1))
        rows.append([r.name, str(res.get("status", "?")), str(rounds),
                     *[("n/a" if final.get(k) is None else f"{final[k]:.4f}") for k in columns],
                     f"{best[0]:.4f} ({best[1]})" if best else "n/a", "-" if eps is None else f"{eps:.3f}",
                     *([site_means(res)] if personal else []),
                     f"{res.get('timing', {}).get('total_seconds', 0):.1f}", f"{mb:.2f}", str(r.path)])
    return head, rows


def site_means(results: dict[str, Any]) -> str:
    """The mean over sites of each site's accuracy on its own test rows: global / personal model."""
    mean = (results.get("personalization") or {}).get("mean") or {}
    if not mean:
        return "-"
    return f"{mean['global'].get('accuracy', float('nan')):.4f} / {mean['personal'].get('accuracy', float('nan')):.4f}"


def plot(runs: list[Run]) -> bytes:
    """A PNG of the runs' test metric per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with_dp = any(h["participation"].get("privacy") for r in runs for h in r.results.get("history", []))
    fig, axes = plt.subplots(1, 3 if with_dp else 2, figsize=(15 if with_dp else 10.5, 4))
    for r in runs:
        hist = r.results.get("history", [])
        rounds = [h["round"] for h in hist]
        init = r.results.get("initial") or {}
        for ax, key in zip(axes, ("auc", "loss")):
            vals = [h["server"].get(key) for h in hist]
            xs, ys = ([0, *rounds], [init.get(key), *vals]) if init.get(key) is not None else (rounds, vals)
            ax.plot(xs, [float("nan") if v is None else v for v in ys], "-o", markersize=2.5, label=r.name)
        if with_dp:
            eps = [max((p["epsilon"] for p in h["participation"].get("privacy", {}).values()), default=float("nan"))
                   for h in hist]
            axes[2].plot(rounds, eps, "-o", markersize=2.5, label=r.name)
    titles = ("test AUC", "test loss", "max epsilon over sites")
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="round")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def write(runs: list[Run], out: Path) -> list[Path]:
    """Write ``compare.csv``, ``compare.md`` and the plot into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    head, rows = table(runs)
    with open(out / "compare.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        w.writerows(rows)
    png = plot(runs)
    (out / "compare.png").write_bytes(png)
    sec = Section(f"{len(runs)} runs", paragraphs=["Final metrics on each run's held-out test set; runs are named by "
                                                   "the overrides in which they differ."],
                  tables=[(head, rows)], figures=[("compare", png)])
    title = "fedsilo: run comparison"
    (out / "compare.md").write_text(to_markdown(title, [sec]))
    (out / "compare.html").write_text(to_html(title, [sec]))
    return [out / f for f in ("compare.md", "compare.csv", "compare.png", "compare.html")]


def main(argv: list[str]) -> int:
    """``fedsilo compare DIR...``: compare runs; the exit code."""
    parser = argparse.ArgumentParser(prog="fedsilo compare", description="Compare runs (or a Hydra multirun folder).")
    parser.add_argument("dirs", nargs="+", type=Path, help="run directories or folders of runs")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="output folder (default ./compare)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.dirs)
        files = write(runs, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"fedsilo compare: {err}", file=sys.stderr)
        return 2
    head, rows = table(runs)
    width = max(len(r[0]) for r in rows)
    print(f"{'run'.ljust(width)}  status      auc     loss   seconds")
    for r in rows:
        print(f"{r[0].ljust(width)}  {r[1]:<10}  {r[3]:>6}  {r[7]:>6}  {r[11]:>7}")
    print(f"fedsilo compare: {len(runs)} runs -> {', '.join(str(f) for f in files)}")
    return 0
