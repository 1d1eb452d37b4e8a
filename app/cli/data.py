"""``fedsilo data split --out DIR [overrides]``: one data file per site, for deployments.

Splits the task's bundled data exactly as the simulation would for the same config
(``task``, ``partition``, ``num_sites``, ``seed``) and writes ``DIR/<site>.npz`` per site
(:mod:`tasks.site_file`) and ``DIR/sites.json`` (file, rows and label balance per site; never
records). Start each SuperNode with ``--node-config 'data-path="DIR/<site>.npz"'``.
Exit codes: 0 written, 2 bad config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np


def split(overrides: list[str], out: Path) -> list[dict[str, Any]]:
    """Write every site's file for the config ``overrides``; return the ``sites.json`` entries."""
    import tasks
    from app import config
    from app.runtime.preflight import preflight
    from tasks import site_file

    cfg = config.compose(overrides)
    data_dir = preflight(cfg)
    task = tasks.get(cfg.task.name)(cfg.task, data_dir)
    n = config.num_sites(cfg)
    if getattr(task, "federated_data", False):
        return _split_tables(task, cfg, n, out)
    entries = []
    for site in task.sites(cfg.partition, n, cfg.seed):
        path = site_file.write(out / f"{site.name}.npz", site, task=cfg.task.name, num_sites=n,
                               partition=cfg.partition.name, seed=cfg.seed, features=task.data().feature_names)
        entries.append({"site_id": site.site_id, "name": site.name, "file": str(path.resolve()),
                        "rows_train": len(site.train), "rows_val": len(site.val),
                        "positive_share_train": float(site.train.y.mean()) if len(site.train) else None})
    (out / "sites.json").write_text(json.dumps({"task": cfg.task.name, "partition": cfg.partition.name,
                                                 "seed": cfg.seed, "sites": entries}, indent=2) + "\n")
    return entries


def _split_tables(task: Any, cfg: Any, n: int, out: Path) -> list[dict[str, Any]]:
    """``task=tabular``: each site's own raw table (its rows of the shared file, or its own file), as CSV.

    The rows keep every column (the split column too, so a site holds out the same test rows
    as in simulation); nothing is preprocessed: each site is preprocessed federally at run time.
    """
    import shutil

    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    files = task.site_files()
    # each site holds its own copy of the federation's schema: a deployed site reads no path the coordinator sends
    source_schema = task.path(cfg.task.schema, "schema")
    schema = Path(shutil.copyfile(source_schema, out / f"schema{source_schema.suffix}"))
    entries = []
    for k in range(n):
        site = task.raw_site(cfg.partition, n, cfg.seed, k)
        dest = out / f"{site.name}.csv"
        if files and files[k].is_dir():  # a site's folder (task=images)
            dest = out / site.name
            shutil.copytree(files[k], dest, dirs_exist_ok=True)
        elif files:
            shutil.copyfile(files[k], dest)
        elif not task.path(cfg.task.data, "data").is_file():
            raise ValueError(f"task={cfg.task.name}: to give each site its own data, make task.data a folder of "
                             "site folders (partition=natural)")
        else:
            source = pd.read_csv(task.path(cfg.task.data, "data"), dtype=str, keep_default_na=False)
            lines = np.sort(np.concatenate([site.train.line, site.val.line, site.test.line]))
            source.iloc[lines - 2].to_csv(dest, index=False)
        entries.append({"site_id": k, "name": site.name, "file": str(dest.resolve()),
                        "rows_train": len(site.train), "rows_val": len(site.val), "rows_test": len(site.test),
                        "node": {"partition-id": k, "site-name": site.name, "schema-path": str(schema.resolve())}})
    (out / "sites.json").write_text(json.dumps({"task": cfg.task.name, "partition": cfg.partition.name,
                                                 "seed": cfg.seed, "sites": entries}, indent=2) + "\n")
    return entries


def _own_data(args: argparse.Namespace) -> int:
    """``schema infer`` and ``check``: run at the site, on its own file; nothing leaves the machine."""
    from tasks.tabular.schema import Schema, SchemaError
    from tasks.tabular.table import SiteInputError, read

    try:
        if args.command == "schema":
            from tasks.tabular.infer import infer, to_yaml

            draft, notes = infer(args.file, args.label)
            text = to_yaml(draft, notes, str(args.file))
            Schema.parse(draft, "drafted schema")  # the draft must itself be valid
            if args.out:
                args.out.write_text(text)
                print(f"fedsilo data: schema drafted in {args.out}; review it, then share it with every site")
            else:
                print(text, end="")
            return 0
        schema = Schema.load(args.schema)
        table = read(args.file, schema)
        labels = table.label
        kind = schema.label.kind
        balance = (f"{int(labels.sum())} positive" if kind == "binary" else
                   f"classes {np.bincount(labels, minlength=len(schema.label.classes)).tolist()}" if kind == "multiclass"
                   else f"label mean {float(labels.mean()):.4g}")
        print(f"fedsilo data: {args.file} fits {args.schema} (fingerprint {schema.fingerprint()}): {len(table)} rows, "
              f"{balance}" + ("" if len(table) >= schema.min_rows else f"; BELOW min_rows={schema.min_rows}"))
        return 0 if len(table) >= schema.min_rows else 2
    except (SchemaError, SiteInputError) as err:
        print(f"fedsilo data: {err}", file=sys.stderr)
        return 2


def main(argv: list[str]) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")  # Flower Datasets' partitioners draw progress bars
    parser = argparse.ArgumentParser(prog="fedsilo data", description="Prepare per-site data files.")
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("split", help="one .npz per site from a task's bundled data")
    sp.add_argument("--out", type=Path, required=True, help="folder for the site files")
    sp.add_argument("overrides", nargs="*", help="Hydra overrides, as for a job: task=medical partition=natural ...")
    sp.add_argument("--vertical", action="store_true",
                    help="split the credit table by columns: a bank (label + its columns) and a payment platform")
    sp.add_argument("--overlap", type=float, default=0.85, help="--vertical: share of the customers both parties hold")
    sp.add_argument("--seed", type=int, default=0, help="--vertical: which customers each party holds")
    sc = sub.add_parser("schema", help="draft a schema from a site's own file (task=tabular)")
    sc.add_argument("action", choices=["infer"])
    sc.add_argument("file", type=Path, help="the site's CSV or Parquet file")
    sc.add_argument("--label", default=None, help="the label column (default: the last column)")
    sc.add_argument("--out", type=Path, default=None, help="write the schema here (default: print it)")
    ck = sub.add_parser("check", help="check a site's file against a schema before the site joins")
    ck.add_argument("file", type=Path)
    ck.add_argument("--schema", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command in ("schema", "check"):
        return _own_data(args)
    if args.vertical:
        from app.runtime.paths import resolve_data_dir
        from vertical.data import split_credit

        try:
            done = split_credit(resolve_data_dir(None) / "uci_credit_default_taiwan" / "credit_default.csv", args.out,
                                args.overlap, args.seed)
        except ValueError as err:
            print(f"fedsilo data: {err}", file=sys.stderr)
            return 2
        print(f"bank: {done['bank_rows']} customers -> {args.out / 'bank.csv'} (+ {done['test_customers']} held out "
              f"-> bank_test.csv)\nplatform: {done['platform_rows']} customers -> {args.out / 'platform.csv'} "
              f"(+ platform_test.csv); {done['both']} customers at both")
        return 0
    from app import config
    from app.runtime.preflight import PreflightError

    try:
        entries = split(args.overrides, args.out)
    except (config.ConfigError, PreflightError, ValueError) as err:
        print(f"fedsilo data: {err}", file=sys.stderr)
        return 2
    for e in entries:
        print(f"{e['name']}: {e['rows_train']} training + {e['rows_val']} validation rows -> {e['file']}")
    return 0
