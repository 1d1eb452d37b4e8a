r"""``fedsilo site``: one command for a site operator, checks first, then the site joins.

    fedsilo site --superlink coordinator.example.org:8000 --root-certificates ca.crt \\
        --auth-key site-0 --data /data/fedsilo/cleveland.npz task=medical num_sites=4

The overrides are the federation's (the coordinator's operator hands them out: task, sites,
partition, aggregation). Before anything starts, it checks what a site can check on its own and
prints one line per problem, with the fix:

- the CA file (readable PEM certificate);
- the SuperLink: reachable at the address, its TLS certificate signed by that CA, valid for the
  host name and not expired (``--insecure`` skips TLS, for demos on a closed machine);
- the node's private key (readable, an OpenSSH EC key as ``fedsilo keys`` / Flower make them);
- the data file, read and validated by the same code the ClientApp runs (file, task, number of
  sites, shape; for ``task=tabular`` the table against the federation's schema);
- what the aggregation option needs at the site (``aggregation=paillier``: the key pair);
- the site's policy (``--policy site.yaml``, else the default), printed field by field, and the
  federation's config against it (:mod:`app.site_policy`); the running site enforces it on
  every message.

Then it starts the site: Flower's SuperNode with the site's long-lived ClientApp worker
(:mod:`app.runtime.supernode`), with the flags and node config these checks used, and waits
until the SuperLink has accepted the node (an unregistered key is refused there, and said so).
It stops everything it started on Ctrl-C or SIGTERM. ``--check`` only checks. Exit codes: 0 ok,
1 the site could not join or its SuperNode failed, 2 a check failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

JOINED = "SuperNode ID:"


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--superlink {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def check_ca(path: Path) -> list[str]:
    """Problems of the CA certificate at ``path`` (empty if it is one)."""
    from cryptography import x509

    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as err:
        return [f"CA file {path} cannot be read: {err.strerror or err}"]
    except ValueError:
        return [f"CA file {path} is not a PEM certificate (the coordinator's ca.crt)"]
    return []


def check_superlink(address: str, ca: Path | None, timeout: float = 5.0) -> list[str]:
    """The SuperLink reachable at ``address``; with ``ca``, its certificate verified for the host."""
    try:
        host, port = _address(address)
    except ValueError as err:
        return [str(err)]
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        return [f"SuperLink {address} is unreachable: {err.strerror or err} (is it running, and is the port open "
                f"to this site?)"]
    with sock:
        if ca is None:
            return []
        context = ssl.create_default_context(cafile=str(ca))
        try:
            with context.wrap_socket(sock, server_hostname=host):
                return []
        except ssl.SSLCertVerificationError as err:
            return [_verify_problem(address, host, ca, err)]
        except (ssl.SSLError, OSError) as err:
            return [f"SuperLink {address}: the TLS handshake failed ({err}); does it run with TLS?"]


def _verify_problem(address: str, host: str, ca: Path, err: ssl.SSLCertVerificationError) -> str:
    code, why = err.verify_code, err.verify_message
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return f"SuperLink {address}: its TLS certificate has expired ({why}); the coordinator must renew it"
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        return (f"SuperLink {address}: its TLS certificate is not valid for {host!r} ({why}); connect by a name or "
                f"address the certificate lists, or have it reissued")
    if code in (2, 18, 19, 20, 21):  # no issuer / self-signed / untrusted chain
        return (f"SuperLink {address}: its TLS certificate is not signed by the CA in {ca} ({why}); "
                f"use the coordinator's ca.crt")
    return f"SuperLink {address}: its TLS certificate does not verify with {ca}: {why} (code {code})"


def check_key(path: Path) -> list[str]:
    """Problems of the node's authentication key at ``path`` (empty if it is a private P-256 key kept private)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    from core.secret_files import SecretFileError, read_private

    try:
        data = path.read_bytes()
    except OSError as err:
        return [f"node key {path} cannot be read: {err.strerror or err}"]
    try:
        key = load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        return [f"node key {path} is not an unencrypted OpenSSH private key ({err}); give the private key "
                f"`fedsilo keys` made for this site (not its .pub)"]
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return [f"node key {path} is a {type(key).__name__.removeprefix('_')}, Flower's node authentication needs "
                f"an elliptic-curve (ECDSA) key"]
    try:  # a private key others may read, or a symbolic link: refused (as OpenSSH refuses it)
        read_private(path, "node key")
    except SecretFileError as err:
        return [str(err)]
    return []


def node_config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The SuperNode's node config from the command line: data, schema, state folder, policy and keys."""
    node: dict[str, Any] = {"data-path": str(Path(args.data).expanduser().resolve())}
    if args.state_dir:
        node["state-dir"] = str(Path(args.state_dir).expanduser().resolve())
    if args.site_name:
        node["site-name"] = args.site_name
    if args.schema:
        node["schema-path"] = str(Path(args.schema).expanduser().resolve())
    for flag, key in (("site_key", "site-key"), ("roster", "roster")):  # aggregation=secagg: identity and roster
        if getattr(args, flag, None):
            node[key] = str(Path(getattr(args, flag)).expanduser().resolve())
    if args.paillier_keypair:
        from aggregation.paillier.config import NODE_CONFIG_KEY

        node[NODE_CONFIG_KEY] = str(Path(args.paillier_keypair).expanduser().resolve())
    if args.policy:
        from app.site_policy import NODE_CONFIG_KEY as POLICY_KEY

        node[POLICY_KEY] = str(Path(args.policy).expanduser().resolve())
    return node


def check_data(overrides: list[str], data_dir: str | None, node: dict[str, Any]) -> list[str]:
    """The site's data file, loaded by the ClientApp's own code for the federation's config."""
    from flwr.app import Context, RecordDict

    from app import config, plan, site_policy
    from app.support.paths import resolve_data_dir

    run_config: dict[str, bool | float | int | str] = {
        "overrides": config.run_overrides(overrides, resolve_data_dir(data_dir))}
    context = Context(run_id=0, node_id=0, node_config=node, state=RecordDict(), run_config=run_config)
    try:
        plan.site_plan(context)
    except site_policy.PolicyError:
        return []  # the policy file's own problem: check_policy names it
    except (*plan.DATA_ERRORS, OSError, ValueError, KeyError) as err:
        return [f"data file {node['data-path']}: {err}"]
    return []


def check_policy(cfg: Any, node: dict[str, Any]) -> list[str]:
    """The site's policy file, and whether the federation's config is one it accepts (printed field by field)."""
    from app import site_guard, site_policy

    try:
        policy = site_policy.of(node)
    except site_policy.PolicyError as err:
        return [str(err)]
    where = node.get(site_policy.NODE_CONFIG_KEY, "the default policy (no --policy)")
    print(f"fedsilo site: policy: {where}", flush=True)
    for line in site_policy.describe(policy):
        print(f"fedsilo site:   {line}", flush=True)
    return [f"the federation's config is refused by this site's policy: {p}" for p in site_guard.check_run(cfg, policy)]


def check_all(args: argparse.Namespace) -> list[str]:
    """Every problem found before joining, one line each."""
    import aggregation
    from app import config

    problems: list[str] = []
    try:
        cfg = config.compose(args.overrides)
    except (config.ConfigError, ValueError) as err:
        return [f"the federation's config: {err}"]
    ca = None if args.insecure else Path(args.root_certificates) if args.root_certificates else None
    if not args.insecure and ca is None:
        problems.append("--root-certificates CA.crt is required (or --insecure, for demos on a closed machine)")
    if ca is not None:
        problems += check_ca(ca)
    problems += check_superlink(args.superlink, ca if ca is not None and not problems else None)
    if args.auth_key:
        problems += check_key(Path(args.auth_key))
    elif not args.insecure:
        problems.append("--auth-key KEY is required: the SuperLink authenticates its sites (fedsilo keys made one "
                        "per site)")
    node = node_config_of(args)
    problems += check_policy(cfg, node)
    problems += check_data(args.overrides, cfg.data_dir, node)
    problems += aggregation.get(cfg.aggregation.name).site_check(cfg.aggregation, node)
    return problems


def supernode_command(args: argparse.Namespace) -> list[str]:
    """The command that starts this site's SuperNode with the site worker."""
    node = " ".join(f'{k}="{v}"' for k, v in node_config_of(args).items())
    cmd = [sys.executable, "-m", "app.runtime.supernode", "--worker", "--superlink", args.superlink,
           "--node-config", node, "--max-retries", str(args.max_retries)]
    if args.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(args.root_certificates).resolve())]
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", str(Path(args.auth_key).resolve())]
    if args.port:
        cmd += ["--port", str(args.port)]
    return cmd


def run_site(args: argparse.Namespace, join_timeout: float = 120.0) -> int:
    """Start the SuperNode and its worker; return when they end (or on Ctrl-C / SIGTERM)."""
    from app.runtime.superlink import end_group

    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.Popen(supernode_command(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    joined = threading.Event()
    tail: list[str] = []

    def relay() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, ""):
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip())
            del tail[:-20]
            if JOINED in line:
                joined.set()

    threading.Thread(target=relay, daemon=True).start()

    def stop(*_: Any) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop)
    try:
        deadline = time.monotonic() + join_timeout
        while not joined.is_set() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not joined.is_set():
            reason = next((t for t in reversed(tail) if "rror" in t or "refused" in t.lower() or "denied" in t.lower()),
                          tail[-1] if tail else "no output")
            print(f"fedsilo site: the SuperLink did not accept this node: {reason}\nfedsilo site: if its key is not "
                  f"registered, the coordinator's operator runs: flwr supernode register {args.auth_key}.pub",
                  file=sys.stderr, flush=True)
            return 1
        print(f"fedsilo site: joined {args.superlink}; Ctrl-C or SIGTERM stops this site", flush=True)
        return 0 if proc.wait() == 0 else 1
    except KeyboardInterrupt:
        return 130
    finally:
        end_group(proc, 15.0)  # SIGTERM, then SIGKILL: the SuperNode and its worker (one process group)


def main(argv: list[str]) -> int:
    """``fedsilo site``: check and start one site; the exit code."""
    parser = argparse.ArgumentParser(prog="fedsilo site", description=__doc__.splitlines()[0])
    parser.add_argument("--superlink", required=True, help="the coordinator's SuperLink, HOST:PORT")
    parser.add_argument("--root-certificates", help="the coordinator's CA certificate (ca.crt)")
    parser.add_argument("--auth-key", help="this site's private key (its .pub registered at the SuperLink)")
    parser.add_argument("--data", required=True, help="this site's data file")
    parser.add_argument("--state-dir", help="this site's state folder (default: beside the data file)")
    parser.add_argument("--site-name", help="the site's name in logs and reports (default: the data file's stem)")
    parser.add_argument("--schema", help="task=tabular: the federation's schema file as this site holds it")
    parser.add_argument("--paillier-keypair", help="aggregation=paillier: the sites' key pair")
    parser.add_argument("--site-key", help="aggregation=secagg: this site's identity key (fedsilo keys roster)")
    parser.add_argument("--roster", help="aggregation=secagg: the consortium's roster of site identities")
    parser.add_argument("--policy", help="this site's policy (YAML; docs/deployment.md): what it agrees to do, whatever "
                        "the coordinator asks")
    parser.add_argument("--port", type=int, help="the SuperNode's local Runtime API port (default 9094)")
    parser.add_argument("--max-retries", type=int, default=50, help="reconnection attempts if the SuperLink goes away")
    parser.add_argument("--insecure", action="store_true", help="no TLS and no authentication (demos only)")
    parser.add_argument("--check", action="store_true", help="only run the checks")
    parser.add_argument("overrides", nargs="*", help="the federation's overrides: task=medical num_sites=4 ...")
    args = parser.parse_args(argv)
    if not args.state_dir:
        args.state_dir = str(Path(args.data).expanduser().with_suffix(".state"))
    problems = check_all(args)
    for p in problems:
        print(f"fedsilo site: problem: {p}", file=sys.stderr, flush=True)
    if problems:
        print(f"fedsilo site: {len(problems)} problem(s); nothing was started", file=sys.stderr, flush=True)
        return 2
    print(f"fedsilo site: checks passed (SuperLink {args.superlink}, data {args.data})", flush=True)
    if args.check:
        return 0
    return run_site(args)
