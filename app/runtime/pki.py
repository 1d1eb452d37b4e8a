"""Certificates and SuperNode keys for a secure deployment (``fedsilo certs``, ``fedsilo keys supernode``).

* :func:`make_certificates`: a private CA and a SuperLink certificate it signs, for the
  host names and IP addresses the SuperNodes and the ``flwr`` CLI will connect to
  (ECDSA P-384, SHA-384; the CA for 5 years, the server certificate for 1 year). The
  SuperLink gets ``ca.crt``, ``superlink.crt``, ``superlink.key``; every SuperNode and
  CLI user gets ``ca.crt`` only. ``ca.key`` signs certificates and stays offline.
* :func:`make_supernode_keys`: one ECDSA P-384 key pair per site in OpenSSH format, the
  format ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
  read. The private key stays at the site; the coordinator registers the public one.

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.secret_files import write_private


@dataclass(frozen=True)
class Certificates:
    """Paths of a deployment's TLS files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    write_private(path, data)  # 0600 also over an existing file, never through a symbolic link


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(out: Path, hosts: list[str], ips: list[str], days: int = 365) -> Certificates:
    """A CA and a SuperLink certificate valid for ``hosts`` (DNS names) and ``ips``."""
    if not hosts and not ips:
        raise ValueError("give at least one --host or --ip the SuperLink is reached at")
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as err:
        raise ValueError(f"--ip: {err}") from err
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsilo federation"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedsilo federation CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=5 * 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts] + [x509.IPAddress(a) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (hosts or ips)[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out.mkdir(parents=True, exist_ok=True)
    files = Certificates(out / "ca.crt", out / "ca.key", out / "superlink.crt", out / "superlink.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.ca_key, _pem_key(ca_key))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem_key(key))
    return files


def make_supernode_keys(out: Path, sites: int, prefix: str = "site") -> list[tuple[Path, Path]]:
    """``sites`` key pairs ``(private, public)``: ``<prefix>-<i>`` and ``<prefix>-<i>.pub``."""
    if sites < 1:
        raise ValueError("--sites must be >= 1")
    pairs = []
    for i in range(sites):
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = out / f"{prefix}-{i}", out / f"{prefix}-{i}.pub"
        _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH) + b"\n")
        pairs.append((private, public))
    return pairs
