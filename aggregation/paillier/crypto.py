"""Fast Paillier encryption for key holders, and ciphertext checks for the server.

Sites hold the private key, so they can compute the expensive part of an encryption, the
obfuscator ``r^n mod n^2`` (over 99 % of the time), by the Chinese remainder theorem on
half-size moduli ``p^2`` and ``q^2``, with half-length exponents (:class:`Encryptor`; for a
given ``r`` the result is bit-for-bit what ``phe``'s ``raw_encrypt`` returns, tested), or,
as an explicit option under an extra assumption, DJN's short-exponent obfuscators from
fixed-base tables. Obfuscators do not depend on the message, so a site can also
compute them ahead of the round (:meth:`Encryptor.obfuscators`), leaving two
multiplications per ciphertext on the critical path. Decryption is ``phe``'s own, which
already uses CRT. Work is spread over processes with :func:`parallel_map`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

import gmpy2
from phe import paillier

from aggregation.paillier.config import OBFUSCATORS

T = TypeVar("T")
R = TypeVar("R")


#: Bits of each fixed-base window of the ``djn`` tables.
WINDOW = 8


def djn_base(n: int) -> int:
    """The DJN base ``h_s = (-x^2)^n mod n^2`` of a key, with ``x`` derived from ``n`` by SHA-256
    (nothing up the sleeve; every holder of the key derives the same public base)."""
    nsquare = n * n
    seed = hashlib.sha256(b"fedsilo-paillier-djn" + n.to_bytes((n.bit_length() + 7) // 8, "big")).digest()
    x = int.from_bytes(hashlib.sha512(seed).digest() * 4, "big") % n
    return int(gmpy2.powmod((-x * x) % n, n, nsquare))


class _FixedBase:
    """``base^e mod m`` for one base and exponents below ``2^bits``: a table of
    ``base^(d * 2^(WINDOW*i))`` for every window ``i`` and digit ``d``, so an exponentiation is
    ``bits / WINDOW`` multiplications and no squaring (Brickell et al.'s fixed-base method)."""

    def __init__(self, base: int, modulus: int, bits: int) -> None:
        self.m = gmpy2.mpz(modulus)
        self.windows = -(-bits // WINDOW)
        self.table: list[list[gmpy2.mpz]] = []
        b = gmpy2.mpz(base) % self.m
        for _ in range(self.windows):
            row = [gmpy2.mpz(1), b]
            for _ in range(2, 1 << WINDOW):
                row.append(row[-1] * b % self.m)
            self.table.append(row)
            b = row[-1] * b % self.m  # base^(2^WINDOW) of this window = the next window's base

    def pow(self, e: int) -> gmpy2.mpz:
        m, mask, acc = self.m, (1 << WINDOW) - 1, gmpy2.mpz(1)
        for row in self.table:
            d = e & mask
            if d:
                acc = acc * row[d] % m
            e >>= WINDOW
        return acc


class Encryptor:
    """Paillier encryption with the private key's CRT shortcut (``g = n + 1``).

    Obfuscators, the expensive part of an encryption, in one of two ways:

    * ``full`` (default; Paillier's own): a uniformly random ``n``-th residue ``r^n mod n^2``.
      Made by CRT as ``(a^p mod p^2, b^q mod q^2)`` for uniform ``a`` mod ``p``, ``b`` mod ``q``:
      when ``gcd(p, q-1) = gcd(q, p-1) = 1`` (checked; true for keys of distinct safe-size primes
      but for a negligible share) the ``n``-th residues mod ``p^2`` are exactly the ``p``-th
      powers, so this has the distribution of ``r^n`` for uniform ``r`` (same security, no new
      assumption) with half-length exponents. With an explicit ``r``, ``r^n`` itself (bit for bit
      ``phe``'s ``raw_encrypt``).
    * ``djn`` (``aggregation.obfuscators=djn``; Damgard-Jurik-Nielsen 2010, as Intel's IPCL):
      ``h_s^a mod n^2`` for a public base ``h_s`` (:func:`djn_base`) and a uniform ``a`` of
      ``ceil(bits(n)/2)`` bits, by fixed-base tables (:class:`_FixedBase`). Semantic security
      then rests on DCR **and** the assumption that such short-exponent powers of ``h_s`` are
      indistinguishable from random ``n``-th residues (docs/paillier.md).
    """

    def __init__(self, private: paillier.PaillierPrivateKey, obfuscators: str = "full") -> None:
        if obfuscators not in OBFUSCATORS:
            raise ValueError(f"aggregation.obfuscators={obfuscators!r} is invalid: allowed one of {list(OBFUSCATORS)}")
        p, q = gmpy2.mpz(private.p), gmpy2.mpz(private.q)
        self.kind = obfuscators
        self.p, self.q = p, q
        self.n = gmpy2.mpz(private.public_key.n)
        self.nsquare = self.n * self.n
        self.p2, self.q2 = p * p, q * q
        self.ep, self.eq = self.n % (p * (p - 1)), self.n % (q * (q - 1))
        self.p2_inv = gmpy2.invert(self.p2, self.q2)
        self.hp, self.hq = gmpy2.mpz(private.hp), gmpy2.mpz(private.hq)
        self.p_inv_q = gmpy2.invert(p, q)
        self.residues_by_prime = gmpy2.gcd(p, q - 1) == 1 and gmpy2.gcd(q, p - 1) == 1
        self._djn: tuple[_FixedBase, _FixedBase] | None = None
        self.djn_bits = (int(self.n).bit_length() + 1) // 2

    def _crt(self, xp: gmpy2.mpz, xq: gmpy2.mpz) -> int:
        return int(xp + self.p2 * (((xq - xp) * self.p2_inv) % self.q2))

    def _tables(self) -> tuple[_FixedBase, _FixedBase]:
        if self._djn is None:
            h = djn_base(int(self.n))
            self._djn = (_FixedBase(h, int(self.p2), self.djn_bits), _FixedBase(h, int(self.q2), self.djn_bits))
        return self._djn

    def obfuscator(self, r: int | None = None) -> int:
        """A fresh obfuscator of this encryptor's kind, or ``r^n mod n^2`` for a given ``r``."""
        if r is not None:
            rr = gmpy2.mpz(r)
            return self._crt(gmpy2.powmod(rr % self.p2, self.ep, self.p2), gmpy2.powmod(rr % self.q2, self.eq, self.q2))
        if self.kind == "djn":
            tp, tq = self._tables()
            a = secrets.randbits(self.djn_bits)
            return self._crt(tp.pow(a), tq.pow(a))
        if self.residues_by_prime:
            a = gmpy2.mpz(secrets.randbelow(int(self.p) - 1) + 1)
            b = gmpy2.mpz(secrets.randbelow(int(self.q) - 1) + 1)
            return self._crt(gmpy2.powmod(a, self.p, self.p2), gmpy2.powmod(b, self.q, self.q2))
        return self.obfuscator(secrets.randbelow(int(self.n) - 1) + 1)

    def obfuscators(self, count: int) -> list[int]:
        """``count`` fresh obfuscators (``r^n mod n^2``), one per ciphertext to come."""
        return [self.obfuscator() for _ in range(count)]

    def decrypt(self, ciphertext: int) -> int:
        """``phe``'s CRT decryption (``L(c^(p-1) mod p^2) * hp mod p``, the same mod ``q``,
        recombined), bit for bit, without its per-call overhead (tested against ``raw_decrypt``)."""
        c = gmpy2.mpz(ciphertext)
        mp = (gmpy2.powmod(c, self.p - 1, self.p2) - 1) // self.p * self.hp % self.p
        mq = (gmpy2.powmod(c, self.q - 1, self.q2) - 1) // self.q * self.hq % self.q
        return int(mp + (mq - mp) * self.p_inv_q % self.q * self.p)

    def encrypt(self, plaintext: int, obfuscator: int | None = None) -> int:
        """The ciphertext of ``0 <= plaintext < n``."""
        if not 0 <= plaintext < self.n:
            raise ValueError("plaintext must be in [0, n)")
        obf = self.obfuscator() if obfuscator is None else obfuscator
        return int(((self.n * plaintext + 1) * obf) % self.nsquare)


def add_ciphertexts(public: paillier.PaillierPublicKey, columns: Sequence[Sequence[int]]) -> list[int]:
    """Element-wise homomorphic sum of several sites' ciphertext vectors (the server's work)."""
    n2 = gmpy2.mpz(public.nsquare)
    out = [gmpy2.mpz(c) for c in columns[0]]
    for col in columns[1:]:
        for i, c in enumerate(col):
            out[i] = (out[i] * c) % n2
    return [int(c) for c in out]


def check_ciphertexts(public: paillier.PaillierPublicKey, cts: Sequence[Any], expected: int) -> str | None:
    """Why a site's ciphertext vector must be rejected, or None.

    Catches malformed vectors (count, type, range) and, cheaply, most ciphertexts under a
    different key: a valid ciphertext is a unit of Z_(n^2), i.e. coprime to ``n``.
    """
    if len(cts) != expected:
        return f"{len(cts)} ciphertexts, expected {expected}"
    n, n2 = gmpy2.mpz(public.n), gmpy2.mpz(public.nsquare)
    for k, c in enumerate(cts):
        if not isinstance(c, int) or not 0 < c < n2:
            return f"ciphertext {k} is not an integer in (0, n^2): wrong key size or corrupt"
        if gmpy2.gcd(c, n) != 1:
            return f"ciphertext {k} is not a unit mod n^2: not a Paillier ciphertext under this key"
    return None


_KEYS: dict[tuple[int, str], tuple[paillier.PaillierPrivateKey, Encryptor]] = {}


def _key(p: int, q: int, n: int, kind: str = "full") -> tuple[paillier.PaillierPrivateKey, Encryptor]:
    if (n, kind) not in _KEYS:
        private = paillier.PaillierPrivateKey(paillier.PaillierPublicKey(n), p, q)
        _KEYS[(n, kind)] = (private, Encryptor(private, kind))
    return _KEYS[(n, kind)]


def obfuscators_job(p: int, q: int, n: int, count: int, kind: str = "full") -> list[int]:
    """Worker job: ``count`` fresh obfuscators of ``kind``."""
    return _key(p, q, n, kind)[1].obfuscators(count)


def decrypt_job(p: int, q: int, n: int, cts: list[int]) -> list[int]:
    """Worker job: CRT decryption of ``cts``."""
    enc = _key(p, q, n)[1]
    return [enc.decrypt(c) for c in cts]


def chunks(items: list[T], parts: int) -> list[list[T]]:
    """``items`` in at most ``parts`` consecutive chunks of equal size (the last may be shorter)."""
    size = max(1, -(-len(items) // max(1, parts)))
    return [items[i : i + size] for i in range(0, len(items), size)]


def many_obfuscators(private: paillier.PaillierPrivateKey, count: int, workers: int, kind: str = "full") -> list[int]:
    """``count`` obfuscators of ``kind`` over ``workers`` processes (1 = this process)."""
    key = (private.p, private.q, private.public_key.n)
    if workers == 1:
        return _key(*key, kind)[1].obfuscators(count)
    parts = [len(c) for c in chunks(list(range(count)), workers)]
    return [o for part in parallel_map(obfuscators_job, [(*key, k, kind) for k in parts], workers) for o in part]


def decrypt_all(private: paillier.PaillierPrivateKey, cts: list[int], workers: int) -> list[int]:
    """Decrypt ``cts`` over ``workers`` processes (1 = this process)."""
    key = (private.p, private.q, private.public_key.n)
    if workers == 1:
        enc = _key(*key)[1]
        return [enc.decrypt(c) for c in cts]
    return [m for part in parallel_map(decrypt_job, [(*key, c) for c in chunks(cts, workers)], workers) for m in part]


def _call(args: tuple[Callable[..., R], tuple]) -> R:
    fn, a = args
    return fn(*a)


_POOL: ProcessPoolExecutor | None = None


def parallel_map(fn: Callable[..., R], jobs: list[tuple], workers: int | None = None) -> list[R]:
    """``[fn(*job) for job in jobs]`` over ``workers`` processes (0/None: all cores).

    The pool is started once per process with ``spawn`` (safe inside Flower's threaded
    runtimes, about a second to start) and reused.
    """
    global _POOL
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < 2:
        return [fn(*job) for job in jobs]
    if _POOL is None or _POOL._max_workers != workers:  # type: ignore[attr-defined]  # noqa: SLF001
        _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    return list(_POOL.map(_call, [(fn, job) for job in jobs]))


def key_from_pair(p: int, q: int, info: bytes) -> bytes:
    """A 32-byte symmetric key every holder of the key pair derives from its primes (HKDF-SHA256,
    ``info`` naming its use), and nobody else can: the sites' shared secret for sealing and MACs."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    width = (max(p, q).bit_length() + 7) // 8
    ikm = min(p, q).to_bytes(width, "big") + max(p, q).to_bytes(width, "big")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)
