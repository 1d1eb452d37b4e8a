"""``fedsilo site`` (issue #19): each misconfiguration a site operator can make is found before the
site joins, with its own message; a good site joins a real SuperLink (TLS, node authentication) and
stops everything it started on SIGTERM."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.cli import site
from app.runtime import pki
from app.runtime.superlink import LocalSuperLink, free_port
from core import identity
from tests.e2e.test_e2e import leftover_processes

pytestmark = pytest.mark.e2e

FEDERATION = ["task=medical", "num_sites=4"]


def reissue(certs: pki.Certificates, *, hosts: list[str], expired: bool = False) -> None:
    """Replace the SuperLink's certificate, signed by the same CA: for other host names, or expired."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=3), now - dt.timedelta(days=1)) if expired else (now - dt.timedelta(minutes=5),
                                                                                        now + dt.timedelta(days=1))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .sign(ca_key, hashes.SHA384()))  # type: ignore[arg-type]
    certs.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))


class Listening(LocalSuperLink):
    """A SuperLink started with a certificate no client can verify: ready once its port listens."""

    def _healthy(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


def problems(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = site.main(list(argv))
    err = capsys.readouterr().err
    return code, [line.removeprefix("fedsilo site: problem: ") for line in err.splitlines() if "problem:" in line]


def test_site_command_finds_each_misconfiguration_before_joining(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.runtime import site_files as data_cli

    entries = data_cli.split(FEDERATION, tmp_path / "sites")
    data = entries[0]["file"]
    certs = pki.make_certificates(tmp_path / "pki", hosts=["localhost"], ips=["127.0.0.1"])
    (key, public), (stranger, _) = pki.make_supernode_keys(tmp_path / "keys", 2)
    other_ca = pki.make_certificates(tmp_path / "other", hosts=["localhost"], ips=[]).ca_cert
    finance = data_cli.split(["task=finance", "num_sites=4"], tmp_path / "finance")[0]["file"]
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a data file")

    with LocalSuperLink(tmp_path / "link" / "superlink.log", simulation=False, certs=certs, supernode_auth=True) as link:
        link.register(public)
        good = ["--superlink", link.address, "--root-certificates", str(certs.ca_cert), "--auth-key", str(key),
                "--data", data]
        assert problems(capsys, *good, "--check", *FEDERATION) == (0, [])

        def one(*changed: str, overrides: list[str] = FEDERATION) -> str:
            args = dict(zip(good[::2], good[1::2]))
            args.update(dict(zip(changed[::2], changed[1::2])))
            code, found = problems(capsys, *[x for kv in args.items() for x in kv], "--check", *overrides)
            assert code == 2 and len(found) == 1, found
            return found[0]

        assert "not signed by the CA" in one("--root-certificates", str(other_ca))
        assert "CA file" in one("--root-certificates", str(tmp_path / "missing.crt"))
        assert "node key" in one("--auth-key", str(tmp_path / "missing-key")) and "cannot be read" in \
            one("--auth-key", str(tmp_path / "missing-key"))
        assert "not an unencrypted OpenSSH private key" in one("--auth-key", str(public))
        assert "does not exist" in one("--data", str(tmp_path / "nowhere.npz"))
        assert "not a readable .npz file" in one("--data", str(garbage))
        assert "holds task 'finance' data, but this run's task is 'medical'" in one("--data", finance)
        assert "has no Paillier key pair" in one(overrides=[*FEDERATION, "aggregation=paillier"])
        # issue #34: secure aggregation needs the site's identity and the roster, and the two must agree
        secagg = [*FEDERATION, "aggregation=secagg"]
        assert "has no identity key or roster" in one(overrides=secagg)
        ids = identity.provision(tmp_path / "ids", ["cleveland", "hungarian"])
        assert "lists key" in one("--site-key", ids["hungarian"][0], "--roster", ids["cleveland"][1], overrides=secagg)
        assert "does not list this site ('elsewhere')" in one("--site-key", ids["cleveland"][0], "--roster",
                                                              ids["cleveland"][1], "--site-name", "elsewhere",
                                                              overrides=secagg)
        assert problems(capsys, *good, "--site-key", ids["cleveland"][0], "--roster", ids["cleveland"][1],
                        "--check", *secagg) == (0, [])
        # issue #33: the site's own policy, printed field by field, and the federation's config checked against it
        policy = tmp_path / "site.yaml"
        policy.write_text("privacy: {required: dpsgd, max_epsilon: 4.0}\n")
        assert "requires privacy=dpsgd" in one("--policy", str(policy))
        assert "exceeds the policy's max_epsilon=4" in one("--policy", str(policy),
                                                           overrides=[*FEDERATION, "privacy=dpsgd",
                                                                      "privacy.target_epsilon=8"])
        capsys.readouterr()
        assert site.main([*good, "--policy", str(policy), "--check", *FEDERATION, "privacy=dpsgd",
                          "privacy.target_epsilon=3"]) == 0
        printed = capsys.readouterr().out
        assert f"policy: {policy}" in printed and "privacy.max_epsilon: 4.0" in printed
        policy.chmod(0o600)
        policy.write_text("privcy: {}\n")
        assert "privcy" in one("--policy", str(policy))
        public.chmod(0o644)
        key.chmod(0o644)  # a private key others may read is refused, as OpenSSH refuses it
        assert "chmod 600" in one()
        key.chmod(0o600)
        port = free_port()
        assert f"SuperLink 127.0.0.1:{port} is unreachable" in one("--superlink", f"127.0.0.1:{port}")
        # an unregistered key passes every local check; the SuperLink refuses it when the site tries to join
        code = site.main([*good[:5], str(stranger), *good[6:], "--max-retries", "0", "--port", str(free_port()),
                          *FEDERATION])
        err = capsys.readouterr().err
        assert code == 1 and "the SuperLink did not accept this node" in err and "flwr supernode register" in err
    assert not leftover_processes(), leftover_processes()

    for hosts, expired, expect in ((["elsewhere.example.org"], False, "is not valid for 'localhost'"),
                                   (["localhost"], True, "has expired")):
        reissue(certs, hosts=hosts, expired=expired)
        link = Listening(tmp_path / "link2" / "superlink.log", simulation=False, certs=certs, supernode_auth=True)
        link.start()
        try:
            code, found = problems(capsys, "--superlink", f"localhost:{link.port}", "--root-certificates",
                                   str(certs.ca_cert), "--auth-key", str(key), "--data", data, "--check", *FEDERATION)
        finally:
            link.stop()
        assert code == 2 and len(found) == 1 and expect in found[0], found
    assert not leftover_processes(), leftover_processes()


def test_a_good_site_joins_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    from app.runtime import site_files as data_cli

    data = data_cli.split(FEDERATION, tmp_path / "sites")[0]["file"]
    certs = pki.make_certificates(tmp_path / "pki", hosts=["localhost"], ips=["127.0.0.1"])
    ((key, public),) = pki.make_supernode_keys(tmp_path / "keys", 1)
    with LocalSuperLink(tmp_path / "superlink.log", simulation=False, certs=certs, supernode_auth=True) as link:
        link.register(public)
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "site", "--superlink", link.address,
                                 "--root-certificates", str(certs.ca_cert), "--auth-key", str(key), "--data", data,
                                 "--port", str(free_port()), *FEDERATION],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=link.env)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
        try:
            deadline = time.monotonic() + 120
            online: list[dict[str, object]] = []
            while time.monotonic() < deadline and not (online and any("fedsilo worker: serving" in x for x in lines)):
                online = [n for n in link.connected_nodes() if str(n.get("status", "")).lower() == "online"]
                time.sleep(1)
            assert online, json.dumps(link.connected_nodes())
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        time.sleep(0.5)
        out = "".join(lines)
        assert code == 143, out[-3000:]
        assert "checks passed" in out and "joined" in out and "fedsilo worker: serving" in out
    assert not leftover_processes(), leftover_processes()
