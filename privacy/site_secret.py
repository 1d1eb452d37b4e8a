"""The site's own secret in its DP-SGD randomness, so the coordinator cannot predict the noise.

A round's seed is ``seed_for(config seed, round, site)``: reproducible, and known to whoever
knows the config, the coordinator included. DP-SGD's guarantee needs noise the coordinator
cannot predict (a coordinator that can regenerate the noise can subtract it). So a site that
runs as a deployed node mixes a secret of its own into the seed of its DP-SGD generator
(Poisson sampling, noise, dropout):

* node config ``dp-noise-seed``: the operator's own secret (a string; the same secret gives
  the same numbers, so a site can reproduce its own runs);
* else, when the node config names a ``state-dir`` (every deployed site: ``fedsilo site`` and
  ``fedsilo deploy local`` set it), 32 random bytes from the operating system, made once and
  kept in ``<state-dir>/dp-noise-secret`` (mode 0600);
* else (the simulation engine, where the whole federation is one process and one operator)
  the public seed, so simulated runs reproduce bit for bit.

The derived seed is SHA-256(secret || seed || digest of the release's inputs), truncated to 63 bits: without the secret it is
unpredictable; PyTorch's generator itself is not a cryptographic one (docs/privacy.md).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from core.secret_files import read_private

SECRET_FILE = "dp-noise-secret"


def _secret(node_config: Any) -> bytes | None:
    given = node_config.get("dp-noise-seed")
    if given is not None and str(given) != "":
        return str(given).encode()
    state_dir = node_config.get("state-dir")
    if not state_dir:
        return None
    path = Path(str(state_dir)).expanduser() / SECRET_FILE
    try:
        secret = read_private(path, "the site's DP noise secret")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = os.urandom(32)
        try:  # O_EXCL: two processes of one site racing keep the first secret
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return read_private(path, "the site's DP noise secret")
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
    if len(secret) < 16:
        raise ValueError(f"{path}: the site's DP noise secret is {len(secret)} bytes; expected 32 (delete it to make a new one)")
    return secret


def noise_seed(node_config: Any, seed: int, inputs: str = "") -> int:
    """The seed of the site's DP-SGD generator for a release whose public seed is ``seed`` and
    whose inputs have the digest ``inputs`` (:func:`privacy.site_ledger.digest_release`: the job,
    the round, the received model's bytes, the mechanism). Any change of input gives fresh noise: a
    coordinator that re-sends a round with another model cannot make two releases share their
    noise (their difference would be noise-free); a byte-identical replay gives the same bytes."""
    secret = _secret(node_config)
    if secret is None:
        return seed
    digest = hashlib.sha256(secret + b"|" + str(int(seed)).encode() + b"|" + inputs.encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def keeps_secret(node_config: Any) -> bool:
    """Whether this site's noise is beyond the coordinator's prediction (see module docstring)."""
    return bool(node_config.get("dp-noise-seed") or node_config.get("state-dir"))
