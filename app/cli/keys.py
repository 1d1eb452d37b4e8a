"""``fedsilo keys ...``: provisioning commands (run before a job, out of band).

    fedsilo keys paillier --out DIR [--bits 2048]
    fedsilo keys supernode --out DIR --sites N
    fedsilo keys vertical --out DIR --parties bank platform
    fedsilo keys roster --out DIR --sites hospital-a hospital-b hospital-c
    fedsilo certs --out DIR --host NAME [--host ...] [--ip ADDR ...]

``paillier`` writes ``DIR/paillier_keypair.json`` (for the sites only; mode 0600) and
``DIR/paillier_public.json`` (for the server). ``supernode`` writes one SuperNode
authentication key pair per site (``site-<i>``, stays at the site; ``site-<i>.pub``,
registered at the SuperLink). ``vertical`` writes each vertical party's identity key
(``DIR/<party>/party.key``, 0600) and the others' public keys it pins
(``DIR/<party>/peer-keys.json``): node config ``party-key`` and ``peer-keys``. ``roster`` writes each
site's identity key for secure aggregation (``DIR/<site>/site.key``, 0600) and the roster of their
public keys (``DIR/roster.json``): node config ``site-key`` and ``roster`` (``fedsilo site --site-key
--roster``); in a consortium each site runs it for itself alone (``--sites <its name>``) and the
public halves are merged out of band. ``certs`` writes a
CA and a SuperLink TLS certificate (:mod:`app.runtime.pki`). Exit codes: 0 written, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    """``fedsilo keys paillier|roster|vertical``: provision keys for a federation; the exit code."""
    parser = argparse.ArgumentParser(prog="fedsilo keys", description="Provision keys for a fedsilo federation.")
    sub = parser.add_subparsers(dest="kind", required=True)
    pai = sub.add_parser("paillier", help="a Paillier key pair for aggregation=paillier")
    pai.add_argument("--out", type=Path, required=True, help="folder to write the two key files to")
    pai.add_argument("--bits", type=int, default=2048, help="modulus size in bits (>= 2048)")
    sn = sub.add_parser("supernode", help="SuperNode authentication key pairs (ECDSA P-384, OpenSSH format)")
    sn.add_argument("--out", type=Path, required=True)
    sn.add_argument("--sites", type=int, required=True)
    vk = sub.add_parser("vertical", help="vertical parties' identities and pinned peer keys (Ed25519)")
    vk.add_argument("--out", type=Path, required=True)
    vk.add_argument("--parties", nargs="+", required=True, help="the parties' names, as in vertical.parties")
    ro = sub.add_parser("roster", help="sites' identity keys and the roster of them (Ed25519; aggregation=secagg)")
    ro.add_argument("--out", type=Path, required=True)
    ro.add_argument("--sites", nargs="+", required=True, help="the sites' names (node config site-name)")
    args = parser.parse_args(argv)
    if args.kind == "roster":
        from core.identity import provision as provision_sites

        if len(set(args.sites)) != len(args.sites):
            print("fedsilo keys: --sites names must be distinct", file=sys.stderr)
            return 2
        for name, (key, roster) in provision_sites(args.out, args.sites).items():
            print(f"{name}: site-key={key} (keep at the site)  roster={roster}")
        return 0
    if args.kind == "vertical":
        from vertical.channel import provision

        if len(set(args.parties)) != len(args.parties) or len(args.parties) < 2:
            print("fedsilo keys: --parties needs at least two distinct names", file=sys.stderr)
            return 2
        for name, (key, peers) in provision(args.out, args.parties).items():
            print(f"{name}: party-key={key} (keep at the party)  peer-keys={peers}")
        return 0
    if args.kind == "supernode":
        from app.runtime.pki import make_supernode_keys

        try:
            pairs = make_supernode_keys(args.out, args.sites)
        except ValueError as err:
            print(f"fedsilo keys: {err}", file=sys.stderr)
            return 2
        for private, public in pairs:
            print(f"{private} (keep at the site)  {public} (register: flwr supernode register {public} <connection>)")
        return 0
    from core import extras

    if (why := extras.message("fedsilo keys paillier", "paillier")) is not None:
        print(f"fedsilo keys: {why}", file=sys.stderr)
        return 2
    from aggregation.paillier.keys import PaillierKeyError, fingerprint, generate, load_public

    try:
        private_path, public_path = generate(args.out, args.bits)
    except PaillierKeyError as err:
        print(f"fedsilo keys: {err}", file=sys.stderr)
        return 2
    fp = fingerprint(load_public(public_path).n)
    print(f"key pair (sites only, keep secret): {private_path}\npublic key (server): {public_path}\n"
          f"fingerprint: {fp}")
    return 0


def certs_main(argv: list[str]) -> int:
    """``fedsilo certs``: a CA and a SuperLink certificate."""
    parser = argparse.ArgumentParser(prog="fedsilo certs", description="TLS certificates for a SuperLink.")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the files to")
    parser.add_argument("--host", action="append", default=[], help="DNS name the SuperLink is reached at (repeat)")
    parser.add_argument("--ip", action="append", default=[], help="IP address the SuperLink is reached at (repeat)")
    parser.add_argument("--days", type=int, default=365, help="validity of the SuperLink certificate")
    args = parser.parse_args(argv)
    from app.runtime.pki import make_certificates

    try:
        files = make_certificates(args.out, args.host, args.ip, args.days)
    except ValueError as err:
        print(f"fedsilo certs: {err}", file=sys.stderr)
        return 2
    print(f"CA certificate (every SuperNode and CLI user): {files.ca_cert}\n"
          f"CA key (keep offline; signs new certificates): {files.ca_key}\n"
          f"SuperLink certificate and key: {files.server_cert} {files.server_key}")
    return 0
