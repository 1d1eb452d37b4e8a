"""Paillier key files: the sites' key pair and the server's public-key-only file.

Threat model (``docs/paillier.md`` once wired): the sites share one key pair, provisioned
out of band (``fedsilo keys paillier --out DIR``); the server holds only the public key.
Both files are JSON with the key material in hexadecimal and a fingerprint of the modulus
(SHA-256), so that a server and a site holding keys of different pairs find out at start,
with a message naming the files, instead of producing garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from phe import paillier

from core.secret_files import SecretFileError, read_private, write_private

MIN_KEY_BITS = 2048
PRIVATE_FILE = "paillier_keypair.json"
PUBLIC_FILE = "paillier_public.json"


class PaillierKeyError(ValueError):
    """A key file is missing, unreadable, malformed, too short or from another pair."""


def fingerprint(n: int) -> str:
    """A short, stable fingerprint of a public modulus ``n`` (names a key pair in messages and files)."""
    return hashlib.sha256(n.to_bytes((n.bit_length() + 7) // 8, "big")).hexdigest()[:32]


def generate(out: Path, bits: int = MIN_KEY_BITS) -> tuple[Path, Path]:
    """Write a fresh key pair (private file, mode 0600) and its public-key file to ``out``."""
    if bits < MIN_KEY_BITS:
        raise PaillierKeyError(f"Paillier key size {bits} is below the minimum {MIN_KEY_BITS} bits")
    public, private = paillier.generate_paillier_keypair(n_length=bits)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(public.n)
    private_path, public_path = out / PRIVATE_FILE, out / PUBLIC_FILE
    write_private(private_path, json.dumps({"kind": "fedsilo-paillier-keypair", "bits": bits, "fingerprint": fp,
                                            "n": hex(public.n), "p": hex(private.p), "q": hex(private.q)},
                                           indent=1).encode())
    public_path.write_text(json.dumps({"kind": "fedsilo-paillier-public", "bits": bits, "fingerprint": fp,
                                       "n": hex(public.n)}, indent=1) + "\n")
    return private_path, public_path


def _read(path: Path, kind: str) -> dict:
    try:
        data = json.loads(Path(path).read_bytes().decode())
        if kind == "fedsilo-paillier-keypair" and isinstance(data, dict) and data.get("kind") == kind:
            read_private(path, "Paillier key pair")  # a private key readable by others, or a link: refused
    except FileNotFoundError:
        raise PaillierKeyError(f"Paillier key file {path} does not exist (make one with: fedsilo keys paillier "
                               "--out DIR)") from None
    except SecretFileError as err:
        raise PaillierKeyError(str(err)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PaillierKeyError(f"Paillier key file {path} cannot be read: {err}") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise PaillierKeyError(f"{path} is not a {kind} file (kind={data.get('kind') if isinstance(data, dict) else None!r})")
    try:
        n = int(data["n"], 16)
    except (KeyError, TypeError, ValueError):
        raise PaillierKeyError(f"{path}: modulus 'n' is missing or not hexadecimal") from None
    if n.bit_length() < MIN_KEY_BITS:
        raise PaillierKeyError(f"{path}: a {n.bit_length()}-bit key is below the minimum {MIN_KEY_BITS} bits")
    if data.get("fingerprint") != fingerprint(n):
        raise PaillierKeyError(f"{path}: the fingerprint does not match the modulus (file altered?)")
    data["n"] = n
    return data


def load_public(path: Path) -> paillier.PaillierPublicKey:
    """The public key from a public-key file. A key-pair file is refused: whoever is handed a
    public key (the coordinator) must never be handed the private one by mistake."""
    try:
        data = _read(path, "fedsilo-paillier-public")
    except PaillierKeyError as err:
        if "is not a" in str(err) and '"fedsilo-paillier-keypair"' in Path(path).read_text(errors="replace"):
            raise PaillierKeyError(f"{path} is the sites' key pair, not the public key: give the coordinator "
                                   f"{PUBLIC_FILE} (the key pair never leaves the sites)") from None
        raise
    return paillier.PaillierPublicKey(data["n"])


def load_private(path: Path) -> paillier.PaillierPrivateKey:
    """The key pair from a key-pair file; checks that ``p * q == n``."""
    data = _read(path, "fedsilo-paillier-keypair")
    try:
        p, q = int(data["p"], 16), int(data["q"], 16)
    except (KeyError, TypeError, ValueError):
        raise PaillierKeyError(f"{path}: primes 'p'/'q' are missing or not hexadecimal") from None
    public = paillier.PaillierPublicKey(data["n"])
    try:
        return paillier.PaillierPrivateKey(public, p, q)
    except ValueError as err:
        raise PaillierKeyError(f"{path}: {err}") from None


def check_pair(public: paillier.PaillierPublicKey, private: paillier.PaillierPrivateKey,
               public_path: Path, private_path: Path) -> None:
    """Fail clearly when the server's public key and a site's key pair are not one pair."""
    if public.n != private.public_key.n:
        raise PaillierKeyError(f"the public key {public_path} (fingerprint {fingerprint(public.n)[:12]}) does not "
                               f"belong to the key pair {private_path} (fingerprint "
                               f"{fingerprint(private.public_key.n)[:12]})")
