"""Key and secret files (issue #33, attack 10): written 0600 also over an old file, read only when private."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.secret_files import SecretFileError, read_private, write_private


def test_a_secret_overwritten_over_a_world_readable_file_becomes_private(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_private(path, b"new")
    assert path.stat().st_mode & 0o777 == 0o600 and read_private(path) == b"new"


def test_a_group_or_world_readable_secret_is_refused_and_a_link_is_not_followed(tmp_path: Path) -> None:
    path = tmp_path / "key"
    write_private(path, b"secret")
    path.chmod(0o640)
    with pytest.raises(SecretFileError, match="chmod 600"):
        read_private(path)
    path.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(SecretFileError, match="symbolic link"):
        read_private(link)
    # a link planted where a key will be written is replaced, its target untouched
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    planted = tmp_path / "new-key"
    planted.symlink_to(target)
    write_private(planted, b"fresh")
    assert target.read_bytes() == b"keep" and not planted.is_symlink() and read_private(planted) == b"fresh"


def test_paillier_keys_regenerated_are_private_and_a_key_pair_is_no_public_key(tmp_path: Path) -> None:
    from aggregation.paillier import keys

    private, public = keys.generate(tmp_path)
    private.chmod(0o644)
    with pytest.raises(keys.PaillierKeyError, match="chmod 600"):
        keys.load_private(private)
    private, public = keys.generate(tmp_path)  # regenerated over the 0644 file
    assert private.stat().st_mode & 0o777 == 0o600
    keys.load_private(private)
    with pytest.raises(keys.PaillierKeyError, match="is the sites' key pair, not the public key"):
        keys.load_public(private)
    assert keys.load_public(public).n == keys.load_private(private).public_key.n


def test_tls_and_node_keys_are_private(tmp_path: Path) -> None:
    from app.runtime import pki

    certs = pki.make_certificates(tmp_path / "pki", hosts=["localhost"], ips=["127.0.0.1"])
    (priv, _), = pki.make_supernode_keys(tmp_path / "nodes", 1)
    for path in (certs.ca_key, certs.server_key, priv):
        assert os.stat(path).st_mode & 0o777 == 0o600, path
