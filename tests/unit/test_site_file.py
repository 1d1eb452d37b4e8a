"""Site data files (``fedsilo data split``), certificates and SuperNode keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app import config
from app.runtime import pki
from app.runtime import site_files as data_cli
from tasks import site_file
from tasks.site_file import SiteDataError
from tests.conftest import make_task


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sites")
    data_cli.split(["task=medical"], out)
    return out


def test_split_writes_the_simulations_sites(split_dir: Path) -> None:
    """Each file holds exactly the rows the simulation gives that site."""
    cfg = config.compose(["task=medical"])
    sites = make_task("medical").sites(cfg.partition, 4, cfg.seed)
    listing = json.loads((split_dir / "sites.json").read_text())
    assert [e["name"] for e in listing["sites"]] == [s.name for s in sites]
    for site in sites:
        loaded = site_file.load(split_dir / f"{site.name}.npz", task="medical", num_sites=4, input_shape=(13,))
        assert (loaded.site_id, loaded.name) == (site.site_id, site.name)
        assert torch.equal(loaded.train.x, site.train.x) and torch.equal(loaded.val.y, site.val.y)
        assert np.array_equal(loaded.train.group, site.train.group)


def _rewrite(src: Path, dst: Path, **changes: object) -> Path:
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    manifest = json.loads(str(arrays["manifest"]))
    for key, value in changes.items():
        if key.startswith("m_"):
            manifest[key[2:]] = value
        elif value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    arrays["manifest"] = np.array(json.dumps(manifest))
    np.savez(dst, **arrays)
    return dst


@pytest.mark.parametrize("change, message", [
    ({"x_train": None}, "lacks"),
    ({"m_task": "finance"}, "task 'finance'"),
    ({"m_num_sites": 3}, "split for 3 sites"),
    ({"m_format": "csv"}, "format"),
    ({"m_site_id": 9}, "site_id"),
    ({"x_train": np.zeros((5, 12), np.float32)}, "shape"),
    ({"x_train": np.zeros((179, 13), np.float64)}, "float32"),
    ({"y_train": np.full(179, 2.0, np.float32)}, "labels"),
    ({"x_val": np.full((20, 13), np.nan, np.float32)}, "NaN"),
])
def test_malformed_site_file_is_refused_with_a_clear_message(split_dir: Path, tmp_path: Path, change: dict,
                                                              message: str) -> None:
    bad = _rewrite(split_dir / "cleveland.npz", tmp_path / "bad.npz", **change)
    with pytest.raises(SiteDataError, match=message) as err:
        site_file.load(bad, task="medical", num_sites=4, input_shape=(13,))
    assert "bad.npz" in str(err.value) and "data-path" in str(err.value)


def test_missing_or_garbage_file(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="does not exist"):
        site_file.load(tmp_path / "nope.npz", task="medical", num_sites=4, input_shape=(13,))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SiteDataError, match="not a readable .npz"):
        site_file.load(tmp_path / "junk.npz", task="medical", num_sites=4, input_shape=(13,))


def test_certificates_chain_and_names(tmp_path: Path) -> None:
    files = pki.make_certificates(tmp_path, ["localhost", "link.example.org"], ["127.0.0.1"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert files.server_key.stat().st_mode & 0o077 == 0 and files.ca_key.stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="--ip"):
        pki.make_certificates(tmp_path / "x", [], ["300.1.1.1"])


def test_supernode_keys_are_p384_openssh(tmp_path: Path) -> None:
    (private, public), = pki.make_supernode_keys(tmp_path, 1)
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    pub = serialization.load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert key.public_key().public_numbers() == pub.public_numbers()  # type: ignore[union-attr]
    assert private.stat().st_mode & 0o077 == 0


@pytest.mark.slow
def test_cli_errors_are_clear(tmp_path: Path) -> None:
    for args, text in ((["data", "split", "--out", str(tmp_path), "task=medical", "partition.alpha=-1"], "partition.alpha"),
                       (["certs", "--out", str(tmp_path)], "at least one --host"),
                       (["deploy", "local", "--sites", "5", "task=medical"], "natural split has only 4")):
        proc = subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and text in proc.stderr, (args, proc.stderr[-500:])
