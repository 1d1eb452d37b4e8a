"""Long-term signing identities (Ed25519) and the consortium's roster of them.

A site (or a vertical party) holds one Ed25519 private key for years, in a 0600 file (hex), and
the consortium distributes the public halves out of band, as it distributes its CA: a **roster**,
a JSON file ``{"sites": {name: public key hex}}``. A protocol key is trusted only if it is signed
by the identity the roster lists under the name it claims; the coordinator relays keys and
signatures and cannot make one (``cryptography``'s Ed25519: 32-byte keys, 64-byte signatures).

Simulated sites (one process, one operator) have identities derived from their names
(:meth:`SiteIdentity.simulated`): the same code signs and verifies, so the protocol and its
refusals run in a simulation as in a deployment, but a simulated identity proves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityError(ValueError):
    """An identity key or roster that cannot be used, or a signature that does not verify."""


def new_identity() -> bytes:
    """A fresh Ed25519 identity key (raw 32 bytes)."""
    return Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                       serialization.NoEncryption())


def identity_public(identity: bytes) -> bytes:
    """The raw 32-byte public key of an identity key."""
    return Ed25519PrivateKey.from_private_bytes(identity).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_fingerprint(public: bytes) -> str:
    """A short name for a public identity key (logs, refusals)."""
    return hashlib.sha256(b"fedsilo-party|" + public).hexdigest()[:16]


def write_identity(path: str | os.PathLike[str]) -> bytes:
    """Make an identity key file (0600; hex) and return its public key."""
    from core.secret_files import write_private

    identity = new_identity()
    write_private(Path(path), identity.hex().encode() + b"\n")
    return identity_public(identity)


def load_identity(path: str | os.PathLike[str], what: str = "identity key") -> bytes:
    """The identity key in a 0600 file written by :func:`write_identity`."""
    from core.secret_files import read_private

    try:
        raw = bytes.fromhex(read_private(Path(path), what).decode().strip())
    except (ValueError, UnicodeDecodeError) as err:
        raise IdentityError(f"{what} {path}: not a hexadecimal Ed25519 key ({err})") from None
    except FileNotFoundError:
        raise IdentityError(f"{what} {path} does not exist") from None
    if len(raw) != KEY_BYTES:
        raise IdentityError(f"{what} {path}: {len(raw)} bytes, expected {KEY_BYTES}")
    return raw


def load_roster(path: str | os.PathLike[str], section: str = "sites") -> dict[str, bytes]:
    """The public identities a roster file lists: JSON ``{"<section>": {name: public key hex}}``."""
    try:
        doc = json.loads(Path(path).read_text())
        out = {str(k): bytes.fromhex(str(v)) for k, v in doc[section].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise IdentityError(f"roster {path}: expected JSON {{\"{section}\": {{name: public key hex}}}} "
                            f"({type(err).__name__}: {err})") from None
    bad = sorted(k for k, v in out.items() if len(v) != KEY_BYTES)
    if bad:
        raise IdentityError(f"roster {path}: the keys of {bad} are not {KEY_BYTES}-byte Ed25519 public keys")
    return out


def write_roster(path: str | os.PathLike[str], public: dict[str, bytes], section: str = "sites") -> Path:
    """A roster file listing ``public`` (name -> public key)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({section: {k: v.hex() for k, v in sorted(public.items())}}, indent=1) + "\n")
    return path


def provision(out: str | os.PathLike[str], names: list[str], key_file: str = "site.key",
              roster_file: str = "roster.json") -> dict[str, tuple[str, str]]:
    """Each name's identity (``<out>/<name>/<key_file>``, 0600) and one roster of every public key
    (``<out>/<roster_file>``), for a demo or a local deployment in which one operator plays every
    site. In a consortium each site makes its own key (:func:`write_identity`) and the public halves
    are collected out of band. Returns name -> (key path, roster path)."""
    root = Path(out)
    public = {n: write_identity(root / n / key_file) for n in names}
    roster = write_roster(root / roster_file, public).resolve()
    return {n: (str((root / n / key_file).resolve()), str(roster)) for n in names}


def _simulated_key(name: str) -> bytes:
    return hashlib.sha256(b"fedsilo-simulated-identity-v1|" + name.encode()).digest()


@dataclass
class SiteIdentity:
    """A site's own name and signing key, and the roster it trusts.

    ``roster`` None: a simulation, in which every name's identity is derived from the name
    (:meth:`simulated`).
    """

    name: str
    key: bytes = field(repr=False)
    roster: dict[str, bytes] | None = None
    _signer: Ed25519PrivateKey | None = field(default=None, repr=False, compare=False)
    _verifiers: dict[str, Ed25519PublicKey] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def simulated(cls, name: str) -> SiteIdentity:
        """A simulated site's identity, derived from its name (no security claim: for simulations only)."""
        return cls(name, _simulated_key(name))

    @classmethod
    def load(cls, name: str, key_path: str | os.PathLike[str], roster_path: str | os.PathLike[str]) -> SiteIdentity:
        """A deployed site's identity: its key file and the roster; refused if the roster lists
        another key under this site's name (the wrong key file, or a roster that does not know it)."""
        key, roster = load_identity(key_path, "site identity key"), load_roster(roster_path)
        if name not in roster:
            raise IdentityError(f"roster {roster_path} does not list this site ({name!r}); it lists {sorted(roster)}")
        if roster[name] != identity_public(key):
            raise IdentityError(f"roster {roster_path} lists key {key_fingerprint(roster[name])} for {name!r}, but "
                                f"this site's key {key_path} is {key_fingerprint(identity_public(key))}")
        return cls(name, key, roster)

    @property
    def simulation(self) -> bool:
        """Whether this is a simulated identity (no roster)."""
        return self.roster is None

    def public(self) -> bytes:
        """The identity's Ed25519 public key."""
        return identity_public(self.key)

    def sign(self, statement: bytes) -> bytes:
        """The identity's signature of ``statement``."""
        if self._signer is None:
            self._signer = Ed25519PrivateKey.from_private_bytes(self.key)
        return self._signer.sign(statement)

    def knows(self, name: str) -> bool:
        """Whether ``name`` is on the roster (a simulated identity knows every name)."""
        return self.roster is None or name in self.roster

    def verify(self, name: str, statement: bytes, signature: bytes) -> None:
        """:class:`IdentityError` unless ``signature`` is ``name``'s, by the roster, over ``statement``."""
        if not self.knows(name):
            raise IdentityError(f"{name!r} is not on this site's roster")
        verifier = self._verifiers.get(name)
        if verifier is None:
            public = identity_public(_simulated_key(name)) if self.roster is None else self.roster[name]
            verifier = self._verifiers[name] = Ed25519PublicKey.from_public_bytes(public)
        try:
            verifier.verify(bytes(signature), statement)
        except (InvalidSignature, ValueError, TypeError):
            raise IdentityError(f"the key {name!r} presents is not signed by {name!r}'s identity on the roster "
                                "(forged or substituted in transit)") from None
