"""``fedsilo data split --out DIR [overrides]``: one data file per site, for deployments.

Splits the task's bundled data exactly as the simulation would for the same config
(``task``, ``partition``, ``num_sites``, ``seed``) and writes ``DIR/<site>.npz`` per site
(:mod:`tasks.site_file`) and ``DIR/sites.json`` (file, rows and label balance per site; never
records). Start each SuperNode with ``--node-config 'data-path="DIR/<site>.npz"'``.
Exit codes: 0 written, 2 bad config.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


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
    """``fedsilo data split|schema|check``: per-site files, a drafted schema, or a site's file checked; the exit code."""
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
        from app.support.paths import resolve_data_dir
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
    from app.runtime.site_files import split

    try:
        entries = split(args.overrides, args.out)
    except (config.ConfigError, PreflightError, ValueError) as err:
        print(f"fedsilo data: {err}", file=sys.stderr)
        return 2
    for e in entries:
        print(f"{e['name']}: {e['rows_train']} training + {e['rows_val']} validation rows -> {e['file']}")
    return 0
