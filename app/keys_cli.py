"""``fedsilo keys ...``: provisioning commands (run before a job, out of band).

    fedsilo keys paillier --out DIR [--bits 2048]

writes ``DIR/paillier_keypair.json`` (for the sites only; mode 0600) and
``DIR/paillier_public.json`` (for the server). Exit codes: 0 written, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedsilo keys", description="Provision keys for a fedsilo federation.")
    sub = parser.add_subparsers(dest="kind", required=True)
    pai = sub.add_parser("paillier", help="a Paillier key pair for aggregation=paillier")
    pai.add_argument("--out", type=Path, required=True, help="folder to write the two key files to")
    pai.add_argument("--bits", type=int, default=2048, help="modulus size in bits (>= 2048)")
    args = parser.parse_args(argv)
    from strategies.paillier.keys import PaillierKeyError, fingerprint, generate, load_public

    try:
        private_path, public_path = generate(args.out, args.bits)
    except PaillierKeyError as err:
        print(f"fedsilo keys: {err}", file=sys.stderr)
        return 2
    fp = fingerprint(load_public(public_path).n)
    print(f"key pair (sites only, keep secret): {private_path}\npublic key (server): {public_path}\n"
          f"fingerprint: {fp}")
    return 0
