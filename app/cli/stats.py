"""``fedsilo stats ARGS``: a Table 1 of the sites' tables (``learner=table1``, docs/survival.md "Table 1").

The same job as ``fedsilo learner.name=table1 ARGS`` (any override: the task, the schema and data, the aggregation
option, ``+learner.options.group=COLUMN``); the table is printed as Markdown and written beside results.json as
``table1.md``, ``table1.html``, ``table1.csv`` and ``table1.json``.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """Run the Table 1 job with ``argv``'s overrides; its exit code."""
    if argv[:1] in (["--help"], ["-h"]):
        print("usage: fedsilo stats OVERRIDE...   (the overrides of a fedsilo job; learner.name is table1)\n\n"
              + (__doc__ or ""))
        raise SystemExit(0)
    if any(a.startswith("learner.name=") for a in argv):
        print("fedsilo stats: learner.name is table1 here (other learners: fedsilo learner.name=...)", file=sys.stderr)
        return 2
    from app.cli import main as job

    sys.argv = [sys.argv[0], "learner.name=table1", *argv]
    try:
        job.run()
    except SystemExit as done:
        return int(done.code or 0)
    return 0
